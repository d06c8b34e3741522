"""What CATS and TEAL calibration share: the calibration and hold-apart text, a uniform sample of
the |values| each site tests, their quantiles, and the sparsity a thresholded model realises.

A *site* (cats_jax.sparsity) is where a threshold applies. The dense model runs with the sampled
sites active at threshold 0 (exactly dense; each then sows what it tests, see model._sparse_input
and MLP.__call__), and a Reservoir per (site, layer) keeps a uniform sample of the |values|.
CATS samples the one site "mlp.act"; TEAL samples every distinct linear input as well.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import sys
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from cats_jax import checkpoint, data, thresholds
from cats_jax.model import Activation, Transformer, UpSquares, sown_by_site
from cats_jax.sparsity import CATS_ONLY_CRITERIA, CATS_SITE, CRITERIA, TEAL_SITES

f32 = jnp.float32


# ---- the text ------------------------------------------------------------------------------------
def calibration_rows(tokenizer, source: data.TextSource, tokens: int, holdout_tokens: int,
                     seq_len: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(calibration rows, held-apart rows), int32 [seq_len] each, read and checked before any pass.

    The held-apart text shares no document with the calibration rows: it is the documents that
    follow them, or, when the source is one document (a .txt), the tail of that document.
    holdout_tokens 0: no held-apart rows."""
    if tokens < 1 or holdout_tokens < 0 or seq_len < 1:
        raise data.DataError(f"--tokens {tokens}, --holdout-tokens {holdout_tokens} and --seq-len {seq_len} "
                             "must be positive (--holdout-tokens may be 0)")
    n_cal, n_held = math.ceil(tokens / seq_len), math.ceil(holdout_tokens / seq_len)
    sep = data.separator_id(tokenizer)
    docs = data.encode(tokenizer, data.iter_documents(source))
    first = list(itertools.islice(docs, 2))
    if len(first) == 1 and n_held:  # one document: hold apart its tail
        cut = max(len(first[0]) - n_held * seq_len, 0)
        cal_docs, held_docs = iter([first[0][:cut]]), iter([first[0][cut:]])
    else:  # one stream: the held-apart documents follow the calibration rows
        cal_docs = held_docs = itertools.chain(first, docs)
    cal = list(data.pack(cal_docs, seq_len, sep, max_rows=n_cal))
    held = list(data.pack(held_docs, seq_len, sep, max_rows=n_held))
    if len(cal) < n_cal or (n_held and not held):
        have = f"only {len(cal) * seq_len} calibration tokens" + (" and none to hold apart" if n_held else "")
        raise data.DataError(f"{source.name}: {have}, asked for {n_cal * seq_len} + {n_held * seq_len} held apart "
                             f"(rows of --seq-len {seq_len}); use more text, or fewer --tokens / --holdout-tokens")
    return cal, held


def batches(rows: Iterable[np.ndarray], batch_size: int):
    it = iter(rows)
    while batch := list(itertools.islice(it, batch_size)):
        yield np.stack(batch)


def rows_bar(rows: list[np.ndarray], desc: str, progress: bool) -> tqdm:
    """A progress bar over the tokens of rows: a total and an ETA."""
    return tqdm(total=sum(r.size for r in rows), desc=desc, unit="tok", unit_scale=True, disable=not progress)


def rounded(x) -> list[float]:
    return [round(float(v), 6) for v in x]


def spread(values) -> str:
    """Per-layer fractions as "mean min max" in percent ("-" for none)."""
    if values is None:
        return "-"
    return f"{100 * np.mean(values):5.1f} {100 * np.min(values):5.1f} {100 * np.max(values):5.1f}"


def plan(calib_rows, held_rows, levels: int, progress: bool, extra: str = "") -> None:
    """One line before the long passes: what they read (each bar then shows its ETA)."""
    if progress:
        cal, held = sum(r.size for r in calib_rows), sum(r.size for r in held_rows)
        then = f", then {levels} held-apart passes over {held:,} tokens" if held else ", no held-apart measurement"
        print(f"calibration: a pass over {cal:,} tokens{extra}{then}", file=sys.stderr)


# ---- the sample ----------------------------------------------------------------------------------
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


