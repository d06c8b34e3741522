"""cats_jax.decode (the prepared inference path) against the model, its kernels in interpret mode,
and the decode-attention kernel against model.attend. Kernel outputs are NaN-poisoned. Some cases
run the int8 copy of the model (cats_jax.quantize): its decode weights and kernels read int8."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bench.decode import random_thresholds
from bench.kernels import threshold_for
from cats_jax import checkpoint, decode
from cats_jax import model as M
from cats_jax.config import ModelConfig
from cats_jax.generate import generate
from cats_jax.sparsity import MODES, teal_input
from conftest import rel_err
from pallas_kernels import attention as A
from pallas_kernels import sparse_gemv as G
from pallas_kernels.attention import AttentionBlocks, decode_attention
from pallas_kernels.common import interpret_on_cpu, poisoned_outputs
from pallas_kernels.norm import add_rms_norm

f32, bf16 = jnp.float32, jnp.bfloat16
CFG = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, name="tiny")


def _model(mode, sparsity=0.5, dtype=f32, shared=True, criterion="magnitude", int8=False):
    """Thresholds from a uniform calibration: q, k, v (and gate, up) share one per layer; with
    shared=False each site's is moved apart, as a greedy allocation would. int8: the model's int8
    copy (int8="head": its LM head int8 too). up-rms: random factors stand for the calibrated ones."""
    m = M.init_random(CFG, seed=3, dtype=dtype)
    m = M.quantize_model(m, head=int8 == "head") if int8 else m
    factors = (np.asarray(jax.random.uniform(jax.random.key(7), (CFG.num_layers, CFG.intermediate_size), f32, 0.2, 2.0))
               if criterion == "up-rms" else None)
    m.set_criterion(criterion, factors=factors)  # before the thresholds: they are quantiles of the criterion's score
    for i, (site, t) in enumerate(random_thresholds(m, [sparsity], tokens=64, seed=0)[sparsity].items()):
        m.set_thresholds(site, np.asarray(t) * (1 if shared else 1 + 0.1 * i))
    m.set_mode(mode)
    return m


forward = jax.jit(decode.forward, static_argnames="plan")


@pytest.fixture
def kernels_on_tiny_weights(monkeypatch):
    monkeypatch.setattr(G, "MIN_KERNEL_WEIGHTS", 0)  # a performance rule; these tests check correctness


@pytest.mark.parametrize("mode,shared,criterion,int8", [
    ("dense", True, "magnitude", False), ("cats", True, "magnitude", False), ("teal", True, "magnitude", False),
    ("teal", False, "magnitude", False), ("cats+teal-attn", False, "magnitude", False),
    ("cats", True, "weighted", False), ("teal", True, "weighted", False), ("cats", True, "up-rms", False),
    ("cats", True, "weighted", True), ("cats", True, "up-rms", True), ("teal", False, "magnitude", True), ("dense", True, "magnitude", True),
    ("dense", True, "magnitude", "head")])
@pytest.mark.parametrize("impl", ["jnp", "pallas"])
def test_forward_equals_the_model(kernels_on_tiny_weights, mode, shared, criterion, int8, impl):
    """Prefill (several tokens) and a decode step (one token, batch 1: every kernel) give the model's
    logits, with thresholds shared by the fused projections or each its own, under either criterion,
    of float or int8 weights (kept int8 in the decode weights; an int8 LM head too)."""
    m = _model(mode, shared=shared, criterion=criterion, int8=int8)
    dec = decode.prepare(m, impl)
    assert {w.dtype == jnp.int8 for k, w in dec.weights["layers"][0].items() if k in ("qkv", "o", "gate_up", "down",
                                                                                       "gate_up_t")} == {bool(int8)}
    assert (dec.weights["head"].dtype == jnp.int8) == ("head_scale" in dec.weights) == (int8 == "head")
    assert dec.plan.shared == (("qkv", "gate_up") if mode == "teal" and shared and criterion == "magnitude" else ())
    toks = jax.random.randint(jax.random.key(1), (1, 9), 0, CFG.vocab_size)
    pos = jnp.arange(9)[None]
    want, cache = m(toks, pos, M.init_cache(CFG, 1, 16, f32))
    step, step_pos = toks[:, :1], jnp.full((1, 1), 9)
    want_step, want_cache = m(step, step_pos, cache)
    with interpret_on_cpu(), poisoned_outputs():
        got, got_cache, kept = forward(dec.weights, toks, pos, M.init_cache(CFG, 1, 16, f32), plan=dec.plan)
        got_step, got_cache, _ = forward(dec.weights, step, step_pos, got_cache, plan=dec.plan)
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(got_step, want_step, atol=2e-5)
    for (gk, gv), (wk, wv) in zip(got_cache, want_cache):
        np.testing.assert_allclose(gk, wk, atol=1e-5)
        np.testing.assert_allclose(gv, wv, atol=1e-5)
    assert (kept is not None) == ("cats" in mode)


@pytest.mark.parametrize("int8", [False, True])
def test_projections_apart_give_the_model(monkeypatch, int8):
    """Past MAX_STACKED_ROWS each thresholded projection reads its own columns of the fused matrix
    (and of its int8 scales): the model's logits still."""
    monkeypatch.setattr(decode, "MAX_STACKED_ROWS", 0)
    m = _model("teal", shared=False, int8=int8)
    dec = decode.prepare(m, "jnp")
    toks = jax.random.randint(jax.random.key(2), (2, 5), 0, CFG.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    want, _ = m(toks, pos, M.init_cache(CFG, 2, 8, f32))
    got, _, _ = jax.jit(decode.forward, static_argnames="plan")(dec.weights, toks, pos, M.init_cache(CFG, 2, 8, f32),
                                                                plan=dec.plan)
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_int8_head_of_a_decode_step_runs_on_the_kernels(kernels_on_tiny_weights):
    """A decode step's int8 LM head is one more kernel (the masked tiles, as the other dense int8
    products); prefill's last-token logits take it too, and give the model's."""
    step = jnp.zeros((1, 1), jnp.int32)
    calls = []
    for head in (False, True):
        m = M.quantize_model(M.init_random(CFG, seed=3, dtype=f32), head=head)
        dec = decode.prepare(m, "pallas")
        with interpret_on_cpu():
            calls.append(str(jax.make_jaxpr(lambda t, d=dec: decode.forward(d.weights, t, step, M.init_cache(
                CFG, 1, 4, f32), plan=d.plan))(step)).count("pallas_call"))
    assert calls[1] == calls[0] + 1
    toks = jax.random.randint(jax.random.key(2), (2, 5), 0, CFG.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    want = m(toks, pos)[0][:, -1]
    with interpret_on_cpu(), poisoned_outputs():
        got = forward(dec.weights, toks, pos, M.init_cache(CFG, 2, 8, f32), plan=dec.plan, last=jnp.array([4, 4]))[0]
    np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("mode,criterion", [("cats", "weighted"), ("teal", "weighted"), ("cats", "up-rms")])
def test_decode_applies_the_criterions_rule(kernels_on_tiny_weights, mode, criterion):
    """A weighted (up-rms) model's thresholds read under the magnitude rule keep other inputs: the
    decode path (kernels included) follows the model's criterion, not only its thresholds."""
    m = _model(mode, criterion=criterion)
    toks = jax.random.randint(jax.random.key(1), (1, 1), 0, CFG.vocab_size)
    pos, cache = jnp.zeros((1, 1), jnp.int32), M.init_cache(CFG, 1, 4, f32)
    dec = decode.prepare(m, "pallas")
    m.set_criterion("magnitude")
    mag = decode.prepare(m, "pallas")
    assert "factors" in dec.weights["layers"][0] and "factors" not in mag.weights["layers"][0]
    with interpret_on_cpu(), poisoned_outputs():
        got = forward(dec.weights, toks, pos, cache, plan=dec.plan)[0]
        other = forward(mag.weights, toks, pos, cache, plan=mag.plan)[0]
    assert not np.allclose(got, other, atol=1e-4)


def test_prepare_leaves_the_model_as_it_was(tmp_path):
    m = _model("teal")
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(m)))
    decode.prepare(m, "pallas")
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(m)))
    jax.tree.map(np.testing.assert_array_equal, after, before)
    # so its params save and load back as they were
    checkpoint.save(tmp_path / "ckpt", m.cfg, checkpoint.model_params(m))
    loaded = checkpoint.model_params(checkpoint.load_model(tmp_path / "ckpt"))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded),
                 jax.tree.map(np.asarray, checkpoint.model_params(m)))


