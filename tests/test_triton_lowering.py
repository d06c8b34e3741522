"""Every kernel variant lowered to Triton IR on the CPU, as for an H100/H200 (compute capability
9.0), and verified: catches what interpret mode cannot (e.g. an scf.for whose bounds differ in
type), without a GPU (bench.sass compiles the same IR on to SASS, with the triton wheel)."""

import re

import jax
import jax.numpy as jnp
import pytest

from bench import sass
from pallas_kernels import attention as A
from pallas_kernels import cats_mlp as K
from pallas_kernels import norm as N
from pallas_kernels import sparse_gemv as G

S, f32, bf16, i8 = jax.ShapeDtypeStruct, jnp.float32, jnp.bfloat16, jnp.int8


@pytest.fixture
def lowered_for_gpu():
    """Count the Triton modules lowered, each verified; the kernels think they run on a GPU."""
    try:
        context = sass.lowered_for_sm90()
        lowered = context.__enter__()
    except (ImportError, AttributeError) as e:  # private JAX API: may move between versions
        pytest.skip(f"JAX's Triton lowering is not where bench.sass looks: {e}")
    yield lowered
    context.__exit__(None, None, None)


_lower = sass.lower


def _int8_loads(lowered):
    """How many of the lowered modules load int8 tiles (the weights, read as they are stored)."""
    return sum(bool(re.search(r"tt\.load [^\n]*!tt\.ptr<i8>", str(r.module))) for r in lowered)


def _int8_to_float(lowered):
    """How many of the lowered modules convert int8 to a float with the conversion instruction
    (sitofp); the kernels add int8 tiles to fp32 bits instead (common.convert)."""
    return sum(bool(re.search(r"arith\.sitofp [^\n]*i8>? to", str(r.module))) for r in lowered)


def _packed_int8(lowered):
    """How many of the lowered modules convert int8 tiles four a register (common.convert's packed asm)."""
    return sum("elementwise_inline_asm" in str(r.module) for r in lowered)


H, I = 200, 300  # tails on both axes
MLP = (S((2 * I, H), bf16), S((I, H), bf16), S((), f32))
INT8_MLP = (S((2 * I, H), i8), S((I, H), i8), S((), f32), S((2 * I,), f32), S((H,), f32))  # and the scales


@pytest.mark.parametrize("batch", [1, 3, 16])  # the tables: multiply-add (batch 1), tensor-core dot (batch 2..16)
def test_cats_mlp_lowers(lowered_for_gpu, batch):
    _lower(lambda x, w_gu, wd, t: K.cats_mlp(x, w_gu, wd, t)[0], S((batch, H), bf16), *MLP)
    assert len(lowered_for_gpu) == 2  # gate_up, then the down GEMV


@pytest.mark.parametrize("dtype", [bf16, f32])  # the activations'
@pytest.mark.parametrize("batch", [1, 3, 8, 16])
def test_cats_mlp_int8_lowers(lowered_for_gpu, batch, dtype):
    _lower(lambda x, w_gu, wd, t, s_gu, s_d: K.cats_mlp(x, w_gu, wd, t, scales=(s_gu, s_d))[0],
           S((batch, H), dtype), *INT8_MLP)
    assert len(lowered_for_gpu) == 2 and _int8_loads(lowered_for_gpu) == 2 and _int8_to_float(lowered_for_gpu) == 0


@pytest.mark.parametrize("blocks", [K.GateUpBlocks(64, 128, 4, 3), K.GateUpBlocks(16, 64, 2, 4)])
def test_gate_up_int8_dots_lower(lowered_for_gpu, blocks):
    """Batch 1's int8 dots of x's digits: int8 tiles as stored into int8 tensor-core dots (int32)."""
    _lower(lambda x, w_gu, t, s: K.gate_up(x, w_gu, t, scale=s, blocks=blocks), S((1, H), bf16), INT8_MLP[0],
           INT8_MLP[2], INT8_MLP[3])
    ir = str(lowered_for_gpu[0].module)
    assert _int8_loads(lowered_for_gpu) == 1 and _int8_to_float(lowered_for_gpu) == 0
    assert re.search(r"tt\.dot [^\n]*xi8> -> tensor<16x\d+xi32>", ir), "no int8 dot with int32 sums"


