"""Batched log-likelihood scoring of token sequences, and rolling-window perplexity.

A scoring row is a token sequence `ids` and a count n: the model reads ids[:-1] and we sum the
log-probabilities of the last n tokens of ids (and check whether each was the greedy choice).
Rows are sorted by length, grouped into batches of about `batch_tokens` tokens, right-padded to a
few bucketed shapes (so XLA compiles a handful of programs, not one per length), and only the
scored positions go through the LM head.

The MLPs' measured sparsity (the fraction of zeroed activations per layer, over every real token
read) accumulates in `Scorer.stats` while scoring.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm


def _bucket(n: int, minimum: int) -> int:
    """n rounded up to a power of two (at least `minimum`)."""
    return max(minimum, 1 << (n - 1).bit_length())


@functools.partial(jax.jit, static_argnums=(0, 1))
def _score(graphdef, width, state, inputs, targets, lengths, first):
    """inputs, targets [B, L] (right-padded to L); row b reads lengths[b] tokens and scores the
    positions first[b] .. lengths[b] - 1 (at most `width` of them). Returns (log-likelihood [B],
    all-greedy [B], kept MLP activations per layer summed over real tokens [num_layers])."""
    model = nnx.merge(graphdef, state)
    b, length = inputs.shape
    positions = jnp.broadcast_to(jnp.arange(length), (b, length))
    (h, _), inter = nnx.capture(model.hidden, nnx.Intermediate)(inputs, positions)
    cols = first[:, None] + jnp.arange(width)  # [B, C]: only these positions reach the LM head
    valid = cols < lengths[:, None]
    cols = jnp.minimum(cols, length - 1)
    hs = jnp.take_along_axis(h, cols[..., None], axis=1)
    logp = jax.nn.log_softmax(model.logits(hs), axis=-1)  # [B, C, V] fp32
    tgt = jnp.take_along_axis(targets, cols, axis=1)
    tok_lp = jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    ll = jnp.sum(jnp.where(valid, tok_lp, 0.0), axis=1)
    greedy = jnp.all(jnp.where(valid, jnp.argmax(logp, axis=-1) == tgt, True), axis=1)
    real = jnp.arange(length)[None, :] < lengths[:, None]
    layers = sorted(nnx.to_pure_dict(inter).get("layers", {}).items())
    kept = jnp.stack([jnp.sum(jnp.where(real, lay["mlp"]["active_fraction"][0], 0.0)) for _, lay in layers]) \
        if layers else jnp.zeros((0,), jnp.float32)
    return ll, greedy, kept


class Scorer:
    def __init__(self, model, batch_tokens: int = 4096, progress: bool = True):
        self.model, self.batch_tokens, self.progress = model, batch_tokens, progress
        self.reset_stats()

    def reset_stats(self):
        self.kept = np.zeros(self.model.cfg.num_layers)
        self.tokens = 0

    @property
    def layer_sparsity(self) -> np.ndarray:
        """Per-layer fraction of zeroed MLP activations over all tokens read since reset_stats()
        (0 for a dense model, which zeroes nothing by rule)."""
        if self.tokens == 0 or self.model.layers[0].mlp.impl == "dense":
            return np.zeros(self.model.cfg.num_layers)
        return 1.0 - self.kept / self.tokens

    def score(self, rows: list[tuple[list[int], int]], desc: str = "scoring") -> tuple[np.ndarray, np.ndarray]:
        """(log-likelihood, all-greedy) of each row (ids, n): see the module docstring."""
        for ids, n in rows:
            if not 1 <= n < len(ids):
                raise ValueError(f"a scoring row of {len(ids)} tokens cannot score its last {n}")
        graphdef, state = nnx.split(self.model)
        ll, greedy = np.zeros(len(rows)), np.zeros(len(rows), bool)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # longest first, as lm-eval
        bar = tqdm(total=len(rows), desc=desc, unit="seq", disable=not self.progress, leave=False)
        start = 0
        while start < len(order):
            length = _bucket(len(rows[order[start]][0]) - 1, 16)
            size = max(1, self.batch_tokens // length)
            idx = order[start:start + size]
            width = _bucket(max(rows[i][1] for i in idx), 8)
            inputs = np.zeros((size, length), np.int32)
            targets = np.zeros((size, length), np.int32)
            lengths = np.zeros(size, np.int32)  # padding rows (a short last batch): nothing read or scored
            first = np.zeros(size, np.int32)
            for r, i in enumerate(idx):
                ids, n = rows[i]
                inputs[r, :len(ids) - 1], targets[r, :len(ids) - 1] = ids[:-1], ids[1:]
                lengths[r], first[r] = len(ids) - 1, len(ids) - 1 - n
            out = _score(graphdef, width, state, *map(jnp.asarray, (inputs, targets, lengths, first)))
            b_ll, b_greedy, kept = map(np.asarray, out)
            ll[idx], greedy[idx] = b_ll[:len(idx)], b_greedy[:len(idx)]
            if kept.size:
                self.kept += kept
            self.tokens += int(lengths[:len(idx)].sum())
            start += size
            bar.update(len(idx))
        bar.close()
        return ll, greedy


# ---- multiple choice -------------------------------------------------------------------------
def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of context + continuation into tokens: trailing spaces of the context move
    to the continuation, the pair is encoded whole, and the continuation is what follows the
    context's own tokens (so a token merging across the boundary counts as continuation)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


def prefix_token(tokenizer) -> int:
    """What an empty context / a document's first token is conditioned on: BOS, else EOS (lm-eval)."""
    tok = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tok is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start sequences with")
    return tok