def test_prepare_rejects_an_unknown_impl():
    with pytest.raises(ValueError, match="unknown implementation 'cuda'"):
        decode.prepare(_model("dense"), "cuda")


@pytest.mark.parametrize("path,mode,int8", [("masked", "teal", False), ("gather", "teal", False),
                                            ("masked", "cats", False), ("gather", "cats", False),
                                            ("gather", "teal", True), ("masked", "cats", True),
                                            ("masked", "dense", True), ("listed", "dense", False)])
def test_kernel_decode_gives_the_jnp_greedy_tokens(kernels_on_tiny_weights, monkeypatch, path, mode, int8):
    if path == "gather":  # batch 1 on the gather path: two kernels (compact, gather) per GEMV
        monkeypatch.setitem(G.TABLE, 1, G.GatherBlocks(rows=16, cols=16, chunk=32))
        monkeypatch.setattr(G, "TUNED", {})
    if path == "listed":  # dense float GEMVs take the kernels where the device lists their "dense" blocks
        h, i, qkv = CFG.hidden_size, CFG.intermediate_size, (CFG.num_heads + 2 * CFG.num_kv_heads) * CFG.head_dim
        monkeypatch.setattr(G, "TUNED", {jax.devices()[0].device_kind: {
            G.tuned_key(1, n_in, n_out, "dense"): G.GemvBlocks(rows=16, cols=16, splits=4)
            for n_in, n_out in ((h, qkv), (h, h), (h, 2 * i), (i, h))}})
    prompt = [[5, 17, 3, 88, 41, 9, 2]]  # batch 1: the rows the TEAL kernels serve
    m = _model(mode, int8=int8)
    want = generate(decode.prepare(m, "jnp"), prompt, 10, eos_ids=())
    dec = decode.prepare(m, "pallas")
    cache = M.init_cache(CFG, 1, 16, f32)
    with interpret_on_cpu():
        jaxpr = str(jax.make_jaxpr(lambda t: decode.forward(dec.weights, t, jnp.zeros((1, 1), jnp.int32), cache,
                                                            plan=dec.plan))(jnp.array(prompt)[:, :1]))
    # per layer: attention, two residual adds + norms (the first layer's first norm has no add, the
    # final norm has one), and the GEMVs (TEAL: q|k|v, o, gate|up, down; CATS: gate|up + down, and
    # int8 q|k|v and o on the kernels' masked tiles; dense int8 or listed: the four, down computing
    # silu(gate) * up)
    gemvs = {"teal": 4 * (2 if path == "gather" else 1), "dense": 4,
             "cats": 1 + (2 if path == "gather" else 1) + 2 * int8}[mode]
    # TEAL's gathers of q|k|v and gate|up read inputs their add + norm launch compacted (the first
    # layer's q|k|v has no add before it)
    in_norm = 2 * CFG.num_layers - 1 if (path, mode) == ("gather", "teal") else 0
    assert jaxpr.count("pallas_call") == (3 + gemvs) * CFG.num_layers - in_norm
    with interpret_on_cpu(), poisoned_outputs():
        got = generate(dec, prompt, 10, eos_ids=())
    assert got.tokens == want.tokens
    assert got.mlp_sparsity == want.mlp_sparsity


