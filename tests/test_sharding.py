"""Tensor-parallel decode (cats_jax.sharding) on 8 fake CPU devices: TP = 1, 2, 4 and 8 give one
device's logits (prefill and a decode step), KV cache and greedy tokens, for dense, CATS and TEAL on
the jnp path; the Pallas kernels per shard (interpret mode) at TP = 2; the int8 model's decode weights,
split with their scales, at TP = 2 (jnp and kernels); the weighted criterion's factors at TP = 2, 4 (jnp and kernels) and up-rms's at TP = 2; a
saved checkpoint (float and int8, CATS and TEAL thresholds) loaded layer by layer at TP = 2, 4 equal
to the whole decoder split, with no layer's whole weights outliving it; eval's model read slice by
slice scores as one device; shapes that do not divide the mesh give one clear error.

The device count is fixed when jax starts, and the rest of the suite runs in this process on one
device, so the checks run in subprocesses (this file as a script, each given its share of the
cases) that print one JSON line per case.
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
         + [("pallas", "cats", 2), ("pallas", "teal", 2), ("int8", "cats", 2), ("int8", "teal", 2), ("error", None, 4)]
         # a saved checkpoint loaded layer by layer (generate.load_sharded), fp32 and int8
         + [("load", "cats", 2), ("load", "teal", 4), ("load int8", "cats", 4), ("load int8", "teal", 2)]
         # eval's model split by model_shardings (each device reads its slice), fp32 and int8
         + [("eval", "cats", 2), ("eval int8", "teal", 4)]
         # the weighted criterion: o's and down's factors split with their rows
         + [("weighted", "cats", 2), ("load weighted", "teal", 4),
            ("pallas weighted", "cats", 2), ("pallas weighted", "teal", 2), ("cli", "generate", 2)]
         # the up-rms criterion: its calibrated factors come with the thresholds, split with down's rows
         + [("load up-rms", "cats", 2)])


def _name(case) -> str:
    return "{} {} tp={}".format(*case)


@pytest.fixture(scope="module")
def fake_devices():
    """{case: "ok" or its traceback} from subprocesses on 8 fake devices, and their stderr's tails.
    One subprocess per CPU core (at most 4), each running every n-th case: compiling takes the time."""
    # conftest's XLA flags (fewer LLVM passes: compiles take the time of these tiny models), 8 devices
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    parts = max(1, min(4, os.cpu_count() or 1))
    procs = [subprocess.Popen([sys.executable, __file__, str(k), str(parts)], env=env, cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k in range(parts)]
    outs = [p.communicate(timeout=600) for p in procs]
    found = dict(json.loads(ln) for out, _ in outs for ln in out.splitlines() if ln.startswith("["))
    return found, "\n".join(err[-2000:] for _, err in outs)


# one xdist worker runs them all, so the fixture's subprocesses start once
@pytest.mark.xdist_group("fake_devices")
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


def test_eval_more_devices_than_there_are_is_one_line(tmp_path, capsys):
    import jax

    from cats_jax.cli import run
    from eval.__main__ import main

    n = len(jax.devices())
    with pytest.raises(SystemExit) as e:  # before the checkpoint is read
        run(main, ["--ckpt", "no-such-dir", "--tasks", "none", "--ppl", "none", "--out", str(tmp_path / "e.json"),
                   "--tp", str(n + 1)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--tp {n + 1}: tensor parallelism over {n + 1} devices: {n} cpu device(s)" in err


# ---- the subprocess ------------------------------------------------------------------------------

def _run_cases(part: int = 0, parts: int = 1):
    import contextlib
    import dataclasses
    import gc
    import io
    import tempfile
    import weakref

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from bench.decode import parse_args, random_thresholds
    from cats_jax import checkpoint, decode, sharding, thresholds
    from cats_jax import model as M
    from cats_jax.config import ModelConfig
    from cats_jax.generate import generate, load_sharded
    from eval import harness, scoring
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

    def kernels_per_shard(mode, tp, criterion="magnitude"):
        sparse_gemv.MIN_KERNEL_WEIGHTS = 0  # a performance rule; this checks correctness
        model = m if criterion == "magnitude" else criterion_model(criterion)
        mesh = sharding.make_mesh(tp)
        dec = sharding.shard(prepare(mode, "pallas", model), mesh)
        one = tokens[:1]  # batch 1: the rows every kernel serves
        want = on_one_device(prepare(mode, "jnp", model), one)
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

    @functools.cache
    def saved(quantized, criterion="magnitude"):  # a checkpoint of m (its int8 copy, criterion_model()) and its thresholds
        model = int8 if quantized else m if criterion == "magnitude" else criterion_model(criterion)
        ckpt = Path(tempfile.mkdtemp()) / "ckpt"
        checkpoint.save(ckpt, model.cfg, checkpoint.model_params(model))
        calibration = {"criterion": model.criterion}
        if criterion == "up-rms":
            calibration["factors"] = {"mlp.act": [np.asarray(layer.mlp.input_factor["down_proj"][...]).tolist()
                                                  for layer in model.layers]}
        for method, sites in thresholds.METHOD_SITES.items():
            if method == "cats" or criterion != "up-rms":  # up-rms is CATS's only
                level = thresholds.Level(0.5, {s: list(map(float, site_threshold_values(model, s))) for s in sites})
                thresholds.Thresholds(thresholds.model_identity(model), method, [level], calibration).save(ckpt)
        return ckpt

    def site_threshold_values(model, site):
        return [float(M.site_threshold(layer, site)[...]) for layer in model.layers]

    def loaded_layer_by_layer(quantized, mode, tp, criterion="magnitude"):
        """load_sharded equals the decoder loaded whole then shard()ed (weights, shardings, plan), gives
        the greedy tokens of one device, and never holds two layers' whole weights at once."""
        ckpt, mesh = saved(quantized, criterion), sharding.make_mesh(tp)
        configure = functools.partial(thresholds.load_into, ckpt_dir=ckpt, sparsity=0.5, mode=mode)
        whole = checkpoint.load_model(ckpt, f32)
        configure(whole)
        assert whole.criterion == criterion
        live = []  # weak references to the whole (unsplit) arrays of each layer read or prepared

        def no_earlier_layer_alive():
            gc.collect()
            assert all(ref() is None for ref in live), "a layer's whole weights outlived it"

        def read(*args, only=None, **kw):
            params = read_params(*args, only=only, **kw)
            if only and only[0][0] == "layers":
                no_earlier_layer_alive()
                live.extend(weakref.ref(x) for x in jax.tree.leaves(params))
            return params

        def prep(model, layer, impl):  # one layer at a time
            lw = prepare_layer(model, layer, impl)
            live.extend(weakref.ref(x) for x in jax.tree.leaves(lw) if x.ndim == 2)
            return lw

        def top(model):  # the embedding, final norm and head: once
            tops.append(model)
            return prepare_top(model)

        def refuse(*args):
            raise AssertionError("load_sharded prepared a whole model")

        read_params, prepare_layer, prepare_top, prepare_whole = (checkpoint.load_params, decode.prepare_layer,
                                                                  decode.prepare_top, decode.prepare)
        loaded = {}
        for impl in ("jnp", "pallas"):  # pallas: CATS's neuron-major gate|up
            tops = []
            checkpoint.load_params, decode.prepare_layer, decode.prepare_top, decode.prepare = read, prep, top, refuse
            try:
                dec = loaded[impl] = load_sharded(ckpt, mesh, impl, f32, configure)
            finally:
                checkpoint.load_params, decode.prepare_layer, decode.prepare_top, decode.prepare = (
                    read_params, prepare_layer, prepare_top, prepare_whole)
            assert len(tops) == 1
            no_earlier_layer_alive()
            live.clear()
            want = sharding.shard(decode.prepare(whole, impl), mesh)
            assert dec.plan == want.plan
            jax.tree.map(lambda g, w: (np.testing.assert_array_equal(g, w), assert_same(g.sharding, w.sharding)),
                         dec.weights, want.weights)
        qkv = dec.weights["layers"][1]["qkv"]
        assert {s.data.shape for s in qkv.addressable_shards} == {(cfg.hidden_size, qkv.shape[1] // tp)}
        if not quantized:  # the int8 decoder split by shard() gives one device's logits ("int8" cases)
            gen = generate(loaded["jnp"], prompts, 8, eos_ids=())
            assert gen.tokens == generate(decode.prepare(whole), prompts, 8, eos_ids=()).tokens

    def scored_on_mesh(quantized, mode, tp):
        """eval's Scorer on a model read slice by slice gives one device's scores and sparsity."""
        ckpt, mesh = saved(quantized), sharding.make_mesh(tp)
        whole, split = (checkpoint.load_model(ckpt, f32, s) for s in (None, sharding.model_shardings(mesh)))
        for model in (whole, split):
            thresholds.load_into(model, ckpt, 0.5, mode=mode)
        attn, mlp = split.layers[0].attn, split.layers[0].mlp
        assert {s.data.shape for s in attn.q_proj.kernel[...].addressable_shards} == {
            (cfg.hidden_size, cfg.num_heads * cfg.head_dim // tp)}
        assert {s.data.shape for s in mlp.down_proj.kernel[...].addressable_shards} == {
            (cfg.intermediate_size // tp, cfg.hidden_size)}
        if quantized:
            assert {s.data.shape for s in mlp.gate_proj.scales[...].addressable_shards} == {(cfg.intermediate_size // tp,)}
        groups = [([5, 17, 3], [[88, 41], [9]]), ([60, 61, 62, 63, 1], [[7, 30, 4], [2]])]
        want, got = (scoring.Scorer(model, progress=False) for model in (whole, split))
        for (ll_w, greedy_w), (ll_g, greedy_g) in zip(want.score(groups), got.score(groups)):
            np.testing.assert_allclose(ll_g, ll_w, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(greedy_g, greedy_w)
        assert_close(got.site_sparsity, want.site_sparsity)
        # split as Megatron's: partial sums added, no weight gathered onto a device
        graphdef, state = nnx.split(split)
        batch = [jnp.zeros((2, 16), jnp.int32), jnp.ones(2, jnp.int32), jnp.zeros((2, 2, 8), jnp.int32),
                 jnp.ones((2, 2), jnp.int32)]
        program = scoring._score.lower(graphdef, state, *batch).compile().as_text()
        assert "all-reduce" in program and "all-gather" not in program
        assert set(got.site_sparsity) == set(thresholds.MODES[mode])
        with pytest.raises(sharding.TPError, match="divisible by 3"):  # before any weight is read
            harness.evaluate(ckpt, settings=["dense"], task_files={}, tp=3)

    @functools.cache
    def criterion_model(criterion):  # m's weights under a criterion, with thresholds calibrated for it
        mw = M.init_random(cfg, seed=3, dtype=f32)
        factors = (np.asarray(jax.random.uniform(jax.random.key(7), (cfg.num_layers, cfg.intermediate_size), f32,
                                                 0.2, 2.0)) if criterion == "up-rms" else None)
        mw.set_criterion(criterion, factors=factors)
        for site, t in random_thresholds(mw, [0.5], tokens=64, seed=0)[0.5].items():
            mw.set_thresholds(site, t)
        return mw

    def weighted_on_mesh(mode, tp):
        mw, mesh = criterion_model("weighted"), sharding.make_mesh(tp)
        one = prepare(mode, "jnp", mw)
        dec = sharding.shard(prepare(mode, "jnp", mw), mesh)
        factors = dec.weights["layers"][0]["factors"]
        assert {s.data.shape for s in factors["down"].addressable_shards} == {(1, cfg.intermediate_size // tp)}
        assert {s.data.shape for s in factors["qkv"].addressable_shards} == {(3, cfg.hidden_size)}
        want = on_one_device(one, tokens)
        got = on_mesh(dec, tokens, mesh)
        assert_close(got, want)
        if mode == "cats":  # the factors change which neurons are kept: not every one, not none
            assert 0.1 < float(jnp.mean(want[3])) < 0.9
        gen, want_gen = (generate(d, prompts, 8, eos_ids=()) for d in (dec, one))
        assert gen.tokens == want_gen.tokens

    def generate_cli(_, tp):
        """python -m cats_jax.generate --tp: one device's text; a tp that does not divide: one clear error."""
        sys.path.insert(0, str(ROOT / "tests"))
        from cats_jax.cli import InputError
        from cats_jax.generate import main
        from conftest import make_tokenizer

        root = Path(tempfile.mkdtemp())
        make_tokenizer(root / "tok")
        big = dataclasses.replace(cfg, vocab_size=320)  # the tokenizer's ids
        checkpoint.save(root / "ckpt", big, checkpoint.model_params(M.init_random(big, seed=1, dtype=f32)), root / "tok")
        args = ["--ckpt", str(root / "ckpt"), "--prompt", "the cat sat", "--max-new-tokens", "6", "--dtype", "float32"]
        texts = []
        for n in (1, tp):
            with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()):
                main(args + ["--tp", str(n)])
            texts.append(out.getvalue())
        assert texts[0].strip() and texts[1] == texts[0], texts
        with pytest.raises(InputError, match="^--tp 3: tiny: tensor parallelism over 3 devices needs heads"):
            main(args + ["--tp", "3"])

    def assert_same(a, b):
        assert a == b, (a, b)

    checks = {"jnp": tp_equals_one_device, "load": functools.partial(loaded_layer_by_layer, False),
              "load int8": functools.partial(loaded_layer_by_layer, True),
              "cli": generate_cli, "weighted": weighted_on_mesh, "pallas weighted": functools.partial(kernels_per_shard, criterion="weighted"), "load weighted": functools.partial(loaded_layer_by_layer, False, criterion="weighted"), "load up-rms": functools.partial(loaded_layer_by_layer, False, criterion="up-rms"), "eval": functools.partial(scored_on_mesh, False), "eval int8": functools.partial(scored_on_mesh, True), "pallas": kernels_per_shard, "int8": int8_per_shard,
              "error": shapes_that_do_not_divide}
    for what, mode, tp in CASES[part::parts]:
        try:
            checks[what](mode, tp)
            result = "ok"
        except Exception:
            result = traceback.format_exc()
        print(json.dumps([_name((what, mode, tp)), result]), flush=True)


if __name__ == "__main__":
    _run_cases(*map(int, sys.argv[1:3]))