@dataclasses.dataclass
class Sample:
    """Sorted |values| per sampled site and layer: every site's threshold at any sparsity."""

    sorted: dict[str, list[np.ndarray]]  # sampled site -> per layer, ascending
    tokens: int
    values_per_layer: dict[str, int]  # sampled site -> values seen per layer
    exact: bool  # every sample holds all the values seen
    same_input: dict[str, str] = dataclasses.field(default_factory=dict)  # site -> the sampled site it reads

    def threshold(self, site: str, layer: int, level: float) -> tuple[float, float]:
        """(t, fraction of the sample <= t) for `site` of `layer` at sparsity `level`."""
        return quantile_threshold(self.sorted[self.same_input.get(site, site)][layer], level)


def set_dense_sites(model: Transformer, sites=TEAL_SITES + (CATS_SITE,)) -> None:
    """The sites active at threshold 0, every other site off: exactly the dense model in fp32 (in
    bf16 the CATS path reads the gate unrounded), with every active site sowing what it tests."""
    model.set_mode("teal" if set(sites) & set(TEAL_SITES) else "cats")
    model.set_mlp_impl("cats-jnp" if CATS_SITE in sites else "dense")
    for site in TEAL_SITES + (CATS_SITE,):
        model.set_thresholds(site, np.zeros(model.cfg.num_layers))


@functools.partial(jax.jit, static_argnums=(0, 3))
def abs_inputs(graphdef, state, tokens, sites: tuple[str, ...]):
    """The score each of `sites` tests (set_dense_sites; |value|, or |value| * factor under the
    weighted criterion): {site: fp32 [L, B * T, n]}."""
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    _, acts = nnx.capture(model.hidden, Activation)(tokens, positions)
    values = sown_by_site(nnx.to_pure_dict(acts), "input")
    return {s: jnp.abs(values[s].astype(f32)).reshape(values[s].shape[0], -1, values[s].shape[-1]) for s in sites}


def sample_sites(model: Transformer, rows: list[np.ndarray], sites: tuple[str, ...], *, batch_size: int = 2,
                 reservoir: int = 1_000_000, seed: int = 0, same_input: dict | None = None,
                 progress: bool = True) -> Sample:
    """Samples of the scores (|values|, or weighted) each of `sites` tests in the dense model over rows (int32 [T] each)."""
    set_dense_sites(model, sites)
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(seed)
    samples = {s: [Reservoir(reservoir, rng) for _ in range(model.cfg.num_layers)] for s in sites}
    tokens = 0
    with rows_bar(rows, "calibrating", progress) as bar:
        for batch in batches(rows, batch_size):
            for site, values in abs_inputs(graphdef, state, jnp.asarray(batch), tuple(sites)).items():
                for res, v in zip(samples[site], np.asarray(values)):
                    res.add(v)
            tokens += batch.size
            bar.update(batch.size)
    if tokens == 0:
        raise data.DataError("the calibration data produced no rows of tokens")
    return Sample({s: [np.sort(r.values) for r in rs] for s, rs in samples.items()}, tokens,
                  {s: rs[0].seen for s, rs in samples.items()}, all(r.exact for rs in samples.values() for r in rs),
                  dict(same_input or {}))


@functools.partial(jax.jit, static_argnums=0)
def _up_squares(graphdef, state, tokens):
    """Each layer's sum over tokens of every neuron's squared up projection, fp32 [L, I]."""
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    _, sown = nnx.capture(model.hidden, UpSquares)(tokens, positions)
    layers = nnx.to_pure_dict(sown)["layers"]
    return jnp.stack([layers[i]["mlp"]["up_squares"][0] for i in sorted(layers)])


def up_rms(model: Transformer, rows: list[np.ndarray], *, batch_size: int = 2, progress: bool = True) -> np.ndarray:
    """The up-rms criterion's factors: each neuron's root mean square of u = x W_up in the dense
    model over rows, [L, I], rounded to the 6 significant digits thresholds.json stores (so the
    calibration samples with the factors the file gives back)."""
    set_dense_sites(model, (CATS_SITE,))
    graphdef, state = nnx.split(model)
    total, tokens = 0.0, 0
    with rows_bar(rows, "up-rms factors", progress) as bar:
        for batch in batches(rows, batch_size):
            total = total + np.asarray(_up_squares(graphdef, state, jnp.asarray(batch)), np.float64)
            tokens += batch.size
            bar.update(batch.size)
    if tokens == 0:
        raise data.DataError("the calibration data produced no rows of tokens")
    return np.array([[float(f"{v:.6g}") for v in layer] for layer in np.sqrt(total / tokens)])


