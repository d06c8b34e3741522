"""Text generation: one jitted prefill, one jitted decode loop, batches of prompts, streaming.

    python -m cats_jax.generate --ckpt DIR --chat --prompt "What is the capital of France?"

How it works (in the spirit of the flax gemma sampler and gpt-fast):
- The model is prepared once (cats_jax.decode.prepare: decode weights as a plain pytree and a
  static plan of its sparsity sites and kernels); both jitted functions take those weights, and
  this file never looks at the mode or the thresholds. A Transformer passed in is prepared with
  the jnp implementation.
- `_prefill` runs the whole prompt as a lax.scan over chunks of `prefill_chunk` tokens (long
  prompts never build attention scores larger than chunk x cache), fills the KV cache, and
  samples the first token from the logits of each row's last prompt token only.
- `_decode` is a lax.while_loop of one-token steps over the donated cache; it stops when every
  row has hit an EOS id or the token budget. No Python runs per token.
- Batches: prompts are right-padded to a common length P and each row keeps its own positions
  (see model.py): row b's prompt fills cache slots 0..len_b-1 and its padding slots are
  overwritten by its own decode steps before any of its queries can see them (causal mask);
  the sliding window is a mask on positions too. So rows of any lengths need no extra mask.
  P is rounded up (powers of two, then multiples of the chunk) so prompt lengths share compiles.
- Streaming: `_decode` runs at most `n_steps` steps per call (a traced argument: one compile)
  and the host decodes and prints the new text between calls. At 16-32 tokens per call the
  dispatch cost is negligible and the text still streams. Stop strings are checked there too,
  since they need the tokenizer; EOS ids stop rows inside the loop.
- Sampling settings are static (sampling.Sampling); the key of step i is fold_in(seed, i), so a
  seed gives the same tokens however the steps are split into calls.
- Measured MLP sparsity: in CATS modes the decode step returns each MLP's per-token fraction
  of kept neurons; the decode loop sums it over the rows still running. Without CATS (dense,
  TEAL) the sparsity is reported as None.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cats_jax import decode, sharding
from cats_jax.decode import Decoder, Plan
from cats_jax.model import Transformer, init_cache
from cats_jax.sampling import Sampling, sample
from cats_jax.sparsity import CRITERIA, MODES

PAD_ID = 0  # fills prompt padding and the steps after a row is done; never read as a real token


class DecodeState(NamedTuple):
    """Everything the decode loop carries; donated to each `_decode` call."""

    cache: list  # model.py KV cache, P + max_new_tokens slots
    tokens: jax.Array  # [B, N] int32 generated ids, PAD_ID once a row is done
    lengths: jax.Array  # [B] int32 ids generated per row, its EOS included
    positions: jax.Array  # [B] int32 position of each row's last generated id
    done: jax.Array  # [B] bool
    step: jax.Array  # int32 columns of `tokens` filled so far
    key: jax.Array  # the seed's key; step i samples with fold_in(key, i)
    seen: jax.Array | None  # [B, V] bool ids in prompt or output, for the repetition penalty
    kept: jax.Array  # f32 sum over decode steps, layers and running rows of the kept-neuron fraction
    kept_count: jax.Array  # f32 number of terms in `kept`


def _advance(ds: DecodeState, logits, sampling: Sampling, eos_ids: tuple[int, ...]) -> DecodeState:
    """Sample column `step` of every row from logits [B, V]; update the stop state."""
    nxt = sample(logits, jax.random.fold_in(ds.key, ds.step), sampling, ds.seen)
    nxt = jnp.where(ds.done, PAD_ID, nxt)
    is_eos = jnp.any(nxt[:, None] == jnp.asarray(eos_ids, jnp.int32).reshape(1, -1), axis=-1)
    seen = None if ds.seen is None else ds.seen.at[jnp.arange(nxt.shape[0]), nxt].set(True)
    return ds._replace(
        tokens=jax.lax.dynamic_update_slice(ds.tokens, nxt[:, None], (0, ds.step)),
        lengths=ds.lengths + (~ds.done).astype(jnp.int32),
        done=ds.done | is_eos,
        step=ds.step + 1,
        seen=seen,
    )


@functools.partial(jax.jit, static_argnames=("plan", "max_new", "chunk", "sampling", "eos_ids"))
def _prefill(weights, prompts, lengths, key, *, plan: Plan, max_new, chunk, sampling, eos_ids) -> DecodeState:
    """prompts [B, P] right-padded, lengths [B] >= 1; P a multiple of chunk."""
    b, p = prompts.shape
    cfg = plan.cfg
    cache = init_cache(cfg, b, p + max_new, weights["embed"].dtype)
    if plan.mesh is not None:  # tensor parallel: split over KV heads, as forward holds it
        cache = sharding.place_cache(cache, plan.mesh)
    rows = jnp.arange(b)

    def one_chunk(cache, start):
        toks = jax.lax.dynamic_slice_in_dim(prompts, start, chunk, axis=1)
        pos = start + jnp.broadcast_to(jnp.arange(chunk, dtype=jnp.int32), (b, chunk))
        # the logits at each row's last prompt token, valid in the chunk that holds it
        last = jnp.clip(lengths - 1 - start, 0, chunk - 1)
        logits, cache, _ = decode.forward(weights, toks, pos, cache, plan=plan, last=last)
        return cache, logits

    cache, logits = jax.lax.scan(one_chunk, cache, jnp.arange(0, p, chunk, dtype=jnp.int32))
    logits = logits[(lengths - 1) // chunk, rows]
    seen = None
    if sampling.uses_history:
        in_prompt = jnp.arange(p)[None, :] < lengths[:, None]
        seen = jnp.zeros((b, cfg.vocab_size), bool).at[rows[:, None], prompts].max(in_prompt)
    ds = DecodeState(
        cache=cache,
        tokens=jnp.full((b, max_new), PAD_ID, jnp.int32),
        lengths=jnp.zeros((b,), jnp.int32),
        positions=lengths,  # the first generated id sits right after the prompt
        done=jnp.zeros((b,), bool),
        step=jnp.zeros((), jnp.int32),
        key=key,
        seen=seen,
        kept=jnp.zeros((), jnp.float32),
        kept_count=jnp.zeros((), jnp.float32),
    )
    return _advance(ds, logits, sampling, eos_ids)


@functools.partial(jax.jit, static_argnames=("plan", "sampling", "eos_ids"), donate_argnames=("ds",))
def _decode(weights, ds: DecodeState, n_steps, *, plan: Plan, sampling, eos_ids) -> DecodeState:
    """Up to n_steps one-token steps (fewer if every row is done or the budget is spent)."""
    stop = jnp.minimum(ds.step + n_steps, ds.tokens.shape[1])

    def cond(ds):
        return (ds.step < stop) & ~jnp.all(ds.done)

    def body(ds):
        last = jax.lax.dynamic_slice_in_dim(ds.tokens, ds.step - 1, 1, axis=1)  # [B, 1]
        logits, cache, kept = decode.forward(weights, last, ds.positions[:, None], ds.cache, plan=plan)
        running = (~ds.done).astype(jnp.float32)
        if kept is not None:  # the CATS MLPs' fractions [L, B, 1]
            ds = ds._replace(kept=ds.kept + jnp.sum(kept[:, :, 0] * running),
                             kept_count=ds.kept_count + kept.shape[0] * jnp.sum(running))
        ds = ds._replace(cache=cache, positions=ds.positions + 1)
        return _advance(ds, logits[:, 0], sampling, eos_ids)

    return jax.lax.while_loop(cond, body, ds)


# ---- host side ---------------------------------------------------------------------------------

_COMPILED: dict = {}


def _compiled(fn, *args, **static):
    """AOT-compiled `fn` for these argument shapes, cached, and the seconds spent compiling it
    (0 when cached): timings of prefill and decode never include compilation. The cache keeps its
    entries in the order last used (bench.decode reads the decode loop used last)."""
    leaves, treedef = jax.tree.flatten(args)
    key = (fn, treedef, tuple((x.shape, x.dtype) for x in leaves), tuple(sorted(static.items())))
    if key in _COMPILED:
        _COMPILED[key] = _COMPILED.pop(key)
        return _COMPILED[key], 0.0
    t0 = time.perf_counter()
    _COMPILED[key] = fn.lower(*args, **static).compile()
    return _COMPILED[key], time.perf_counter() - t0


def padded_length(n: int, chunk: int) -> int:
    """Bucketed prompt length: a power of two (at least 16) up to `chunk`, then multiples of it.
    Prefill runs it as one chunk of that length, or as chunks of `chunk` tokens."""
    bucket = max(16, 1 << (n - 1).bit_length())
    return bucket if bucket <= chunk else -(-n // chunk) * chunk


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per prompt, the EOS id included when one was hit
    hit_eos: list[bool]
    prefill_s: float
    decode_s: float
    compile_s: float  # compilation, kept out of prefill_s and decode_s
    decode_steps: int  # one-token forward passes of the decode loop (the first id comes from prefill)
    mlp_sparsity: float | None  # fraction of zeroed MLP activations over decode steps; None if dense

    @property
    def decode_tokens_per_s(self) -> float:
        """Ids produced by the decode loop per second, all rows together."""
        produced = sum(max(len(t) - 1, 0) for t in self.tokens)
        return produced / self.decode_s if self.decode_s > 0 else float("nan")


def check_context(cfg, prompt_len: int, max_new_tokens: int) -> None:
    """A ValueError where a prompt and its new tokens exceed the model's positions."""
    if prompt_len + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"context of {cfg.max_position_embeddings} positions")


