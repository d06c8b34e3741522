"""What the Pallas (Triton) kernels share: when they run, interpret mode, small shape helpers."""

from __future__ import annotations

import contextlib
import functools
import operator
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Pallas' Triton backend warns that it is deprecated on every lowering; it is the backend we target.
warnings.filterwarnings("ignore", message=".*Triton backend is deprecated.*")

_interpret_on_cpu = False
_poison_outputs = False


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def kernels_enabled() -> bool:
    """Whether the model routes decode steps through the kernels: on GPU, or on the CPU inside
    `interpret_on_cpu()` (tests). Interpret mode is far too slow for real use."""
    return on_gpu() or _interpret_on_cpu


@contextlib.contextmanager
def interpret_on_cpu():
    """Run the kernels in Pallas interpret mode on the CPU (tests). Decided at trace time, so
    functions jitted outside this context keep what they traced."""
    global _interpret_on_cpu
    old, _interpret_on_cpu = _interpret_on_cpu, True
    try:
        yield
    finally:
        _interpret_on_cpu = old


@contextlib.contextmanager
def poisoned_outputs():
    """Kernels traced inside this context start from NaN-filled output buffers (integer ones: their
    minimum; tests: an element a kernel fails to write stays poisoned instead of inheriting a
    stale buffer's plausible value)."""
    global _poison_outputs
    old, _poison_outputs = _poison_outputs, True
    try:
        yield
    finally:
        _poison_outputs = old


def call(kernel, out_shape, grid, num_warps: int, num_stages: int, name: str, accumulate: tuple[int, ...] = (),
         given: tuple[int, ...] = ()):
    """pl.pallas_call on whole-array refs (the kernels index global memory themselves).

    out_shape: a ShapeDtypeStruct or a tuple of them. The outputs whose index is in `accumulate`
    start from zeros (the kernel atomic-adds into them); those in `given` start from the arrays
    passed as the call's last arguments, in that order (e.g. zeros written by an earlier kernel,
    which saves XLA a memset launch); the others start as whatever memory XLA hands over, or NaN
    (integers: their minimum) under poisoned_outputs(). Initial values travel as aliased inputs
    that the kernel never sees."""
    shapes = tuple(out_shape) if isinstance(out_shape, (tuple, list)) else (out_shape,)
    params = dict(
        grid=grid,
        interpret=not on_gpu(),
        name=name,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
    )
    init = {i: 0 if i in accumulate else _poison(shapes[i].dtype)
            for i in range(len(shapes)) if (i in accumulate or _poison_outputs) and i not in given}
    if not init and not given:
        return pl.pallas_call(kernel, out_shape=out_shape, **params)

    def with_initial_outputs(*args):
        n = len(args) - len(given)
        bufs = [*args[n:], *(jnp.full(shapes[i].shape, v, shapes[i].dtype) for i, v in init.items())]
        body = lambda *refs: kernel(*refs[:n], *refs[n + len(bufs):])  # skip the aliased inputs
        aliases = {n + j: i for j, i in enumerate((*given, *init))}
        return pl.pallas_call(body, out_shape=out_shape, input_output_aliases=aliases, **params)(*args[:n], *bufs)

    return with_initial_outputs


def _poison(dtype):
    """NaN, or for integer outputs (row numbers, counts) the most negative value."""
    return jnp.iinfo(dtype).min if jnp.issubdtype(dtype, jnp.integer) else jnp.nan


def load(ref, mask=None, **kw):
    """Triton load; masked-off elements read as 0 and move no bytes."""
    return plgpu.load(ref, mask=mask, other=None if mask is None else 0, **kw)


# int8 -> fp32 by way of the float bits of 2^23 + 128 + q (exact for |q| <= 128), then a float
# subtract, where the conversion instruction (I2F, cvt.rn.f32.s8; Triton's int8 -> bf16 uses it too)
# runs at a quarter or less of the FMA rate on sm_80 / sm_90 and can bound an int8 GEMV. On the GPU
# the bits come from the four int8 of a 32-bit register at once: one xor flips their sign bits
# (q + 128 as a byte), then one byte permute per value writes it under the exponent byte 0x4B: 1.25
# integer instructions a value, against a byte extraction and an add (2) when Triton sees the
# integer formula. The fp32 of a small integer is exact in bf16 as its upper 16 bits.
_INT8_BIAS_BITS = 0x4B000080  # the fp32 bits of 8388736.0 = 2^23 + 128
_INT8_BIAS = 8388736.0
_INT8_BITS_ASM = """{
.reg .b32 t;
xor.b32 t, $4, 0x80808080;
prmt.b32 $0, t, 0x4B000000, 0x7540;
prmt.b32 $1, t, 0x4B000000, 0x7541;
prmt.b32 $2, t, 0x4B000000, 0x7542;
prmt.b32 $3, t, 0x4B000000, 0x7543;
}"""


