"""The thresholds file: calibrations add to it (levels and methods), replacing one needs force,
another model's file is refused, version 1 files still read, the file is world-readable."""

import json
import stat

import jax.numpy as jnp
import pytest

from cats_jax import thresholds
from cats_jax.config import ModelConfig
from cats_jax.model import init_random
from cats_jax.sparsity import CATS_SITE, TEAL_SITES

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, name="tiny")


@pytest.fixture(scope="module")
def model():
    return init_random(CFG, seed=0, dtype=jnp.float32)


def cats(model, sparsities, tokens=100, t=0.1):
    levels = [thresholds.Level(p, {CATS_SITE: [t] * CFG.num_layers}) for p in sparsities]
    return thresholds.Thresholds(thresholds.model_identity(model), "cats", levels, {"tokens": tokens})


def teal(model, sparsities):
    sites = TEAL_SITES + (CATS_SITE,)
    levels = [thresholds.Level(p, {s: [0.2] * CFG.num_layers for s in sites}) for p in sparsities]
    return thresholds.Thresholds(thresholds.model_identity(model), "teal", levels, {"allocation": "uniform"})


def test_a_run_adds_its_levels_and_methods_to_the_file(model, tmp_path):
    cats(model, [0.3, 0.5, 0.7], tokens=100).save(tmp_path)
    cats(model, [0.4], tokens=200).save(tmp_path)  # one more level: the others stay
    teal(model, [0.5]).save(tmp_path)  # another method: the CATS levels stay
    methods = thresholds.read(tmp_path)
    assert set(methods) == {"cats", "teal"}
    kept = methods["cats"]
    assert kept.sparsities == [0.3, 0.4, 0.5, 0.7] and kept.calibration == {"tokens": 200}
    # each level of the earlier run keeps that run's record
    assert [lv.calibration for lv in kept.levels] == [{"tokens": 100}, None, {"tokens": 100}, {"tokens": 100}]
    assert thresholds.load(tmp_path).method == "cats" and thresholds.load(tmp_path, "teal").method == "teal"
    thresholds.load_into(model, tmp_path, 0.4)
    assert model.sites == (CATS_SITE,)
    thresholds.load_into(model, tmp_path, 0.5, mode="cats+teal-attn")  # TEAL's, uniform
    assert set(model.sites) == {CATS_SITE, "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj"}


def test_replacing_a_calibrated_level_needs_force(model, tmp_path):
    cats(model, [0.3, 0.5], t=0.1).save(tmp_path)
    with pytest.raises(thresholds.ThresholdsError, match="already holds cats levels 0.5; pass --force"):
        cats(model, [0.5, 0.6], t=0.2).save(tmp_path)
    assert thresholds.load(tmp_path).sparsities == [0.3, 0.5]  # untouched
    cats(model, [0.5, 0.6], t=0.2).save(tmp_path, force=True)
    th = thresholds.load(tmp_path)
    assert th.sparsities == [0.3, 0.5, 0.6] and th.level(0.3).thresholds[CATS_SITE] == [0.1, 0.1]
    assert th.level(0.5).thresholds[CATS_SITE] == [0.2, 0.2]


def test_another_models_file_is_refused_without_force(model, tmp_path):
    cats(model, [0.5]).save(tmp_path)
    other = init_random(CFG, seed=1, dtype=jnp.float32)
    with pytest.raises(thresholds.ThresholdsError, match="another model .*embedding_sha256.*--force"):
        cats(other, [0.3]).save(tmp_path)
    cats(other, [0.3]).save(tmp_path, force=True)  # the old model's levels are of no use to this one
    assert thresholds.load(tmp_path).sparsities == [0.3]
    thresholds.load(tmp_path).check_model(other)


def test_version_1_files_are_read(model, tmp_path):
    th = cats(model, [0.5])
    v1 = {"format": thresholds.FORMAT, "version": 1, "model": th.model, "method": "cats", "calibration": {"a": 1},
          "levels": [{"sparsity": 0.5, "thresholds": {CATS_SITE: [0.1, 0.1]}, "realised": {}}]}
    (tmp_path / thresholds.FILENAME).write_text(json.dumps(v1))
    got = thresholds.load(tmp_path)
    assert got.sparsities == [0.5] and got.calibration == {"a": 1}
    cats(model, [0.3]).save(tmp_path)  # written back as version 2, with the level of version 1
    assert json.loads((tmp_path / thresholds.FILENAME).read_text())["version"] == 2
    assert thresholds.load(tmp_path).sparsities == [0.3, 0.5]


def test_the_file_is_readable_like_the_rest_of_the_checkpoint(model, tmp_path):
    path = cats(model, [0.5]).save(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == [thresholds.FILENAME]  # no temporary file left
