"""Batched log-likelihood scoring, and rolling-window perplexity.

The unit of work is a group: one context (token ids, at least one) and K continuations. The log-
likelihood of a continuation is the sum of the log-probabilities of its tokens, each given the
context and the continuation's earlier tokens (and "greedy" says whether each was the argmax).
The model reads the context once, into a KV cache, and then every continuation from a copy of
that cache: a multiple-choice question costs one context plus its K answers, not K contexts.

Groups are bucketed by their context and continuation lengths rounded up to powers of two, and
each batch (about `batch_tokens` tokens) holds one bucket, so XLA compiles a handful of programs
rather than one per length.

The measured sparsity of every thresholded site (the fraction of zeroed values per layer, over
every token the model reads) accumulates in `Scorer.site_sparsity`.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from cats_jax import sparsity
from cats_jax.model import init_cache, sown_by_site

Group = tuple[list[int], list[list[int]]]  # (context ids, [continuation ids, ...])


def _bucket(n: int, minimum: int) -> int:
    """n rounded up to a power of two (at least `minimum`)."""
    return max(minimum, 1 << (n - 1).bit_length())


def _kept(inter, real) -> dict:
    """Site -> kept values per layer [L], summed over the `real` [B, T] tokens (no sites: dense)."""
    fractions = sown_by_site(nnx.to_pure_dict(inter), "active_fraction")  # site -> [L, B, T]
    return {site: jnp.sum(jnp.where(real, f, 0.0), axis=(1, 2)) for site, f in fractions.items()}


@functools.partial(jax.jit, static_argnums=0)
def _score(graphdef, state, ctx, ctx_len, conts, cont_len):
    """ctx [B, Lc] (row b: ctx_len[b] real tokens), conts [B, K, Lk] (cont_len[b, k] real tokens;
    0 for padding). Returns log-likelihood [B, K], all-greedy [B, K], {site: kept values [layers]}."""
    model = nnx.merge(graphdef, state)
    (b, lc), (_, k, lk) = ctx.shape, conts.shape
    hidden = nnx.capture(model.hidden, nnx.Intermediate)
    cache = init_cache(model.cfg, b, lc + lk, model.embed.embedding.dtype)
    (h, cache), inter_ctx = hidden(ctx, jnp.broadcast_to(jnp.arange(lc), (b, lc)), cache)
    # the context's last state predicts each continuation's first token
    last = jnp.take_along_axis(h, jnp.maximum(ctx_len - 1, 0)[:, None, None], axis=1)  # [B, 1, H]
    # Continuations go at slots ctx_len.. of a copy of their row's cache; they overwrite the
    # padding's slots, and causal masking hides everything after each query.
    cache = [(jnp.repeat(ck, k, axis=0), jnp.repeat(cv, k, axis=0)) for ck, cv in cache]
    positions = jnp.repeat(ctx_len, k)[:, None] + jnp.arange(lk)
    (hc, _), inter_cont = hidden(conts.reshape(b * k, lk), positions, cache)
    states = jnp.concatenate([jnp.repeat(last, k, axis=0), hc[:, :-1]], axis=1)  # [B*K, Lk, H]

    def head(args):  # one batch row at a time: fp32 logits [K * Lk, V] are the largest array here
        s, t = args
        logits = model.logits(s)
        return jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(logits, axis=-1), \
            jnp.argmax(logits, axis=-1) == t

    tok_lp, hit = jax.lax.map(head, (states.reshape(b, k * lk, -1), conts.reshape(b, k * lk)))
    valid = jnp.arange(lk) < cont_len.reshape(b * k, 1)
    ll = jnp.sum(jnp.where(valid, tok_lp.reshape(b * k, lk), 0.0), axis=1).reshape(b, k)
    greedy = jnp.all(jnp.where(valid, hit.reshape(b * k, lk), True), axis=1).reshape(b, k)
    # tokens read: the context once, each continuation but its last token (which predicts nothing)
    kept_ctx = _kept(inter_ctx, jnp.arange(lc) < ctx_len[:, None])
    kept_cont = _kept(inter_cont, jnp.arange(lk) < cont_len.reshape(b * k, 1) - 1)
    return ll, greedy, {site: kept_ctx[site] + kept_cont[site] for site in kept_ctx}


def release_programs() -> None:
    """Drop the compiled scoring programs (one per batch shape): XLA:CPU holds on to memory per
    program (up to ~1 GB each for SmolLM2-135M), so a long run frees them between tasks."""
    _score.clear_cache()


class Scorer:
    def __init__(self, model, batch_tokens: int = 2048, progress: bool = True):
        self.model, self.batch_tokens, self.progress = model, batch_tokens, progress
        self.reset_stats()

    def reset_stats(self):
        self.kept: dict[str, np.ndarray] = {}  # site -> kept values per layer
        self.tokens = 0

    @property
    def site_sparsity(self) -> dict[str, np.ndarray]:
        """Site -> per-layer fraction of zeroed values over all tokens read since reset_stats()
        (no sites for a dense model, which zeroes nothing by rule)."""
        return {site: 1.0 - kept / self.tokens for site, kept in self.kept.items()} if self.tokens else {}

    @property
    def layer_sparsity(self) -> np.ndarray:
        """Per-layer sparsity: of the one site in mode cats, the MLP activation's; with several
        sites, their weighted mean (sparsity.weighted_mean: the fraction of skippable weight rows)."""
        per_site = self.site_sparsity
        return sparsity.weighted_mean(per_site, self.model.cfg) if per_site else np.zeros(self.model.cfg.num_layers)

    def score(self, groups: list[Group], desc: str = "scoring") -> list[tuple[np.ndarray, np.ndarray]]:
        """(log-likelihoods [K], all-greedy [K]) of each group's continuations."""
        for ctx, conts in groups:
            if not ctx or not conts or not all(conts):
                raise ValueError("a scoring group needs a non-empty context and non-empty continuations")
        graphdef, state = nnx.split(self.model)
        out: list = [None] * len(groups)
        k = max(len(conts) for _, conts in groups)  # one K for all: fewer shapes (missing choices are empty)
        # Batches of one padded shape each: groups by (context bucket, continuation bucket), largest first.
        shape = [(_bucket(len(c), 16), _bucket(max(map(len, ks)), 8)) for c, ks in groups]
        order = sorted(range(len(groups)), key=lambda i: (shape[i], len(groups[i][0])), reverse=True)
        bar = tqdm(total=len(groups), desc=desc, unit="group", disable=not self.progress, leave=False)
        start = 0
        while start < len(order):
            lc, lk = shape[order[start]]
            same = sum(1 for i in order[start:] if shape[i] == (lc, lk))
            rows = max(1, self.batch_tokens // (lc + k * lk))
            if same < rows:  # the bucket's last batch: fewer padding rows, at most one more shape
                rows = _bucket(same, 1)
            idx = order[start:start + min(rows, same)]
            ctx, ctx_len = np.zeros((rows, lc), np.int32), np.zeros(rows, np.int32)  # padding rows stay empty
            conts, cont_len = np.zeros((rows, k, lk), np.int32), np.zeros((rows, k), np.int32)
            for r, i in enumerate(idx):
                c, ks = groups[i]
                ctx[r, :len(c)], ctx_len[r] = c, len(c)
                for j, cont in enumerate(ks):
                    conts[r, j, :len(cont)], cont_len[r, j] = cont, len(cont)
            ll, greedy, kept = _score(graphdef, state, *map(jnp.asarray, (ctx, ctx_len, conts, cont_len)))
            ll, greedy = np.asarray(ll), np.asarray(greedy)
            for r, i in enumerate(idx):
                n = len(groups[i][1])
                out[i] = (ll[r, :n].astype(np.float64), greedy[r, :n])
            for site, v in kept.items():
                self.kept[site] = self.kept.get(site, 0.0) + np.asarray(v, np.float64)
            self.tokens += int(ctx_len.sum() + np.maximum(cont_len - 1, 0).sum())
            start += len(idx)
            bar.update(len(idx))
        bar.close()
        return out


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


def request_groups(tokenizer, requests: list[tuple[str, str]], max_length: int) -> list[Group]:
    """Scoring groups of (context, continuation) requests, in order: consecutive requests whose
    context encodes to the same tokens share a group. A context is cut on the left so that it and
    its group's longest continuation fit max_length + 1 tokens (lm-eval cuts each request alone)."""
    groups: list[Group] = []
    for context, continuation in requests:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        ctx = ctx or [prefix_token(tokenizer)]
        if groups and groups[-1][0] == ctx:
            groups[-1][1].append(cont)
        else:
            groups.append((ctx, [cont]))
    out = []
    for ctx, conts in groups:
        conts = [c[-max_length:] for c in conts]
        out.append((ctx[-max(1, max_length + 1 - max(map(len, conts))):], conts))
    return out


# ---- perplexity ------------------------------------------------------------------------------
def rolling_windows(tokens: list[int], prefix: int, max_length: int, stride: int) -> list[Group]:
    """Groups that predict every token of a document exactly once (lm-eval's rolling windows,
    generalised to a stride): the first window reads [prefix] + the first max_length - 1 tokens
    and scores max_length tokens; each next window scores the next `stride` tokens, reading up to
    max_length tokens before each (stride = max_length: disjoint windows, lm-eval's default;
    smaller strides give each token more context, as in HF's perplexity guide)."""
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride {stride} must be in 1..context length {max_length}")
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    groups = [([prefix], [tokens[:first]])]
    done = first
    while done < len(tokens):
        end = min(done + stride, len(tokens))
        groups.append((tokens[max(0, end - max_length - 1):done], [tokens[done:end]]))
        done = end
    return groups


def perplexity(scorer: Scorer, tokenizer, token_docs: list[list[int]], max_length: int, stride: int) -> dict:
    """Token perplexity of the documents (token ids), plus lm-eval's word perplexity and bits per
    byte (words and bytes counted on the decoded text, which is the original text for byte-level
    tokenizers)."""
    prefix = prefix_token(tokenizer)
    groups = [g for doc in token_docs for g in rolling_windows(doc, prefix, max_length, stride)]
    total = float(sum(ll.sum() for ll, _ in scorer.score(groups, desc="perplexity")))
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