# ---- realised sparsity ---------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=0)
def _kept_per_site(graphdef, state, tokens):
    """{site: kept values per layer, summed over tokens [L]} of the model's active sites."""
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    _, inter = nnx.capture(model.hidden, nnx.Intermediate)(tokens, positions)
    return {s: jnp.sum(v, axis=(1, 2)) for s, v in sown_by_site(nnx.to_pure_dict(inter), "active_fraction").items()}


def measure_sparsity(model: Transformer, rows: list[np.ndarray], batch_size: int = 2, desc: str = "measuring",
                     progress: bool = True) -> dict[str, np.ndarray]:
    """Per site the model thresholds now (model.sites), its fraction of zeroed values per layer over
    rows; a dense model thresholds no site."""
    graphdef, state = nnx.split(model)
    kept, count = {}, 0
    with rows_bar(rows, desc, progress) as bar:
        for batch in batches(rows, batch_size):
            for site, k in _kept_per_site(graphdef, state, jnp.asarray(batch)).items():
                kept[site] = kept.get(site, 0.0) + np.asarray(k, np.float64)
            count += batch.size
            bar.update(batch.size)
    if count == 0:
        raise data.DataError("no rows of tokens to measure sparsity on")
    return {site: 1.0 - k / count for site, k in kept.items()}


# ---- a calibration run ---------------------------------------------------------------------------
def check_sparsities(sparsities) -> None:
    for p in sparsities:
        if not 0 < p < 1:
            raise ValueError(f"sparsity {p} is not a fraction in (0, 1)")


def prepare(ckpt_dir, method: str, sparsities: list[float], source: data.TextSource, *, tokens: int,
            holdout_tokens: int, seq_len: int, dtype: str | None, force: bool = False, criterion: str = "magnitude"):
    """(model, calibration rows, held-apart rows): everything a calibration checks before its pass,
    that the text suffices and that saving `method` at `sparsities` of `criterion` replaces no
    calibration without force (thresholds.check_merge). The model is set to `criterion`, but to
    up-rms, whose factors the caller measures over the rows (up_rms)."""
    check_sparsities(sparsities)
    if criterion not in CRITERIA:
        raise ValueError(f"unknown selection criterion {criterion!r} (choose from {', '.join(CRITERIA)})")
    if criterion in CATS_ONLY_CRITERIA and method != "cats":
        raise ValueError(f"the {criterion} criterion is CATS's only (it weighs the MLP's neurons); "
                         "choose magnitude or weighted for TEAL")
    model = checkpoint.load_model(ckpt_dir, checkpoint.DTYPES[dtype] if dtype else None)
    thresholds.check_merge(ckpt_dir, thresholds.model_identity(model), method, sparsities, force, criterion)
    if criterion not in CATS_ONLY_CRITERIA:
        model.set_criterion(criterion)
    cal, held = calibration_rows(data.load_tokenizer(ckpt_dir), source, tokens, holdout_tokens, seq_len)
    return model, cal, held


def save_and_measure(result: thresholds.Thresholds, model: Transformer, ckpt_dir, held_rows: list[np.ndarray], *,
                     batch_size: int = 2, force: bool = False, progress: bool = True,
                     on_measured=None) -> thresholds.Thresholds:
    """Save the thresholds, then measure the sparsity each level realises on the held-apart rows
    (none: no measurement), record it per site under realised[site]["held_out"] (then call
    on_measured(level)) and save again: an interrupted measurement loses no calibration."""
    result.save(ckpt_dir, force)
    if not held_rows:
        return result
    for level in result.levels:
        thresholds.apply(model, result, level.sparsity)
        held = measure_sparsity(model, held_rows, batch_size, desc=f"held-apart @ {level.sparsity:g}",
                                progress=progress)
        for site, v in held.items():
            level.realised[site]["held_out"] = rounded(v)
        if on_measured is not None:
            on_measured(level)
    result.save(ckpt_dir, force=True)  # the levels just written, now with their held-apart sparsity
    return result
