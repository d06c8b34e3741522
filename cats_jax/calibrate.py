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

Allocation: uniform (the paper's: every layer at the target) or greedy, TEAL's search run across
layers instead of across one layer's sites (cats_jax.teal.greedy_path): from 0 everywhere, raise
by a step the layer whose output error (relative L2 of its output on the dense model's hidden
states, as TEAL measures) grows least, until the mean over layers reaches the target. Every layer
has the same number of neurons, so the model-wide skipped rows, and the speed, are those of
uniform CATS at the target; only where they are skipped changes.

    python -m cats_jax.calibrate --ckpt DIR --sparsity 0.3,0.4,0.5,0.6,0.7 --data-file text.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Iterable

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from cats_jax import checkpoint, cli, data, quantiles, teal, thresholds
from cats_jax.model import Transformer
from cats_jax.sparsity import CATS_SITE, CRITERIA


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


def greedy(model: Transformer, sample: quantiles.Sample, rows: np.ndarray, targets: list[float], *,
           base_step: float = 0.05, last_fraction: float = 0.25, progress: bool = True) -> teal.Greedy:
    """Per-layer CATS sparsities whose mean is each target (module docstring), on the dense hidden
    states of rows [R, T]: TEAL's greedy path with the layers as its "sites", all of one weight.
    Greedy.levels is [targets, layers]."""
    if not 0 < base_step <= 1 or not 0 < last_fraction <= 1:
        raise ValueError(f"base_step {base_step} and last_fraction {last_fraction} must be in (0, 1]")
    num_layers = model.cfg.num_layers
    quantiles.set_dense_sites(model, (CATS_SITE,))
    start = int(rows.shape[1] * (1 - last_fraction))
    x, blocks = model.embed(jnp.asarray(rows)), []
    for layer in model.layers:  # each layer's dense input and output
        graphdef, state = nnx.split(layer)
        y, y_tail = teal.dense_block(graphdef, state, x, start)
        blocks.append((graphdef, state, x, y_tail, float(jnp.sqrt(jnp.sum(jnp.square(y_tail.astype(jnp.float32)))))))
        x = y
    memo: dict = {}
    bar = tqdm(desc="greedy allocation", unit="eval", disable=not progress)

    def error(layer: int, level: float) -> float:
        """The relative error of the layer's output with its CATS sparsity at `level`."""
        key = (layer, round(level, 9))
        if key not in memo:
            graphdef, state, x, y_tail, scale = blocks[layer]
            t = jnp.asarray([[sample.threshold(CATS_SITE, layer, level)[0]]], jnp.float32)
            memo[key] = float(teal.block_errors(graphdef, state, x, y_tail, t, start, (CATS_SITE,))[0]) / scale
            bar.update()
        return memo[key]

    def evaluate(candidates):  # the model-wide error of each candidate's levels [C, layers]
        return np.array([sum(error(layer, lv) for layer, lv in enumerate(row)) for row in candidates])

    weights = np.ones(num_layers)
    targets = np.asarray(targets, np.float64)
    path, _ = teal.greedy_path(evaluate, weights, base_step, float(targets.max()))
    levels = np.stack([teal.levels_at(path, weights, p) for p in targets])
    errors = np.array([[error(layer, lv[layer]) for layer in range(num_layers)] for lv in levels])
    uniform = np.array([[error(layer, p) for layer in range(num_layers)] for p in targets])
    bar.close()
    return teal.Greedy(levels, errors, uniform, len(path) - 1)


def run(ckpt_dir, sparsities: list[float], source: data.TextSource, *, tokens: int = 102_400,
        holdout_tokens: int = 16_384, seq_len: int = 1024, batch_size: int = 2, reservoir: int = 1_000_000,
        seed: int = 0, dtype: str | None = "float32", progress: bool = True, force: bool = False,
        criterion: str = "magnitude", allocation: str = "uniform", greedy_tokens: int = 2048, base_step: float = 0.05,
        last_fraction: float = 0.25) -> thresholds.Thresholds:
    """Calibrate a checkpoint on `tokens` tokens of `source` (the greedy allocation on the first
    `greedy_tokens` of them), add the levels to DIR/thresholds.json (replacing levels it holds only
    with force), then measure them on the next `holdout_tokens`."""
    if allocation not in teal.ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r} (choose from {', '.join(teal.ALLOCATIONS)})")
    model, calib_rows, held_rows = quantiles.prepare(ckpt_dir, "cats", sparsities, source, tokens=tokens,
                                                     holdout_tokens=holdout_tokens, seq_len=seq_len, dtype=dtype,
                                                     force=force, criterion=criterion)
    greedy_rows = calib_rows[:math.ceil(greedy_tokens / seq_len)]
    quantiles.plan(calib_rows, held_rows, len(sparsities), progress,
                   f", a greedy allocation on {sum(r.size for r in greedy_rows):,} of them" if allocation == "greedy" else "")
    sample = sample_activations(model, calib_rows, batch_size=batch_size, reservoir=reservoir, seed=seed,
                                progress=progress)
    g = meta_greedy = None
    if allocation == "greedy":
        rows = np.stack(greedy_rows)
        g = greedy(model, sample, rows, sparsities, base_step=base_step, last_fraction=last_fraction, progress=progress)
        meta_greedy = {"rows": len(rows), "tokens": int(rows.size), "base_step": base_step,
                       "last_fraction": last_fraction, "steps": g.steps,
                       # relative L2 error of each layer's output on the greedy rows, greedy vs uniform levels
                       "layer_error": {f"{p:g}": {"greedy": quantiles.rounded(g.error[i]),
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
        "activation": "|SiLU(x W_gate)| in fp32, dense model"
                      + (", times the L2 norm of the neuron's W_down row" if criterion == "weighted" else ""),
        "values_per_layer": cal.values_per_layer,
        "sample_per_layer": cal.sample_per_layer,
        "exact_quantile": cal.exact,
        # std of the realised fraction on the whole calibration data around the target, in points
        "quantile_std_points": 0.0 if cal.exact else round(100 * worst / math.sqrt(cal.sample_per_layer), 4),
        "seed": seed,
    }
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
    ap.add_argument("--tokens", type=int, help="calibration tokens (default: 102400 = 100 x 1024 for CATS, as CATS; "
                                               "20480 for TEAL, as TEAL)")
    ap.add_argument("--holdout-tokens", type=int, default=16_384,
                    help="held-apart tokens to measure realised sparsity on: the documents after the calibration "
                         "text, or the tail of a one-document .txt; 0: no measurement (default 16384)")
    ap.add_argument("--seq-len", type=int, default=1024, help="tokens per row (default 1024)")
    ap.add_argument("--batch-size", type=int, default=2, help="rows per forward pass (default 2)")
    ap.add_argument("--reservoir", type=int, default=1_000_000, help="sampled |a| values kept per layer (default 10^6)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the reservoir sample (default 0)")
    ap.add_argument("--force", action="store_true",
                    help="replace levels thresholds.json already holds for this method (or a file of another "
                         "model); without it calibration refuses before its pass. Other levels are kept")
    ap.add_argument("--dtype", choices=sorted(checkpoint.DTYPES), default="float32", help="compute dtype (default float32)")
    ap.add_argument("--criterion", choices=CRITERIA, default="magnitude",
                    help="what is compared with a threshold: |value| (magnitude, the papers', default) or |value| times "
                         "the L2 norm of the weight row it multiplies (weighted)")
    tg = ap.add_argument_group("allocation")
    tg.add_argument("--allocation", choices=("greedy", "uniform"),
                    help="TEAL: per-site sparsities by TEAL's block-wise greedy search (TEAL's default) or every site at "
                         "the target; CATS: per-layer sparsities by the same search across layers, or every layer at "
                         "the target (CATS's default)")
    tg.add_argument("--greedy-tokens", type=int, default=2048,
                    help="calibration tokens (the first rows) the greedy search runs the layers on (default 2048)")
    tg.add_argument("--greedy-step", type=float, default=0.05,
                    help="greedy base step: a site of weight w rises by step / w (default 0.05, as TEAL)")
    tg.add_argument("--last-fraction", type=float, default=0.25,
                    help="greedy: fraction of each row (its end) on which layer output errors are measured (default 0.25)")
    args = ap.parse_args(argv)
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
