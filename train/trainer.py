"""Fine-tuning with optax: LoRA or full, CATS-aware, resumable.

The model is split once into (graphdef, trainable, frozen). The trainable part (LoRA A/B, or every
nnx.Param for full fine-tuning) is kept as an fp32 master copy that optax updates; each step casts
it to the model's own dtypes (bf16 weights compute in bf16) and merges it with the frozen part:
base weights, and the CATS thresholds, which are not Params and so never train. Gradients reach
only the kept CATS activations (jnp.where passes none to the zeroed ones), as in CATS.

One jitted step = one optimizer update over grad_accum micro-batches (lax.scan), the loss being
the mean over every target token of all of them. The dropout key is a function of the step, and
the data position is saved with each checkpoint, so a resumed run repeats an uninterrupted one.

Run directory: train_config.json, log.jsonl, checkpoints/<step>/ (orbax CheckpointManager: the
master weights, optimizer state, and a JSON with the step and data position).
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

from cats_jax import checkpoint, data, thresholds
from cats_jax.config import ModelConfig
from cats_jax.data import REFINEDWEB, TextSource
from cats_jax.model import Transformer
from train import data as train_data
from train.lora import CATS_TARGETS, apply_lora, merge_lora

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    ckpt: str
    run_dir: str
    # data (see cats_jax.data.TextSource)
    data: str = REFINEDWEB
    split: str = "train"
    field: str | None = None
    data_config: str | None = None
    chat: bool = False
    seq_len: int = 1024
    eval_data: str | None = None  # eval source; default: the first eval_docs documents of `data`
    eval_docs: int = 64  # held out of `data` when eval_data is None (0: no eval)
    eval_rows: int = 16
    # method
    method: str = "lora"  # "lora" | "full"
    lora_rank: int = 64
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = CATS_TARGETS
    sparsity: float | None = None  # CATS target sparsity (thresholds from the checkpoint); None = dense
    dtype: str = "bfloat16"  # compute dtype of the model; trained weights are fp32 masters regardless
    remat: bool = False
    # optimisation
    steps: int = 1000
    batch_size: int = 8  # rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4
    schedule: str = "cosine"  # "cosine" | "linear" | "constant", after linear warmup
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0
    # bookkeeping
    log_every: int = 10
    eval_every: int = 200
    save_every: int = 200
    keep: int = 3

    # Fields a resumed run may change; any other difference is an error.
    RESUMABLE = ("steps", "log_every", "eval_every", "save_every", "keep")

    def __post_init__(self):
        checks = {
            "method": self.method in ("lora", "full"),
            "schedule": self.schedule in ("cosine", "linear", "constant"),
            "dtype": self.dtype in checkpoint.DTYPES,
            "sparsity": self.sparsity is None or 0 < self.sparsity < 1,
        }
        for name in ("seq_len", "steps", "batch_size", "grad_accum", "lora_rank", "log_every", "eval_every",
                     "save_every", "keep"):
            checks[name] = getattr(self, name) >= 1
        checks["warmup_steps"] = self.warmup_steps >= 0
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(", ".join(f"{k}={getattr(self, k)!r} is not valid" for k in bad))

    @property
    def warmup(self) -> int:
        """The warm-up steps the schedule takes: warmup_steps, clamped so that one step follows it."""
        return min(self.warmup_steps, self.steps - 1)

    @property
    def tokens_per_step(self) -> int:
        return self.grad_accum * self.batch_size * self.seq_len

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        d = json.loads(text)
        d["lora_targets"] = tuple(d["lora_targets"])
        return cls(**d)


# ---- pieces --------------------------------------------------------------------------------
def check_base(ckpt) -> None:
    """Refuse a quantized base (ValueError): training updates float weights only."""
    quantization = ModelConfig.load(ckpt).quantization
    if quantization is not None:
        raise ValueError(f"{ckpt} holds {quantization} weights: fine-tuning (LoRA or full) needs a float checkpoint; "
                         "train on the bf16 / fp32 one, then quantize the result (python -m convert --ckpt DIR "
                         f"--quantize {quantization} --out DIR2)")


def load_base_model(cfg: TrainConfig) -> Transformer:
    """The checkpoint's model in cfg.dtype, with CATS thresholds at cfg.sparsity if asked for."""
    model = checkpoint.load_model(cfg.ckpt, checkpoint.DTYPES[cfg.dtype])
    if cfg.sparsity is not None:
        thresholds.load_into(model, cfg.ckpt, cfg.sparsity)
    return model


def make_schedule(cfg: TrainConfig):
    warmup = cfg.warmup
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, cfg.steps, end)
    after = {"linear": optax.linear_schedule(cfg.lr, end, max(cfg.steps - warmup, 1)),
             "constant": optax.constant_schedule(cfg.lr)}[cfg.schedule]
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def make_optimizer(cfg: TrainConfig, schedule):
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # not on norm scales
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip),
        optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=decay_mask),
    )


def token_nll(model, ids, weights):
    """Sum of next-token NLL over weighted targets, and the total weight. ids/weights [B, T+1]."""
    logits, _ = model(ids[:, :-1])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
    w = weights[:, 1:]
    return jnp.sum(nll * w), jnp.sum(w)