@pytest.mark.parametrize("o_on", ["gather", "xla"])
def test_split_attention_hands_o_its_input(kernels_on_tiny_weights, monkeypatch, o_on):
    """With the attention split over the sequence, TEAL's decode step combines the splits in one launch
    that also applies o's rule: it compacts o's input for o's gather, or thresholds it for XLA's
    product (no launch of its own). Greedy tokens equal the jnp path's."""
    monkeypatch.setattr(A, "blocks_for", lambda *a: AttentionBlocks(block=16, span=16))  # 2 splits from 17 slots
    monkeypatch.setitem(G.TABLE, 1, G.GatherBlocks(rows=16, cols=16, chunk=32))
    monkeypatch.setattr(G, "TUNED", {})
    if o_on == "xla":  # o (N D x H) below the size rule, the other matrices above it
        monkeypatch.setattr(G, "MIN_KERNEL_WEIGHTS", CFG.num_heads * CFG.head_dim * CFG.hidden_size + 1)
    prompt = [[5, 17, 3, 88, 41, 9, 2]]
    m = _model("teal")
    want = generate(decode.prepare(m, "jnp"), prompt, 10, eos_ids=())
    dec = decode.prepare(m, "pallas")
    with interpret_on_cpu():
        jaxpr = jax.make_jaxpr(lambda t: decode.forward(dec.weights, t, jnp.zeros((1, 1), jnp.int32), M.init_cache(
            CFG, 1, 17, f32), plan=dec.plan))(jnp.zeros((1, 1), jnp.int32)).jaxpr
    calls = [e.params["name"] for e in jaxpr.eqns if e.primitive.name == "pallas_call"]
    assert calls.count("combine_splits") == CFG.num_layers
    # per layer: attention, its combine, two adds + norms (the first layer's first norm has no add, the
    # final norm has one), the gathers (o's too) and the down GEMV's compaction
    per_layer = 9 if o_on == "gather" else 8
    assert len(calls) == per_layer * CFG.num_layers + 1  # + the first layer's q|k|v compaction
    if o_on == "xla":  # o's product reads the combine's output as it is: no select between them
        made_by = {v: e for e in jaxpr.eqns for v in e.outvars}
        o_in = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"
                and e.invars[1].aval.shape == (CFG.num_heads * CFG.head_dim, CFG.hidden_size)]
        sources = {made_by[e.invars[0]].primitive.name for e in o_in}
        assert sources <= {"reshape", "pallas_call", "broadcast_in_dim"}, sources
    with interpret_on_cpu(), poisoned_outputs():
        got = generate(dec, prompt, 10, eos_ids=())
    assert got.tokens == want.tokens


@pytest.mark.parametrize("mode,int8,path", [("teal", False, "masked"), ("teal", False, "gather"),
                                           ("teal", True, "gather"), ("cats", False, "masked"), ("dense", True, "masked")])
def test_kernels_take_the_projections_unfinished(kernels_on_tiny_weights, monkeypatch, mode, int8, path):
    """On the kernels, the decode attention takes the q|k|v GEMV's output and each residual add +
    norm its projection's (o, down) as they leave the GEMV kernel: no op between them rounds,
    scales or slices them (a launch each on the GPU). On the gather path the down projection's
    compaction takes gate|up as their GEMV left them too (it computes silu(gate) * up)."""
    if path == "gather":
        monkeypatch.setitem(G.TABLE, 1, G.GatherBlocks(rows=16, cols=16, chunk=32))
        monkeypatch.setattr(G, "TUNED", {})
    m = _model(mode, int8=int8)
    dec = decode.prepare(m, "pallas")
    with interpret_on_cpu():
        jaxpr = jax.make_jaxpr(lambda t: decode.forward(dec.weights, t, jnp.zeros((1, 1), jnp.int32), M.init_cache(
            CFG, 1, 16, f32), plan=dec.plan))(jnp.zeros((1, 1), jnp.int32)).jaxpr
    made_by = {v: e for e in jaxpr.eqns for v in e.outvars}
    takes = [(e.params["name"], e.invars[0 if e.params["name"] == "decode_attention" else 1])
             for e in jaxpr.eqns if e.primitive.name == "pallas_call" and e.params["name"] in (
                 "decode_attention", "add_rms_norm", "add_rms_norm_compact")]
    assert len(takes) == 3 * CFG.num_layers  # per layer one attention; add + norm twice, less the first, plus the final
    direct = [made_by[v].primitive.name == "pallas_call" and made_by[v].params["name"] in ("gather_gemv", "sparse_gemv")
              for _, v in takes]
    # CATS: only the down projection is a kernel's (q|k|v and o are XLA's bf16 products)
    assert sum(direct) == (CFG.num_layers if mode == "cats" else 3 * CFG.num_layers), takes
    gathered = {v for e in jaxpr.eqns if e.primitive.name == "pallas_call" and e.params["name"] == "gather_gemv"
                for v in e.outvars}
    inputs = [made_by.get(e.invars[0]) for e in jaxpr.eqns
              if e.primitive.name == "pallas_call" and e.params["name"] == "compact"]
    # a compaction fed by a gather's output, through a reshape only (a bitcast)
    fed = [e for e in inputs if e is not None and e.primitive.name == "reshape" and e.invars[0] in gathered]
    assert len(fed) == (CFG.num_layers if path == "gather" else 0)