def generate(
    model: Transformer | Decoder,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    *,
    seed: int = 0,
    eos_ids: Sequence[int] | None = None,
    prefill_chunk: int = 512,
    stream_every: int | None = None,
    on_chunk: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray | None] | None = None,
) -> Generation:
    """Generate up to max_new_tokens ids after each prompt (lists of ids, any lengths).

    eos_ids: ids that end a row (default: the config's); () never stops early (benchmarks).
    stream_every: decode steps per jitted call (default: all in one call). After each call
    on_chunk(tokens [B, n], lengths [B], done [B]) sees the ids so far (row b's are
    tokens[b, :lengths[b]]) and may return a [B] bool mask of rows to stop (stop strings).
    A Transformer is prepared with the jnp implementation (decode.prepare); prepare it once yourself
    for the kernels, or to generate many times; a Decoder placed on a mesh (sharding.shard) runs
    tensor parallel.
    """
    weights, plan = model if isinstance(model, Decoder) else decode.prepare(model)
    cfg = plan.cfg
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if prefill_chunk < 1 or (stream_every is not None and stream_every < 1):
        raise ValueError(f"prefill_chunk={prefill_chunk} and stream_every={stream_every} must be >= 1")
    longest = max(len(p) for p in prompts)
    check_context(cfg, longest, max_new_tokens)
    eos_ids = tuple(sorted(set(cfg.eos_token_ids if eos_ids is None else eos_ids)))
    p = padded_length(longest, prefill_chunk)
    tokens = np.full((len(prompts), p), PAD_ID, np.int32)
    for i, ids in enumerate(prompts):
        tokens[i, : len(ids)] = ids
    lengths = np.array([len(ids) for ids in prompts], np.int32)
    statics = dict(plan=plan, sampling=sampling, eos_ids=eos_ids)

    args = (weights, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(seed))
    prefill, compile_s = _compiled(_prefill, *args, max_new=max_new_tokens, chunk=min(prefill_chunk, p), **statics)
    t0 = time.perf_counter()
    ds = jax.block_until_ready(prefill(*args))
    prefill_s = time.perf_counter() - t0

    n_steps = jnp.asarray(stream_every or max_new_tokens, jnp.int32)
    decode_fn, dt = _compiled(_decode, weights, ds, n_steps, **statics)
    compile_s += dt
    decode_s = 0.0
    while True:
        step, done = jax.device_get((ds.step, ds.done))
        if on_chunk is not None:
            tokens, lens = jax.device_get((ds.tokens, ds.lengths))  # whole: slicing on device would compile per size
            stop = on_chunk(tokens[:, :step], lens, done)
            if stop is not None and np.any(stop & ~done):
                done = done | stop
                ds = ds._replace(done=jnp.asarray(done))
        if step >= max_new_tokens or done.all():
            break
        t0 = time.perf_counter()
        ds = jax.block_until_ready(decode_fn(weights, ds, n_steps))
        decode_s += time.perf_counter() - t0

    out, lens = np.asarray(ds.tokens), np.asarray(ds.lengths)
    rows = [out[i, : lens[i]].tolist() for i in range(len(prompts))]
    count = float(ds.kept_count)
    return Generation(
        tokens=rows,
        hit_eos=[bool(r) and r[-1] in eos_ids for r in rows],
        prefill_s=prefill_s,
        decode_s=decode_s,
        compile_s=compile_s,
        decode_steps=int(ds.step) - 1,
        mlp_sparsity=1.0 - float(ds.kept) / count if count else None,
    )


