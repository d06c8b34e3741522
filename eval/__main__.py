"""python -m eval: zero-shot accuracy, perplexity and measured sparsity, dense vs calibrated levels (CATS or TEAL)."""

from __future__ import annotations

import argparse
import json
import sys

from cats_jax import checkpoint, cli, data, fileio, sharding, thresholds
from cats_jax.sparsity import CRITERIA, MODES
from eval import harness
from eval import tasks as task_lib

WIKITEXT = ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "test", "page")  # lm-eval's wikitext


def _settings(text: str | None, ckpt: str, mode: str | None, criterion: str | None) -> list:
    th = thresholds.load(ckpt, mode)
    if th is not None:  # sparse rows apply the thresholds' criterion; one asked for must be it
        th.check_criterion(criterion)
    if text is None:  # dense and every calibrated level
        return [harness.DENSE] + (th.sparsities if th else [])
    out = []
    for s in text.split(","):
        s = s.strip()
        try:
            out.append(s if s == harness.DENSE else float(s))
        except ValueError:
            raise cli.InputError(f"--sparsity {text!r}: expected 'dense' and/or fractions, e.g. dense,0.5") from None
    return out


def _task_files(tasks: str, data_files: list[str]) -> dict[str, str | None]:
    names = list(task_lib.TASKS) if tasks == "all" else [] if tasks == "none" else [t.strip() for t in tasks.split(",")]
    for t in names:
        if t not in task_lib.TASKS:
            raise cli.InputError(f"unknown task {t!r} (known: {', '.join(task_lib.TASKS)})")
    files = {t: None for t in names}
    for spec in data_files:
        name, sep, path = spec.partition("=")
        if not sep or name not in files:
            raise cli.InputError(f"--data-file {spec!r}: expected TASK=PATH with TASK one of --tasks ({', '.join(names)})")
        files[name] = path
    return files


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m eval",
        description="Evaluate a checkpoint dense and at its calibrated sparsities (CATS or TEAL): zero-shot multiple choice "
                    "(lm-eval-harness formats, acc / acc_norm), rolling-window perplexity, measured activation sparsity.",
    )
    ap.add_argument("--ckpt", required=True, help="converted checkpoint directory (with thresholds.json for sparse rows)")
    ap.add_argument("--sparsity", help="settings, comma-separated: 'dense' and/or calibrated fractions "
                                       "(default: dense + every level in thresholds.json)")
    ap.add_argument("--mode", choices=[m for m in MODES if m != "dense"],
                    help="which sites the calibrated levels threshold (default: the thresholds' method; TEAL "
                         "thresholds also serve cats, and with uniform allocation cats+teal-attn)")
    ap.add_argument("--criterion", choices=CRITERIA,
                    help="the selection criterion the thresholds must have been calibrated with (default: theirs)")
    cli.add_allow_quantization_mismatch(ap)
    ap.add_argument("--tasks", default="all", help=f"comma-separated tasks, 'all' or 'none' (known: {', '.join(task_lib.TASKS)})")
    ap.add_argument("--data-file", action="append", default=[], metavar="TASK=PATH",
                    help="a task's local data: its original release file (e.g. piqa=valid.jsonl) or a "
                         "datasets.save_to_disk directory; repeat per task. Without it, the task loads from the hub")
    ap.add_argument("--limit", type=cli.count, help="only the first N examples of each task")
    ppl = ap.add_argument_group("perplexity text (default: lm-eval's WikiText-2 raw test, from the hub)")
    ppl.add_argument("--ppl", default=WIKITEXT[0], help="local .txt (one document) / .jsonl file, a `datasets` name, or 'none'")
    ppl.add_argument("--ppl-config", help=f"dataset configuration (default for WikiText: {WIKITEXT[1]})")
    ppl.add_argument("--ppl-split", help="dataset split (default: test for WikiText, else train)")
    ppl.add_argument("--ppl-field", help="text field of .jsonl / dataset records (default: page for WikiText, else text)")
    ppl.add_argument("--ppl-tokens", type=cli.count, help="only the first N tokens of the text")
    ap.add_argument("--context-length", type=cli.count, default=1024, help="tokens the model reads per sequence (default 1024)")
    ap.add_argument("--stride", type=cli.count, help="perplexity: new tokens scored per window (default: context length)")
    ap.add_argument("--batch-tokens", type=cli.count, default=2048, help="tokens per forward pass (default 2048)")
    ap.add_argument("--dtype", choices=sorted(checkpoint.DTYPES), default="float32", help="compute dtype (default float32)")
    ap.add_argument("--tp", type=int, default=1, help="split the model over this many devices (tensor parallel; default 1)")
    ap.add_argument("--out", default="runs/eval.json",
                    help="results JSON, rewritten as each setting finishes each task (an interrupted run keeps what "
                         "it finished); the markdown table goes next to it (.md)")
    ap.add_argument("--plot", metavar="PNG", help="also plot accuracy and perplexity against sparsity")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)

    ppl_source = None
    if args.ppl != "none":
        wiki = args.ppl == WIKITEXT[0]
        ppl_source = data.TextSource(args.ppl, args.ppl_split or ("test" if wiki else "train"),
                                     args.ppl_field or (WIKITEXT[3] if wiki else None),
                                     args.ppl_config or (WIKITEXT[1] if wiki else None))
    out = cli.output_file(ap, "--out", args.out)
    cli.output_file(ap, "--plot", args.plot)

    saved = []

    def save(record):  # each finished (setting, task): written whole, so Ctrl-C keeps the last one
        fileio.write_text_atomic(out, json.dumps(record, indent=1))
        fileio.write_text_atomic(out.with_suffix(".md"), harness.markdown(record["results"]) + "\n")
        saved.append(True)

    try:
        result = harness.evaluate(
            args.ckpt, settings=_settings(args.sparsity, args.ckpt, args.mode, args.criterion),
            task_files=_task_files(args.tasks, args.data_file), limit=args.limit, ppl_source=ppl_source,
            ppl_tokens=args.ppl_tokens, context_length=args.context_length, stride=args.stride,
            batch_tokens=args.batch_tokens, dtype=args.dtype, progress=not args.no_progress, mode=args.mode,
            on_result=save, allow_quantization_mismatch=args.allow_quantization_mismatch, tp=args.tp)
    except sharding.TPError as e:
        raise cli.InputError(f"--tp {args.tp}: {e}") from e
    except (data.DataError, task_lib.TaskDataError, thresholds.ThresholdsError, FileNotFoundError) as e:
        raise cli.InputError(str(e)) from e
    except KeyboardInterrupt:
        if saved:
            print(f"the settings finished so far are in {out}", file=sys.stderr)
        raise
    print(harness.markdown(result["results"]))
    for r in result["results"]:
        speed = ", ".join(f"{t} {v['examples_per_s']:.1f}" for t, v in r["tasks"].items())
        print(f"{r['setting']}: examples/s {speed or '-'}")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    if args.plot:
        harness.plot(result["results"], args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    cli.run(main)