@pytest.mark.parametrize("mode,int8,rows", [("cats", False, 3), ("cats", True, 3), ("teal", False, 3),
                                           ("teal", True, 3), ("dense", True, 3), ("teal", True, 12)])
def test_kernel_decode_of_ragged_batches(kernels_on_tiny_weights, mode, int8, rows):
    """Batches of 3 and 12 rows (padding rows too): the kernels' greedy tokens equal the jnp path's
    (CATS on its kernel, float and int8, TEAL and int8 on the masked tiles' batched dots)."""
    base = [[5, 17, 3, 88, 41], [9, 2], [60, 61, 62, 63, 1, 7, 30]]  # past 3 rows, shifted copies of these
    prompts = [[(t + 7 * (i // 3)) % CFG.vocab_size for t in base[i % 3]] for i in range(rows)]
    m = _model(mode, int8=int8)
    want = generate(decode.prepare(m, "jnp"), prompts, 8, eos_ids=())
    with interpret_on_cpu(), poisoned_outputs():
        got = generate(decode.prepare(m, "pallas"), prompts, 8, eos_ids=())
    assert got.tokens == want.tokens
    if mode == "cats":
        assert got.mlp_sparsity == pytest.approx(want.mlp_sparsity, abs=0.02)
        assert 0.3 < got.mlp_sparsity < 0.7


WIDE = ModelConfig(vocab_size=97, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=64, name="wide")  # weights well above a step's activations


def _step_hlo(mode, batch, shared=False) -> tuple[str, set[str]]:
    """The decode step's StableHLO on WIDE, and the shapes of its fused weight matrices."""
    m = M.init_random(WIDE, seed=3, dtype=bf16)
    for i, site in enumerate(MODES[mode]):  # shared=False: each site its own threshold
        m.set_thresholds(site, np.full(WIDE.num_layers, 0.5 + (0 if shared else 0.01 * i)))
    m.set_mode(mode)
    dec = decode.prepare(m, "jnp")
    args = (dec.weights, jnp.zeros((batch, 1), jnp.int32), jnp.zeros((batch, 1), jnp.int32),
            M.init_cache(WIDE, batch, 8, bf16))
    fused = {"x".join(map(str, dec.weights["layers"][0][k].shape)) for k in ("qkv", "gate_up")}
    step = jax.jit(lambda *a, plan: decode.forward(*a, plan=plan), static_argnames="plan")  # traced anew
    return step.lower(*args, plan=dec.plan).as_text(), fused


def _weight_slices(mode, batch) -> list[str]:
    """The ops of the decode step's StableHLO that slice a fused weight matrix (q|k|v or gate|up)."""
    text, fused = _step_hlo(mode, batch)
    return [ln for ln in text.splitlines() if "slice" in ln and any(f"tensor<{s}xbf16>" in ln for s in fused)]


def test_shared_thresholds_take_one_plain_product_per_matrix():
    """Uniform TEAL (q, k, v share a threshold, as gate and up do): the step multiplies as many
    matrices as dense does, each once, with one thresholded input."""
    dense, _ = _step_hlo("dense", 4)
    teal, _ = _step_hlo("teal", 4, shared=True)
    apart, _ = _step_hlo("teal", 4)
    assert teal.count("stablehlo.dot_general") == dense.count("stablehlo.dot_general")
    assert apart.count("stablehlo.concatenate") > teal.count("stablehlo.concatenate")  # the stacked inputs


@pytest.mark.parametrize("batch", [2, 4, 8, 32])
def test_teal_jnp_step_reads_the_weights_whole(batch, monkeypatch):
    """TEAL's decode step off the kernels (batch > 1) reads each fused matrix whole, as dense does:
    no slice of a weight matrix, which XLA turns into a copy before a GEMM on the GPU (the model
    once split q|k|v and gate|up on every step: 2.4x slower than dense at batch 4)."""
    assert _weight_slices("teal", batch) == []
    monkeypatch.setattr(decode, "MAX_STACKED_ROWS", 0)  # past the limit: each projection's columns apart
    assert len(_weight_slices("teal", batch)) >= 2 * WIDE.num_layers  # what the test would catch


def _attention_config(heads, kv_heads, d, window=None) -> ModelConfig:
    """A config of these attention shapes, for its RoPE frequencies and attend (the rest unused)."""
    return ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=heads,
                       num_kv_heads=kv_heads, head_dim=d, sliding_window=window, name="t")


@pytest.mark.parametrize("heads,kv_heads,d,slots,positions,window", [
    (4, 4, 16, 40, [0, 5, 39], None),  # GQA ratio 1, the first and the last slot
    (9, 3, 16, 70, [69, 33], 7),  # ratio 3 (padded to 4 query heads), a sliding window
    (8, 2, 32, 130, [129, 64, 1, 100], None),  # ratio 4, several splits of the sequence
    (8, 1, 64, 20, [19], None),  # ratio 8
])
@pytest.mark.parametrize("dtype", [f32, bf16])
def test_decode_attention_equals_attend(heads, kv_heads, d, slots, positions, window, dtype):
    cfg = _attention_config(heads, kv_heads, d, window)
    b = len(positions)
    ks = jax.random.split(jax.random.key(slots + heads), 3)
    qkv = jax.random.normal(ks[0], (b, (heads + 2 * kv_heads) * d), f32).astype(dtype)
    ck, cv = (jax.random.normal(k, (b, slots, kv_heads, d), f32).astype(dtype) for k in ks[1:])
    pos = jnp.asarray(positions, jnp.int32)
    q, key, val = jnp.split(qkv, [heads * d, (heads + kv_heads) * d], axis=1)
    qkv_heads = (q.reshape(b, 1, heads, d), key.reshape(b, 1, kv_heads, d), val.reshape(b, 1, kv_heads, d))
    want, (wk, wv) = M.attend(cfg, *qkv_heads, pos[:, None], (ck, cv))
    # the slots a row does not attend (past its position, before its window) hold NaN: never read
    since = jnp.arange(slots)[None, :] - pos[:, None]
    unread = (since > 0) | (False if window is None else since <= -window)
    ck, cv = (jnp.where(unread[:, :, None, None], jnp.nan, c).astype(dtype) for c in (ck, cv))
    with interpret_on_cpu(), poisoned_outputs():
        got, gk, gv = jax.jit(lambda *a: decode_attention(*a, num_heads=heads, num_kv_heads=kv_heads,
                                                          sliding_window=window))(
            qkv, pos, ck, cv, M.rope_angles(pos, M.rope_inv_freq(cfg)))
    # fp32 reference for bf16 too: the reference's own rounding would count against the kernel
    ref = want if dtype == f32 else M.attend(cfg, *(a.astype(f32) for a in qkv_heads), pos[:, None],
                                             (wk.astype(f32), wv.astype(f32)))[0]
    assert rel_err(got, ref[:, 0]) < (1e-5 if dtype == f32 else 1e-2)
    read = ~np.asarray(unread)[:, :, None, None]
    np.testing.assert_allclose(np.where(read, np.asarray(gk, f32), 0), np.where(read, np.asarray(wk, f32), 0),
                               atol=1e-5 if dtype == f32 else 1e-2)
    np.testing.assert_array_equal(np.where(read, np.asarray(gv, f32), 0), np.where(read, np.asarray(wv, f32), 0))


def test_cats_decode_step_counts_kept_neurons_once(kernels_on_tiny_weights):
    """On the CATS kernel, a decode step counts every layer's kept neurons (the non-zeros of h) in
    one reduction after the last layer: one test and one launch a step, not one a layer."""
    assert CFG.num_layers > 1
    dec = decode.prepare(_model("cats"), "pallas")
    with interpret_on_cpu():
        jaxpr = jax.make_jaxpr(lambda t: decode.forward(dec.weights, t, jnp.zeros((1, 1), jnp.int32), M.init_cache(
            CFG, 1, 16, f32), plan=dec.plan))(jnp.zeros((1, 1), jnp.int32)).jaxpr
    assert [e.primitive.name for e in jaxpr.eqns].count("ne") == 1


@pytest.mark.parametrize("mode,int8,batch,per_layer", [("dense", "head", 1, 4), ("teal", False, 3, 4),
                                                        ("cats", False, 3, 1), ("dense", "head", 3, 4),
                                                        ("teal", False, 16, 4), ("dense", "head", 12, 4)])
def test_gemvs_add_into_buffers_their_add_norm_zeroed(kernels_on_tiny_weights, mode, int8, batch, per_layer):
    """Every GEMV on the masked tiles (dense int8 with its LM head at 1, 3 and 12 rows, TEAL at 3 and
    16 rows, CATS's down at 3 rows) adds into an fp32 buffer that the add + norm launch before it
    zeroed: XLA runs no memset and no sum of splits for them; only the first layer's q|k|v and o,
    after a norm with no add (no launch), start from XLA's zeros."""
    dec = decode.prepare(_model(mode, int8=int8), "pallas")
    tokens = jnp.zeros((batch, 1), jnp.int32)
    with interpret_on_cpu():
        jaxpr = jax.make_jaxpr(lambda t: decode.forward(dec.weights, t, tokens, M.init_cache(
            CFG, batch, 16, f32), plan=dec.plan))(tokens).jaxpr
    made_by = {v: e for e in jaxpr.eqns for v in e.outvars}
    gemvs = [e for e in jaxpr.eqns if e.primitive.name == "pallas_call" and e.params["name"] == "sparse_gemv"]
    starts = [made_by[e.invars[-1]] for e in gemvs]  # the aliased initial output (through a reshape)
    starts = [made_by[e.invars[0]] if e.primitive.name == "reshape" else e for e in starts]
    from_norm = [e.primitive.name == "pallas_call" and e.params["name"] == "add_rms_norm" for e in starts]
    first = 0 if mode == "cats" else 2  # CATS's down follows an add + norm in every layer
    assert len(gemvs) == per_layer * CFG.num_layers + (int8 == "head") and sum(from_norm) == len(gemvs) - first
    assert all(e.primitive.name == "broadcast_in_dim" for e, ok in zip(starts, from_norm) if not ok)
    assert not [e for e in jaxpr.eqns if e.primitive.name == "reduce_sum" and e.params["axes"] == (0,)]  # splits


def test_a_compacting_add_norm_zeroes_the_tiles_buffers(kernels_on_tiny_weights, monkeypatch):
    """TEAL at batch 1 with q|k|v on the gather and o, gate|up and down on the masked tiles: the add +
    norm that compacts q|k|v's input also zeroes o's buffer (no XLA memset but the first layer's, whose
    norm has no add), and the tokens are the jnp path's."""
    h, i, qkv = CFG.hidden_size, CFG.intermediate_size, (CFG.num_heads + 2 * CFG.num_kv_heads) * CFG.head_dim
    tiles = G.GemvBlocks(rows=16, cols=16, splits=4)
    monkeypatch.setattr(G, "TUNED", {jax.devices()[0].device_kind: {
        (1, h, qkv): G.GatherBlocks(rows=16, cols=16, chunk=32), (1, h, h): tiles, (1, h, 2 * i): tiles,
        (1, i, h): tiles}})
    m = _model("teal")
    dec = decode.prepare(m, "pallas")
    tokens = jnp.zeros((1, 1), jnp.int32)
    with interpret_on_cpu():
        jaxpr = jax.make_jaxpr(lambda t: decode.forward(dec.weights, t, tokens, M.init_cache(CFG, 1, 16, f32),
                                                        plan=dec.plan))(tokens).jaxpr
    made_by = {v: e for e in jaxpr.eqns for v in e.outvars}
    gemvs = [e for e in jaxpr.eqns if e.primitive.name == "pallas_call" and e.params["name"] == "sparse_gemv"]
    starts = [made_by[e.invars[-1]] for e in gemvs]
    starts = [made_by[e.invars[0]] if e.primitive.name == "reshape" else e for e in starts]
    names = [e.params["name"] if e.primitive.name == "pallas_call" else e.primitive.name for e in starts]
    assert len(gemvs) == 3 * CFG.num_layers
    assert names.count("add_rms_norm_compact") == CFG.num_layers - 1 and names.count("broadcast_in_dim") == 1
    prompt = [[5, 17, 3, 88, 41, 9, 2]]
    want = generate(decode.prepare(m, "jnp"), prompt, 8, eos_ids=())
    with interpret_on_cpu(), poisoned_outputs():
        assert generate(dec, prompt, 8, eos_ids=()).tokens == want.tokens


def test_int8_teal_with_o_alone_on_the_tiles_gives_the_jnp_tokens(kernels_on_tiny_weights, monkeypatch):
    """int8 TEAL at batch 1 as the H100's table has it: q|k|v, gate|up and down on their gathers, o on
    the masked tiles (its buffer zeroed by the add + norm that compacts q|k|v's input)."""
    h, i, qkv = CFG.hidden_size, CFG.intermediate_size, (CFG.num_heads + 2 * CFG.num_kv_heads) * CFG.head_dim
    gather = G.GatherBlocks(rows=16, cols=16, chunk=32)
    monkeypatch.setattr(G, "TUNED", {jax.devices()[0].device_kind: {
        (1, h, qkv, "int8"): gather, (1, h, h, "int8"): G.GemvBlocks(rows=16, cols=16, splits=4),
        (1, h, 2 * i, "int8"): gather, (1, i, h, "int8"): gather}})
    m = _model("teal", int8=True)
    prompt = [[5, 17, 3, 88, 41, 9, 2]]
    want = generate(decode.prepare(m, "jnp"), prompt, 8, eos_ids=())
    with interpret_on_cpu(), poisoned_outputs():
        assert generate(decode.prepare(m, "pallas"), prompt, 8, eos_ids=()).tokens == want.tokens


@pytest.mark.parametrize("zeros", [(), ((1, 96), (4, 1250))])
def test_add_rms_norm_zeroes_buffers_for_the_next_gemvs(zeros):
    """zeros: after x + h and the normalised rows, fp32 buffers of these shapes, zeros (written by the
    launch's extra programs: NaN-poisoned otherwise); the rows are as without them."""
    ks = jax.random.split(jax.random.key(9), 3)
    x, h = (jax.random.normal(k, (2, 200), f32) for k in ks[:2])
    scale = 1 + jax.random.normal(ks[2], (200,), f32) / 4
    with interpret_on_cpu(), poisoned_outputs():
        got_x, got_y, *bufs = jax.jit(lambda *a: add_rms_norm(*a, 1e-5, zeros=zeros))(x, h, scale)
        want_x, want_y = jax.jit(lambda *a: add_rms_norm(*a, 1e-5))(x, h, scale)
    np.testing.assert_array_equal(np.asarray(got_x), np.asarray(want_x))
    np.testing.assert_array_equal(np.asarray(got_y), np.asarray(want_y))
    assert [b.shape for b in bufs] == list(zeros) and all(np.all(np.asarray(b) == 0) for b in bufs)


@pytest.mark.parametrize("n", [576, 96, 8])  # SmolLM2's hidden size, a tail, a whole row in one block
@pytest.mark.parametrize("dtype", [f32, bf16])
def test_add_rms_norm_equals_the_model(n, dtype):
    """The kernel's residual add and RMSNorm equal the jnp path's x + h, rms_norm(x + h) (the
    projection output h arrives in fp32 and is rounded to x's dtype first, as the jnp path's is)."""
    ks = jax.random.split(jax.random.key(n), 3)
    x = jax.random.normal(ks[0], (3, n), f32).astype(dtype)
    h = jax.random.normal(ks[1], (3, n), f32) * 3
    scale = (1 + jax.random.normal(ks[2], (n,), f32) / 4).astype(dtype)
    want_x = x + h.astype(dtype)
    want_y = M.rms_norm(want_x, scale, 1e-5)
    with interpret_on_cpu(), poisoned_outputs():
        got_x, got_y = jax.jit(lambda *a: add_rms_norm(*a, 1e-5))(x, h, scale)
    np.testing.assert_array_equal(np.asarray(got_x, f32), np.asarray(want_x, f32))
    assert rel_err(got_y, want_y) < (1e-6 if dtype == f32 else 1e-2)


@pytest.mark.parametrize("dtype", [f32, bf16])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95])
def test_add_rms_norm_applies_the_teal_rule(dtype, sparsity):
    """threshold: the normalised rows thresholded as sparsity.teal_input does."""
    ks = jax.random.split(jax.random.key(5), 3)
    x, h = (jax.random.normal(k, (3, 200), f32).astype(dtype) for k in ks[:2])
    scale = (1 + jax.random.normal(ks[2], (200,), f32) / 4).astype(dtype)
    want_x = x + h
    y = M.rms_norm(want_x, scale, 1e-5)
    t = jnp.quantile(jnp.abs(y.astype(f32)), sparsity)
    with interpret_on_cpu(), poisoned_outputs():
        got_x, got_y = add_rms_norm(x, h, scale, 1e-5, threshold=t)
    np.testing.assert_array_equal(np.asarray(got_x, f32), np.asarray(want_x, f32))
    np.testing.assert_array_equal(np.asarray(got_y, f32), np.asarray(teal_input(y, t), f32))


def test_teal_off_the_kernels_thresholds_in_the_norm(kernels_on_tiny_weights):
    """A batch beyond the kernels' (TEAL's GEMVs on XLA), q|k|v and gate|up each sharing one threshold
    a layer: the add + norm launch applies it, so XLA's products read its output as it is (no select
    of their own)."""
    dec = decode.prepare(_model("teal"), "pallas")
    assert set(dec.plan.shared) == {"qkv", "gate_up"}
    b = G.MAX_KERNEL_BATCH + 1
    with interpret_on_cpu():
        jaxpr = jax.make_jaxpr(lambda t: decode.forward(dec.weights, t, jnp.zeros((b, 1), jnp.int32), M.init_cache(
            CFG, b, 16, f32), plan=dec.plan))(jnp.zeros((b, 1), jnp.int32)).jaxpr
    made_by = {v: e for e in jaxpr.eqns for v in e.outvars}

    def source(v):  # past reshapes and converts
        e = made_by.get(v)
        while e is not None and e.primitive.name in ("reshape", "convert_element_type"):
            e = made_by.get(e.invars[0])
        return e

    fused = {dec.weights["layers"][0][g].shape for g in ("qkv", "gate_up")}
    lhs = [source(e.invars[0]) for e in jaxpr.eqns if e.primitive.name == "dot_general"
           and tuple(e.invars[1].aval.shape) in fused]
    from_norm = [e is not None and e.primitive.name == "pallas_call" and e.params["name"] == "add_rms_norm"
                 for e in lhs]
    assert len(lhs) == 2 * CFG.num_layers
    assert sum(from_norm) == 2 * CFG.num_layers - 1  # all but the first layer's q|k|v (no add before it)


@pytest.mark.parametrize("n,segments,chunk", [(576, 3, 64), (200, 2, 128), (96, 1, 128)])  # tails: 200, 96
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95])
def test_add_rms_norm_compacts_for_the_gather(n, segments, chunk, sparsity):
    """At batch 1 the add + norm launch lists the normalised row's kept inputs for a gather GEMV, per
    segment with its own threshold: the gather then gives the GEMV of the jnp path's thresholded row.
    The same launch also zeroes the buffers of GEMVs on the masked tiles (poisoned otherwise)."""
    ks = jax.random.split(jax.random.key(n), 4)
    x, h = (jax.random.normal(k, (1, n), f32) for k in ks[:2])
    scale = 1 + jax.random.normal(ks[2], (n,), f32) / 4
    w = jax.random.normal(ks[3], (n, 32 * segments), f32)
    want_x = x + h
    y = M.rms_norm(want_x, scale, 1e-5)
    ts = [jnp.quantile(jnp.abs(y), sparsity) * (1 + 0.1 * i) for i in range(segments)]
    want = jnp.concatenate([jnp.where(jnp.abs(y) > t, y, 0) @ w[:, 32 * i:32 * (i + 1)] for i, t in enumerate(ts)], 1)
    layout = G.CompactLayout(n, 32 * segments, segments, G.GatherBlocks(rows=16, cols=32, chunk=chunk))
    comp = G.Compaction(layout, tuple(jnp.reshape(t, 1) for t in ts))
    zeros = ((1, 4096), (1, 96))
    with interpret_on_cpu(), poisoned_outputs():
        got_x, yc, *bufs = add_rms_norm(x, h, scale, 1e-5, compaction=comp, zeros=zeros)
        got = G.sparse_gemv(yc, w, segments=(32,) * segments)
    np.testing.assert_array_equal(np.asarray(got_x), np.asarray(want_x))
    assert rel_err(got, want) < 1e-5
    assert [b.shape for b in bufs] == list(zeros) and all(np.all(np.asarray(b) == 0) for b in bufs)


