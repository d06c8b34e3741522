"""The Pallas kernels on int8 weights (one fp32 scale per output channel), interpret mode on the
CPU, against fp32 references on the dequantized weights q * scale. Outputs are NaN-poisoned, so
an unwritten element fails. (int8 holds no NaN, so unlike the float tests these cannot poison
the rows a kernel must skip; which rows are skipped is the float kernels' logic, tested there.)"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench.kernels import threshold_for
from cats_jax.sparsity import cats_activation, gated_mlp
from conftest import poisoned as _poisoned
from conftest import rel_err as _rel
from pallas_kernels import cats_mlp as K
from pallas_kernels import common
from pallas_kernels import sparse_gemv as G
from pallas_kernels.cats_mlp import cats_mlp, gate_up
from pallas_kernels.common import convert
from pallas_kernels.sparse_gemv import sparse_gemv

f32, bf16, i8 = jnp.float32, jnp.bfloat16, jnp.int8


def int8_weights(n_in, n_out, seed):
    """q int8 [in, out] uniform in [-127, 127] and positive scales fp32 [out] that spread the
    columns' magnitudes over 10x around a trained layer's (std ~ 1 / sqrt(in))."""
    kq, ks = jax.random.split(jax.random.key(seed))
    q = jax.random.randint(kq, (n_in, n_out), -127, 128).astype(i8)
    scale = jax.random.uniform(ks, (n_out,), f32, 0.3, 3.0) / (73.0 * np.sqrt(n_in))
    return q, scale


def dequantized(q, scale):
    """The fp32 weights that int8 q with per-column scale stands for (the references' weights)."""
    return q.astype(f32) * scale


@pytest.mark.parametrize("dtype", [f32, bf16, jnp.float16])
def test_convert_turns_every_int8_into_its_exact_value(dtype):
    q = jnp.arange(-128, 128, dtype=jnp.int32).astype(i8).reshape(16, 16)
    got = convert(q, dtype)
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got.astype(f32)), np.arange(-128, 128, dtype=np.float32).reshape(16, 16))
    np.testing.assert_array_equal(np.asarray(convert(jnp.asarray([1.5, -2.25], bf16), f32)), [1.5, -2.25])


def test_int8_digits_are_x_to_23_bits_and_never_wrap():
    """x's three int8 digits (batch 1's int8 dots) give round(x DIGITS_MAX / amax) exactly, also
    where |x| = amax rounds past DIGITS_MAX (a digit of 128 would wrap to -128), and the dot's
    int32 sums come back as x's products to fp32 precision."""
    n = 256
    spread = jax.random.uniform(jax.random.key(1), (64, 1, 1), f32, 0.01, 50)
    x = jax.random.normal(jax.random.key(0), (64, 1, n), f32) * spread
    x = x.at[:, :, :2].set(jnp.max(jnp.abs(x), axis=2, keepdims=True) * jnp.asarray([1.0, -1.0]))  # +-amax
    amax = jnp.max(jnp.abs(x), axis=(1, 2))
    d = np.asarray(jax.vmap(common.int8_digits)(x, amax), np.int64)  # [64, 16, n]
    assert not d[:, 3:].any()
    unit = common.DIGITS_MAX / np.asarray(amax, np.float64)[:, None]
    q = np.clip(np.floor(np.asarray(x[:, 0], np.float64) * unit + 0.5), -common.DIGITS_MAX, common.DIGITS_MAX)
    assert np.abs(65536 * d[:, 0] + 256 * d[:, 1] + d[:, 2] - q).max() <= 1  # fp32's rounding of x / amax
    w = jax.random.randint(jax.random.key(2), (n, 128), -127, 128).astype(i8)
    acc = jnp.einsum("bkn,no->bko", jnp.asarray(d, jnp.int32), w.astype(jnp.int32))
    y = np.asarray(jax.vmap(common.from_int8_digits)(acc, amax), np.float64)
    ref = np.asarray(x[:, 0], np.float64) @ np.asarray(w, np.float64)
    assert np.abs(y - ref).max() / np.abs(ref).max() < 1e-6


