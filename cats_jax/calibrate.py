"""CATS calibration: per-layer thresholds at target sparsities, from the model's own activations.

Run the model over calibration text with every MLP at threshold 0 (exactly dense, but the MLP then
records its fp32 activation a = SiLU(x W_gate)), keep a uniform sample of |a| per layer, and set
layer l's threshold at sparsity p to the p-quantile of its sample: then a fraction p of that
layer's activations satisfy |a| <= t and are zeroed. One pass serves every sparsity level.

Precision: the sample is a reservoir of `reservoir` values per layer. While the calibration data
has no more values than that (tokens x intermediate_size), the sample is everything and the
quantile is exact. Beyond, it is a uniform sample without replacement, and the realised fraction
on the whole calibration data misses p by a standard deviation of at most
sqrt(p (1 - p) / reservoir): 0.05 points at p = 0.5 for the default 10^6. (The CATS paper used a
1000-bin histogram.) The thresholds are saved, and then sparsity is measured for real on
held-apart text: the CATS model is run at each level and its zeroed activations are counted per
layer. This is TEAL's sampler (cats_jax.quantiles) restricted to the one site "mlp.act".

Allocation: uniform (the paper's: every layer at the target) or layers: TEAL's greedy search run
across layers instead of across one layer's sites (across_layers), on a cost that
compares between layers: the KL divergence of the model's next-token distribution from the dense
one with that layer alone at a level, summed over layers. From 0 everywhere, raise by a step the
layer whose cost grows least, until the mean over layers reaches the target. Every layer has the
same number of neurons, so the model-wide skipped rows, and the speed, are those of uniform CATS
at the target; only where they are skipped changes. (TEAL's own error, the relative L2 error of a
layer's output, does not compare across layers: the residual stream grows with depth, and that
search sparsified the last layers most and lost to uniform; docs/quality.md.)

    python -m cats_jax.calibrate --ckpt DIR --sparsity 0.3,0.4,0.5,0.6,0.7 --data-file text.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from cats_jax import checkpoint, cli, data, quantiles, teal, thresholds
from cats_jax.model import Transformer
from cats_jax.sparsity import CATS_ONLY_CRITERIA, CATS_SITE, CRITERIA

ALLOCATIONS = ("layers", "uniform")


@dataclasses.dataclass
class Calibration:
    sparsities: list[float]
    thresholds: np.ndarray  # [levels, layers]
    realised: np.ndarray  # [levels, layers]: fraction of the sample with |a| <= t
    tokens: int
    values_per_layer: int
    sample_per_layer: int

    @property
    def exact(self) -> bool:
        return self.sample_per_layer == self.values_per_layer


def calibrate(model: Transformer, rows: Iterable[np.ndarray], sparsities: list[float], *, batch_size: int = 2,
              reservoir: int = 1_000_000, seed: int = 0, progress: bool = True) -> Calibration:
    """Thresholds at each sparsity from the activations of the model over rows (int32 [seq_len]
    each), every layer at the target. The model is left dense-equivalent (impl cats-jnp, thresholds 0)."""
    quantiles.check_sparsities(sparsities)
    sample = sample_activations(model, rows, batch_size=batch_size, reservoir=reservoir, seed=seed, progress=progress)
    return thresholds_of(sample, sparsities)


def sample_activations(model: Transformer, rows: Iterable[np.ndarray], *, batch_size: int = 2,
                       reservoir: int = 1_000_000, seed: int = 0, progress: bool = True) -> quantiles.Sample:
    """A sample of the CATS score (|a|, or weighted) of every layer of the dense model over rows."""
    return quantiles.sample_sites(model, list(rows), (CATS_SITE,), batch_size=batch_size, reservoir=reservoir,
                                  seed=seed, progress=progress)


def thresholds_of(sample: quantiles.Sample, sparsities: list[float], levels: np.ndarray | None = None) -> Calibration:
    """Each layer's threshold at each sparsity (levels [sparsities, layers]: per layer; default the target)."""
    layers = len(sample.sorted[CATS_SITE])
    levels = np.repeat(np.asarray(sparsities, np.float64)[:, None], layers, axis=1) if levels is None else levels
    got = np.array([[sample.threshold(CATS_SITE, layer, lv[layer]) for layer in range(layers)] for lv in levels],
                   np.float64)  # [levels, layers, (t, realised)]
    return Calibration(list(sparsities), got[..., 0].astype(np.float32), got[..., 1].astype(np.float32), sample.tokens,
                       sample.values_per_layer[CATS_SITE], len(sample.sorted[CATS_SITE][0]))


