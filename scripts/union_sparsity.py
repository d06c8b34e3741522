"""Union sparsity of batched decode on real activations (issue 17).

In a batched decode step a weight row can be skipped only if no row of the batch needs it: the
union of the rows' kept inputs decides. For independent random inputs at sparsity p, B rows leave
p^B of the rows skippable; real tokens are correlated. For each method and level this runs the
sparse model (jnp path, the calibrated thresholds set, so that every site sees what the sparse
model produces) over documents, records which inputs each site keeps at every token, and reports
per layer and site the fraction of weight rows that NO token of a batch keeps, for batches of

  - B tokens of B different documents (a server batching independent requests): random batches
    of B distinct documents, one random position of each;
  - B consecutive tokens of one document (multi-token / speculative decode): every aligned
    block of B positions.

Positions before --skip are prompt context and are not measured.

    PYTHONPATH=. python scripts/union_sparsity.py --cats checkpoints/smollm2-cats --teal checkpoints/smollm2-teal \\
        --data-file ~/.cache/cats-jax/evaldata/wiki_passages.jsonl --sparsity 0.4,0.5,0.7 --out runs/union.json
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from cats_jax import checkpoint, cli, data, thresholds
from cats_jax.model import Activation, site_threshold, sown_by_site
from cats_jax.sparsity import CATS_SITE, TEAL_SITES, teal_input, weighted_mean

BATCH_SIZES = (1, 2, 4, 8, 16, 32)
COLUMNS = ("different_docs", "consecutive")
SITES = (CATS_SITE,) + TEAL_SITES  # the order of the per-site table


# ---- what each site keeps ------------------------------------------------------------------------
def keep_masks(model, tokens) -> dict[str, jax.Array]:
    """{site: bool [L, R, T, n]}: which inputs each site of the model's mode keeps, per token of
    tokens [R, T] (the weight rows that token needs). TEAL sites sow their input before the rule:
    the rule is applied here with each layer's threshold; the CATS MLP sows its activation after
    the rule, so its non-zeros are the kept neurons."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    _, acts = nnx.capture(model.hidden, Activation)(tokens, positions)
    kept = {}
    for site, v in sown_by_site(nnx.to_pure_dict(acts), "input").items():
        if site == CATS_SITE:
            kept[site] = v != 0
        else:
            t = jnp.stack([site_threshold(layer, site)[...] for layer in model.layers])
            kept[site] = teal_input(v, t[:, None, None, None]) != 0
    return kept


def site_inputs(cfg, site: str) -> int:
    """Inputs a site tests: the weight rows it can let skip (CATS: neurons)."""
    if site in (CATS_SITE, "mlp.down_proj"):
        return cfg.intermediate_size
    return cfg.num_heads * cfg.head_dim if site == "attn.o_proj" else cfg.hidden_size


def consecutive_union(kept: jax.Array, batch: int) -> jax.Array:
    """Union sparsity [L, R, blocks] of every aligned block of `batch` consecutive tokens of
    kept [L, R, T, n] (a tail shorter than a block is left out)."""
    blocks = kept.shape[2] // batch
    k = kept[:, :, :blocks * batch].reshape(*kept.shape[:2], blocks, batch, kept.shape[-1])
    return 1.0 - jnp.mean(jnp.any(k, axis=3), axis=-1)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _doc_stats(graphdef, state, tokens, batch_sizes, skip, sample_pos):
    """For rows tokens [R, T]: per site, the consecutive-token union sparsity summed over rows and
    blocks [len(batch_sizes), L], and the kept masks of the positions sample_pos [R, K], bit-packed
    along the inputs [R, K, L, ceil(n / 8)]."""
    kept = keep_masks(nnx.merge(graphdef, state), tokens)
    sums, packed = {}, {}
    for site, k in kept.items():
        sums[site] = jnp.stack([jnp.sum(consecutive_union(k[:, :, skip:], b), axis=(1, 2)) for b in batch_sizes])
        at = jnp.take_along_axis(k, sample_pos[None, :, :, None], axis=2)  # [L, R, K, n]
        packed[site] = jnp.packbits(jnp.transpose(at, (1, 2, 0, 3)), axis=-1)
    return sums, packed