def test_packed_int8_bits_asm_gives_every_int8_in_every_byte():
    """convert(packed=True)'s inline asm, emulated: its xor, then PTX prmt's byte select from
    {b, a}; every int8 in each byte of the register (the others random) gives the bits of
    2^23 + 128 + q, which the float subtract turns into q. Interpret mode runs the integer formula."""
    asm = common._INT8_BITS_ASM
    mask = int(re.search(r"xor\.b32 t, \$4, (0x[0-9A-F]+);", asm).group(1), 16)
    prmts = [(int(i), int(b, 16), int(c, 16)) for i, b, c in re.findall(r"prmt\.b32 \$(\d), t, (0x[0-9A-F]+), (0x[0-9A-F]+);", asm)]
    assert [i for i, _, _ in prmts] == [0, 1, 2, 3] and all(c & 0x8888 == 0 for _, _, c in prmts)  # no sign modes

    def prmt(a, b, c):
        src = a.to_bytes(4, "little") + b.to_bytes(4, "little")
        return int.from_bytes(bytes(src[(c >> 4 * k) & 7] for k in range(4)), "little")

    rng = np.random.default_rng(0)
    for q in range(-128, 128):
        for pos, b, c in prmts:
            others = bytearray(rng.integers(0, 256, 4, dtype=np.uint8).tobytes())
            others[pos] = q & 0xFF
            bits = prmt(int.from_bytes(others, "little") ^ mask, b, c)
            assert bits == common._INT8_BIAS_BITS + q
            assert np.float32(np.uint32(bits).view(np.float32)) - np.float32(common._INT8_BIAS) == q


def _thresholded(x, t):
    return jnp.where(jnp.abs(x.astype(f32)) > t, x.astype(f32), 0.0)


# (batch, in, segments, sparsities, blocks, activation dtype): ragged inputs and columns,
# q|k|v-like segments with their own thresholds, 0..95% sparsity; batch 1 on the masked tiles
# (multiply-add, atomics) and on the gather path, batches 2..16 on the dot path
GEMV_CASES = [
    (1, 200, (64, 32, 32), (0.0, 0.5, 0.95), None, bf16),
    (1, 300, (48, 40), (0.9, 0.3), G.GatherBlocks(rows=16, cols=16, chunk=128), bf16),
    (1, 130, (32, 32), (0.5, 0.95), G.GatherBlocks(rows=16, cols=32, chunk=64), f32),
    (2, 96, (32, 16, 16), (0.3, 0.6, 0.9), None, bf16),
    (5, 72, (48, 16), (0.8, 0.2), None, f32),
    (8, 130, (32, 32, 32), (0.95, 0.95, 0.5), None, bf16),
    (16, 80, (32, 16), (0.5, 0.95), None, bf16),
]


@pytest.mark.parametrize("b,n_in,segments,sparsities,blocks,dtype", GEMV_CASES)
def test_sparse_gemv_int8_matches_the_dequantized_reference(b, n_in, segments, sparsities, blocks, dtype):
    n_out = sum(segments)
    q, scale = int8_weights(n_in, n_out, seed=b + n_in)
    x = jax.random.normal(jax.random.key(b), (b, n_in), f32).astype(dtype)
    t = jnp.stack([threshold_for(x, s) for s in sparsities])
    got = _poisoned(lambda x, q, t, s: sparse_gemv(x, q, t, segments=segments, blocks=blocks, scale=s), x, q, t, scale)
    assert got.shape == (b, n_out) and got.dtype == dtype
    cuts = np.cumsum(segments)[:-1]
    want = jnp.concatenate([_thresholded(x, ti) @ wi for ti, wi in
                            zip(t, jnp.split(dequantized(q, scale), cuts, axis=1))], axis=1)
    assert _rel(got, want) < (1e-2 if dtype == bf16 else 1e-5)


@pytest.mark.parametrize("b,n_in,n_out,blocks", [(1, 200, 96, G.GemvBlocks(rows=32, cols=32, splits=4)),  # a row tail
                                                  (1, 128, 64, G.GemvBlocks(rows=16, cols=64, splits=2)),
                                                  (3, 72, 48, G.GemvBlocks(rows=16, cols=16, splits=2)),
                                                  (13, 72, 48, None)])  # the dense blocks, fitted
def test_dense_int8_gemv_reads_every_row(b, n_in, n_out, blocks):
    """skip_zeros=False (dense int8 decode): no row is tested, zeros in x included; the input's tail
    past its end is still masked."""
    q, scale = int8_weights(n_in, n_out, seed=n_in)
    x = jax.random.normal(jax.random.key(b), (b, n_in), f32).astype(bf16).at[:, ::3].set(0)
    got = _poisoned(lambda x, q, s: sparse_gemv(x, q, scale=s, blocks=blocks, skip_zeros=False), x, q, scale)
    assert got.shape == (b, n_out) and _rel(got, x.astype(f32) @ dequantized(q, scale)) < 1e-2


@pytest.mark.parametrize("b,blocks", [(1, G.GemvBlocks(rows=32, cols=32, splits=4)),  # a row tail (200 rows)
                                      (1, None),  # the dense blocks, fitted
                                      (3, G.GemvBlocks(rows=16, cols=16, splits=2))])
