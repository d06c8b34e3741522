"""scripts/union_sparsity.py: which inputs each site keeps, and their union over a batch, on the tiny model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cats_jax import cli
from cats_jax.model import init_random, sown_by_site
from cats_jax.sparsity import CATS_SITE, TEAL_SITES

_SCRIPT = Path(__file__).parents[1] / "scripts" / "union_sparsity.py"
_spec = importlib.util.spec_from_file_location("union_sparsity", _SCRIPT)
us = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(us)


# Near the median |input| of each site of the tiny model (k, v, up: other thresholds than q, gate)
THRESHOLDS = {CATS_SITE: 0.25, "attn.q_proj": 0.7, "attn.k_proj": 0.5, "attn.v_proj": 0.9, "attn.o_proj": 0.4,
              "mlp.gate_proj": 0.7, "mlp.up_proj": 0.5, "mlp.down_proj": 0.15}


def _model(tiny_cfg, mode):
    model = init_random(tiny_cfg(), seed=0, dtype=jnp.float32)
    model.set_mode(mode)
    for site in TEAL_SITES if mode == "teal" else (CATS_SITE,):
        model.set_thresholds(site, np.full(model.cfg.num_layers, THRESHOLDS[site]))
    return model


def _rows(cfg, docs, length, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (docs, length)).astype(np.int32)


@pytest.mark.parametrize("mode", ["cats", "teal"])
def test_keep_masks_are_what_the_sparse_model_keeps(tiny_cfg, mode):
    """Per token, the kept fraction equals the one the model itself sows (nnx.Intermediate), and
    each site is partly sparse (so the thresholds reached it)."""
    model = _model(tiny_cfg, mode)
    tokens = jnp.asarray(_rows(model.cfg, 2, 12))
    kept = us.keep_masks(model, tokens)
    positions = jnp.broadcast_to(jnp.arange(12), tokens.shape)
    _, inter = nnx.capture(model.hidden, nnx.Intermediate)(tokens, positions)
    sown = sown_by_site(nnx.to_pure_dict(inter), "active_fraction")
    assert set(kept) == set(sown) == set(model.sites)
    for site, k in kept.items():
        assert k.shape[-1] == us.site_inputs(model.cfg, site)
        np.testing.assert_allclose(np.mean(np.asarray(k), axis=-1), np.asarray(sown[site]), atol=1e-6)
        assert 0.05 < 1 - np.mean(np.asarray(k)) < 0.95, site


def test_identical_documents_give_the_single_token_sparsity(tiny_cfg):
    model = _model(tiny_cfg, "teal")
    rows = np.repeat(_rows(model.cfg, 1, 16), 8, axis=0)  # 8 copies of one document
    sample_pos = np.full((8, 1), 9, np.int32)  # the same position of each
    batches = us.draw_batches(8, 1, (1, 2, 8), 4, seed=0)
    out = us.measure(model, rows, (1, 2, 8), 4, sample_pos, batches, rows_per_call=4, progress=False)
    single = out["different_docs"][1]
    for b in (2, 8):
        for site in model.sites:
            np.testing.assert_allclose(out["different_docs"][b][site], single[site])
            assert 0 < np.mean(single[site]) < 1


def test_union_of_different_documents(tiny_cfg):
    """Each batch's union sparsity equals np.any over its rows' masks and is no larger than any of
    its rows' sparsity; over the batches, union sparsity falls with B."""
    model = _model(tiny_cfg, "cats")
    rows = _rows(model.cfg, 6, 10, seed=1)
    kept = np.asarray(us.keep_masks(model, jnp.asarray(rows))[CATS_SITE])  # [L, D, T, n]
    packed = np.packbits(np.transpose(kept, (1, 2, 0, 3)), axis=-1)  # [D, K=T, L, n / 8]
    n = us.site_inputs(model.cfg, CATS_SITE)
    rng = np.random.default_rng(0)
    for b in (2, 3, 6):
        docs, pos = rng.permutation(6)[:b][None], rng.integers(10, size=(1, b))
        union = us.cross_doc_union(packed, n, docs, pos)
        members = kept[:, docs[0], pos[0]]  # [L, B, n]
        np.testing.assert_allclose(union, 1 - np.mean(np.any(members, axis=1), axis=-1))
        assert np.all(union[:, None] <= 1 - np.mean(members, axis=-1) + 1e-9)
    means = [np.mean(us.cross_doc_union(packed, n, *us.draw_batches(6, 10, (b,), 32, seed=2)[b])) for b in (1, 2, 4)]
    assert means[0] > means[1] > means[2]


def test_consecutive_union_blocks():
    kept = np.random.default_rng(0).random((2, 3, 11, 16)) < 0.3  # [L, R, T, n]
    got = np.asarray(us.consecutive_union(jnp.asarray(kept), 4))  # 2 blocks, the 3-token tail left out
    want = np.stack([1 - np.mean(np.any(kept[:, :, 4 * j:4 * j + 4], axis=2), axis=-1) for j in range(2)], axis=-1)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(cli.InputError, match="--cats"):
        us.main(["--data-file", str(tmp_path / "x.jsonl")])
    with pytest.raises(cli.InputError, match="no CATS thresholds"):
        us.main(["--cats", str(tmp_path), "--data-file", str(tmp_path / "x.jsonl")])


def test_the_script_runs_a_calibrated_checkpoint(calibrated, tmp_path, capsys):
    ckpt, text, _ = calibrated
    out = tmp_path / "union.json"
    us.main(["--cats", str(ckpt), "--data-file", str(text), "--sparsity", "0.5", "--docs", "8", "--seq-len", "32",
             "--skip", "8", "--samples-per-doc", "4", "--batches", "8", "--batch-sizes", "1,2", "--dtype", "float32",
             "--out", str(out)])
    assert "CATS" in capsys.readouterr().out
    union = json.loads(out.read_text())["union_sparsity"]["cats"]["0.5"]["different_docs"]
    one, two = (np.array(union[b][CATS_SITE]) for b in ("1", "2"))  # per layer
    assert np.all(two <= one) and 0.3 < one.mean() < 0.7  # a batch's union keeps at least one row's inputs
