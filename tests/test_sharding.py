"""Tensor-parallel decode (cats_jax.sharding) on 8 fake CPU devices: TP = 1, 2, 4 and 8 give one
device's logits (prefill and a decode step), KV cache and greedy tokens, for dense, CATS and TEAL on
the jnp path; the Pallas kernels per shard (interpret mode) at TP = 2; the int8 model's decode weights,
split with their scales, at TP = 2 (jnp and kernels); shapes that do not divide the mesh give one
clear error.

The device count is fixed when jax starts, and the rest of the suite runs in this process on one
device, so the checks run in a subprocess (this file as a script) that prints one JSON line per case.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODES = ("dense", "cats", "teal")
# (what, mode, tp): the jnp path, the Pallas kernels (interpret mode), the error of shapes that do not divide
CASES = ([("jnp", mode, tp) for mode in MODES for tp in (1, 2, 4, 8)]
         + [("pallas", "cats", 2), ("pallas", "teal", 2), ("int8", "cats", 2), ("int8", "teal", 2), ("error", None, 4)])


def _name(case) -> str:
    return "{} {} tp={}".format(*case)


@pytest.fixture(scope="module")
def fake_devices():
    """{case: "ok" or its traceback} from one subprocess on 8 fake devices, and its stderr's tail."""
    # fewer LLVM passes: the compiles, not the programs, take the time of these tiny models
    flags = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
             "--xla_llvm_disable_expensive_passes=true")
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return dict(json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("[")), proc.stderr[-4000:]


@pytest.mark.parametrize("case", CASES, ids=_name)
def test_on_fake_devices(fake_devices, case):
    found, stderr = fake_devices
    case = _name(case)
    assert case in found, f"the subprocess did not report {case!r}; its stderr:\n{stderr}"
    assert found[case] == "ok", found[case]


def test_more_devices_than_there_are_is_one_line(capsys):
    import jax

    from cats_jax.generate import main

    n = len(jax.devices())
    with pytest.raises(SystemExit) as e:  # before the checkpoint is read
        main(["--ckpt", "no-such-dir", "--prompt", "hi", "--tp", str(n + 1)])
    assert e.value.code == 2
    assert f"--tp {n + 1}: tensor parallelism over {n + 1} devices: {n} cpu device(s) here" in capsys.readouterr().err


# ---- the subprocess ------------------------------------------------------------------------------