# ---- the trainer ---------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, quiet: bool = False):
        self.cfg, self.quiet = cfg, quiet
        check_base(cfg.ckpt)  # before the run dir is made
        self.run_dir = Path(cfg.run_dir).absolute()
        self._check_run_dir(resume)

        model = load_base_model(cfg)
        model.remat = cfg.remat
        if cfg.method == "lora":
            apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.seed)
        trainable = nnx.LoRAParam if cfg.method == "lora" else nnx.Param
        self.graphdef, params, frozen = nnx.split(model, trainable, ...)
        # Pure dicts, so that each trace builds its own Variables (reseeding dropout mutates them).
        self.frozen = nnx.to_pure_dict(frozen)
        # Evaluation runs without dropout: the same states under a graphdef with deterministic=True.
        self.eval_graphdef = nnx.split(nnx.view(model, deterministic=True, raise_if_not_found=False))[0]
        params = nnx.to_pure_dict(params)
        self.dtypes = jax.tree.map(lambda p: p.dtype, params)
        self.master = jax.tree.map(lambda p: p.astype(f32), params)
        self.schedule = make_schedule(cfg)
        self.tx = make_optimizer(cfg, self.schedule)
        # Committed to the device like the step's outputs, or the second step would compile again.
        self.master, self.opt_state = jax.device_put((self.master, self.tx.init(self.master)), jax.devices()[0])
        self.step = 0

        src = lambda name: TextSource(name, cfg.split, cfg.field, cfg.data_config)
        tok, records, encode = train_data.tokenizer_and_records(cfg.ckpt, src(cfg.data), cfg.chat)
        sep, sep_weight = data.separator_id(tok), 0.0 if cfg.chat else 1.0  # chat: the template ends turns
        holdout = 0 if cfg.eval_data else cfg.eval_docs
        self._packer = partial(train_data.Packer, records, encode, cfg.seq_len, sep, holdout, sep_weight)
        self.packer = self._packer()
        self.eval_batch = None  # (ids, weights) of the eval rows
        if cfg.eval_data:
            _, records, encode = train_data.tokenizer_and_records(cfg.ckpt, src(cfg.eval_data), cfg.chat)
        if cfg.eval_data or holdout:
            where, way_out = ((cfg.eval_data, "") if cfg.eval_data else
                              (f"{cfg.data} (its first {holdout} documents, held out)", ", or --eval-docs 0 (no eval)"))
            self.eval_batch = train_data.eval_rows(records, encode, cfg.seq_len, sep, holdout or None, cfg.eval_rows,
                                                   sep_weight, where, way_out)

        self.manager = ocp.CheckpointManager(
            self.run_dir / "checkpoints", options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep)
        )
        if resume:
            self._restore()
        else:
            (self.run_dir / "train_config.json").write_text(cfg.to_json())
        self._train_step = jax.jit(self._step_fn, donate_argnums=(0, 1))
        self._eval_step = jax.jit(self._eval_fn)
        self._stop = None

    # -- run directory --
    def _check_run_dir(self, resume: bool):
        saved = self.run_dir / "train_config.json"
        if not resume:
            if (self.run_dir / "checkpoints").is_dir() and any((self.run_dir / "checkpoints").iterdir()):
                raise FileExistsError(f"{self.run_dir} already holds a run; pass --resume, or use another --run")
            self.run_dir.mkdir(parents=True, exist_ok=True)
            return
        if not saved.is_file():
            raise FileNotFoundError(f"--resume: {saved} not found (no run to resume there)")
        old = dataclasses.asdict(TrainConfig.from_json(saved.read_text()))
        new = dataclasses.asdict(self.cfg)
        diff = [k for k in new if k not in TrainConfig.RESUMABLE and old[k] != new[k]]
        if diff:
            raise ValueError("--resume with different settings: " + ", ".join(
                f"{k}={new[k]!r} (run has {old[k]!r})" for k in diff))

    def _restore(self):
        step = self.manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"--resume: {self.run_dir / 'checkpoints'} has no checkpoint")
        target = jax.eval_shape(lambda: {"master": self.master, "opt_state": self.opt_state})
        got = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        self.master, self.opt_state = got.state["master"], got.state["opt_state"]
        self.step = got.meta["step"]
        self.packer = self._packer(got.meta["data"])

    def save(self):
        self.manager.save(self.step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"master": self.master, "opt_state": self.opt_state}),
            meta=ocp.args.JsonSave({"step": self.step, "data": self.packer.state()})))

    # -- jitted functions --
    def _merge(self, graphdef, master, frozen):
        params = jax.tree.map(lambda p, d: p.astype(d), master, self.dtypes)
        return nnx.merge(graphdef, params, frozen)

    def _step_fn(self, master, opt_state, frozen, ids, weights, step):
        key = jax.random.fold_in(jax.random.key(self.cfg.seed), step)

        def micro_loss(master, ids, weights, key):
            model = self._merge(self.graphdef, master, frozen)
            nnx.reseed(model, dropout=key)
            return token_nll(model, ids, weights)

        def accumulate(carry, xs):
            grads, nll, count = carry
            ids, weights, i = xs
            (l, c), g = jax.value_and_grad(micro_loss, has_aux=True)(master, ids, weights, jax.random.fold_in(key, i))
            return (jax.tree.map(jnp.add, grads, g), nll + l, count + c), None

        zeros = jax.tree.map(jnp.zeros_like, master)
        xs = (ids, weights, jnp.arange(ids.shape[0]))
        (grads, nll, count), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), xs)
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = self.tx.update(grads, opt_state, master)
        metrics = {"loss": nll / count, "grad_norm": optax.tree.norm(grads), "lr": self.schedule(step)}
        return optax.apply_updates(master, updates), opt_state, metrics

    def _eval_fn(self, master, frozen, ids, weights):
        return token_nll(self._merge(self.eval_graphdef, master, frozen), ids, weights)

    # -- public --
    def evaluate(self) -> float:
        """Mean next-token loss on the held-out rows."""
        ids, weights = self.eval_batch
        nll = count = 0.0
        for i in range(0, len(ids), self.cfg.batch_size):
            l, c = self._eval_step(self.master, self.frozen, ids[i:i + self.cfg.batch_size],
                                   weights[i:i + self.cfg.batch_size])
            nll, count = nll + float(l), count + float(c)
        return nll / max(count, 1.0)

    def request_stop(self, signum, frame=None):
        if self._stop is not None:  # a second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt
        self._stop = signal.Signals(signum).name

    def run(self, until: int | None = None) -> str:
        """Train to step `until` (default cfg.steps) and save a checkpoint there. Returns "done", or
        the signal's name if SIGINT/SIGTERM stopped it first (saving a checkpoint at the last step)."""
        cfg = self.cfg
        until = cfg.steps if until is None else min(until, cfg.steps)
        old = {s: signal.signal(s, self.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        log = _Log(self.run_dir)
        try:
            if self.eval_batch is not None and self.step == 0:
                log.write({"step": 0, "eval_loss": self.evaluate()})
            bar = tqdm(total=cfg.steps, initial=self.step, unit="step", disable=self.quiet)
            pending, t0 = [], time.perf_counter()
            while self.step < until and self._stop is None:
                ids, weights = self.packer.next_batch((cfg.grad_accum, cfg.batch_size))
                self.master, self.opt_state, metrics = self._train_step(
                    self.master, self.opt_state, self.frozen, ids, weights, self.step)
                self.step += 1
                pending.append(metrics)  # fetched only when logging: keeps the device busy
                bar.update()
                last = self.step == until
                if self.step % cfg.log_every == 0 or last:
                    rec = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
                    dt = time.perf_counter() - t0
                    rec.update(step=self.step, tokens_per_s=len(pending) * cfg.tokens_per_step / dt)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                    lr=f"{rec['lr']:.2e}")
                    log.write(rec)
                    pending, t0 = [], time.perf_counter()
                if self.eval_batch is not None and (self.step % cfg.eval_every == 0 or last):
                    log.write({"step": self.step, "eval_loss": self.evaluate()})
                if self.step % cfg.save_every == 0 or last or self._stop:
                    self.save()
            bar.close()
            if self._stop and self.manager.latest_step() != self.step:
                self.save()
            self.manager.wait_until_finished()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            log.close()
        return self._stop or "done"

    def trained_model(self) -> Transformer:
        """The model with the current trained weights (LoRA still separate)."""
        return self._merge(self.eval_graphdef, self.master, self.frozen)

    def export(self, out_dir, force: bool = False) -> Path:
        """A plain checkpoint (LoRA folded into the weights; tokenizer and thresholds copied) that
        loads like any converted one. Its weights are in the dtype trained in (cfg.dtype): folding
        a small LoRA update into bf16 weights of an fp32 run would round much of it away."""
        model = merge_lora(self.trained_model())
        out = checkpoint.save(out_dir, model.cfg, checkpoint.model_params(model), self.cfg.ckpt, force)
        for th in (thresholds.read(self.cfg.ckpt) or {}).values():
            # Thresholds stay as calibrated (training kept them fixed); they now belong to the
            # fine-tuned weights, whose embedding full fine-tuning changed.
            th.model = thresholds.model_identity(model)
            th.calibration = {**th.calibration, "fine_tuned": {"from": str(Path(self.cfg.ckpt).absolute()),
                                                               "method": self.cfg.method, "steps": self.step}}
            th.save(out, force=True)  # over the file of the checkpoint this export replaced, if any
        return out


class _Log:
    """JSONL log (and TensorBoard scalars when tensorboardX is installed)."""

    def __init__(self, run_dir: Path):
        self.f = (run_dir / "log.jsonl").open("a")
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        except ImportError:
            self.tb = None

    def write(self, rec: dict):
        self.f.write(json.dumps({"time": time.time(), **rec}) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step":
                    self.tb.add_scalar(k, v, rec["step"])

    def close(self):
        self.f.close()
        if self.tb is not None:
            self.tb.close()
