"""The decode kernels compiled for sm_90 (H100 / H200) without a GPU: registers, spills and
instruction counts per kernel, to read a kernel change's machine code before timing it.

Pallas lowers each kernel to Triton IR on the CPU (as tests/test_triton_lowering.py checks); the
`triton` wheel (not a dependency: `pip install triton==3.6.0`, the release jaxlib's Triton
follows) compiles that IR with its passes and its ptxas, and its nvdisasm lists the SASS. XLA
compiles the same IR with its own copy of those passes, so the code is close to what runs, not
identical (a gather summing over an axis of length one compiled the same here either way, and
ran 10 us slower in XLA's copy on the H100); times come from the GPU only.

    python -m bench.sass                          # Mistral-7B shapes, bf16, the H200's blocks
    python -m bench.sass --int8 --only gather,masked --save runs/sass   # also write .ttgir / .ptx / .sass

Columns: registers per thread, spilled bytes, the global loads per thread by width (e.g. 8x128:
eight 16-byte loads; 4x128a: four 16-byte copies to shared memory, cp.async), then per thread
FFMA, FADD, integer ops (IADD3, LOP3, PRMT, SHF, IMAD, ISETP, ...), tensor-core MMAs and
barriers, counted in the code (a loop body once), and the instructions of each loop body (what
a program repeats: "317+323" for two loops), the figure to read against the bytes a step loads,
and how far into each body its last 8- or 16-byte load comes ("loads by": early, a step's weight
loads are in flight together; late, ptxas issued them a few at a time: loop_bodies). Last, the
launch's programs, how many fit on an SM at once (registers, warps, shared memory) and the waves
they make on 132 SMs (H100 / H200): a latency-bound kernel at 3.39 waves runs its last wave
two-fifths full.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import export

from bench.kernels import config
from cats_jax.config import PRESETS
from pallas_kernels import attention as A
from pallas_kernels import cats_mlp as K
from pallas_kernels import common
from pallas_kernels import norm as N
from pallas_kernels import sparse_gemv as G

S, f32, bf16, i8 = jax.ShapeDtypeStruct, jnp.float32, jnp.bfloat16, jnp.int8
TRITON_CALL = "__gpu$xla.gpu.triton"


@contextlib.contextmanager
def lowered_for_sm90():
    """Inside: Pallas kernels lower as for a GPU of compute capability 9.0 (on any machine); yields
    the list that collects each kernel's lowered Triton module, verified. Raises ImportError or
    AttributeError if JAX's (private) Triton lowering is not where this looks."""
    from jax._src.pallas.triton import pallas_call_registration as reg
    lower, gpu_info, on_gpu = reg.lowering.lower_jaxpr_to_triton_module, reg.gpu_info_lib, common.on_gpu
    lowered = []

    def lower_and_verify(*args, **kw):
        result = lower(*args, **kw)
        result.module.operation.verify()  # raises on an invalid module
        lowered.append(result)
        return result

    reg.lowering.lower_jaxpr_to_triton_module = lower_and_verify
    reg.gpu_info_lib = types.SimpleNamespace(
        get_gpu_info=lambda: types.SimpleNamespace(compute_capability="9.0"))
    common.on_gpu = lambda: True
    try:
        yield lowered
    finally:
        reg.lowering.lower_jaxpr_to_triton_module, reg.gpu_info_lib, common.on_gpu = lower, gpu_info, on_gpu


def lower(fn, *args) -> str:
    """Lower jit(fn) at these shapes for CUDA (inside lowered_for_sm90); the StableHLO text."""
    exported = export.export(jax.jit(fn), platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args)
    return exported.mlir_module()


@dataclasses.dataclass
class Kernel:
    name: str
    ttir: str  # the Triton IR as Pallas lowered it
    num_warps: int
    num_stages: int
    programs: int  # the launch's grid, all axes


