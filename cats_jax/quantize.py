"""int8 weight-only quantization: symmetric, one fp32 scale per output channel (gpt-fast's int8).

A kernel W [in, out] (Flax layout) is held as q int8 [in, out] and scale fp32 [out], with
scale[j] = max_i |W[i, j]| / 127 (1 for a zero column: never 0 or NaN) and q = round(W / scale)
in [-127, 127], so |W - q * scale| <= scale / 2 elementwise. x @ W is computed as (x @ q) * scale,
q converted to x's dtype (exact: |q| <= 127 fits bf16's 8-bit significand) and the products
accumulated in fp32, the scale applied after the accumulation.

What is quantized: every linear layer of the blocks (q, k, v, o, gate, up, down), as
model.QLinear when the config's `quantization` is "int8"; the embedding and norms stay in the
model's dtype, and so does the LM head unless the config's `quantize_head` is true (convert
--quantize int8 --quantize-head). A checkpoint records both in config.json; `quantize_params` turns
a float params tree into the int8 one, model.quantize_model a model.

The int8 LM head is its own matrix q int8 [H, V] with scales fp32 [V] (one per vocab entry), the
model's lm_head, and logits are (h @ q) * scale in fp32. A tied model keeps its float embedding
for the gather, so its checkpoint and model grow by V H + 4 V bytes (the head no longer shares the
table), while a decode step reads V H + 4 V bytes for the head instead of the table's 2 V H in bf16
(decode.prepare already held a bf16 model's head as a transposed copy of the table: its decode
weights shrink by V H - 4 V bytes). An untied model saves V H - 4 V bytes everywhere. The head
comes after every block, so thresholds calibrated on the int8 model apply with or without it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cats_jax.config import QUANTIZATIONS

f32 = jnp.float32
QMAX = 127


@jax.jit
def quantize_int8(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(q int8 [in, out], scale fp32 [out]) of a kernel w [in, out] (module docstring)."""
    w = w.astype(f32)
    peak = jnp.max(jnp.abs(w), axis=0)
    scale = jnp.where(peak > 0, peak / QMAX, 1.0)
    q = jnp.clip(jnp.round(w / scale), -QMAX, QMAX).astype(jnp.int8)
    return q, scale


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
    """The fp32 weights q * scale [in, out] (for derived quantities: the weighted criterion's factors)."""
    return q.astype(f32) * scale


def dot(x: jax.Array, w: jax.Array, scale: jax.Array | None = None, dtype=None) -> jax.Array:
    """x [..., in] @ w [in, out] in `dtype` (default x's). w float (scale None): a plain product;
    w int8 with its scales [out]: (x @ w) * scale, accumulated in fp32 and then cast."""
    if scale is None:
        return jnp.dot(x, w, preferred_element_type=dtype)
    y = jnp.dot(x, w.astype(x.dtype), preferred_element_type=f32) * scale
    return y.astype(dtype or x.dtype)


def quantized_config(cfg, scheme: str = "int8", head: bool = False):
    """cfg of the same model with its blocks' linear layers quantized (head: its LM head too)."""
    if scheme not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {scheme!r} (choose from {', '.join(QUANTIZATIONS)})")
    if cfg.quantization is not None:
        raise ValueError(f"{cfg.name or 'the model'} is quantized already ({cfg.quantization})")
    return dataclasses.replace(cfg, quantization=scheme, quantize_head=head)


def quantize_params(params: dict, head: bool = False) -> dict:
    """A float params tree (nested dicts, the model's or the checkpoint's keys) quantized in place:
    every linear layer under "layers" ({"kernel": W}) becomes {"kernel": q, "scales": scale}, one
    at a time, each float kernel dropped as it is replaced (one model's weights in memory, not
    two). head: "lm_head" too, made from the embedding's transpose if tied (the embedding stays).
    Returns params."""

    def walk(node: dict):
        if "kernel" in node:
            node["kernel"], node["scales"] = quantize_int8(node["kernel"])
            return
        for sub in node.values():
            if isinstance(sub, dict):
                walk(sub)

    walk(params["layers"])
    if head:
        tied = "lm_head" not in params
        params["lm_head"] = {"kernel": params["embed"]["embedding"].T if tied else params["lm_head"]["kernel"]}
        walk(params["lm_head"])
    return params