# ---- text: tokenizer, chat template, stop strings, streaming ------------------------------------


def encode_prompt(tokenizer, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
    """Token ids of a prompt; with chat=True, wrapped in the tokenizer's chat template as a user
    turn (after an optional system turn), ending with the assistant's generation prompt."""
    if not chat:
        return tokenizer(prompt).input_ids
    if not tokenizer.chat_template:
        raise ValueError("--chat: this checkpoint's tokenizer has no chat template")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids  # the template already has them


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def generate_text(
    model: Transformer | Decoder,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 256,
    sampling: Sampling = Sampling(),
    *,
    chat: bool = False,
    system: str | None = None,
    stop: Sequence[str] = (),
    seed: int = 0,
    stream: Callable[[str], None] | None = None,
    stream_every: int = 16,
    prefill_chunk: int = 512,
) -> tuple[list[str], Generation]:
    """Completions of text prompts, cut before the first stop string. With `stream`, the first
    prompt's text is passed to it piece by piece as it is generated."""
    ids = [encode_prompt(tokenizer, p, chat, system) for p in prompts]
    cfg = model.plan.cfg if isinstance(model, Decoder) else model.cfg
    eos = set(cfg.eos_token_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    detok = functools.partial(tokenizer.decode, skip_special_tokens=True)
    # Hold back what could be the start of a stop string, or a multi-byte character cut in two.
    hold = max((len(s) for s in stop), default=1) - 1
    shown = 0

    def on_chunk(tokens, lengths, done):
        nonlocal shown
        texts = [_cut_at_stop(detok(tokens[b, : lengths[b]]), stop) for b in range(len(prompts))]
        if stream is not None:
            text, hit = texts[0]
            end = len(text) if hit or done[0] else max(len(text.rstrip("\ufffd")) - hold, shown)
            if end > shown:
                stream(text[shown:end])
                shown = end
        return np.array([hit for _, hit in texts]) if stop else None

    use_chunks = stream is not None or bool(stop)
    gen = generate(
        model, ids, max_new_tokens, sampling, seed=seed, eos_ids=sorted(eos), prefill_chunk=prefill_chunk,
        stream_every=stream_every if use_chunks else None, on_chunk=on_chunk if use_chunks else None,
    )
    texts = [_cut_at_stop(detok(t), stop)[0] for t in gen.tokens]
    if stream is not None and len(texts[0]) > shown:
        stream(texts[0][shown:])
    return texts, gen


def load(ckpt, sparsity: float | None = None, *, mode: str | None = None, impl: str = "jnp", dtype: str = "bfloat16",
         criterion: str | None = None, allow_quantization_mismatch: bool = False, tp: int = 1):
    """(Decoder, tokenizer) of a converted checkpoint, dense or at a calibrated `sparsity` of its
    thresholds.json (cats_jax.load's and the CLI's one way to load). criterion: the selection
    criterion the thresholds must have (None: theirs, whichever); allow_quantization_mismatch:
    thresholds of the same weights at another quantization are applied (cats_jax.thresholds).
    tp > 1: tensor parallel over the first tp devices, the decoder built layer by layer (load_sharded)."""
    from cats_jax import checkpoint, data, thresholds  # orbax and transformers: not needed above
    from cats_jax.config import ModelConfig

    if dtype not in checkpoint.DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose from {', '.join(checkpoint.DTYPES)}")
    if mode is not None and sparsity is None:
        raise ValueError(f"mode={mode!r} needs a sparsity (the calibrated level to run at)")
    ModelConfig.load(ckpt)  # a path that is no checkpoint: said before the tokenizer's own error
    tokenizer = data.load_tokenizer(ckpt)

    def configure(model):
        if sparsity is not None:
            thresholds.load_into(model, ckpt, sparsity, mode=mode, criterion=criterion,
                                 allow_quantization_mismatch=allow_quantization_mismatch)

    if tp != 1:
        return load_sharded(ckpt, sharding.make_mesh(tp), impl, checkpoint.DTYPES[dtype], configure), tokenizer
    model = checkpoint.load_model(ckpt, dtype=checkpoint.DTYPES[dtype])
    configure(model)
    return decode.prepare(model, impl), tokenizer


def load_sharded(ckpt, mesh, impl: str = "jnp", dtype=None, configure: Callable | None = None) -> Decoder:
    """The decoder of a checkpoint placed on the mesh one layer at a time, so that no device or host
    ever holds the whole model: each layer is read, prepared (decode.prepare_layer), split into its tp blocks
    and placed, and its whole copies are dropped before the next is read (cats_jax.sharding).
    configure(model) sets the sparsity (thresholds, mode, criterion) once, on the model whose layers
    all hold the first layer's weights until each is read; the weighted criterion's factors are then
    derived again from each layer's own weights."""
    from flax import nnx

    from cats_jax import checkpoint
    from cats_jax.config import ModelConfig
    from cats_jax.model import from_params

    decode.check_impl(impl)
    cfg = ModelConfig.load(ckpt)
    sharding.local_config(cfg, sharding.tp_size(mesh))  # the shapes divide, before any read

    def read_layer(i):
        return checkpoint.load_params(ckpt, cfg, dtype, only=[("layers", str(i))])["layers"][str(i)]

    def hold(layer, params):  # the layer's nnx.Params become these arrays (or abstract shapes)
        state = nnx.state(layer, nnx.Param)
        nnx.replace_by_pure_dict(state, params)
        nnx.update(layer, state)

    top = [(k,) for k in checkpoint.param_shapes(cfg) if k != "layers"]  # embedding, final norm, LM head
    first = read_layer(0)
    model = from_params(cfg, dict(checkpoint.load_params(ckpt, cfg, dtype, only=top), layers=dict.fromkeys(
        range(cfg.num_layers), first)))
    if configure is not None:
        configure(model)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), first)
    layers, placed = list(model.layers), []
    for layer in layers[1:]:
        hold(layer, abstract)
    del first
    for i, layer in enumerate(layers):
        if i:
            hold(layer, read_layer(i))
        if model.criterion == "weighted":  # the factors of this layer's weights (up-rms's came with the thresholds)
            model.set_criterion("weighted", layers=[layer])
        placed.append(sharding.place(sharding.split_layer(decode.prepare_layer(model, layer, impl), cfg,
                                                          sharding.tp_size(mesh)), mesh))
        hold(layer, abstract)
    weights = sharding.place(decode.prepare_top(model), mesh)
    plan = dataclasses.replace(decode.make_plan(model, impl, placed), mesh=mesh)
    return Decoder(dict(weights, layers=placed), plan)