GEMV_BLOCKS = [
    (1, G.GemvBlocks(64, 32, 4)), (3, G.GemvBlocks(32, 32, 2)), (8, G.GemvBlocks(32, 32, 2)),
    (1, G.GatherBlocks(16, 32, 128)), (1, G.GatherBlocks(32, 32, 256, 8, 2)),
]


@pytest.mark.parametrize("batch,blocks", GEMV_BLOCKS)
def test_sparse_gemv_lowers(lowered_for_gpu, batch, blocks):
    segments = (64, 96, 96)  # q|k|v-like: three thresholds
    _lower(lambda x, w, t: G.sparse_gemv(x, w, (t, t, t), segments=segments, blocks=blocks),
           S((batch, H), bf16), S((H, sum(segments)), bf16), S((), f32))
    assert len(lowered_for_gpu) == (2 if isinstance(blocks, G.GatherBlocks) else 1)  # compact + gather


@pytest.mark.parametrize("batch,blocks", [(1, G.GemvBlocks(64, 32, 4)), (1, G.GatherBlocks(16, 32, 128)),
                                          (3, G.GemvBlocks(32, 32, 2))])
def test_sparse_gemv_adds_with_relaxed_atomics(lowered_for_gpu, batch, blocks):
    """The fp32 sums are accumulated by relaxed atomic adds (common.atomic_add): no fence and no wait
    for the old value at the end of each program (3 rows: the dots' tile folded onto 4 buffer rows)."""
    _lower(lambda x, w: G.sparse_gemv(x, w, blocks=blocks), S((batch, H), bf16), S((H, 96), bf16))
    adds = [line for r in lowered_for_gpu for line in str(r.module).splitlines() if "tt.atomic_rmw" in line]
    assert adds and all("fadd, relaxed, gpu" in line for line in adds), adds


@pytest.mark.parametrize("kind,shape", [(kind, shape) for kind, table in G.TUNED.items() for shape in table])
def test_tuned_blocks_lower_at_their_shapes(lowered_for_gpu, kind, shape):
    """Each entry of the tuned table lowers at its own shape and variant (int8 weights; CATS's down
    projection: no threshold): a bad entry fails here, not on its GPU."""
    (batch, n_in, n_out), variant = shape[:3], shape[3:]
    blocks = G.TUNED[kind][shape]
    int8, cats = variant == ("int8",), variant == ("cats",)
    _lower(lambda x, w, t, s: G.sparse_gemv(x, w, None if cats else t, blocks=blocks, scale=s if int8 else None),
           S((batch, n_in), bf16), S((n_in, n_out), i8 if int8 else bf16), S((), f32), S((n_out,), f32))
    assert len(lowered_for_gpu) == (2 if isinstance(blocks, G.GatherBlocks) else 1)


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("batch,blocks", [(1, G.GatherBlocks(16, 32, 128)), (1, G.GemvBlocks(64, 32, 4)),
                                          (3, G.GemvBlocks(32, 32, 2)), (8, G.GemvBlocks(32, 32, 2))])
def test_sparse_gemv_of_a_gated_input_lowers(lowered_for_gpu, int8, batch, blocks):
    """silu(gate) * up from gate|up sums (and their int8 scale): computed by the gather's compaction,
    or by each masked tile for its rows."""
    w = S((H, 160), i8 if int8 else bf16)
    scales = (S((2 * H,), f32), S((160,), f32)) if int8 else (None, None)
    _lower(lambda x, w, t, xs, s: G.sparse_gemv(x, w, t, blocks=blocks, out_dtype=bf16, gated=True, x_scale=xs,
                                                scale=s), S((batch, 2 * H + 56), f32), w, S((), f32), *scales)
    assert len(lowered_for_gpu) == (2 if isinstance(blocks, G.GatherBlocks) else 1)