def _int8_bias_bits(w):
    """The int32 bits of the fp32 2^23 + 128 + q per int8 q of a loaded tile: on the GPU four at a
    time (above), in interpret mode by the integer formula."""
    if not on_gpu():
        return w.astype(jnp.int32) + _INT8_BIAS_BITS
    [bits] = plgpu.elementwise_inline_asm(_INT8_BITS_ASM, args=[w], constraints="=r,=r,=r,=r,r", pack=4,
                                          result_shape_dtypes=[jax.ShapeDtypeStruct(w.shape, jnp.int32)])
    return bits


def convert(w, dtype, packed: bool = False):
    """A loaded weight tile in `dtype`: int8 exactly by the bit tricks above, float by a conversion.
    packed: four int8 a register on the GPU (above), for a tile used in the layout it was loaded in
    (batch 1's multiply-adds); a tile that moves to another layout (a dot operand) would move as
    fp32 instead of int8, which cost more than it saved (bench.sass)."""
    if w.dtype != jnp.int8:
        return w.astype(dtype)
    bits = _int8_bias_bits(w) if packed else w.astype(jnp.int32) + _INT8_BIAS_BITS
    f = jax.lax.bitcast_convert_type(bits, jnp.float32) - _INT8_BIAS
    if dtype == jnp.bfloat16:
        return jax.lax.bitcast_convert_type((jax.lax.bitcast_convert_type(f, jnp.int32) >> 16).astype(jnp.int16),
                                            jnp.bfloat16)
    return f.astype(dtype)


# int8 weights at batch 1 on int8 tensor-core dots (IMMA): x as three balanced base-256 int8 digits
# of q = round(x DIGITS_MAX / amax) (23 bits against the largest |x|), rows 0-2 of a 16-row A
# operand, so that a dot's int32 sums take a whole int8 tile as it is stored: no conversion or
# multiply-add a weight (sm_90: about 1 instruction a weight against 3.9, bench.sass).
DIGITS_MAX = 127 * (65536 + 256 + 1)  # every digit of |q| <= DIGITS_MAX stays within int8
DIGIT_ROWS = 16  # the A operand's rows: Triton's smallest dot M


def int8_digits(x, amax):
    """x [1, n] fp32 (|x| <= amax > 0) as int8 [DIGIT_ROWS, n]: rows 0-2 hold the digits h, m, l
    of q = 65536 h + 256 m + l, the other rows zeros."""
    # x DIGITS_MAX / amax may round past DIGITS_MAX where |x| = amax: a digit would wrap
    q = jnp.clip(jnp.floor(x * (DIGITS_MAX / amax) + 0.5), -DIGITS_MAX, DIGITS_MAX).astype(jnp.int32)
    low = ((q + 128) & 255) - 128
    q = (q - low) >> 8
    mid = ((q + 128) & 255) - 128
    high = (q - mid) >> 8
    r = iota(DIGIT_ROWS)[:, None]
    return jnp.where(r == 0, high, jnp.where(r == 1, mid, jnp.where(r == 2, low, 0))).astype(jnp.int8)


def from_int8_digits(acc, amax):
    """The fp32 sums [n] of x's products from a dot's int32 sums [DIGIT_ROWS, n] of int8_digits(x, amax)."""
    a, r = acc.astype(jnp.float32), iota(DIGIT_ROWS)[:, None]
    sums = jnp.where(r == 0, 65536.0 * a, jnp.where(r == 1, 256.0 * a, jnp.where(r == 2, a, 0.0)))
    return jnp.sum(sums, axis=0) * (amax / DIGITS_MAX)


def finished(sums, scale, dtype):
    """A GEMV's fp32 sums as the projection finishes them: times their int8 scale (None: float
    weights), rounded to dtype. sparse_gemv applies it to its output; with finish=False the consumer
    (decode attention, add + norm, the gated compaction) applies it to what it loads."""
    return (sums if scale is None else sums * scale).astype(dtype)