@pytest.mark.parametrize("kv_heads,groups,d,splits,sparsity", [(4, 1, 16, 3, 0.5), (3, 3, 32, 5, 0.0),
                                                                (2, 4, 16, 2, 0.95), (1, 8, 64, 7, 0.7)])
def test_combine_equals_its_reference(kv_heads, groups, d, splits, sparsity):
    """The attention's splits combined in one launch (GQA ratios 1, 3, 4, 8; empty splits too) equal
    combine_reference; with o's rule applied (0-95% of its values dropped); and compacted for o's
    gather (batch 1), the gather gives o's product of the thresholded output."""
    b, gp = 2, 16
    ks = jax.random.split(jax.random.key(splits), 4)
    m = jax.random.normal(ks[0], (b, kv_heads, splits, gp), f32) * 3
    l = jax.random.uniform(ks[1], (b, kv_heads, splits, gp), f32, 0.5, 2.0)
    acc = jax.random.normal(ks[2], (b, kv_heads, splits, gp, d), f32)
    empty = jnp.arange(splits) == splits - 1  # a span past the row's position: nothing attended
    m, l = jnp.where(empty[:, None], -1e30, m), jnp.where(empty[:, None], 0.0, l)
    acc = jnp.where(empty[:, None, None], 0.0, acc)
    want = A.combine_reference(m, l, acc, groups, f32)
    n = want.shape[1]
    t = threshold_for(want, sparsity)  # between two values: no rounding flips a test
    w = jax.random.normal(ks[3], (n, 48), f32)
    layout = G.CompactLayout(n, 48, 1, G.GatherBlocks(rows=16, cols=16, chunk=32))
    with interpret_on_cpu(), poisoned_outputs():
        got = A.combine(m, l, acc, groups=groups, dtype=f32)
        kept = A.combine(m, l, acc, groups=groups, dtype=f32, threshold=t)
        gathered = G.sparse_gemv(A.combine(m[:1], l[:1], acc[:1], groups=groups, dtype=f32,
                                           compaction=G.Compaction(layout, (jnp.reshape(t, 1),))), w)
    thresholded = jnp.where(jnp.abs(want) > t, want, 0)
    assert rel_err(got, want) < 1e-6
    assert rel_err(kept, thresholded) < 1e-6
    assert rel_err(gathered, thresholded[:1] @ w) < 1e-5


