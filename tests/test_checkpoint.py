"""A damaged checkpoint is one InputError that names the file and says what to do, never a library traceback."""

import json
import shutil

import pytest

from cats_jax import checkpoint, thresholds
from cats_jax.cli import InputError

# A failed orbax restore leaves tensorstore reads that report "Event loop is closed" later, as unraisable.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture
def ckpt(word_ckpt, tmp_path):
    """A copy of the tiny checkpoint that a test may damage."""
    return shutil.copytree(word_ckpt, tmp_path / "ckpt")


def largest_chunk(ckpt):
    return max((p for p in (ckpt / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("size", [0, 100], ids=["emptied", "truncated"])
def test_damaged_params_file(ckpt, size):
    chunk = largest_chunk(ckpt)
    with open(chunk, "r+b") as f:
        f.truncate(size)
    with pytest.raises(InputError, match=r"cannot read the params .*re-convert it") as e:
        checkpoint.load_model(ckpt)
    assert str(ckpt / "params") in str(e.value) and "\n" not in str(e.value)


def test_deleted_tensor_directory(ckpt):
    shutil.rmtree(ckpt / "params" / "layers.1.mlp.up_proj.kernel")
    missing = r"1 of its tensors are missing \(layers\.1\.mlp\.up_proj\.kernel\).*re-convert"
    with pytest.raises(InputError, match=missing):
        checkpoint.load_model(ckpt)


def test_truncated_config_json(ckpt):
    path = ckpt / "config.json"
    path.write_text(path.read_text()[:40])
    with pytest.raises(InputError, match=rf"{path}: not a cats-jax config.json .*re-convert"):
        checkpoint.load_model(ckpt)


def test_thresholds_without_levels(ckpt):
    path = ckpt / thresholds.FILENAME
    d = json.loads(path.read_text())
    for section in d["methods"].values():
        del section["levels"]
    path.write_text(json.dumps(d))
    with pytest.raises(InputError, match=rf"{path}: malformed \(KeyError: 'levels'\); re-calibrate"):
        thresholds.load(ckpt)


def test_a_sparsity_outside_0_1_is_not_sent_to_calibrate(word_ckpt):
    th = thresholds.load(word_ckpt)
    with pytest.raises(InputError, match=r"^sparsity 1.5 is not a fraction in \(0, 1\)$"):
        th.level(1.5)
    with pytest.raises(InputError, match="run python -m cats_jax.calibrate --sparsity 0.3"):
        th.level(0.3)  # a fraction not calibrated: calibrating it is the remedy
