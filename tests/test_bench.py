"""Helpers of the GPU benchmarks that run without a GPU."""

import re

import jax
import jax.numpy as jnp
import pytest

from bench import profile_decode, sass
from bench.profile_decode import idle_gaps
from pallas_kernels import sparse_gemv as G


def test_idle_gaps_split_launch_gaps_from_host_round_trips():
    ev = lambda ts, dur: {"ts": ts, "dur": dur}
    events = [ev(0, 10), ev(12, 5), ev(15, 3),  # a gap of 2, then an overlap (no gap)
              ev(16, 10),  # overlaps the one before: no gap
              ev(100, 4),  # 74 us after the last end (26): a host round trip
              ev(107, 1)]  # 3
    assert idle_gaps(list(reversed(events))) == (5.0, 2, 74.0, 1)
    assert idle_gaps([]) == (0.0, 0, 0.0, 0)


def test_profile_reports_the_launches_of_a_decode_step(capsys):
    """The profile's header counts the kernels a step launches (on the CPU: XLA's CPU kernels)."""
    from bench.decode import kernel_launches, latest_decode_hlo

    args = ["--config", "smollm2-135m", "--layers", "2", "--prompt-len", "4", "--new-tokens", "3", "--mode", "teal",
            "--impl", "jnp"]
    profile_decode.main(args + ["--batch", "1"])
    one = len(kernel_launches(latest_decode_hlo()))
    profile_decode.main(args + ["--batch", "30,1"])  # batch 1's loop again, from the cache: its own count
    heads = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("### ")]
    counts = [re.search(r"; (\d+) launches a decode step \(([\d.]+) a layer\)", h).groups() for h in heads]
    (first, _), (thirty, _), (again, _) = counts
    assert int(first) == int(again) == one != int(thirty)  # 30 rows launch another count
    assert all(float(p) == int(n) / 2 for n, p in counts)


def _gather_kernels(blk):
    S = jax.ShapeDtypeStruct
    return sass.kernels_of(lambda x, w, t: G.sparse_gemv(x, w, t, blocks=blk), S((1, 200), jnp.bfloat16),
                           S((200, 256), jnp.bfloat16), S((), jnp.float32))


def test_sass_finds_each_kernel_with_its_launch_settings():
    """bench.sass pairs each lowered Triton module with its launch's name, warps and stages."""
    ks = _gather_kernels(G.GatherBlocks(rows=16, cols=32, chunk=128, num_warps=8, num_stages=2))
    assert [(k.name, k.num_warps, k.num_stages) for k in ks] == [("compact", 4, 1), ("gather_gemv", 8, 2)]
    assert all("tt.func" in k.ttir for k in ks)
    assert [k.programs for k in ks] == [2, 16]  # 2 chunks of 128 inputs; x 8 blocks of 32 outputs


def test_programs_per_sm_take_the_tightest_sm90_limit():
    """Registers go per warp in units of 256; warps, programs and shared memory limit too."""
    assert sass.programs_per_sm(126, 4, 0) == 4  # 128 a thread: 16 KB registers a program of 4 warps
    assert sass.programs_per_sm(32, 4, 0) == 16  # 64 warps an SM
    assert sass.programs_per_sm(16, 1, 0) == 32  # 32 programs an SM
    assert sass.programs_per_sm(32, 1, 100_000) == 2  # shared memory


def test_sass_compiles_for_sm90():
    pytest.importorskip("triton")  # the triton wheel compiles for sm_90; it is no dependency
    r = sass.compile_sm90(_gather_kernels(G.GatherBlocks(rows=16, cols=128, chunk=128, num_warps=4))[1])
    assert r["regs"] > 0 and r["spill"] == 0 and r["atom"] == 1
    # a 16 x 128 bf16 tile: two 16-byte loads per thread, for the first tile and in the loop
    assert r["ldg"].startswith("4x128")


def test_sass_loop_bodies_are_counted_from_their_label_to_the_branch_back():
    listing = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   FFMA R6, R2, R3, R6 ;
        /*0030*/                   NOP ;
        /*0040*/               @P0 BRA `(.L_x_0) ;
        /*0050*/                   BRA `(.L_x_1) ;