@functools.partial(jax.jit, static_argnums=0)
def _block(graphdef, state, x, t):
    """A block's output with its CATS threshold at t (0: dense)."""
    block = nnx.merge(graphdef, state)
    block.mlp.threshold[...] = t
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    return block(x, positions)[0]


@functools.partial(jax.jit, static_argnums=(0, 3))
def _log_probs(graphdef, state, x, start):
    """fp32 next-token log-probabilities of tokens start.. of the last block's output x."""
    model = nnx.merge(graphdef, state)
    return jax.nn.log_softmax(model.logits(model.norm(x[:, start:])), axis=-1)


@jax.jit
def _kl(dense_logp, logp):
    """Mean over tokens of KL(dense || sparse) of the next-token distributions."""
    return jnp.mean(jnp.sum(jnp.exp(dense_logp) * (dense_logp - logp), axis=-1))


class OutputKL:
    """A layer's cost that compares across layers: the KL divergence of the model's next-token
    distribution from the dense one (tokens of the last `last_fraction` of each of rows [R, T]) with
    that layer alone at a CATS threshold. It sets the model to CATS at threshold 0 (dense) and
    computes the layers' dense inputs once."""

    def __init__(self, model: Transformer, rows: np.ndarray, last_fraction: float):
        quantiles.set_dense_sites(model, (CATS_SITE,))
        self.start = int(rows.shape[1] * (1 - last_fraction))
        self.layers = [nnx.split(layer) for layer in model.layers]
        self.top = nnx.split(model)
        self.inputs = [model.embed(jnp.asarray(rows))]  # each layer's dense input
        for graphdef, state in self.layers:
            self.inputs.append(_block(graphdef, state, self.inputs[-1], 0.0))
        self.dense = _log_probs(*self.top, self.inputs[-1], self.start)

    def __call__(self, layer: int, t: float) -> float:
        x = _block(*self.layers[layer], self.inputs[layer], t)
        for graphdef, state in self.layers[layer + 1:]:
            x = _block(graphdef, state, x, 0.0)
        return float(_kl(self.dense, _log_probs(*self.top, x, self.start)))


def across_layers(model: Transformer, sample: quantiles.Sample, rows: np.ndarray, targets: list[float], *,
                  base_step: float = 0.05, last_fraction: float = 0.25, progress: bool = True) -> teal.Greedy:
    """Per-layer CATS sparsities whose mean is each target (module docstring), on rows [R, T]:
    teal.greedy_path with the layers as its sites, all of one weight, over the summed costs
    (OutputKL, each computed once; level 0 costs 0). Greedy.levels [targets, layers]; Greedy.error
    and uniform_error [targets, layers]: each layer's cost at its level and at the target."""
    teal.check_greedy(base_step, last_fraction)
    num_layers = model.cfg.num_layers
    kl, memo = OutputKL(model, rows, last_fraction), {}
    bar = tqdm(desc="allocation across layers", unit="eval", disable=not progress)

    def cost(layer: int, level: float) -> float:
        key = (layer, round(float(level), 9))
        if key not in memo:
            memo[key] = kl(layer, sample.threshold(CATS_SITE, layer, level)[0]) if level > 0 else 0.0
            bar.update()
        return memo[key]

    weights = np.ones(num_layers)
    targets = np.asarray(targets, np.float64)
    path, _ = teal.greedy_path(lambda cand: np.array([sum(map(cost, range(num_layers), row)) for row in cand]),
                               weights, base_step, float(targets.max()))
    levels = np.stack([teal.levels_at(path, weights, p) for p in targets])
    error = np.array([[cost(layer, lv[layer]) for layer in range(num_layers)] for lv in levels])
    uniform = np.array([[cost(layer, p) for layer in range(num_layers)] for p in targets])
    bar.close()
    return teal.Greedy(levels, error, uniform, len(path) - 1)