def cross_doc_union(packed: np.ndarray, n: int, docs: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Mean union sparsity per layer [L] over batches: packed [D, K, L, ceil(n / 8)] (bit-packed
    kept masks of K positions of D documents), batch i made of positions pos[i] of documents
    docs[i] ([batches, B] each)."""
    union = np.bitwise_or.reduce(packed[docs, pos], axis=1)  # [batches, L, n / 8]
    return 1.0 - np.bitwise_count(union).sum(-1).mean(0) / n


# ---- one method at one level ---------------------------------------------------------------------
def measure(model, rows: np.ndarray, batch_sizes, skip: int, sample_pos: np.ndarray, batches: dict,
            rows_per_call: int = 2, desc: str = "", progress: bool = True) -> dict:
    """{column: {B: {site: [L] union sparsity}}} of the model as set (mode and thresholds) over
    rows [D, T] (one document each). sample_pos [D, K]: the positions cross-document batches draw
    from; batches {B: (docs, pos)}, indices into D and K."""
    graphdef, state = nnx.split(model)
    sums, packed = {}, {}
    for i in tqdm(range(0, len(rows), rows_per_call), desc=desc, unit="call", disable=not progress):
        s, p = _doc_stats(graphdef, state, jnp.asarray(rows[i:i + rows_per_call]), tuple(batch_sizes), skip,
                          jnp.asarray(sample_pos[i:i + rows_per_call]))
        for site in s:
            sums[site] = sums.get(site, 0.0) + np.asarray(s[site], np.float64)
            packed.setdefault(site, []).append(np.asarray(p[site]))
    measured = rows.shape[1] - skip
    out = {"consecutive": {b: {site: sums[site][j] / (len(rows) * (measured // b)) for site in sums}
                           for j, b in enumerate(batch_sizes)}}
    packed = {site: np.concatenate(p) for site, p in packed.items()}
    out["different_docs"] = {b: {site: cross_doc_union(p, site_inputs(model.cfg, site), *batches[b])
                                 for site, p in packed.items()} for b in batch_sizes}
    return out


def draw_batches(docs: int, samples: int, batch_sizes, count: int, seed: int) -> dict:
    """{B: (docs [count, B], pos [count, B])}: `count` batches of B distinct documents, a random
    one of each document's `samples` sampled positions."""
    rng = np.random.default_rng(seed)
    return {b: (np.stack([rng.choice(docs, b, replace=False) for _ in range(count)]),
                rng.integers(samples, size=(count, b))) for b in batch_sizes}


# ---- summaries -----------------------------------------------------------------------------------
def layer_mean(per_site: dict, cfg) -> float:
    """Mean over layers of each layer's union sparsity, its sites weighted by the weight rows they
    let skip (sparsity.site_weights)."""
    return float(np.mean(weighted_mean({s: np.asarray(v) for s, v in per_site.items()}, cfg)))


def random_prediction(single: dict, batch: int, cfg) -> float:
    """layer_mean if B tokens were independent: each (layer, site) at its measured single-token
    sparsity s keeps s^B of its rows skippable."""
    return layer_mean({s: np.asarray(v) ** batch for s, v in single.items()}, cfg)


def tables(results: dict, cfg, batch_sizes) -> str:
    """Markdown: per method, rows B, columns per level (different documents, consecutive tokens,
    the independent-input prediction); then per site at the level nearest 50%."""
    out = []
    for method, levels in results.items():
        head = "| B | " + " | ".join(f"{100 * float(p):g}%: docs | consecutive | random" for p in levels) + " |"
        out += [f"**{method.upper()}**: union sparsity, % of weight rows no token of the batch needs "
                "(mean over layers)", "", head, "|---" * (1 + 3 * len(levels)) + "|"]
        for b in batch_sizes:
            cells = []
            for r in levels.values():
                cells += [f"{100 * layer_mean(r[c][b], cfg):.1f}" for c in COLUMNS]
                cells.append(f"{100 * random_prediction(r['different_docs'][1], b, cfg):.1f}")
            out.append(f"| {b} | " + " | ".join(cells) + " |")
        out.append("")
        p = min(levels, key=lambda p: abs(float(p) - 0.5))
        r = levels[p]["different_docs"]
        out += [f"**{method.upper()} {100 * float(p):g}%, per site** (different documents; mean over layers, "
                "and min-max over layers at B=8)", "",
                "| site | " + " | ".join(f"B={b}" for b in batch_sizes) + " | B=8 min-max |",
                "|---" * (len(batch_sizes) + 2) + "|"]
        for site in sorted(r[batch_sizes[0]], key=SITES.index):
            cells = [f"{100 * np.mean(r[b][site]):.1f}" for b in batch_sizes]
            at8 = f"{100 * np.min(r[8][site]):.1f}-{100 * np.max(r[8][site]):.1f}" if 8 in r else ""
            out.append(f"| {site} | " + " | ".join(cells) + f" | {at8} |")
        out.append("")
    return "\n".join(out)


# ---- command line --------------------------------------------------------------------------------
def documents(ckpt: str, source: data.TextSource, count: int, length: int) -> np.ndarray:
    """[count, length]: the first `length` tokens of the first `count` documents that have as many."""
    tokenizer = data.load_tokenizer(ckpt)
    rows = []
    for ids in data.encode(tokenizer, data.iter_documents(source)):
        if len(ids) >= length:
            rows.append(ids[:length])
            if len(rows) == count:
                return np.asarray(rows, np.int32)
    raise cli.InputError(f"{source.name}: only {len(rows)} documents of >= {length} tokens, --docs asks for {count}; "
                         "use fewer --docs or a shorter --seq-len")


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 1,2,4,8") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers")
    return values


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="scripts/union_sparsity.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cats", metavar="CKPT", help="checkpoint whose thresholds.json holds CATS levels")
    ap.add_argument("--teal", metavar="CKPT", help="checkpoint whose thresholds.json holds TEAL levels")
    ap.add_argument("--sparsity", type=cli.fractions, default=[0.4, 0.5, 0.7], help="levels (default 0.4,0.5,0.7)")
    ap.add_argument("--data-file", required=True, help=".jsonl / .jsonl.gz (one document per line) or .txt")
    ap.add_argument("--field", default=None, help="text field of .jsonl records (default text)")
    ap.add_argument("--docs", type=int, default=128, help="documents (default 128)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens read of each document (default 256)")
    ap.add_argument("--skip", type=int, default=32, help="first positions of each document not measured (default 32)")
    ap.add_argument("--samples-per-doc", type=int, default=16,
                    help="positions per document that cross-document batches draw from (default 16)")
    ap.add_argument("--batches", type=int, default=256, help="random cross-document batches per B (default 256)")
    ap.add_argument("--batch-sizes", type=_ints, default=BATCH_SIZES, help="B (default 1,2,4,8,16,32)")
    ap.add_argument("--rows-per-call", type=int, default=2, help="documents per forward pass (default 2)")
    ap.add_argument("--dtype", choices=sorted(checkpoint.DTYPES), default="bfloat16",
                    help="compute dtype (default bfloat16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write every number (per layer and site) to this JSON")
    args = ap.parse_args(argv)

    # check every input before the long pass
    ckpts = {m: c for m, c in (("cats", args.cats), ("teal", args.teal)) if c}
    if not ckpts:
        raise cli.InputError("give --cats CKPT and/or --teal CKPT")
    measured = args.seq_len - args.skip
    if args.skip < 0 or measured < max(args.batch_sizes):
        raise cli.InputError(f"--seq-len {args.seq_len} - --skip {args.skip} leaves {measured} measured positions, "
                             f"fewer than B = {max(args.batch_sizes)}")
    if args.docs < max(args.batch_sizes):
        raise cli.InputError(f"--docs {args.docs} < B = {max(args.batch_sizes)}: a batch needs distinct documents")
    if not 1 <= args.samples_per_doc <= measured or args.batches < 1 or args.rows_per_call < 1:
        raise cli.InputError("--samples-per-doc must be in 1..seq-len - skip; --batches and --rows-per-call >= 1")
    files = {}
    for method, ckpt in ckpts.items():
        try:
            th = thresholds.load(ckpt)
        except (thresholds.ThresholdsError, OSError) as e:
            raise cli.InputError(f"{ckpt}: {e}") from None
        if th is None or th.method != method:
            raise cli.InputError(f"{ckpt}: no {method.upper()} thresholds.json; run python -m cats_jax.calibrate "
                                 f"--ckpt {ckpt} --method {method} first")
        for p in args.sparsity:
            try:
                th.level(p)
            except thresholds.ThresholdsError as e:
                raise cli.InputError(f"{ckpt}: {e}") from None
        files[method] = th
    try:
        rows = documents(next(iter(ckpts.values())), data.TextSource(args.data_file, field=args.field),
                         args.docs, args.seq_len)
    except data.DataError as e:
        raise cli.InputError(str(e)) from None

    rng = np.random.default_rng(args.seed)
    sample_pos = np.stack([rng.choice(np.arange(args.skip, args.seq_len), args.samples_per_doc, replace=False)
                           for _ in range(args.docs)]).astype(np.int32)
    batches = draw_batches(args.docs, args.samples_per_doc, args.batch_sizes, args.batches, args.seed + 1)
    meta = {"data": Path(args.data_file).name, "docs": args.docs, "seq_len": args.seq_len, "skip": args.skip,
            "samples_per_doc": args.samples_per_doc, "batches": args.batches, "dtype": args.dtype,
            "seed": args.seed, "commit": _git_commit(), "date": datetime.date.today().isoformat()}
    results = {}
    for method, ckpt in ckpts.items():
        model = checkpoint.load_model(ckpt, checkpoint.DTYPES[args.dtype])
        cfg = model.cfg
        meta["model"] = cfg.name
        for p in args.sparsity:
            thresholds.apply(model, files[method], p, mode=method)
            results.setdefault(method, {})[f"{p:g}"] = measure(
                model, rows, args.batch_sizes, args.skip, sample_pos, batches, args.rows_per_call,
                desc=f"{method} {p:g}")
            if args.out:  # after each level: nothing is lost to an interruption
                _save(args.out, meta, results)
    print(tables(results, cfg, args.batch_sizes))
    if args.out:
        print(f"wrote {args.out}")


def _save(path: str, meta: dict, results: dict) -> None:
    rounded = {m: {p: {c: {str(b): {s: [round(float(x), 4) for x in v] for s, v in sites.items()}
                           for b, sites in cols.items()} for c, cols in r.items()} for p, r in levels.items()}
               for m, levels in results.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({**meta, "union_sparsity": rounded}, indent=None) + "\n")


if __name__ == "__main__":
    cli.run(main)