# ---- CLI -----------------------------------------------------------------------------------------


def main(argv=None) -> None:
    from cats_jax import cli

    ap = argparse.ArgumentParser(
        prog="python -m cats_jax.generate",
        description="Generate text from a converted cats-jax checkpoint, dense or with CATS sparsity. "
        "The first prompt's text is streamed to stdout; timings go to stderr.",
    )
    ap.add_argument("--ckpt", required=True, help="converted checkpoint directory (config.json, params/, tokenizer)")
    ap.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    ap.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    ap.add_argument("--system", help="system message for --chat")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0 (default) is off")
    ap.add_argument("--top-p", type=float, default=1.0, help="1 (default) is off")
    ap.add_argument("--repetition-penalty", type=float, default=1.0, help="1 (default) is off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop", action="append", default=[], help="stop string; repeatable")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--sparsity", type=cli.fraction,
                      help="target sparsity, e.g. 0.5 (thresholds from thresholds.json)")
    mode.add_argument("--dense", action="store_true", help="no sparsity (the default)")
    ap.add_argument("--mode", choices=[m for m in MODES if m != "dense"],
                    help="sparsity sites for --sparsity (default: the calibration's method, cats or teal)")
    ap.add_argument("--criterion", choices=CRITERIA,
                    help="the selection criterion the thresholds must have been calibrated with (default: theirs)")
    cli.add_allow_quantization_mismatch(ap)
    ap.add_argument("--impl", choices=("jnp", "pallas"), default="jnp",
                    help="jnp (any device) or pallas (GPU kernels for decode steps)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                    help="weights (an int8 checkpoint's embedding and norms) and KV cache dtype")
    ap.add_argument("--stream-every", type=cli.count, default=16, help="decode steps per jitted call between prints")
    ap.add_argument("--prefill-chunk", type=cli.count, default=512, help="prompt tokens per prefill step")
    ap.add_argument("--tp", type=int, default=1, help="tensor parallel over this many devices (default 1)")
    args = ap.parse_args(argv)
    if args.mode and args.sparsity is None:  # else it would silently run dense
        ap.error(f"--mode {args.mode} needs --sparsity (the calibrated level to run at)")
    try:
        sampling = Sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    except ValueError as e:
        ap.error(str(e))
    if args.criterion and args.sparsity is None:
        ap.error(f"--criterion {args.criterion} needs --sparsity (the calibrated level to run at)")
    try:
        sharding.make_mesh(args.tp)  # enough devices, before the checkpoint is read
    except ValueError as e:
        ap.error(f"--tp {args.tp}: {e}")
    try:
        decoder, tokenizer = load(args.ckpt, args.sparsity, mode=args.mode, impl=args.impl, dtype=args.dtype,
                                  criterion=args.criterion, allow_quantization_mismatch=args.allow_quantization_mismatch,
                                  tp=args.tp)
    except sharding.TPError as e:  # shapes that do not divide over the devices
        raise cli.InputError(f"--tp {args.tp}: {e}") from e
    cli.note_impl(args.impl)
    try:
        texts, gen = generate_text(
            decoder, tokenizer, args.prompt, args.max_new_tokens, sampling, chat=args.chat,
            system=args.system, stop=args.stop, seed=args.seed, stream=functools.partial(print, end="", flush=True),
            stream_every=args.stream_every, prefill_chunk=args.prefill_chunk,
        )
    except ValueError as e:  # a prompt or setting generate() refuses (empty prompt, no chat template, ...)
        raise cli.InputError(str(e)) from e
    print()
    for i, text in enumerate(texts[1:], 1):
        print(f"--- prompt {i + 1}\n{text}")
    err = functools.partial(print, file=sys.stderr)
    err(f"compile {gen.compile_s:.2f} s | prefill {gen.prefill_s * 1e3:.1f} ms | "
        f"decode {gen.decode_tokens_per_s:.1f} tokens/s ({gen.decode_steps} steps, batch {len(texts)})")
    if gen.mlp_sparsity is not None:
        err(f"measured MLP sparsity (decode): {gen.mlp_sparsity:.3f}")

if __name__ == "__main__":
    from cats_jax import cli

    cli.run(main)