def run(ckpt_dir, sparsities: list[float], source: data.TextSource, *, tokens: int = 102_400,
        holdout_tokens: int = 16_384, seq_len: int = 1024, batch_size: int = 2, reservoir: int = 1_000_000,
        seed: int = 0, dtype: str | None = "float32", progress: bool = True, force: bool = False,
        criterion: str = "magnitude", allocation: str = "uniform", greedy_tokens: int = 2048, base_step: float = 0.05,
        last_fraction: float = 0.25) -> thresholds.Thresholds:
    """Calibrate a checkpoint on `tokens` tokens of `source` (the allocation across layers on the
    first `greedy_tokens` of them), add the levels to DIR/thresholds.json (replacing levels it holds only
    with force), then measure them on the next `holdout_tokens`."""
    if allocation not in ALLOCATIONS:
        hint = " (TEAL's search within a layer; a CATS layer has one site)" if allocation == "greedy" else ""
        raise ValueError(f"allocation {allocation!r} is not one of CATS's{hint}: choose from {', '.join(ALLOCATIONS)}")
    model, calib_rows, held_rows = quantiles.prepare(ckpt_dir, "cats", sparsities, source, tokens=tokens,
                                                     holdout_tokens=holdout_tokens, seq_len=seq_len, dtype=dtype,
                                                     force=force, criterion=criterion)
    greedy_rows = calib_rows[:math.ceil(greedy_tokens / seq_len)]
    quantiles.plan(calib_rows, held_rows, len(sparsities), progress,
                   (" (and one before it for the up-rms factors)" if criterion == "up-rms" else "")
                   + (f", an allocation across layers on {sum(r.size for r in greedy_rows):,} of them"
                      if allocation == "layers" else ""))
    factors = None
    if criterion == "up-rms":  # its factors first: the sample is of |a_i| * rms(u_i)
        factors = quantiles.up_rms(model, calib_rows, batch_size=batch_size, progress=progress)
        model.set_criterion(criterion, factors=factors)
    sample = sample_activations(model, calib_rows, batch_size=batch_size, reservoir=reservoir, seed=seed,
                                progress=progress)
    g = meta_greedy = None
    if allocation == "layers":
        rows = np.stack(greedy_rows)
        g = across_layers(model, sample, rows, sparsities, base_step=base_step, last_fraction=last_fraction, progress=progress)
        meta_greedy = {"rows": len(rows), "tokens": int(rows.size), "base_step": base_step,
                       "last_fraction": last_fraction, "steps": g.steps,
                       # each layer's cost (next-token KL, that layer alone sparse), allocated vs uniform levels
                       "layer_kl": {f"{p:g}": {"allocated": quantiles.rounded(g.error[i]),
                                               "uniform": quantiles.rounded(g.uniform_error[i])}
                                    for i, p in enumerate(sparsities)}}
    cal = thresholds_of(sample, sparsities, None if g is None else g.levels)
    levels = [thresholds.Level(p, {CATS_SITE: [float(t) for t in cal.thresholds[i]]},
                               {CATS_SITE: {"calibration": quantiles.rounded(cal.realised[i])}},
                               None if g is None else {CATS_SITE: quantiles.rounded(g.levels[i])})
              for i, p in enumerate(sparsities)]
    worst = max(math.sqrt(p * (1 - p)) for p in sparsities)
    meta = {
        "source": source.describe(),
        "tokens": cal.tokens,
        "held_out_tokens": sum(r.size for r in held_rows),
        "seq_len": seq_len,
        "dtype": dtype or "as stored",
        "criterion": criterion,
        "allocation": allocation,
        "greedy": meta_greedy,
        "activation": "|SiLU(x W_gate)| in fp32, dense model" + {
            "weighted": ", times the L2 norm of the neuron's W_down row",
            "up-rms": ", times the neuron's rms of x W_up over the calibration text (factors)"}.get(criterion, ""),
        "values_per_layer": cal.values_per_layer,
        "sample_per_layer": cal.sample_per_layer,
        "exact_quantile": cal.exact,
        # std of the realised fraction on the whole calibration data around the target, in points
        "quantile_std_points": 0.0 if cal.exact else round(100 * worst / math.sqrt(cal.sample_per_layer), 4),
        "seed": seed,
    }
    if factors is not None:  # up-rms: [layers][neurons], as measured (6 significant digits)
        meta["factors"] = {CATS_SITE: factors.tolist()}
    result = thresholds.Thresholds(thresholds.model_identity(model), "cats", levels, meta)
    return quantiles.save_and_measure(result, model, ckpt_dir, held_rows, batch_size=batch_size, force=force,
                                      progress=progress)


