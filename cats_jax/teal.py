"""TEAL calibration (arXiv 2408.14690): a threshold per (layer, linear input) at each target
sparsity, allocated uniformly or by TEAL's block-wise greedy search.

    python -m cats_jax.calibrate --method teal --sparsity 0.25,0.4,0.5,0.65 [--allocation greedy|uniform]

1. Quantiles. The dense model runs over calibration text with every site active at threshold 0
   (exactly dense; each site then sows what it tests, see model._sparse_input). A reservoir per
   layer and distinct input (k_proj and v_proj read q_proj's input, up_proj reads gate_proj's),
   and one for CATS's |SiLU(x W_gate)|, keeps a uniform sample of the |values| (all of them while
   they fit, quantiles.Reservoir); the greedy search reads its quantiles. The stored thresholds
   are exact quantiles over all the calibration values: where the sample is not all of them, a
   second pass reads each one inside the bracket the sample gives it (exact_thresholds). No
   symmetry is assumed: these are quantiles of |x| itself (TEAL's 10k-bin histograms of x
   assumed a distribution symmetric about zero).
2. Allocation: per layer, the per-site sparsities ("levels") at which the layer's effective
   sparsity (sparsity.weighted_mean: each site counts as the weight rows it lets skip) is the
   target. uniform: every site at the target. greedy (TEAL's): from 0 everywhere, try raising
   each site by its step, base_step / weight (so any step adds base_step / sum(weights) to the
   effective sparsity), keep the one that moves the layer's output least from the dense output
   (L2 norm over the last quarter of each calibration row; the layer's input is the dense model's
   hidden state), and repeat up to the largest target. One path serves every target: between the
   two steps that bracket a target the levels are interpolated to hit it exactly.
3. Realised sparsity per site: on the calibration data (the fraction of the dense inputs at or
   below the threshold) and, once the thresholds are saved, running the TEAL model on held-apart
   text (quantiles.save_and_measure).

The file also holds CATS's "mlp.act" thresholds from the same pass, so that the modes cats and
(with uniform allocation) cats+teal-attn apply from it as well.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from cats_jax import data, quantiles, thresholds
from cats_jax.model import Transformer, site_threshold
from cats_jax.sparsity import CATS_SITE, TEAL_SITES, site_weights, weighted_mean

f32 = jnp.float32
ALLOCATIONS = ("greedy", "uniform")
# Sites that read another site's input: they share its sample (their own thresholds still differ),
# under the magnitude criterion; under the weighted one each projection weighs the input its own way.
SAME_INPUT = {"attn.k_proj": "attn.q_proj", "attn.v_proj": "attn.q_proj", "mlp.up_proj": "mlp.gate_proj"}
SAMPLED = tuple(s for s in TEAL_SITES if s not in SAME_INPUT) + (CATS_SITE,)


def sampled(criterion: str) -> tuple[tuple[str, ...], dict[str, str]]:
    """(the sites whose scores are sampled, site -> the sampled site it shares) under `criterion`."""
    return (SAMPLED, SAME_INPUT) if criterion == "magnitude" else (TEAL_SITES + (CATS_SITE,), {})


# ---- 1. quantiles --------------------------------------------------------------------------------
def sample_inputs(model: Transformer, rows, *, batch_size: int = 2, reservoir: int = 1_000_000, seed: int = 0,
                  progress: bool = True) -> quantiles.Sample:
    """Samples of the score (|x|, or weighted) of every distinct site input (and of CATS's a) of the
    dense model over rows."""
    sites, same = sampled(model.criterion)
    return quantiles.sample_sites(model, list(rows), sites, batch_size=batch_size, reservoir=reservoir, seed=seed,
                                  same_input=same, progress=progress)


def exact_thresholds(model: Transformer, rows, sample: quantiles.Sample, wanted, *, batch_size: int = 2,
                     progress: bool = True) -> dict:
    """{(site, layer, level): (t, realised)}: exact quantiles over every value of rows, not only
    the sample's. The sample brackets each quantile (6 standard deviations of its rank either
    side); a second pass over the rows counts the values under the bracket and keeps those in it,
    where the quantile is read (with quantiles.quantile_threshold's choice between tied values)."""
    same, sites = sample.same_input, tuple(sample.sorted)
    keys = sorted({(same.get(site, site), layer, float(level)) for site, layer, level in wanted})
    bounds = {}
    for site, layer, level in keys:
        s = sample.sorted[site][layer]
        rank, spread = level * len(s), 6 * math.sqrt(level * (1 - level) * len(s)) + 2
        lo = s[int(rank - spread)] if rank - spread >= 0 and level > 0 else 0.0  # |x| >= 0: 0 takes all
        hi = s[int(rank + spread)] if rank + spread < len(s) and level > 0 else (np.inf if level > 0 else 0.0)
        bounds[site, layer, level] = lo, hi
    below = dict.fromkeys(keys, 0)
    inside = {k: [] for k in keys}
    quantiles.set_dense_sites(model, sites)
    graphdef, state = nnx.split(model)
    with quantiles.rows_bar(rows, "exact quantiles", progress) as bar:
        for batch in quantiles.batches(rows, batch_size):
            values = {s: np.asarray(v) for s, v in quantiles.abs_inputs(graphdef, state, jnp.asarray(batch), sites).items()}
            for key, (lo, hi) in bounds.items():
                v = values[key[0]][key[1]]
                below[key] += int(np.count_nonzero(v < lo))
                inside[key].append(v[(v >= lo) & (v <= hi)])
            bar.update(batch.size)
    out = {}
    for key in keys:
        w, n = np.sort(np.concatenate(inside[key])), sample.values_per_layer[key[0]]
        out[key] = _bracketed_quantile(w, below[key], n, key[2], key)
    return {(site, layer, float(level)): out[same.get(site, site), layer, float(level)]
            for site, layer, level in wanted}


def _bracketed_quantile(w: np.ndarray, below: int, n: int, p: float, where) -> tuple[float, float]:
    """quantiles.quantile_threshold of n sorted values of which `below` lie under the window w."""
    k = int(round(p * n))
    if k == 0:
        return 0.0, (below + int(np.searchsorted(w, 0.0, "right"))) / n
    i = k - 1 - below
    if not 0 <= i < len(w):
        raise RuntimeError(f"{where}: the sample's bracket missed the exact quantile; use a larger --reservoir")
    t = w[i]
    first, last = np.searchsorted(w, t, "left"), np.searchsorted(w, t, "right")  # t's tie group in w
    if below + first > 0 and k - (below + first) < (below + last) - k:  # the previous value is nearer to p
        if first == 0:
            raise RuntimeError(f"{where}: a tie group fills the sample's bracket; use a larger --reservoir")
        t, last = w[first - 1], first
    return float(t), (below + last) / n


# ---- 2. allocation -------------------------------------------------------------------------------
def effective(levels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Effective sparsity of per-site levels [..., sites] (sparsity.weighted_mean, as arrays)."""
    return levels @ weights / weights.sum()


def greedy_path(evaluate: Callable[[np.ndarray], np.ndarray], weights: np.ndarray, base_step: float,
                until: float) -> tuple[np.ndarray, np.ndarray]:
    """TEAL's greedy search for one layer. evaluate(levels [C, sites]) -> output error [C].
    Returns the levels after each step [steps + 1, sites] (row 0: all 0) and each step's error."""
    steps = base_step / weights
    levels = np.zeros(len(weights))
    path, errors = [levels], [0.0]
    while effective(levels, weights) < until - 1e-9:
        candidates = np.minimum(levels + np.diag(steps), 1.0)  # row i: site i one step up
        err = np.asarray(evaluate(candidates), np.float64)
        err[levels >= 1.0] = np.inf  # a site at sparsity 1 has nothing left to zero
        best = int(np.argmin(err))
        levels = candidates[best]
        path.append(levels)
        errors.append(err[best])
    return np.stack(path), np.asarray(errors)


def levels_at(path: np.ndarray, weights: np.ndarray, target: float) -> np.ndarray:
    """The levels at which the path's effective sparsity is exactly `target`, interpolated between
    the two steps that bracket it (they differ in one site)."""
    eff = effective(path, weights)
    if target > eff[-1] + 1e-9:
        raise ValueError(f"the greedy path stops at effective sparsity {eff[-1]:.4f} < target {target}")
    k = int(np.searchsorted(eff, target - 1e-9))  # first step at or past the target (rounding aside)
    if k == 0:
        return path[0]
    frac = min(1.0, (target - eff[k - 1]) / (eff[k] - eff[k - 1]))
    return path[k - 1] + frac * (path[k] - path[k - 1])


def _tail(block, x, start: int):
    """The block's output for tokens start.. of each row [R, T - start, H]. Those tokens attend over
    the keys and values of every token (handed in as a KV cache); nothing else of the earlier
    tokens reaches them, so only their queries, o_proj and MLP are computed."""
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    kv = block.attn.keys_values(block.input_norm(x), positions)
    return block(x[:, start:], positions[:, start:], kv)[0]


@functools.partial(jax.jit, static_argnums=(0, 3))
def dense_block(graphdef, state, x, start):
    """(the whole output, the output of tokens start..) of a block at thresholds 0: dense."""
    block = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    return block(x, positions)[0], _tail(block, x, start)


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def block_errors(graphdef, state, x, y_tail, th, start, sites=TEAL_SITES):
    """th [C, sites]: the thresholds of `sites` of C candidates. Per candidate, the L2 norm of the
    block's output minus the dense y_tail over tokens start.. of every row [C]."""

    def error(state, t):  # state passed in (unbatched) so that the merged block is of vmap's trace
        block = nnx.merge(graphdef, state)
        for i, site in enumerate(sites):
            site_threshold(block, site)[...] = t[i]
        return jnp.sqrt(jnp.sum(jnp.square((_tail(block, x, start) - y_tail).astype(f32))))

    return jax.vmap(error, in_axes=(None, 0))(state, th)


@dataclasses.dataclass
class Greedy:
    levels: np.ndarray  # [targets, layers, sites] (across layers: [targets, layers])
    error: np.ndarray  # [targets, layers]: each layer's error (or cost) at those levels
    uniform_error: np.ndarray  # [targets, layers]: the same with every site (layer) at the target
    steps: int  # greedy steps (per layer)


def check_greedy(base_step: float, last_fraction: float) -> None:
    if not 0 < base_step <= 1 or not 0 < last_fraction <= 1:
        raise ValueError(f"base_step {base_step} and last_fraction {last_fraction} must be in (0, 1]")


def greedy(model: Transformer, sample: quantiles.Sample, rows: np.ndarray, targets: list[float], *, base_step: float = 0.05,
           last_fraction: float = 0.25, progress: bool = True) -> Greedy:
    """TEAL's greedy allocation of every layer, on the dense hidden states of rows [R, T]."""
    check_greedy(base_step, last_fraction)
    num_layers = model.cfg.num_layers
    weights = np.array([site_weights(model.cfg)[s] for s in TEAL_SITES])
    model.set_mode("teal")
    for site in TEAL_SITES:
        model.set_thresholds(site, np.zeros(num_layers))
    x = model.embed(jnp.asarray(rows))
    start = int(rows.shape[1] * (1 - last_fraction))
    targets = np.asarray(targets, np.float64)
    levels = np.zeros((len(targets), num_layers, len(TEAL_SITES)))
    error, uniform_error = np.zeros((len(targets), num_layers)), np.zeros((len(targets), num_layers))
    steps = 0
    for layer in tqdm(range(num_layers), desc="greedy allocation", unit="layer", disable=not progress):
        graphdef, state = nnx.split(model.layers[layer])
        y, y_tail = dense_block(graphdef, state, x, start)
        scale = float(jnp.sqrt(jnp.sum(jnp.square(y_tail.astype(f32)))))

        def evaluate(cand):
            th = [[sample.threshold(s, layer, lv)[0] for s, lv in zip(TEAL_SITES, row)] for row in cand]
            return np.asarray(block_errors(graphdef, state, x, y_tail, jnp.asarray(th, f32), start)) / scale

        path, _ = greedy_path(evaluate, weights, base_step, float(targets.max()))
        levels[:, layer] = [levels_at(path, weights, p) for p in targets]
        err = evaluate(np.concatenate([levels[:, layer], np.repeat(targets[:, None], len(TEAL_SITES), axis=1)]))
        error[:, layer], uniform_error[:, layer] = err[:len(targets)], err[len(targets):]
        steps = max(steps, len(path) - 1)
        x = y
    return Greedy(levels, error, uniform_error, steps)


# ---- the whole calibration -------------------------------------------------------------------------
def run(ckpt_dir, sparsities: list[float], source: data.TextSource, *, allocation: str = "greedy",
        tokens: int = 20_480, holdout_tokens: int = 16_384, seq_len: int = 1024, batch_size: int = 2,
        reservoir: int = 1_000_000, greedy_tokens: int = 2048, base_step: float = 0.05, last_fraction: float = 0.25,
        seed: int = 0, dtype: str | None = "float32", progress: bool = True, force: bool = False,
        criterion: str = "magnitude") -> thresholds.Thresholds:
    """Calibrate TEAL thresholds of a checkpoint on `tokens` tokens of `source` (the greedy search
    on the first `greedy_tokens` of them), add the levels to DIR/thresholds.json (replacing levels
    it holds only with force), then measure them on the next `holdout_tokens`."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r} (choose from {', '.join(ALLOCATIONS)})")
    model, calib_rows, held_rows = quantiles.prepare(ckpt_dir, "teal", sparsities, source, tokens=tokens,
                                                     holdout_tokens=holdout_tokens, seq_len=seq_len, dtype=dtype,
                                                     force=force, criterion=criterion)
    cfg = model.cfg
    greedy_rows = calib_rows[:math.ceil(greedy_tokens / seq_len)]
    quantiles.plan(calib_rows, held_rows, len(sparsities), progress,
                   f", a greedy search per layer on {sum(r.size for r in greedy_rows):,} of them"
                   if allocation == "greedy" else "")
    sample = sample_inputs(model, calib_rows, batch_size=batch_size, reservoir=reservoir, seed=seed, progress=progress)

    meta_greedy = None
    if allocation == "greedy":
        rows = np.stack(greedy_rows)
        g = greedy(model, sample, rows, sparsities, base_step=base_step, last_fraction=last_fraction, progress=progress)
        site_levels = g.levels
        meta_greedy = {"rows": len(rows), "tokens": int(rows.size), "base_step": base_step,
                       "last_fraction": last_fraction, "steps_per_layer": g.steps,
                       "weights": {s: round(w, 6) for s, w in site_weights(cfg).items() if s in TEAL_SITES},
                       # relative L2 error of each layer's output on the greedy rows, greedy vs uniform levels
                       "layer_error": {f"{p:g}": {"greedy": quantiles.rounded(g.error[i]), "uniform": quantiles.rounded(g.uniform_error[i])}
                                       for i, p in enumerate(sparsities)}}
    else:
        site_levels = np.broadcast_to(np.asarray(sparsities)[:, None, None],
                                      (len(sparsities), cfg.num_layers, len(TEAL_SITES)))

    def site_level(i, j, site):  # [layers]: level i's sparsity of a site in each layer (CATS: uniform)
        return site_levels[i, :, j] if site != CATS_SITE else np.full(cfg.num_layers, sparsities[i])

    wanted = [(site, layer, float(site_level(i, j, site)[layer])) for i in range(len(sparsities))
              for j, site in enumerate(TEAL_SITES + (CATS_SITE,)) for layer in range(cfg.num_layers)]
    quantile = ({key: sample.threshold(*key) for key in wanted} if sample.exact else
                exact_thresholds(model, calib_rows, sample, wanted, batch_size=batch_size, progress=progress))

    levels = []
    for i, p in enumerate(sparsities):
        th, realised, site_sparsity = {}, {}, {}
        for j, site in enumerate(TEAL_SITES + (CATS_SITE,)):
            lv = site_level(i, j, site)
            got = [quantile[site, layer, float(lv[layer])] for layer in range(cfg.num_layers)]
            th[site] = [t for t, _ in got]
            realised[site] = {"calibration": quantiles.rounded([r for _, r in got])}
            if site != CATS_SITE:
                site_sparsity[site] = quantiles.rounded(lv)
        realised["effective"] = {"calibration": _effective(realised, "calibration", cfg)}
        levels.append(thresholds.Level(p, th, realised, site_sparsity))

    worst = max(math.sqrt(p * (1 - p)) for p in sparsities)
    smallest = min(min(len(a) for a in arrays) for arrays in sample.sorted.values())
    meta = {
        "source": source.describe(),
        "tokens": sample.tokens,
        "held_out_tokens": sum(r.size for r in held_rows),
        "seq_len": seq_len,
        "dtype": dtype or "as stored",
        "allocation": allocation,
        "criterion": criterion,
        "activation": "|input| of each linear layer, and |SiLU(x W_gate)| for mlp.act; fp32, dense model"
                      + (", times the L2 norm of the weight row it multiplies" if criterion == "weighted" else ""),
        "values_per_layer": sample.values_per_layer,
        "exact_quantile": True,  # over all values_per_layer (a second pass where the sample is not all)
        "sample_per_layer": {s: len(a[0]) for s, a in sample.sorted.items()},
        # the greedy search reads the sample's quantiles: their realised fraction's std, in points
        "sample_quantile_std_points": 0.0 if sample.exact else round(100 * worst / math.sqrt(smallest), 4),
        "seed": seed,
        "greedy": meta_greedy,
    }
    result = thresholds.Thresholds(thresholds.model_identity(model), "teal", levels, meta)

    def effective_held(level):
        level.realised["effective"]["held_out"] = _effective(level.realised, "held_out", cfg)

    return quantiles.save_and_measure(result, model, ckpt_dir, held_rows, batch_size=batch_size, force=force,
                                      progress=progress, on_measured=effective_held)


def _effective(realised: dict, key: str, cfg) -> list[float]:
    """Each layer's effective sparsity (weighted_mean over TEAL_SITES) of realised[site][key]."""
    return quantiles.rounded(weighted_mean({s: np.asarray(realised[s][key]) for s in TEAL_SITES}, cfg))


def summary(th: thresholds.Thresholds) -> str:
    """Per level: effective sparsity realised per layer (mean / min / max) on calibration and
    held-apart text, the mean held-apart sparsity of each site, and the greedy's layer errors."""
    short = [s.split(".")[1].removesuffix("_proj") for s in TEAL_SITES]
    errors = (th.calibration.get("greedy") or {}).get("layer_error", {})
    head = "target   effective calib (mean/min/max)   held-apart (mean/min/max)   " + " ".join(f"{s:>5}" for s in short)
    lines = [head + ("   layer error greedy / uniform" if errors else "")]
    for lv in th.levels:
        eff = lv.realised["effective"]
        cells = [quantiles.spread(eff.get(key)) for key in ("calibration", "held_out")]
        sites = " ".join(f"{100 * np.mean(lv.realised[s]['held_out']):5.1f}" if "held_out" in lv.realised[s] else
                         f"{'-':>5}" for s in TEAL_SITES)
        line = f"{100 * lv.sparsity:5.1f}%   {cells[0]:>30}   {cells[1]:>25}   {sites}"
        if errors:
            e = errors[f"{lv.sparsity:g}"]
            line += f"   {np.mean(e['greedy']):.4f} / {np.mean(e['uniform']):.4f}"
        lines.append(line)
    return "\n".join(lines)