def kernels_of(fn, *args) -> list[Kernel]:
    """The Triton kernels jit(fn) launches at these shapes, in order, with their launch settings."""
    with lowered_for_sm90() as lowered:
        hlo = lower(fn, *args)
    calls = [dict(re.findall(r'\b(name|num_warps|num_stages|grid_x|grid_y|grid_z) = "?(\w+)', call))
             for call in hlo.split(TRITON_CALL)[1:]]
    assert len(calls) == len(lowered), (len(calls), len(lowered))
    return [Kernel(c["name"], str(r.module), int(c["num_warps"]), int(c["num_stages"]),
                   int(c["grid_x"]) * int(c["grid_y"]) * int(c["grid_z"])) for c, r in zip(calls, lowered)]


SMS = 132  # H100 SXM and H200
SM_REGISTERS, SM_WARPS, SM_PROGRAMS, SM_SHARED = 65536, 64, 32, 227 * 1024  # sm_90, per SM


def programs_per_sm(regs: int, num_warps: int, shared: int) -> int:
    """Programs (CTAs) of a kernel resident on one sm_90 SM at once: registers are allocated per
    warp in units of 256 (8 a thread), and warps, programs and shared memory have their own limits."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    fits = [SM_REGISTERS // (per_warp * num_warps), SM_WARPS // num_warps, SM_PROGRAMS]
    return min(fits + ([SM_SHARED // shared] if shared else []))


def compile_sm90(k: Kernel, save: Path | None = None) -> dict:
    """Compile with pip Triton for sm_90; registers, spills and SASS instruction counts."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{k.name}.ttir"
        path.write_text(k.ttir)
        c = triton.compile(str(path), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=k.num_warps, num_stages=k.num_stages))
        cubin = Path(tmp) / f"{k.name}.cubin"
        cubin.write_bytes(c.asm["cubin"])
        tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
        usage = subprocess.run([tools / "cuobjdump", "-res-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([tools / "nvdisasm", "-c", cubin], capture_output=True, text=True).stdout
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        for ext, text in (("ttgir", c.asm["ttgir"]), ("ptx", c.asm["ptx"]), ("sass", sass)):
            (save / f"{k.name}.{ext}").write_text(text)
    res = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    bodies = loop_bodies(sass)
    loops = "+".join(str(n) for n, _ in bodies) or "-"
    loads_by = "+".join("-" if at is None else f"{100 * at // n}%" for n, at in bodies) or "-"
    ops = collections.Counter(op.split(".")[0] for _, op in _INSTRUCTION.findall(sass))
    loads = collections.Counter(re.findall(r"\bLDG\.E(?:\.EF|\.EL|\.LU)?(?:\.(\d+|U16|U8|S16|S8))?\b", sass))
    loads.update(f"{w or 32}a" for w in re.findall(r"\bLDGSTS\.E(?:\.BYPASS)?(?:\.LTC128B)?(?:\.(\d+))?\b", sass))
    width = {"": "32", "U16": "16", "S16": "16", "U8": "8", "S8": "8"}
    regs = int(res.get("REG", 0))
    per_sm = programs_per_sm(regs, k.num_warps, c.metadata.shared)
    return dict(regs=regs, per_sm=per_sm, waves=k.programs / (per_sm * SMS), spill=int(res.get("STACK", 0)) + int(res.get("LOCAL", 0)),
                ldg=" ".join(f"{n}x{width.get(w, w)}" for w, n in
                             sorted(loads.items(), key=lambda t: -int(width.get(t[0], t[0]).rstrip("a")))),
                ffma=ops["FFMA"], fadd=ops["FADD"],
                int=sum(ops[o] for o in ("IADD3", "LOP3", "PRMT", "SHF", "IMAD", "ISETP", "SEL", "LEA", "IABS", "I2F", "F2I")),
                mma=ops["HMMA"] + ops["IMMA"], bar=ops["BAR"], atom=ops["ATOMG"] + ops["RED"] + ops["REDG"], loops=loops,
                loads_by=loads_by)


# a line of nvdisasm's listing: its address and its instruction (past a predicate)
_INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)", re.M)


def loop_bodies(sass: str) -> list[tuple[int, int | None]]:
    """Each loop body of nvdisasm's listing, from a label to a later branch back to it, in order:
    its instructions (NOPs aside) and how many of them come before its last 8- or 16-byte global
    load (the weight loads), None if it has none. A late last load means ptxas issued the step's
    loads a few at a time between the arithmetic (it does so to save registers), so that a thread
    has fewer bytes in flight than its tile; whether that costs time only the GPU says (int8
    `gate_up`'s sat 61% into the body, and issuing them together alone gained 1%; more programs an
    SM then gained 14%: docs/decisions.md)."""
    labels, pending = {}, []
    for line in sass.splitlines():
        if m := re.match(r"^(\.L_x_\d+):", line):
            pending.append(m.group(1))
        elif m := _INSTRUCTION.match(line):
            labels.update((name, int(m.group(1), 16)) for name in pending)
            pending = []
    code = [(int(a, 16), op) for a, op in _INSTRUCTION.findall(sass) if op != "NOP"]
    bodies = []
    for line in sass.splitlines():
        m = re.match(r"^\s+/\*([0-9a-f]+)\*/.*\bBRA\b.*`\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(2), 1 << 62) < int(m.group(1), 16):
            lo, hi = labels[m.group(2)], int(m.group(1), 16)
            body = [op for a, op in code if lo <= a <= hi]
            wide = [i for i, op in enumerate(body) if re.match(r"LDG\.E(\.\w+)*\.(64|128)$", op)]
            bodies.append((len(body), wide[-1] if wide else None))
    return bodies


def cases(model: str, int8: bool, device: str):
    """(label, fn, args) per decode kernel at the model's shapes; GEMV blocks as TUNED has them for
    `device` (the table's elsewhere)."""
    c = config(model)
    h, n_i = c.hidden_size, c.intermediate_size
    qkv = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim)
    wt = i8 if int8 else bf16
    tuned = G.TUNED.get(device, {})

    def tuned_blocks(n_in, n_out, cats_down=False):
        """TUNED's blocks for `device` at batch 1 as blocks_for looks them up, or None."""
        return G.tuned_blocks(tuned, 1, n_in, n_out, G.gemv_variant(wt, cats_down))

    def gemv(name, n_in, segs, thresholded=True, gated=False):
        """(label, fn, args) of a projection's GEMV: thresholded ones with TUNED's blocks, dense
        (int8) ones with their "int8 dense" entry or sparse_gemv.DENSE, as decode runs them."""
        n_out = sum(segs)
        blk = G.blocks_for(1, n_in, n_out, dense=not thresholded, tuned=tuned,
                           variant=G.gemv_variant(wt, dense=not thresholded))
        scale = (S((n_out,), f32),) if int8 else ()
        x_scale = (S((2 * n_in,), f32),) if int8 and gated else ()  # the gate|up sums' int8 scale
        x = S((1, 2 * n_in + 128), f32) if gated else S((1, n_in), bf16)
        ts = tuple(S((), f32) for _ in segs) if thresholded else ()

        def fn(x, w, *rest):
            t, (s, xs) = (rest[:len(ts)] or None), (*rest[len(ts):], None, None)[:2]
            return G.sparse_gemv(x, w, t, segments=segs, blocks=blk, scale=s, finish=False, gated=gated, x_scale=xs,
                                 out_dtype=bf16 if gated else None, skip_zeros=thresholded)
        kind = "gather" if isinstance(blk, G.GatherBlocks) else "masked"
        return f"{name} {'' if thresholded else 'dense '}{kind}", fn, (x, S((n_in, n_out), wt), *ts, *scale, *x_scale)

    out = [gemv("qkv", h, qkv), gemv("gate|up", h, (n_i, n_i)), gemv("down", n_i, (h,), gated=True)]
    if int8 or G.tuned_key(1, h, h) in tuned:  # o on the kernels where TUNED lists it (int8: always, as decode)
        out.insert(1, gemv("o", h, (h,)))
    if int8:  # dense int8 GEMVs: masked tiles, nothing thresholded; down computes silu(gate) * up
        out += [gemv(name, n_in, (n_out,), thresholded=False, gated=name == "down")
                for name, n_in, n_out in (("qkv", h, sum(qkv)), ("o", h, h), ("gate|up", h, 2 * n_i), ("down", n_i, h))]
    h_scale = (S((h,), f32),) if int8 else ()  # a GEMV's unfinished sums, with their int8 scale
    out.append(("add+norm", lambda x, hh, s, *hs: N.add_rms_norm(x, hh, s, 1e-5, *hs),
                (S((1, h), bf16), S((1, h + 128), f32), S((h,), bf16), *h_scale)))
    if int8:  # dense int8: the add + norm also zeroes q|k|v's and o's output buffers
        shapes = (G.sum_shape(1, h, (sum(qkv),), dense=True), G.sum_shape(1, h, (h,), dense=True))
        out.append(("add+norm zeroing", lambda x, hh, s, *hs: N.add_rms_norm(x, hh, s, 1e-5, *hs, zeros=shapes),
                    (S((1, h), bf16), S((1, h + 128), f32), S((h,), bf16), *h_scale)))
    qkv_blk = tuned_blocks(h, sum(qkv))
    if isinstance(qkv_blk, G.GatherBlocks):  # the add + norm compacting q|k|v's gather input
        layout = G.CompactLayout(h, sum(qkv), 3, qkv_blk)
        out.append(("add+norm compacting", lambda x, hh, s, *ts: N.add_rms_norm(
            x, hh, s, 1e-5, compaction=G.Compaction(layout, ts))[1].val,
            (S((1, h), bf16), S((1, h + 128), f32), S((h,), bf16), *[S((1,), f32)] * 3)))
    out.append(("attention", lambda qkv_, pos, k, v, rope: A.decode_attention(
        qkv_, pos, k, v, rope, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads),
        (S((1, sum(qkv)), bf16), S((1,), jnp.int32), S((1, 4096, c.num_kv_heads, c.head_dim), bf16),
         S((1, 4096, c.num_kv_heads, c.head_dim), bf16), (S((1, c.head_dim // 2), f32),) * 2)))
    scales = (S((2 * n_i,), f32), S((h,), f32)) if int8 else ()
    down_blk = tuned_blocks(n_i, h, cats_down=True)  # CATS's down GEMV as decode runs it
    out.append(("cats gate_up+down", lambda x, gu, d, t, *s: K.cats_mlp(x, gu, d, t, scales=s or None,
                                                                         down_blocks=down_blk)[0],
                (S((1, h), bf16), S((2 * n_i, h), wt), S((n_i, h), wt), S((), f32), *scales)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.sass", description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(PRESETS), default="mistral-7b", help="preset whose shapes to compile (cats_jax.config.PRESETS)")
    p.add_argument("--int8", action="store_true", help="int8 weights (and the dense int8 GEMVs)")
    p.add_argument("--device", default="NVIDIA H200", help="whose TUNED blocks to use (device kind)")
    p.add_argument("--only", default="", help="comma-separated substrings: compile only the kernels whose label has one")
    p.add_argument("--save", type=Path, help="write each kernel's .ttgir, .ptx and .sass here")
    a = p.parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("bench.sass needs the triton wheel (pip install triton==3.6.0): it compiles the kernels for sm_90")
    only = [s for s in a.only.split(",") if s]
    print(f"{'kernel':<34} {'launch':<16} {'warps':>5} {'regs':>4} {'spill':>5} {'global loads':<18} "
          f"{'FFMA':>5} {'FADD':>5} {'int':>5} {'MMA':>4} {'BAR':>4} {'atomic':>6} {'loop bodies':>11} {'loads by':>9} "
          f"{'programs':>8} {'per SM':>6} {'waves':>5}")
    for label, fn, args in cases(a.model, a.int8, a.device):
        if only and not any(s in label for s in only):
            continue
        for k in kernels_of(fn, *args):
            r = compile_sm90(k, a.save and a.save / re.sub(r"\W+", "_", label))
            print(f"{label:<34} {k.name:<16} {k.num_warps:>5} {r['regs']:>4} {r['spill']:>5} {r['ldg']:<18} "
                  f"{r['ffma']:>5} {r['fadd']:>5} {r['int']:>5} {r['mma']:>4} {r['bar']:>4} {r['atom']:>6} {r['loops']:>11} {r['loads_by']:>9} "
                  f"{k.programs:>8} {r['per_sm']:>6} {r['waves']:>5.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