.L_x_1:
        /*0060*/               @!P1 LDG.E.EF.128 R8, desc[UR4][R4.64] ;
        /*0070*/                   FFMA R6, R8, R3, R6 ;
        /*0080*/                   LDG.E.64 R10, desc[UR4][R4.64+0x10] ;
        /*0090*/                   FFMA R6, R10, R3, R6 ;
        /*00a0*/               @P0 BRA `(.L_x_1) ;
        /*00b0*/                   EXIT ;
"""
    # LDG, FFMA and the branch (no wide load); the forward branch is no loop; the second loop's last
    # 8- or 16-byte load comes after two of its instructions
    assert sass.loop_bodies(listing) == [(3, None), (5, 2)]


def test_forced_check_tells_a_kernel_error_from_agreement(monkeypatch):
    """gpu_check's teacher-forced comparison (interpret mode, a tiny model): the kernels' TEAL decode
    steps pass; with the kernels' thresholds 30% high (an injected error) most steps' logits move."""
    from bench.gpu_check import check_forced
    from cats_jax import decode
    from cats_jax.config import ModelConfig
    from pallas_kernels.common import interpret_on_cpu

    cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4, num_kv_heads=2,
                      head_dim=16, name="tiny")
    with interpret_on_cpu():
        assert check_forced(jnp.float32, "teal", steps=2, batch=1, cfg=cfg)
        kernel_thresholds = decode._kernel_thresholds
        monkeypatch.setattr(decode, "_kernel_thresholds", lambda ths: [t * 1.3 for t in kernel_thresholds(ths)])
        assert not check_forced(jnp.float32, "teal", steps=2, batch=1, cfg=cfg)


def test_a_tune_times_only_the_projections_decode_runs():
    from bench.kernels import projections

    labels = [label for label, _, _ in projections(["mistral-7b"])]
    tuned = [label for label, _, _ in projections(["mistral-7b"], compare=False)]
    assert "mistral-7b gate" in labels
    assert tuned == [label for label in labels if label != "mistral-7b gate"]
    assert tuned == ["mistral-7b qkv", "mistral-7b o", "mistral-7b gate|up", "mistral-7b down"]


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("blocks", [G.GemvBlocks(rows=16, cols=32, splits=4), G.GatherBlocks(rows=8, cols=32, chunk=64)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_a_tune_times_each_gemv_as_decode_launches_it(gated, blocks, sparsity):
    """bench.kernels times what decode runs: the unfinished sums of x' @ W, x' the thresholded input
    (down: silu(gate) * up from gate|up's sums), a gather's input compacted before the timed call."""
    from bench.kernels import _gemv_call, _gemv_input, _gemv_thresholds

    n_in, segs = 160, (64, 32, 32)
    w = jax.random.normal(jax.random.key(7), (n_in, sum(segs)), jnp.float32).astype(jnp.bfloat16)
    x, values = _gemv_input(1, n_in, gated)
    t, union = _gemv_thresholds(values, segs, sparsity)
    f, args = _gemv_call(x, w, t, segs, blocks, None, sparsity, gated)
    got = f(*args)[:1, :sum(segs)]
    v = values.astype(jnp.float32)
    want = jnp.where(jnp.abs(v) > t[0], v, 0.0) @ w.astype(jnp.float32)
    assert abs(union - sparsity) < 0.05
    assert float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))) < 1e-5


def test_the_cats_tune_leaves_its_winners_where_the_kernels_look(monkeypatch):
    """bench.kernels.tune's down-projection winner goes to this device's sparse_gemv.TUNED entry for
    CATS's down projection of the shape (the "cats" variant, which blocks_for reads before the plain
    entry and the table; TEAL's down keeps its own), gate_up's to cats_mlp.TABLE."""
    from bench import kernels as B
    from pallas_kernels import cats_mlp as K

    monkeypatch.setattr(K, "TABLE", dict(K.TABLE))
    monkeypatch.setattr(G, "TUNED", {})
    monkeypatch.setattr(B, "_ceilings", lambda: (1e12, 1e12))
    times = iter(range(1000, 0, -1))  # every candidate faster than the one before: the last wins
    monkeypatch.setattr(B, "_time", lambda label, f, *args, n=None: float(next(times)))
    B.tune(models=("smollm2-135m",), batch=(1,), sparsity=0.5)
    assert K.TABLE[1] == B.GATE_UP_CANDIDATES[1][-1]
    cfg = B.config("smollm2-135m")
    winner = B.GEMV_CANDIDATES[1][-1]
    assert G._tuned() == {(1, cfg.intermediate_size, cfg.hidden_size, "cats"): winner}
    picked = G.blocks_for(1, cfg.intermediate_size, cfg.hidden_size, variant="cats")  # fitted to the shape
    assert (type(picked), picked.rows, picked.num_warps) == (type(winner), winner.rows, winner.num_warps)


def test_the_int8_tune_times_the_int8_dots_at_batch_1(monkeypatch):
    """An int8 tune at batch 1 times gate_up's int8 dots candidates; its winner goes to
    cats_mlp.INT8_TABLE (int8's own), not to the table float weights read."""
    from bench import kernels as B
    from pallas_kernels import cats_mlp as K

    table = dict(K.TABLE)
    monkeypatch.setattr(K, "TABLE", dict(K.TABLE))
    monkeypatch.setattr(K, "INT8_TABLE", {})
    monkeypatch.setattr(G, "TUNED", {})
    monkeypatch.setattr(B, "_ceilings", lambda: (1e12, 1e12))
    timed = []
    times = iter(range(1000, 0, -1))
    monkeypatch.setattr(B, "_time", lambda label, f, *args, n=None: timed.append(label) or float(next(times)))
    B.tune(models=("smollm2-135m",), batch=(1,), sparsity=0.5, int8=True)
    gate_up = [label for label in timed if " gate_up " in label]
    assert len(gate_up) == len(B.GATE_UP_INT8)
    assert K.TABLE == table and K.INT8_TABLE == {1: B.GATE_UP_INT8[-1]}


def test_the_dense_tune_times_no_gather(monkeypatch):
    """At sparsity 0 (`--teal --tune --tune-at 0`) the tune times only masked tiles: a gather of every
    row would need a compaction launch of its own, which its timer leaves out. Each projection's
    "dense" winner goes to this device's TUNED entry."""
    from bench import kernels as B

    monkeypatch.setattr(G, "TUNED", {})
    monkeypatch.setattr(B, "_ceilings", lambda: (1e12, 1e12))
    monkeypatch.setattr(B, "stream_us", lambda *a: 1.0)
    monkeypatch.setattr(B, "loop_timer", lambda f, n=None: lambda *a: 1.0)
    timed = []
    monkeypatch.setattr(B, "_time", lambda label, f, *a, n=None: timed.append(label) or float(1000 - len(timed)))
    B.bench_gemv(models=("smollm2-135m",), sparsity=(0.0,), batch=(1,), tune_at=0.0)
    tiles = [c for c in B.GEMV_CANDIDATES[1] if isinstance(c, G.GemvBlocks)]
    assert len(timed) == 4 * len(tiles) and not any("GatherBlocks" in label for label in timed)
    assert len(G._tuned()) == 4 and all(k[-1] == "dense" and isinstance(v, G.GemvBlocks) for k, v in G._tuned().items())


@pytest.mark.parametrize("tied", [True, False])
def test_random_model_is_the_models_own_init_a_layer_at_a_time(tiny_cfg, tied):
    from flax import nnx

    from bench.decode import random_model
    from cats_jax.model import Transformer

    cfg = tiny_cfg(num_layers=3, tie_word_embeddings=tied)
    model = random_model(cfg, seed=1)
    own = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    shapes = lambda m: jax.tree.map(lambda a: (a.shape, a.dtype), nnx.to_pure_dict(nnx.state(m)))  # noqa: E731
    assert model.cfg == cfg and nnx.graphdef(model) == nnx.graphdef(own) and shapes(model) == shapes(own)
    q = [layer.attn.q_proj.kernel[...] for layer in model.layers]
    assert not jnp.array_equal(q[0], q[1]) and not jnp.array_equal(q[1], q[2])  # a key per layer
    assert jnp.array_equal(q[2], random_model(cfg, seed=1).layers[2].attn.q_proj.kernel[...])  # the seed's
    std = float(jnp.std(q[0].astype(jnp.float32)))
    assert 0.5 / cfg.hidden_size ** 0.5 < std < 1.5 / cfg.hidden_size ** 0.5  # the init's fan-in scale


def test_mlp_check_forgives_ties_only(monkeypatch):
    """gpu_check's CATS MLP check (interpret mode): the kernel passes; with the kernel's threshold 2%
    high (an injected error, beyond the summation noise it forgives) it fails."""
    from bench import gpu_check
    from pallas_kernels.common import interpret_on_cpu

    with interpret_on_cpu():
        assert gpu_check.check_mlp(3, 64, 96, 0.5, seed=0)
        kernel = gpu_check.K.cats_mlp
        monkeypatch.setattr(gpu_check.K, "cats_mlp", lambda x, w_gu, w_d, t, **kw: kernel(x, w_gu, w_d, t * 1.02, **kw))
        assert not gpu_check.check_mlp(3, 64, 96, 0.5, seed=0)


@pytest.mark.parametrize("dtype,shape", [(jnp.bfloat16, (64, 512)), (jnp.int8, (64, 512)), (jnp.int8, (33, 101))])
def test_the_stream_reads_every_byte_of_the_matrix(dtype, shape):
    """bench.kernels.stream (the floor of a kernel that reads a matrix) XORs each 4 KB row's int32
    words: equal to the XOR in jnp, so no byte goes unread (interpret mode); bytes past whole rows
    are padded with zeros."""
    from bench.kernels import STREAM_BLOCKS, stream, stream_words

    w = jax.random.randint(jax.random.key(3), shape, -100, 100).astype(dtype)
    words = stream_words(w)
    flat = jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(-1)
    assert all(words.shape[0] % r == 0 for r, _, _ in STREAM_BLOCKS)
    assert bool(jnp.all(flat[:w.nbytes] == jax.lax.bitcast_convert_type(w.reshape(-1), jnp.uint8).reshape(-1)))
    assert not bool(jnp.any(flat[w.nbytes:]))
    want = jnp.sum(jax.lax.reduce(words.reshape(-1, 4, 256), jnp.int32(0), jax.lax.bitwise_xor, (1,)), axis=1)
    got = stream(jnp.ones((1, 1), jnp.bfloat16), words, rows=4, cols=256)
    assert bool(jnp.all(got == want))