def _unfinished(finished_width, rows, key, dtype, scaled):
    """A kernel's unfinished sums standing for a projection of `finished_width` columns: fp32, 40
    padding columns of NaN past them (never to be read), and an int8-like scale or None; and the
    projection as sparse_gemv would finish them, in dtype."""
    ks = jax.random.split(key, 2)
    sums = jax.random.normal(ks[0], (rows, finished_width), f32) * 3
    scale = jax.random.uniform(ks[1], (finished_width,), f32, 0.01, 0.05) if scaled else None
    finished = (sums if scale is None else sums * scale).astype(dtype)
    return jnp.concatenate([sums, jnp.full((rows, 40), jnp.nan, f32)], axis=1), scale, finished


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("dtype", [f32, bf16])
def test_add_rms_norm_finishes_unfinished_sums(dtype, scaled):
    """h as the down projection's fp32 sums (padded, with an int8 scale or without): the kernel
    gives what it gives for the finished projection."""
    n = 96
    ks = jax.random.split(jax.random.key(11), 3)
    x = jax.random.normal(ks[0], (2, n), f32).astype(dtype)
    sums, h_scale, h = _unfinished(n, 2, ks[1], dtype, scaled)
    scale = (1 + jax.random.normal(ks[2], (n,), f32) / 4).astype(dtype)
    norm = jax.jit(lambda *a: add_rms_norm(*a[:3], 1e-5, *a[3:]))
    with interpret_on_cpu(), poisoned_outputs():
        want_x, want_y = norm(x, h, scale)
        got_x, got_y = norm(x, sums, scale, h_scale)
    # bf16: the same bits; fp32: the scale's multiply may fuse with the add (one rounding fewer)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == f32 else dict(rtol=0, atol=0)
    np.testing.assert_allclose(np.asarray(got_x, f32), np.asarray(want_x, f32), **tol)
    np.testing.assert_allclose(np.asarray(got_y, f32), np.asarray(want_y, f32), **tol)
    with pytest.raises(ValueError, match="h_scale"):
        add_rms_norm(x, sums, scale, 1e-5, jnp.ones(n + 1))


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("dtype", [f32, bf16])
def test_decode_attention_finishes_unfinished_sums(dtype, scaled):
    """qkv as the q|k|v projection's fp32 sums (padded, with an int8 scale or without): the same
    output and cache writes as for the finished projection."""
    heads, kv_heads, d, slots = 9, 3, 16, 70
    ks = jax.random.split(jax.random.key(12), 3)
    sums, q_scale, qkv = _unfinished((heads + 2 * kv_heads) * d, 2, ks[0], dtype, scaled)
    ck, cv = (jax.random.normal(k, (2, slots, kv_heads, d), f32).astype(dtype) for k in ks[1:])
    pos = jnp.asarray([69, 12], jnp.int32)
    rope = M.rope_angles(pos, M.rope_inv_freq(_attention_config(heads, kv_heads, d)))
    run = jax.jit(lambda q, s, *a: decode_attention(q, *a, num_heads=heads, num_kv_heads=kv_heads, qkv_scale=s))
    with interpret_on_cpu(), poisoned_outputs():
        want = run(qkv, None, pos, ck, cv, rope)
        got = run(sums, q_scale, pos, ck, cv, rope)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == f32 else dict(rtol=0, atol=0)  # as above
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g, f32), np.asarray(w, f32), **tol)