# Atomic adds with relaxed memory order. Pallas' atomic_add orders each add acquire-release: the
# sm_90 code fences (MEMBAR.ALL.GPU) and waits for the old value (ATOMG) at the end of every
# program. The kernels' adds only accumulate sums that a later launch reads, which needs no order
# between programs: relaxed, they compile to fire-and-forget reductions (REDG, bench.sass). Pallas
# does not expose the order, so this is its atomic_rmw_p with it, from JAX 0.11.2's internals
# (pinned); where they moved, Pallas' own ordered add.
try:
    from jax._src import core as _core
    from jax._src import tree_util as _tree_util
    from jax._src.lib.triton import dialect as _tt
    from jax._src.pallas.triton import lowering as _tl
    from jax._src.pallas.triton import primitives as _tp
    from jax._src.state import discharge as _discharge
    from jax._src.state import primitives as _state

    def _add_relaxed_lowering(ctx, *args_flat, args_tree):
        ptr, (idx,), val, _ = args_tree.unflatten(args_flat)
        ptr = _tl._compute_pointers_from_indices(ptr, ctx.block_infos[0], idx)
        val = _tl._ensure_ir_value(val, args_tree.unflatten(ctx.avals_in)[2])
        return _tl._atomic_rmw(_tt.RMWOp.FADD, ptr, val, semantic=_tt.MemSemantic.RELAXED)

    _add_relaxed_p = _core.Primitive("atomic_add_relaxed")
    _ADD = _tp.AtomicOpType.ADD
    _add_relaxed_p.def_effectful_abstract_eval(functools.partial(_tp._atomic_abstract_eval, atomic_type=_ADD))
    _discharge.register_discharge_rule(_add_relaxed_p)(functools.partial(_tp._atomic_rmw_discharge_rule,
                                                                         atomic_type=_ADD))
    _tl.register_lowering(_add_relaxed_p)(_add_relaxed_lowering)
except (ImportError, AttributeError):
    _add_relaxed_p = None


def atomic_add(ref, idx, val):
    """ref[idx] += val (float32 ref, an index of pl.ds / arrays as plgpu.atomic_add takes), atomically
    and with no memory order (above)."""
    if _add_relaxed_p is None:
        plgpu.atomic_add(ref, idx, val)
        return
    ref, transforms = _state.get_ref_and_transforms(ref, idx, "atomic_add")
    args_flat, args_tree = _tree_util.tree_flatten((ref, transforms, val, None))
    _add_relaxed_p.bind(*args_flat, args_tree=args_tree)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def check_blocks(blocks, *names: str) -> None:
    """A clear error for block sizes Triton cannot take (its tiles and warp counts are powers of two),
    rather than a failure deep in the lowering."""
    for name in names + ("num_warps",):
        v = getattr(blocks, name)
        try:
            n = operator.index(v)
        except TypeError:  # not an integer
            n = 0
        if n < 1 or n & (n - 1):
            raise ValueError(f"{type(blocks).__name__}: {name}={v!r} must be a positive power of two")


def block_along(n: int, preferred: int, smallest: int = 16) -> int:
    """A power-of-two block for an axis of length n: `preferred`, halved down to `smallest` if that
    divides n (no tail to mask), and never much longer than n itself."""
    b = preferred
    while b > smallest and n % b:
        b //= 2
    if n % b:
        b = preferred
    return max(min(b, next_pow2(n)), 1)


def padded_batch(batch: int, use_dot: bool) -> int:
    """Rows a kernel's tiles hold for `batch` decode rows: a power of two, and at least 16 when
    they feed tensor-core dots (Triton's smallest M). Padding rows are masked loads of zeros."""
    return max(next_pow2(batch), 16 if use_dot else 1)


def mask2d(rows=None, cols=None):
    """The [rows, cols] mask of a tile from per-row and per-column masks; None for an axis that
    needs no mask (no tail, nothing skipped), None if neither does."""
    if rows is None or cols is None:
        return None if rows is None and cols is None else (rows[:, None] if cols is None else cols[None, :])
    return rows[:, None] & cols[None, :]


def iota(n: int, start=0):
    return start + jnp.arange(n, dtype=jnp.int32)