def _run_cases():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench.decode import parse_args, random_thresholds
    from cats_jax import decode, sharding
    from cats_jax import model as M
    from cats_jax.config import ModelConfig
    from cats_jax.generate import generate
    from pallas_kernels import sparse_gemv
    from pallas_kernels.common import interpret_on_cpu, poisoned_outputs

    assert len(jax.devices()) == 8
    # GQA 16 / 8 heads and 128 neurons: every TP up to 8 divides them
    cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=16,
                      num_kv_heads=8, head_dim=8, name="tiny")
    f32 = jnp.float32
    prompts = [[5, 17, 3, 88, 41, 9, 2], [60, 61, 62]]  # ragged: padding rows too

    m = M.init_random(cfg, seed=3, dtype=f32)  # fp32: no argmax ties flipped by the psums' rounding
    int8 = M.quantize_model(m, head=True)  # its LM head too (replicated, as the float one)
    for site, t in random_thresholds(m, [0.5], tokens=64, seed=0)[0.5].items():  # every site, ~half kept
        # k's own threshold: q|k|v's segments test their own; gate|up keeps one shared (decode.Plan.shared)
        for model in (m, int8):
            model.set_thresholds(site, np.asarray(t) * (0.8 if site == "attn.k_proj" else 1.0))

    def prepare(mode, impl, model=m):
        model.set_mode(mode)
        return decode.prepare(model, impl)

    @functools.partial(jax.jit, static_argnames="plan")
    def prefill_and_step(weights, tokens, cache, *, plan):
        b, t = tokens.shape
        pos = jnp.broadcast_to(jnp.arange(t), (b, t))
        logits, cache, kept = decode.forward(weights, tokens, pos, cache, plan=plan)
        step, cache, kept_step = decode.forward(weights, tokens[:, -1:], pos[:, -1:] + 1, cache, plan=plan)
        return logits, step, cache, kept, kept_step

    def on_one_device(decoder, tokens):
        return prefill_and_step(decoder.weights, tokens, M.init_cache(cfg, tokens.shape[0], 16, f32), plan=decoder.plan)

    def on_mesh(decoder, tokens, mesh):
        cache = sharding.place_cache(M.init_cache(cfg, tokens.shape[0], 16, f32), mesh)
        return prefill_and_step(decoder.weights, tokens, cache, plan=decoder.plan)

    def assert_close(got, want):
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=2e-5), got, want)

    tokens = jnp.asarray([[5, 17, 3, 88, 41, 9, 2, 30], [60, 61, 62, 63, 1, 7, 30, 4]])

    @functools.cache
    def reference(mode):
        dec = prepare(mode, "jnp")
        return on_one_device(dec, tokens), generate(dec, prompts, 8, eos_ids=())

    def tp_equals_one_device(mode, tp):
        mesh = sharding.make_mesh(tp)
        dec = sharding.shard(prepare(mode, "jnp"), mesh)
        assert dec.plan.shared == (("gate_up",) if mode == "teal" else ())
        k = cfg.num_kv_heads
        qkv = dec.weights["layers"][0]["qkv"]
        assert {s.data.shape for s in qkv.addressable_shards} == {(cfg.hidden_size, qkv.shape[1] // tp)}
        want, want_gen = reference(mode)
        got = on_mesh(dec, tokens, mesh)
        assert {s.data.shape[2] for s in got[2][0][0].addressable_shards} == {k // tp}  # cache over KV heads
        assert_close(got, want)
        gen = generate(dec, prompts, 8, eos_ids=(), stream_every=3)  # several decode calls on the sharded state
        assert gen.tokens == want_gen.tokens
        assert gen.mlp_sparsity == pytest.approx(want_gen.mlp_sparsity)

    def kernels_per_shard(mode, tp):
        sparse_gemv.MIN_KERNEL_WEIGHTS = 0  # a performance rule; this checks correctness
        mesh = sharding.make_mesh(tp)
        dec = sharding.shard(prepare(mode, "pallas"), mesh)
        one = tokens[:1]  # batch 1: the rows every kernel serves
        want = on_one_device(prepare(mode, "jnp"), one)
        with interpret_on_cpu(), poisoned_outputs():
            cache = sharding.place_cache(M.init_cache(cfg, 1, 16, f32), mesh)
            step = jax.make_jaxpr(lambda t: decode.forward(dec.weights, t, jnp.zeros((1, 1), jnp.int32), cache,
                                                           plan=dec.plan))(one[:, :1])
            got = on_mesh(dec, one, mesh)
        # per layer: attention, and CATS's MLP kernel or TEAL's GEMVs (q|k|v, o, gate|up, down)
        assert str(step).count("pallas_call") >= (2 if mode == "cats" else 5) * cfg.num_layers
        assert_close(got, want)

    def int8_per_shard(mode, tp):  # the scales split with their columns (q|k|v's and gate|up's in tp blocks)
        sparse_gemv.MIN_KERNEL_WEIGHTS = 0
        mesh = sharding.make_mesh(tp)
        one = tokens[:1]
        want = on_one_device(prepare(mode, "jnp", int8), one)
        for impl in ("jnp", "pallas"):
            dec = sharding.shard(prepare(mode, impl, int8), mesh)
            with interpret_on_cpu(), poisoned_outputs():
                got = on_mesh(dec, one, mesh)
            assert_close(got, want)

    def shapes_that_do_not_divide(_, tp):
        odd = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4,
                          num_kv_heads=2, head_dim=16, name="odd")
        dec = decode.prepare(M.init_random(odd, dtype=f32), "jnp")
        with pytest.raises(ValueError) as e:
            sharding.shard(dec, sharding.make_mesh(tp))
        assert str(e.value) == (f"odd: tensor parallelism over {tp} devices needs heads, KV heads and intermediate "
                                f"size divisible by {tp}; KV heads 2 not (choose a tp that divides them)")
        with pytest.raises(ValueError, match="sharded already"):  # twice would re-order the fused columns again
            sharding.shard(sharding.shard(dec, sharding.make_mesh(1)), sharding.make_mesh(1))
        with pytest.raises(SystemExit, match="2"):  # the benchmark says so before any work
            parse_args(["--config", "mistral-7b", "--tp", "3"])

    checks = {"jnp": tp_equals_one_device, "pallas": kernels_per_shard, "int8": int8_per_shard,
              "error": shapes_that_do_not_divide}
    for what, mode, tp in CASES:
        try:
            checks[what](mode, tp)
            result = "ok"
        except Exception:
            result = traceback.format_exc()
        print(json.dumps([_name((what, mode, tp)), result]), flush=True)


if __name__ == "__main__":
    _run_cases()
