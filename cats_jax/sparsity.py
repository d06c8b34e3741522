"""The sparsity rules, in plain jnp: the one definition that the model, the kernels' tests,
calibration, evaluation and training all use.

CATS (arXiv 2404.08763): in the gated MLP, a = SiLU(x W_gate); a_i := 0 where |a_i| <= t.
Then y = (a * (x W_up)) W_down, so rows of W_up / W_down of zeroed neurons need not be read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# How a gated MLP is computed. "cats-jnp" is the dense-equivalent reference; "cats-pallas"
# runs decode steps through the Pallas kernel (pallas_kernels.cats_mlp) and prefill through jnp.
MLP_IMPLS = ("dense", "cats-jnp", "cats-pallas")


def cats_activation(gate: jax.Array, threshold: jax.Array) -> jax.Array:
    """SiLU then zero |a| <= threshold; computed in fp32 (the threshold test must not depend on
    the storage dtype of the gate output). threshold 0 is exactly dense: it only zeroes zeros."""
    a = jax.nn.silu(gate.astype(jnp.float32))
    return jnp.where(jnp.abs(a) > threshold, a, 0.0)


def gated_mlp(x, w_gate, w_up, w_down, threshold=None):
    """Reference gated MLP on raw Flax-layout weights ([H, I], [H, I], [I, H]).

    threshold None is the dense SiLU MLP. Accumulates in fp32; the kernels must equal this.
    """
    f32 = jnp.float32
    g = jnp.dot(x.astype(f32), w_gate.astype(f32))
    a = jax.nn.silu(g) if threshold is None else cats_activation(g, threshold)
    u = jnp.dot(x.astype(f32), w_up.astype(f32))
    return jnp.dot(a * u, w_down.astype(f32))


def active_fraction(a: jax.Array) -> jax.Array:
    """Fraction of non-zero activations (1 - sparsity)."""
    return jnp.mean((a != 0).astype(jnp.float32))