def loglikelihood_rows(tokenizer, requests, max_length: int) -> list[tuple[list[int], int]]:
    """Scoring rows of (context, continuation) requests, left-truncated to max_length inputs."""
    rows = []
    for context, continuation in requests:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not ctx:
            ctx = [prefix_token(tokenizer)]
        ids = (ctx + cont)[-(max_length + 1):]
        rows.append((ids, min(len(cont), len(ids) - 1)))
    return rows


# ---- perplexity ------------------------------------------------------------------------------
def rolling_windows(tokens: list[int], prefix: int, max_length: int, stride: int) -> list[tuple[list[int], int]]:
    """Scoring rows that predict every token of a document exactly once (lm-eval's rolling
    windows, generalised to a stride): the first window reads [prefix] + the first max_length - 1
    tokens and scores max_length tokens; each next window scores the next `stride` tokens,
    reading up to max_length tokens before each (stride = max_length: disjoint windows, lm-eval's
    default; smaller strides give each token more context, as in HF's perplexity guide)."""
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride {stride} must be in 1..context length {max_length}")
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    rows = [([prefix] + tokens[:first], first)]
    done = first
    while done < len(tokens):
        n = min(stride, len(tokens) - done)
        end = done + n
        rows.append((tokens[max(0, end - max_length - 1):end], n))
        done = end
    return rows


def perplexity(scorer: Scorer, tokenizer, token_docs: list[list[int]], max_length: int, stride: int) -> dict:
    """Token perplexity of the documents (token ids), plus lm-eval's word perplexity and bits per
    byte (words and bytes counted on the decoded text, which is the original text for byte-level
    tokenizers)."""
    prefix = prefix_token(tokenizer)
    rows = [row for doc in token_docs for row in rolling_windows(doc, prefix, max_length, stride)]
    ll, _ = scorer.score(rows, desc="perplexity")
    total = float(ll.sum())
    texts = [tokenizer.decode(doc) for doc in token_docs]
    tokens = sum(len(doc) for doc in token_docs)
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    return {
        "perplexity": float(np.exp(-total / tokens)),
        "word_perplexity": float(np.exp(-total / words)),
        "bits_per_byte": float(-total / nbytes / np.log(2)),
        "tokens": tokens, "documents": len(token_docs), "context_length": max_length, "stride": stride,
    }