def test_dense_int8_gemv_of_a_gated_input(b, blocks):
    """Dense int8 decode's down projection: the masked tiles compute silu(gate) * up from the int8
    gate|up sums (NaN past them) as they load each tile's rows, and read every row."""
    n_in, n_out = 200, 48
    q, scale = int8_weights(n_in, n_out, seed=7)
    ks = jax.random.split(jax.random.key(b), 2)
    sums = jax.random.normal(ks[0], (b, 2 * n_in), f32) * 40
    x_scale = jax.random.uniform(ks[1], (2 * n_in,), f32, 0.01, 0.05)
    padded = jnp.concatenate([sums, jnp.full((b, 24), jnp.nan, f32)], axis=1)
    h = G.gated_input(padded, x_scale, n_in, bf16)
    got = _poisoned(lambda s, q, sc: sparse_gemv(s, q, scale=sc, blocks=blocks, out_dtype=bf16, gated=True,
                                                 x_scale=x_scale, skip_zeros=False), padded, q, scale)
    assert got.shape == (b, n_out) and _rel(got, h.astype(f32) @ dequantized(q, scale)) < 1e-2
    want = _poisoned(lambda h, q, sc: sparse_gemv(h, q, scale=sc, blocks=blocks, out_dtype=bf16, skip_zeros=False),
                     h, q, scale)
    np.testing.assert_allclose(np.asarray(got, f32), np.asarray(want, f32), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("b", [1, 3])
def test_dense_int8_gemv_adds_into_a_zeroed_buffer(b):
    """zeroed: the output buffer an earlier kernel zeroed (sum_shape: rows padded to a power of two,
    columns to whole blocks), used as it is; unfinished, the padding rows stay zeros."""
    q, scale = int8_weights(256, 96, seed=3)
    x = jax.random.normal(jax.random.key(4), (b, 256), f32).astype(bf16)
    shape = G.sum_shape(b, 256, (96,), dense=True)
    assert shape[0] == (1 if b == 1 else 4) and shape[1] >= 96
    gemv = lambda x, q, s, z, finish=True: sparse_gemv(x, q, scale=s, skip_zeros=False, zeroed=z, finish=finish)
    got = _poisoned(gemv, x, q, scale, jnp.zeros(shape, f32))
    assert got.shape == (b, 96) and _rel(got, x.astype(f32) @ dequantized(q, scale)) < 1e-2
    sums = _poisoned(lambda *a: gemv(*a, finish=False), x, q, scale, jnp.zeros(shape, f32))
    assert sums.shape == shape and np.all(np.asarray(sums[b:]) == 0)
    with pytest.raises(ValueError, match="zeroed .* is not the output buffer"):
        sparse_gemv(x, q, scale=scale, skip_zeros=False, zeroed=jnp.zeros((shape[0], 95), f32))


def _int8_mlp(h, i, seed):
    """Neuron-major int8 weights and their scales, w_gu [2I, H] with s_gu [2I] (a scale per row),
    w_down [I, H] with s_down [H]; and the dequantized Flax-layout wg, wu [H, I], wd [I, H]."""
    q_gu, s_gu = int8_weights(h, 2 * i, seed)  # [H, 2I]: a scale per output channel
    q_d, s_d = int8_weights(i, h, seed + 1)
    w_gu = dequantized(q_gu, s_gu)
    return (q_gu.T, s_gu, q_d, s_d), (w_gu[:, :i], w_gu[:, i:], dequantized(q_d, s_d))


# (batch, hidden, intermediate, sparsity): ragged shapes, 0..95% sparsity, batch 1 (multiply-add)
# and 2..16 (dots on padded batch rows)
MLP_CASES = [(1, 72, 200, 0.95), (1, 64, 128, 0.5), (2, 96, 80, 0.0), (3, 200, 96, 0.8), (4, 40, 144, 0.6),
             (6, 64, 96, 0.5), (8, 72, 112, 0.7), (16, 64, 128, 0.5)]


@pytest.mark.parametrize("b,h,i,sparsity", MLP_CASES)
def test_cats_mlp_int8_matches_the_dequantized_reference(b, h, i, sparsity):
    (w_gu, s_gu, w_d, s_d), (wg, wu, wd) = _int8_mlp(h, i, seed=b * 1000 + h + i)
    x = jax.random.normal(jax.random.key(b), (b, h), f32).astype(bf16)
    g = jnp.dot(x.astype(f32), wg)
    t = threshold_for(jax.nn.silu(g), sparsity)
    a = cats_activation(g, t)
    y, hidden = _poisoned(lambda x, w_gu, w_d, t, s_gu, s_d: cats_mlp(x, w_gu, w_d, t, scales=(s_gu, s_d)),
                          x, w_gu, w_d, t, s_gu, s_d)
    # the same neurons kept: the rule reads the scaled gate (scales differ per neuron)
    np.testing.assert_array_equal(np.asarray(hidden) == 0, np.asarray(a) == 0)
    assert _rel(hidden, a * jnp.dot(x.astype(f32), wu)) < 1e-2
    assert y.shape == (b, h) and y.dtype == bf16
    assert _rel(y, gated_mlp(x, wg, wu, wd, t)) < 1e-2


DOTS = K.GateUpBlocks(32, 64, 4, 3)


@pytest.mark.parametrize("h,i,sparsity,blocks", [(72, 200, 0.95, DOTS), (64, 128, 0.5, DOTS), (200, 96, 0.0, DOTS),
                                                  (96, 80, 0.7, K.GateUpBlocks(16, 32, 2, 3))])
def test_gate_up_int8_dots_match_the_dequantized_reference(h, i, sparsity, blocks):
    """Batch 1's int8 dots of x's digits (tails on both axes, 0..95% sparsity): the same neurons
    kept as the fp32 reference, and h to its precision."""
    (w_gu, s_gu, _, _), (wg, wu, _) = _int8_mlp(h, i, seed=h + i)
    x = jax.random.normal(jax.random.key(i), (1, h), f32).astype(bf16)
    g = jnp.dot(x.astype(f32), wg)
    t = threshold_for(jax.nn.silu(g), sparsity)
    a = cats_activation(g, t)
    hidden = _poisoned(lambda x, w, t, s: gate_up(x, w, t, scale=s, blocks=blocks), x, w_gu, t, s_gu)
    np.testing.assert_array_equal(np.asarray(hidden) == 0, np.asarray(a) == 0)
    assert _rel(hidden, a * jnp.dot(x.astype(f32), wu)) < 1e-2


def test_int8_at_batch_1_refuses_blocks_a_dot_cannot_take(monkeypatch):
    (w_gu, s_gu, _, _), _ = _int8_mlp(64, 128, seed=0)
    x = jnp.ones((1, 64), bf16)
    with pytest.raises(ValueError, match="needs rows >= 8 \\* num_warps and cols >= 32"):
        gate_up(x, w_gu, 0.1, scale=s_gu, blocks=K.GateUpBlocks(16, 128, 4))
    assert K.blocks_for(1, 48, 20, int8=False).rows < 32  # fitted to the shape
    for table in ({1: K.GateUpBlocks(64, 128, 4)}, {}):  # int8's own blocks, or the float table's fitted
        monkeypatch.setattr(K, "INT8_TABLE", table)
        fitted = K.blocks_for(1, 48, 20, int8=True)
        assert fitted.int8_dots_fit() and (fitted.rows, fitted.cols) == (32, 32)


@pytest.mark.parametrize("b", [1, 3])  # batch 1: int8 dots of fp32 x's digits
def test_gate_up_int8_weighted_criterion_and_fp32_activations(b):
    """fp32 activations keep their precision against int8 weights (no rounding to the weights'
    dtype), and the weighted criterion reads the scaled gate as the magnitude one does."""
    h, i = 72, 96
    (w_gu, s_gu, _, _), (wg, wu, _) = _int8_mlp(h, i, seed=11)
    x = jax.random.normal(jax.random.key(b), (b, h), f32)
    f = jax.random.uniform(jax.random.key(i), (i,), f32, 0.1, 3.0)
    g = jnp.dot(x, wg)
    t = threshold_for(jnp.abs(jax.nn.silu(g)) * f, 0.6)
    a = cats_activation(g, t, f)
    hidden = _poisoned(lambda x, w, t, f, s: gate_up(x, w, t, f, s), x, w_gu, t, f, s_gu)
    np.testing.assert_array_equal(np.asarray(hidden) == 0, np.asarray(a) == 0)
    assert _rel(hidden, a * jnp.dot(x, wu)) < 1e-5


def test_int8_kernels_reject_bad_scales():
    x = jnp.ones((1, 8), bf16)
    q, scale = int8_weights(8, 48, seed=0)
    with pytest.raises(ValueError, match="int8 weights need their fp32 scale"):
        sparse_gemv(x, q)
    with pytest.raises(ValueError, match=r"scale \(47,\) .* expected \(48,\)"):
        sparse_gemv(x, q, scale=scale[:47])
    with pytest.raises(ValueError, match="only for int8 weights; these are bfloat16"):
        sparse_gemv(x, q.astype(bf16), scale=scale)
    w_gu, s_gu = q.T, scale  # [2I, H] = [48, 8]: 24 neurons
    with pytest.raises(ValueError, match=r"gate_up: scale \(24,\) .* expected \(48,\)"):
        gate_up(x, w_gu, 0.1, scale=s_gu[:24])
    with pytest.raises(ValueError, match="gate_up: int8 weights need"):
        gate_up(x, w_gu, 0.1)
    with pytest.raises(ValueError, match="pair"):
        cats_mlp(x, w_gu, w_gu[24:], 0.1, scales=(s_gu,))