def test_decode_attention_one_span_equals_splits():
    """One program per row and kv head (the output stored by the kernel) equals the split sequence
    combined in jnp."""
    heads, kv_heads, d, slots = 8, 2, 32, 130
    ks = jax.random.split(jax.random.key(3), 3)
    qkv = jax.random.normal(ks[0], (2, (heads + 2 * kv_heads) * d), f32)
    ck, cv = (jax.random.normal(k, (2, slots, kv_heads, d), f32) for k in ks[1:])
    pos = jnp.asarray([129, 40], jnp.int32)
    rope = M.rope_angles(pos, M.rope_inv_freq(_attention_config(heads, kv_heads, d)))
    run = lambda blk: jax.jit(lambda *a: decode_attention(*a, num_heads=heads, num_kv_heads=kv_heads, blocks=blk))(
        qkv, pos, ck, cv, rope)
    with interpret_on_cpu(), poisoned_outputs():
        one, k1, v1 = run(AttentionBlocks(block=16, span=256))
        split, k2, v2 = run(AttentionBlocks(block=16, span=32))
    assert rel_err(one, split) < 1e-6
    np.testing.assert_array_equal(np.asarray(k1), np.asarray(k2))
    np.testing.assert_array_equal(np.asarray(v1), np.asarray(v2))


def test_decode_attention_rejects_bad_shapes():
    ck = jnp.zeros((1, 8, 2, 12))
    with pytest.raises(ValueError, match="D a power of two"):
        decode_attention(jnp.zeros((1, 96)), jnp.zeros((1,), jnp.int32), ck, ck, (jnp.zeros((1, 6)),) * 2, num_heads=4,
                         num_kv_heads=2)