@pytest.mark.parametrize("dtype", [bf16, f32])  # the activations': int8 tiles convert to fp32 or to x's dtype
@pytest.mark.parametrize("batch,blocks", GEMV_BLOCKS)
def test_sparse_gemv_int8_lowers(lowered_for_gpu, batch, blocks, dtype):
    _lower(lambda x, w, t, s: G.sparse_gemv(x, w, t, blocks=blocks, scale=s),
           S((batch, H), dtype), S((H, 160), i8), S((), f32), S((160,), f32))
    assert len(lowered_for_gpu) == (2 if isinstance(blocks, G.GatherBlocks) else 1)
    assert _int8_loads(lowered_for_gpu) == 1  # the GEMV or the gather reads W's int8 rows
    assert _int8_to_float(lowered_for_gpu) == 0
    # batch 1's multiply-adds build the fp32 bits four int8 at a time; the dots' operands move first
    assert _packed_int8(lowered_for_gpu) == (batch == 1)


@pytest.mark.parametrize("batch", [1, 3])
def test_dense_int8_gemv_lowers(lowered_for_gpu, batch):
    """skip_zeros=False: W's loads masked by the input's tail and the columns only."""
    _lower(lambda x, w, s: G.sparse_gemv(x, w, scale=s, blocks=G.GemvBlocks(64, 32, 4), skip_zeros=False),
           S((batch, H), bf16), S((H, 160), i8), S((160,), f32))
    assert len(lowered_for_gpu) == 1 and _int8_loads(lowered_for_gpu) == 1


@pytest.mark.parametrize("batch", [1, 3])
def test_dense_int8_gemv_of_a_gated_input_lowers(lowered_for_gpu, batch):
    """Dense int8's down projection: the masked tiles compute silu(gate) * up from int8 gate|up sums."""
    _lower(lambda x, w, xs, s: G.sparse_gemv(x, w, scale=s, out_dtype=bf16, gated=True, x_scale=xs, skip_zeros=False),
           S((batch, 2 * H + 56), f32), S((H, 160), i8), S((2 * H,), f32), S((160,), f32))
    assert len(lowered_for_gpu) == 1 and _int8_loads(lowered_for_gpu) == 1


@pytest.mark.parametrize("n,warps", [(4096, None), (576, None), (4096, 16)])  # 16: a bench.kernels --norm candidate
def test_add_rms_norm_lowers(lowered_for_gpu, n, warps):
    _lower(lambda x, h, s: N.add_rms_norm(x, h, s, 1e-5, num_warps=warps), S((2, n), bf16), S((2, n), jnp.float32),
           S((n,), bf16))
    assert len(lowered_for_gpu) == 1


@pytest.mark.parametrize("n", [4096, 576])
def test_add_rms_norm_of_unfinished_int8_sums_lowers(lowered_for_gpu, n):
    """h: a GEMV's padded fp32 sums with their int8 scale (sparse_gemv's finish=False)."""
    _lower(lambda x, h, s, hs: N.add_rms_norm(x, h, s, 1e-5, hs), S((2, n), bf16), S((2, n + 448), f32),
           S((n,), bf16), S((n,), f32))
    assert len(lowered_for_gpu) == 1


def test_add_rms_norm_zeroing_the_next_gemvs_buffers_lowers(lowered_for_gpu):
    """The add + norm before GEMVs on the masked tiles: extra programs zero their output buffers
    (3 rows: 4 padded)."""
    _lower(lambda x, h, s, hs: N.add_rms_norm(x, h, s, 1e-5, hs, zeros=((4, 6144), (4, 4096 + 64))),
           S((3, 4096), bf16), S((4, 4096), f32), S((4096,), bf16), S((4096,), f32))
    assert len(lowered_for_gpu) == 1


