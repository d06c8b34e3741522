"""python -m train: fine-tune a converted checkpoint with LoRA (CATS recipe) or fully.

    python -m train --ckpt checkpoints/smollm2 --run runs/lora50 --sparsity 0.5 \\
        --data lambada.jsonl --seq-len 256 --steps 120 --lr 1e-3 --merge-lora checkpoints/smollm2-lora50
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from cats_jax import checkpoint, cli
from cats_jax.data import DataError
from train.lora import ATTN_TARGETS, MLP_TARGETS
from train.trainer import TrainConfig, Trainer


def _default(name):
    return TrainConfig.__dataclass_fields__[name].default


class _Help(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (where it has one and does not say it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, argparse.SUPPRESS) and action.default is not False and "default" not in text:
            text += " (default: %(default)s)"
        return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__, formatter_class=_Help)
    p.add_argument("--ckpt", required=True, help="converted checkpoint dir (thresholds.json in it for --sparsity)")
    p.add_argument("--run", required=True, help="run dir: config, log.jsonl, orbax checkpoints")
    p.add_argument("--resume", action="store_true", help="continue the run in --run from its last checkpoint")
    p.add_argument("--export", "--merge-lora", dest="export", metavar="DIR",
                   help="at the end, write a plain checkpoint here (LoRA folded into the weights)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --export dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    g = p.add_argument_group("data")
    g.add_argument("--data", "--data-file", default=_default("data"),
                   help="local .txt (one document) / .jsonl(.gz) (a document per line), or a `datasets` name "
                        "(streamed)")
    g.add_argument("--split", default=_default("split"), help="dataset split")
    g.add_argument("--field", help="text field of records (default: content for RefinedWeb, else text)")
    g.add_argument("--data-config", help="`datasets` configuration name")
    g.add_argument("--eval-data", help="eval text source (same split/field); default: hold out --eval-docs")
    g.add_argument("--chat", action="store_true",
                   help="records are chats ('messages' or 'prompt'+'response'): apply the chat template, "
                        "train only on assistant tokens")
    g.add_argument("--seq-len", type=int, default=_default("seq_len"), help="tokens per training row")
    g.add_argument("--eval-docs", type=int, default=_default("eval_docs"),
                   help="without --eval-data: hold out this many first documents of --data for eval loss "
                        "(0: no eval)")
    g.add_argument("--eval-rows", type=int, default=_default("eval_rows"), help="at most this many eval rows")

    g = p.add_argument_group("method")
    g.add_argument("--method", choices=("lora", "full"), default=_default("method"),
                   help="LoRA adapters (base weights frozen) or every weight")
    g.add_argument("--lora-rank", type=int, default=_default("lora_rank"), help="rank of each LoRA adapter")
    g.add_argument("--lora-alpha", type=float, default=_default("lora_alpha"),
                   help="LoRA scale: the update is alpha / rank * B A")
    g.add_argument("--lora-dropout", type=float, default=_default("lora_dropout"), help="dropout on the LoRA input")
    g.add_argument("--lora-targets", default=",".join(_default("lora_targets")),
                   help=f"comma-separated, from {','.join(ATTN_TARGETS + MLP_TARGETS)}")
    g.add_argument("--sparsity", type=float,
                   help="train under CATS at this calibrated sparsity (thresholds fixed); default dense")
    g.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=_default("dtype"),
                   help="model compute dtype (trained weights and optimizer state are fp32)")
    g.add_argument("--remat", action="store_true", help="recompute block activations in backward (long seqs)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=_default("steps"), help="optimizer steps in all")
    g.add_argument("--batch-size", type=int, default=_default("batch_size"), help="rows per micro-batch")
    g.add_argument("--grad-accum", type=int, default=_default("grad_accum"), help="micro-batches per step")
    g.add_argument("--lr", type=float, default=_default("lr"), help="peak learning rate")
    g.add_argument("--schedule", choices=("cosine", "linear", "constant"), default=_default("schedule"),
                   help="learning-rate decay after the warm-up")
    g.add_argument("--warmup-steps", type=int, default=_default("warmup_steps"),
                   help="linear warm-up from 0 (clamped to --steps - 1)")
    g.add_argument("--min-lr-ratio", type=float, default=_default("min_lr_ratio"),
                   help="final learning rate of the cosine / linear decay, as a fraction of --lr")
    g.add_argument("--weight-decay", type=float, default=_default("weight_decay"),
                   help="AdamW weight decay (not on norm scales)")
    g.add_argument("--clip", type=float, default=_default("clip"), help="global gradient-norm clip")
    g.add_argument("--seed", type=int, default=_default("seed"), help="seed of the LoRA initialisation and of dropout")

    g = p.add_argument_group("bookkeeping")
    g.add_argument("--log-every", type=int, default=_default("log_every"), help="steps between log lines")
    g.add_argument("--eval-every", type=int, default=_default("eval_every"), help="steps between eval losses")
    g.add_argument("--save-every", type=int, default=_default("save_every"), help="steps between checkpoints")
    g.add_argument("--keep", type=int, default=_default("keep"), help="checkpoints kept")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)

    kw = {f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in ("ckpt", "run_dir")}
    kw["lora_targets"] = tuple(t.strip() for t in a.lora_targets.split(",") if t.strip())
    try:
        cfg = TrainConfig(ckpt=a.ckpt, run_dir=a.run, **kw)
        if cfg.warmup < cfg.warmup_steps:
            print(f"--warmup-steps {cfg.warmup_steps} is not below --steps {cfg.steps}: warming up over "
                  f"{cfg.warmup} steps", file=sys.stderr)
        if a.export:
            checkpoint.check_out_dir(a.export, a.force)  # before training, not after
        trainer = Trainer(cfg, resume=a.resume, quiet=a.quiet)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise cli.InputError(str(e)) from e
    try:
        status = trainer.run()
    except DataError as e:  # a source that fails only once training reads it
        raise cli.InputError(str(e)) from e
    if status != "done":
        print(f"stopped by {status} at step {trainer.step}; checkpoint saved. Continue with the same "
              f"command plus --resume.", file=sys.stderr)
        return 130 if status == "SIGINT" else 143
    print(f"done: {trainer.step} steps, run in {trainer.run_dir}")
    if a.export:
        print(f"wrote {trainer.export(a.export, a.force)}")
    return 0


if __name__ == "__main__":
    cli.run(main)
