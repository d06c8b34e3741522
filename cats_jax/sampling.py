"""Next-token choice from logits: greedy, temperature, top-k, top-p, repetition penalty.

Pure jnp on [B, V] fp32 logits, traced inside the jitted decode loop. The settings are a frozen
(hashable) dataclass, a static argument: each mode compiles its own small graph and greedy
decoding carries no sampling code at all. Filters apply in the Hugging Face order:
repetition penalty, temperature, top-k, top-p.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy (argmax), the other settings but the penalty are then unused
    top_k: int = 0  # keep the k most likely tokens; 0: off
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p; 1: off
    repetition_penalty: float = 1.0  # CTRL rule on tokens seen in prompt or output; 1: off

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 is off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 is off)")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1 is off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_history(self) -> bool:
        """Whether sampling needs the set of tokens seen so far."""
        return self.repetition_penalty != 1.0


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """CTRL (arXiv 1909.05858) as in HF: seen tokens' logits are divided by the penalty if
    positive, multiplied if negative, so penalty > 1 always makes them less likely."""
    penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalized, logits)


def sample(logits: jax.Array, key: jax.Array, s: Sampling, seen: jax.Array | None = None) -> jax.Array:
    """Next token ids [B] (int32) from logits [B, V]; `seen` [B, V] bool is needed iff s.uses_history."""
    logits = logits.astype(jnp.float32)
    if s.uses_history:
        logits = apply_repetition_penalty(logits, seen, s.repetition_penalty)
    if s.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / s.temperature
    if s.top_k == 0 and s.top_p == 1.0:
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    # Candidates sorted by decreasing logit: the top k (a partial sort), else the whole vocabulary.
    k = min(s.top_k, logits.shape[-1]) if s.top_k else logits.shape[-1]
    vals, ids = jax.lax.top_k(logits, k)
    if s.top_p < 1.0:
        probs = jax.nn.softmax(vals, axis=-1)
        # Keep a token while the mass before it is below p: the most likely token always stays.
        keep = jnp.cumsum(probs, axis=-1) - probs < s.top_p
        vals = jnp.where(keep, vals, -jnp.inf)
    choice = jax.random.categorical(key, vals, axis=-1)
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
