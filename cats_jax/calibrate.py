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
1000-bin histogram.) Sparsity is then measured for real on held-apart text: the CATS model is run
at each level and its zeroed activations are counted per layer.

    python -m cats_jax.calibrate --ckpt DIR --sparsity 0.3,0.4,0.5,0.6,0.7 --data-file text.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import math
import sys
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from cats_jax import checkpoint, data, thresholds
from cats_jax.model import Activation, Transformer


class Reservoir:
    """A uniform sample without replacement of at most `size` values of a stream: the values with
    the `size` smallest random keys (bottom-k sampling). Holds the whole stream until it is full."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.size, self.rng, self.seen = size, rng, 0
        self.values = np.empty(0, np.float32)
        self.keys = np.empty(0, np.float32)

    @property
    def exact(self) -> bool:
        return self.seen <= self.size

    def add(self, values: np.ndarray) -> None:
        values = values.reshape(-1)
        self.seen += values.size
        keys = self.rng.random(values.size, dtype=np.float32)
        if len(self.values) == self.size:  # full: only keys below the current largest can enter
            keep = keys < self.keys.max()
            values, keys = values[keep], keys[keep]
        values, keys = np.concatenate([self.values, values]), np.concatenate([self.keys, keys])
        if len(values) > self.size:
            idx = np.argpartition(keys, self.size - 1)[: self.size]
            values, keys = values[idx], keys[idx]
        self.values, self.keys = values, keys


def quantile_threshold(sorted_values: np.ndarray, p: float) -> tuple[float, float]:
    """(t, realised): the sample value t whose fraction of values <= t is nearest to p.

    Ties matter: a bf16 model's activations take few distinct values, so the fraction jumps by
    the size of a tie group; we pick the side of the group that lands nearer to p."""
    s, n = sorted_values, len(sorted_values)
    k = int(round(p * n))
    if k == 0:
        return 0.0, float(np.mean(s <= 0))
    t = s[k - 1]
    below, upto = np.searchsorted(s, t, "left"), np.searchsorted(s, t, "right")
    if below > 0 and k - below < upto - k:  # the previous distinct value is nearer to p
        t, upto = s[below - 1], below
    return float(t), upto / n


@functools.partial(jax.jit, static_argnums=0)
def _abs_activations(graphdef, state, tokens):
    """|a| of every MLP: fp32 [num_layers, B * T, I]."""
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    _, acts = nnx.capture(model.hidden, Activation)(tokens, positions)
    per_layer = [layer["mlp"]["act"][0] for _, layer in sorted(nnx.to_pure_dict(acts)["layers"].items())]
    return jnp.abs(jnp.stack(per_layer)).reshape(len(per_layer), -1, per_layer[0].shape[-1])


@functools.partial(jax.jit, static_argnums=0)
def _kept_per_layer(graphdef, state, tokens):
    """Per layer, the number of kept (non-zero) activations, summed over tokens: fp32 [num_layers]."""
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    _, inter = nnx.capture(model.hidden, nnx.Intermediate)(tokens, positions)
    layers = sorted(nnx.to_pure_dict(inter)["layers"].items())
    return jnp.stack([jnp.sum(layer["mlp"]["active_fraction"][0]) for _, layer in layers])


def _batches(rows: Iterable[np.ndarray], batch_size: int):
    it = iter(rows)
    while batch := list(itertools.islice(it, batch_size)):
        yield np.stack(batch)


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
              reservoir: int = 1_000_000, seed: int = 0, progress: bool = True,
              total_tokens: int | None = None) -> Calibration:
    """Thresholds at each sparsity from the activations of the model over rows (int32 [seq_len] each;
    total_tokens, if known, sizes the progress bar). The model is left dense-equivalent (impl
    cats-jnp, thresholds 0)."""
    for p in sparsities:
        if not 0 < p < 1:
            raise ValueError(f"sparsity {p} is not a fraction in (0, 1)")
    model.set_mlp_impl("cats-jnp")
    model.set_cats_thresholds(np.zeros(model.cfg.num_layers))
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(seed)
    samples = [Reservoir(reservoir, rng) for _ in range(model.cfg.num_layers)]
    tokens = 0
    bar = tqdm(total=total_tokens, desc="calibrating", unit="tok", unit_scale=True, disable=not progress)
    for batch in _batches(rows, batch_size):
        acts = np.asarray(_abs_activations(graphdef, state, jnp.asarray(batch)))
        for sample, a in zip(samples, acts):
            sample.add(a)
        tokens += batch.size
        bar.update(batch.size)
    bar.close()
    if tokens == 0:
        raise data.DataError("the calibration data produced no rows of tokens")
    th = np.zeros((len(sparsities), len(samples)), np.float32)
    realised = np.zeros_like(th)
    for j, sample in enumerate(samples):
        s = np.sort(sample.values)
        for i, p in enumerate(sparsities):
            th[i, j], realised[i, j] = quantile_threshold(s, p)
    return Calibration(list(sparsities), th, realised, tokens, samples[0].seen, len(samples[0].values))


def measure_sparsity(model: Transformer, rows: Iterable[np.ndarray], batch_size: int = 2, desc: str = "measuring",
                     progress: bool = True) -> np.ndarray:
    """Per-layer fraction of zeroed MLP activations of the model (with its current impl and
    thresholds) over rows; a dense model zeroes none."""
    if model.layers[0].mlp.impl == "dense":
        return np.zeros(model.cfg.num_layers)
    graphdef, state = nnx.split(model)
    kept, count = np.zeros(model.cfg.num_layers), 0
    for batch in tqdm(_batches(rows, batch_size), desc=desc, unit="batch", disable=not progress):
        kept += np.asarray(_kept_per_layer(graphdef, state, jnp.asarray(batch)), np.float64)
        count += batch.size
    if count == 0:
        raise data.DataError("no rows of tokens to measure sparsity on")
    return 1.0 - kept / count


def run(ckpt_dir, sparsities: list[float], source: data.TextSource, *, tokens: int = 102_400,
        holdout_tokens: int = 16_384, seq_len: int = 1024, batch_size: int = 2, reservoir: int = 1_000_000,
        seed: int = 0, dtype: str | None = "float32", progress: bool = True) -> thresholds.Thresholds:
    """Calibrate a checkpoint on `tokens` tokens of `source`, measure on the next `holdout_tokens`
    (later documents), and save DIR/thresholds.json."""
    model = checkpoint.load_model(ckpt_dir, checkpoint.DTYPES[dtype] if dtype else None)
    tokenizer = data.load_tokenizer(ckpt_dir)
    docs = data.encode(tokenizer, data.iter_documents(source))  # one stream: held-apart text follows
    sep = data.separator_id(tokenizer)
    calib_rows = data.pack(docs, seq_len, sep, max_rows=math.ceil(tokens / seq_len))
    cal = calibrate(model, calib_rows, sparsities, batch_size=batch_size, reservoir=reservoir, seed=seed,
                    progress=progress, total_tokens=math.ceil(tokens / seq_len) * seq_len)
    held_rows = list(data.pack(docs, seq_len, sep, max_rows=math.ceil(holdout_tokens / seq_len)))
    if not held_rows:
        raise data.DataError(f"{source.name}: no text left after the {cal.tokens} calibration tokens to hold apart; "
                             "use more data or fewer --tokens")
    identity = thresholds.model_identity(model)
    levels = []
    for i, p in enumerate(sparsities):
        model.set_cats_thresholds(cal.thresholds[i])
        held = measure_sparsity(model, held_rows, batch_size, desc=f"held-apart @ {p:g}", progress=progress)
        realised = {"calibration": _rounded(cal.realised[i]), "held_out": _rounded(held)}
        levels.append(thresholds.Level(p, {thresholds.CATS_SITE: [float(t) for t in cal.thresholds[i]]},
                                       {thresholds.CATS_SITE: realised}))
    worst = max(math.sqrt(p * (1 - p)) for p in sparsities)
    meta = {
        "source": source.describe(),
        "tokens": cal.tokens,
        "held_out_tokens": sum(r.size for r in held_rows),
        "seq_len": seq_len,
        "dtype": dtype or "as stored",
        "activation": "|SiLU(x W_gate)| in fp32, dense model",
        "values_per_layer": cal.values_per_layer,
        "sample_per_layer": cal.sample_per_layer,
        "exact_quantile": cal.exact,
        # std of the realised fraction on the whole calibration data around the target, in points
        "quantile_std_points": 0.0 if cal.exact else round(100 * worst / math.sqrt(cal.sample_per_layer), 4),
        "seed": seed,
    }
    result = thresholds.Thresholds(identity, "cats", levels, meta)
    result.save(ckpt_dir)
    return result


def _rounded(x) -> list[float]:
    return [round(float(v), 6) for v in x]


def summary(th: thresholds.Thresholds) -> str:
    """One line per level: target, realised on calibration and held-apart text (mean / min / max)."""
    lines = ["target   calibration (mean/min/max)   held-apart (mean/min/max)"]
    for lv in th.levels:
        r = lv.realised[thresholds.CATS_SITE]
        cells = [f"{100 * np.mean(v):5.1f} {100 * np.min(v):5.1f} {100 * np.max(v):5.1f}"
                 for v in (r["calibration"], r["held_out"])]
        lines.append(f"{100 * lv.sparsity:5.1f}%   {cells[0]:>26}   {cells[1]:>25}")
    return "\n".join(lines)


def parse_sparsities(text: str) -> list[float]:
    try:
        values = sorted({float(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sparsity {text!r}: expected comma-separated fractions, e.g. 0.3,0.5")
    if not values or any(not 0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"--sparsity {text!r}: each value must be a fraction in (0, 1)")
    return values


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m cats_jax.calibrate",
        description="Calibrate sparsity thresholds of a checkpoint and store them in DIR/thresholds.json: CATS (one "
                    "per layer) or TEAL (one per layer and linear input; see cats_jax.teal).",
    )
    ap.add_argument("--method", choices=("cats", "teal"), default="cats", help="sparsity method (default cats)")
    ap.add_argument("--ckpt", required=True, help="converted checkpoint directory")
    ap.add_argument("--sparsity", type=parse_sparsities, default=[0.5],
                    help="target sparsities, comma-separated fractions (default 0.5), e.g. 0.3,0.4,0.5,0.6,0.7")
    src = ap.add_argument_group("calibration text (default: RefinedWeb streamed from the hub, as CATS)")
    src.add_argument("--data-file", help="local .txt (one document) or .jsonl / .jsonl.gz (one document per line)")
    src.add_argument("--data", default=data.REFINEDWEB, help=f"`datasets` hub name (default {data.REFINEDWEB})")
    src.add_argument("--split", default="train", help="dataset split (default train)")
    src.add_argument("--config", default=None, help="dataset configuration name")
    src.add_argument("--field", default=None, help="text field of .jsonl / dataset records (default: content for RefinedWeb, else text)")
    ap.add_argument("--tokens", type=int, help="calibration tokens (default: 102400 = 100 x 1024 for CATS, as CATS; "
                                               "20480 for TEAL, as TEAL)")
    ap.add_argument("--holdout-tokens", type=int, default=16_384, help="held-apart tokens to measure realised sparsity on")
    ap.add_argument("--seq-len", type=int, default=1024, help="tokens per row (default 1024)")
    ap.add_argument("--batch-size", type=int, default=2, help="rows per forward pass (default 2)")
    ap.add_argument("--reservoir", type=int, default=1_000_000, help="sampled |a| values kept per layer (default 10^6)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the reservoir sample")
    ap.add_argument("--dtype", choices=sorted(checkpoint.DTYPES), default="float32", help="compute dtype (default float32)")
    tg = ap.add_argument_group("TEAL")
    tg.add_argument("--allocation", choices=("greedy", "uniform"), default="greedy",
                    help="per-site sparsities: TEAL's block-wise greedy search (default) or every site at the target")
    tg.add_argument("--greedy-tokens", type=int, default=2048,
                    help="calibration tokens (the first rows) the greedy search runs the layers on (default 2048)")
    tg.add_argument("--greedy-step", type=float, default=0.05,
                    help="greedy base step: a site of weight w rises by step / w (default 0.05, as TEAL)")
    tg.add_argument("--last-fraction", type=float, default=0.25,
                    help="greedy: fraction of each row (its end) on which layer output errors are measured (default 0.25)")
    args = ap.parse_args(argv)
    source = data.TextSource(args.data_file or args.data, args.split, args.field, args.config)
    common = dict(holdout_tokens=args.holdout_tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                  reservoir=args.reservoir, seed=args.seed, dtype=args.dtype)
    try:
        if args.method == "teal":
            from cats_jax import teal  # imports this module

            result = teal.run(args.ckpt, args.sparsity, source, allocation=args.allocation, tokens=args.tokens or 20_480,
                              greedy_tokens=args.greedy_tokens, base_step=args.greedy_step,
                              last_fraction=args.last_fraction, **common)
        else:
            result = run(args.ckpt, args.sparsity, source, tokens=args.tokens or 102_400, **common)
    except (data.DataError, thresholds.ThresholdsError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    cal = result.calibration
    exact = "exact quantiles" if cal["exact_quantile"] else f"quantiles of a sample, std {cal['quantile_std_points']} points"
    print(f"calibrated on {cal['tokens']} tokens ({exact}), held apart {cal['held_out_tokens']} tokens")
    print(teal.summary(result) if args.method == "teal" else summary(result))
    print(f"wrote {args.ckpt}/{thresholds.FILENAME}")


if __name__ == "__main__":
    main()