def summary(th: thresholds.Thresholds) -> str:
    """One line per level: target, realised on calibration and held-apart text (mean / min / max)."""
    lines = ["target   calibration (mean/min/max)   held-apart (mean/min/max)"]
    for lv in th.levels:
        r = lv.realised[CATS_SITE]
        cells = [quantiles.spread(r.get(key)) for key in ("calibration", "held_out")]
        lines.append(f"{100 * lv.sparsity:5.1f}%   {cells[0]:>26}   {cells[1]:>25}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m cats_jax.calibrate",
        description="Calibrate sparsity thresholds of a checkpoint and store them in DIR/thresholds.json: CATS (one "
                    "per layer) or TEAL (one per layer and linear input; see cats_jax.teal).",
    )
    ap.add_argument("--method", choices=("cats", "teal"), default="cats", help="sparsity method (default cats)")
    ap.add_argument("--ckpt", required=True, help="converted checkpoint directory")
    ap.add_argument("--sparsity", type=cli.fractions, default=[0.5],
                    help="target sparsities, comma-separated fractions (default 0.5), e.g. 0.3,0.4,0.5,0.6,0.7")
    src = ap.add_argument_group("calibration text (default: RefinedWeb streamed from the hub, as CATS)")
    src.add_argument("--data-file", help="local .txt (one document) or .jsonl / .jsonl.gz (one document per line)")
    src.add_argument("--data", default=data.REFINEDWEB, help=f"`datasets` hub name (default {data.REFINEDWEB})")
    src.add_argument("--split", default="train", help="dataset split (default train)")
    src.add_argument("--config", default=None, help="dataset configuration name")
    src.add_argument("--field", default=None, help="text field of .jsonl / dataset records (default: content for RefinedWeb, else text)")
    ap.add_argument("--tokens", type=cli.count, help="calibration tokens (default: 102400 = 100 x 1024 for CATS, as CATS; "
                                               "20480 for TEAL, as TEAL)")
    ap.add_argument("--holdout-tokens", type=int, default=16_384,
                    help="held-apart tokens to measure realised sparsity on: the documents after the calibration "
                         "text, or the tail of a one-document .txt; 0: no measurement (default 16384)")
    ap.add_argument("--seq-len", type=cli.count, default=1024, help="tokens per row (default 1024)")
    ap.add_argument("--batch-size", type=cli.count, default=2, help="rows per forward pass (default 2)")
    ap.add_argument("--reservoir", type=cli.count, default=1_000_000, help="sampled |a| values kept per layer (default 10^6)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the reservoir sample (default 0)")
    ap.add_argument("--force", action="store_true",
                    help="replace levels thresholds.json already holds for this method (or a file of another "
                         "model); without it calibration refuses before its pass. Other levels are kept")
    ap.add_argument("--dtype", choices=sorted(checkpoint.DTYPES), default="float32", help="compute dtype (default float32)")
    ap.add_argument("--criterion", choices=CRITERIA, default="magnitude",
                    help="what is compared with a threshold: |value| (magnitude, the papers', default), |value| times "
                         "the L2 norm of the weight row it multiplies (weighted), or (CATS only) |SiLU(x W_gate)_i| "
                         "times the neuron's rms of x W_up over the calibration text (up-rms)")
    tg = ap.add_argument_group("allocation")
    tg.add_argument("--allocation", choices=sorted({*ALLOCATIONS, *teal.ALLOCATIONS}),
                    help="uniform: every layer and site at the target (CATS's default). greedy (TEAL, its default): "
                         "each layer at the target, its sites by TEAL's block-wise search. layers (CATS): the layers' "
                         "sparsities by their next-token KL, their mean at the target")
    tg.add_argument("--greedy-tokens", type=cli.count, default=2048,
                    help="calibration tokens (the first rows) the greedy and layers searches run on (default 2048)")
    tg.add_argument("--greedy-step", type=float, default=0.05,
                    help="base step of the searches: a site of weight w rises by step / w; a CATS layer by step "
                         "(default 0.05, as TEAL)")
    tg.add_argument("--last-fraction", type=float, default=0.25,
                    help="greedy and layers searches: fraction of each row (its end) on which errors are measured: "
                         "TEAL, each layer's output; CATS, the model's next-token KL (default 0.25)")
    args = ap.parse_args(argv)
    if args.method == "cats" and args.allocation not in (None, *ALLOCATIONS):
        ap.error(f"--allocation {args.allocation} is TEAL's search within a layer, and a CATS layer has one site: "
                 f"choose from {', '.join(ALLOCATIONS)}")
    if args.method == "teal" and args.allocation not in (None, *teal.ALLOCATIONS):
        ap.error(f"--allocation {args.allocation} is CATS's: for TEAL choose from {', '.join(teal.ALLOCATIONS)}")
    if args.method == "teal" and args.criterion in CATS_ONLY_CRITERIA:
        ap.error(f"--criterion {args.criterion} is CATS's only (it weighs the MLP's neurons): for TEAL choose "
                 "magnitude or weighted")
    try:  # the searches' own check, before any work
        teal.check_greedy(args.greedy_step, args.last_fraction)
    except ValueError:
        ap.error(f"--greedy-step {args.greedy_step} and --last-fraction {args.last_fraction} must be in (0, 1]")
    source = data.TextSource(args.data_file or args.data, args.split, args.field, args.config)
    common = dict(holdout_tokens=args.holdout_tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                  reservoir=args.reservoir, seed=args.seed, dtype=args.dtype, force=args.force, criterion=args.criterion,
                  greedy_tokens=args.greedy_tokens, base_step=args.greedy_step, last_fraction=args.last_fraction)
    try:
        if args.method == "teal":
            result = teal.run(args.ckpt, args.sparsity, source, allocation=args.allocation or "greedy",
                              tokens=args.tokens or 20_480, **common)
        else:
            result = run(args.ckpt, args.sparsity, source, allocation=args.allocation or "uniform",
                         tokens=args.tokens or 102_400, **common)
    except (data.DataError, thresholds.ThresholdsError, FileNotFoundError) as e:
        raise cli.InputError(str(e)) from e
    cal = result.calibration
    exact = "exact quantiles" if cal["exact_quantile"] else f"quantiles of a sample, std {cal['quantile_std_points']} points"
    held = f"held apart {cal['held_out_tokens']} tokens" if cal["held_out_tokens"] else "no held-apart measurement"
    print(f"calibrated on {cal['tokens']} tokens ({exact}), {held}")
    print(teal.summary(result) if args.method == "teal" else summary(result))
    print(f"wrote {args.ckpt}/{thresholds.FILENAME}")


if __name__ == "__main__":
    cli.run(main)