@pytest.mark.parametrize("heads,kv_heads,d,window,span", [(32, 8, 128, None, None), (9, 3, 64, 4096, None),
                                                          (4, 4, 16, None, None), (64, 8, 128, None, None),
                                                          (32, 8, 128, None, 512)])  # GQA 4, 3, 1, 8; one span
@pytest.mark.parametrize("unfinished", [False, True])  # qkv: a GEMV's padded fp32 sums with an int8 scale
def test_decode_attention_lowers(lowered_for_gpu, heads, kv_heads, d, window, span, unfinished):
    b, s, width = 2, 384, (heads + 2 * kv_heads) * d
    blk = None if span is None else A.AttentionBlocks(block=16, span=span)  # span: one program per kv head
    qkv = (S((b, width + 512), f32), S((width,), f32)) if unfinished else (S((b, width), bf16), None)
    _lower(lambda qkv, qs, pos, k, v, rope: A.decode_attention(qkv, pos, k, v, rope, num_heads=heads,
                                                              num_kv_heads=kv_heads, sliding_window=window, blocks=blk,
                                                              qkv_scale=qs),
           *qkv, S((b,), jnp.int32), S((b, s, kv_heads, d), bf16), S((b, s, kv_heads, d), bf16),
           (S((b, d // 2), f32),) * 2)
    assert len(lowered_for_gpu) == (1 if span else 2)  # several spans: and the launch that combines them


def test_add_rms_norm_applying_the_teal_rule_lowers(lowered_for_gpu):
    _lower(lambda x, h, s, t: N.add_rms_norm(x, h, s, 1e-5, threshold=t), S((4, 4096), bf16), S((4, 4096), bf16),
           S((4096,), bf16), S((), f32))
    assert len(lowered_for_gpu) == 1


@pytest.mark.parametrize("n,segments,chunk", [(4096, 3, 256), (576, 2, 512), (200, 1, 128)])  # tail chunks too
@pytest.mark.parametrize("zeros", [(), ((1, 4096),)])  # and o's buffer zeroed for its masked tiles
def test_add_rms_norm_compacting_for_a_gather_lowers(lowered_for_gpu, n, segments, chunk, zeros):
    layout = G.CompactLayout(n, 192 * segments, segments, G.GatherBlocks(rows=32, cols=64, chunk=chunk))
    _lower(lambda x, h, s, *ts: N.add_rms_norm(x, h, s, 1e-5, compaction=G.Compaction(layout, ts), zeros=zeros)[1].val,
           S((1, n), bf16), S((1, n + 64), f32), S((n,), bf16), *[S((1,), f32)] * segments)
    assert len(lowered_for_gpu) == 1


@pytest.mark.parametrize("out", ["threshold", "compacted"])
@pytest.mark.parametrize("k,groups,d", [(8, 4, 128), (8, 8, 128), (3, 3, 64), (4, 1, 64)])  # GQA 4, 8, 3, 1
def test_combine_lowers(lowered_for_gpu, out, k, groups, d):
    """The attention splits combined (6 of them: a tail past the power of two), o's rule applied or o's input compacted."""
    b = 1
    layout = G.CompactLayout(k * groups * d, 4096, 1, G.GatherBlocks(rows=32, cols=128, chunk=256))
    kw = (lambda t: dict(threshold=t)) if out == "threshold" else (
        lambda t: dict(compaction=G.Compaction(layout, (t,))))
    combined = lambda m, l, acc, t: A.combine(m, l, acc, groups=groups, dtype=bf16, **kw(t))
    _lower(lambda *a: combined(*a) if out == "threshold" else combined(*a).val,
           S((b, k, 6, 16), f32), S((b, k, 6, 16), f32), S((b, k, 6, 16, d), f32), S((1,), f32))
    assert len(lowered_for_gpu) == 1


def test_the_benchmarks_stream_lowers(lowered_for_gpu):
    from bench.kernels import stream

    _lower(stream, S((1, 1), bf16), S((6144, 1024), jnp.int32))
    assert len(lowered_for_gpu) == 1
