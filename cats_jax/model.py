"""Llama / Mistral decoder in Flax NNX, with a KV cache and a pluggable (CATS) gated MLP.

Shapes: B batch, T tokens in this call, S cache slots, H hidden, I intermediate, N query heads,
K kv heads, D head dim, V vocab. Weights use the Flax layout [in, out].

Positions are per row: row b's token t sits at positions[b, t], and its key/value go to cache
slot positions[b, t]. Prompts of different lengths are right-padded; the causal test
(slot <= query position) never lets a real token see a padding slot, and decode overwrites
padding slots before any query can reach them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cats_jax import sparsity
from cats_jax.config import ModelConfig

f32 = jnp.float32
Cache = list  # per layer: (k [B, S, K, D], v [B, S, K, D])


class Threshold(nnx.Variable):
    """A calibrated sparsity threshold: model state that is saved and loaded, never trained."""


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> Cache:
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    # zeros, not empty: unwritten slots are masked, but NaN garbage would still poison 0 * NaN.
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)]


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    rs = cfg.rope_scaling
    if rs is None:
        return inv.astype(np.float32)
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the middle blended.
    old = rs.original_max_position_embeddings
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / rs.low_freq_factor, inv / rs.factor, inv)
    smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    blended = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= old / rs.high_freq_factor) & (wavelen <= old / rs.low_freq_factor)
    return np.where(medium, blended, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """HF rotate-half RoPE. x [B, T, heads, D], positions [B, T]."""
    freqs = positions[..., None].astype(f32) * inv_freq  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x1, x2 = jnp.split(x.astype(f32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(f32) * cos + rotated * sin).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(f32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * y.astype(x.dtype)  # cast then scale, as HF does


def _linear(n_in, n_out, dtype, rngs):
    return nnx.Linear(n_in, n_out, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = _linear(h, cfg.num_heads * d, dtype, rngs)
        self.k_proj = _linear(h, cfg.num_kv_heads * d, dtype, rngs)
        self.v_proj = _linear(h, cfg.num_kv_heads * d, dtype, rngs)
        self.o_proj = _linear(cfg.num_heads * d, h, dtype, rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.cfg = cfg  # static (hashable); RoPE frequencies are derived from it at trace time

    def __call__(self, x, positions, kv=None):
        b, t, _ = x.shape
        n, k, d = self.num_heads, self.num_kv_heads, self.head_dim
        inv_freq = rope_inv_freq(self.cfg)
        q = apply_rope(self.q_proj(x).reshape(b, t, n, d), positions, inv_freq)
        key = apply_rope(self.k_proj(x).reshape(b, t, k, d), positions, inv_freq)
        val = self.v_proj(x).reshape(b, t, k, d)
        if kv is None:  # no cache: attend among this call's tokens
            keys, vals, key_pos = key, val, positions
        else:  # write this call's keys at their slots, then attend over the whole cache
            ck, cv = kv
            start = positions[:, 0]
            write = jax.vmap(lambda c, new, s: jax.lax.dynamic_update_slice(c, new.astype(c.dtype), (s, 0, 0)))
            ck, cv = write(ck, key, start), write(cv, val, start)
            kv = (ck, cv)
            keys, vals = ck, cv
            key_pos = jnp.broadcast_to(jnp.arange(ck.shape[1]), (b, ck.shape[1]))
        mask = key_pos[:, None, :] <= positions[:, :, None]  # [B, T, S]
        if self.cfg.sliding_window is not None:
            mask &= positions[:, :, None] - key_pos[:, None, :] < self.cfg.sliding_window
        qg = q.reshape(b, t, k, n // k, d)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, keys, preferred_element_type=f32) / math.sqrt(d)
        scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(vals.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, vals, preferred_element_type=f32)
        return self.o_proj(out.reshape(b, t, n * d).astype(x.dtype)), kv


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)). `impl` (static, one of sparsity.MLP_IMPLS) picks
    dense SiLU, the CATS activation in jnp, or the Pallas decode kernel."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.gate_proj = _linear(cfg.hidden_size, cfg.intermediate_size, dtype, rngs)
        self.up_proj = _linear(cfg.hidden_size, cfg.intermediate_size, dtype, rngs)
        self.down_proj = _linear(cfg.intermediate_size, cfg.hidden_size, dtype, rngs)
        self.threshold = Threshold(jnp.zeros((), f32))
        self.impl = "dense"

    def __call__(self, x):
        g = self.gate_proj(x)
        if self.impl == "dense":
            a = jax.nn.silu(g)
        else:
            a = sparsity.cats_activation(g, self.threshold[...]).astype(x.dtype)
        return self.down_proj(a * self.up_proj(x))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attn = Attention(cfg, dtype, rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype, rngs)

    def __call__(self, x, positions, kv=None):
        h, kv = self.attn(self.input_norm(x), positions, kv)
        x = x + h
        return x + self.mlp(self.post_attn_norm(x)), kv


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.bfloat16, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.layers = nnx.List([Block(cfg, dtype, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = None if cfg.tie_word_embeddings else _linear(cfg.hidden_size, cfg.vocab_size, dtype, rngs)

    def hidden(self, tokens, positions, cache: Cache | None = None):
        """Final-norm hidden states [B, T, H] and the updated cache (None without a cache)."""
        x = self.embed(tokens)
        new_cache = None if cache is None else []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, positions, None if cache is None else cache[i])
            if cache is not None:
                new_cache.append(kv)
        return self.norm(x), new_cache

    def logits(self, h):
        """fp32 logits of hidden states [..., H]."""
        w = self.embed.embedding[...].T if self.lm_head is None else self.lm_head.kernel[...]
        return jnp.dot(h, w, preferred_element_type=f32)

    def __call__(self, tokens, positions=None, cache: Cache | None = None):
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        h, cache = self.hidden(tokens, positions, cache)
        return self.logits(h), cache

    # ---- sparsity settings --------------------------------------------------------------
    def set_mlp_impl(self, impl: str):
        if impl not in sparsity.MLP_IMPLS:
            raise ValueError(f"unknown MLP implementation {impl!r} (choose from {sparsity.MLP_IMPLS})")
        for layer in self.layers:
            layer.mlp.impl = impl

    def set_cats_thresholds(self, thresholds):
        thresholds = np.asarray(thresholds, np.float32)
        if thresholds.shape != (len(self.layers),):
            raise ValueError(
                f"CATS thresholds have shape {thresholds.shape}, this model needs one per layer ({len(self.layers)},)"
            )
        for layer, t in zip(self.layers, thresholds):
            layer.mlp.threshold[...] = jnp.asarray(t)


def forward(graphdef, state, tokens, positions, cache=None):
    """Pure forward over (graphdef, state) for jitted loops: no nnx.jit bookkeeping per call."""
    return nnx.merge(graphdef, state)(tokens, positions, cache)


def init_random(cfg: ModelConfig, seed: int = 0, dtype=jnp.bfloat16) -> Transformer:
    """A model with random weights (benchmarks and tests)."""
    return Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
