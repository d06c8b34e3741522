"""The sparsity rules, in plain jnp: the one definition that the model, the kernels' tests,
calibration, evaluation and training all use.

CATS (arXiv 2404.08763): in the gated MLP, a = SiLU(x W_gate); a_i := 0 where |a_i| <= t.
Then y = (a * (x W_up)) W_down, so rows of W_up / W_down of zeroed neurons need not be read.

TEAL (arXiv 2408.14690): the input x of every linear layer, x_j := 0 where |x_j| <= t, so the rows
of W (Flax layout [in, out]) of zeroed inputs need not be read. Seven sites per layer: q, k, v
(one input, three thresholds), o (the attention output), gate, up (one input, two thresholds)
and down (SiLU(gate) * up).

The *criterion* says what is compared with the threshold: "magnitude" (both papers) tests |v|;
"weighted" (WINA, arXiv 2505.19427) tests |v| * c, where c is the L2 norm of the weight row that v
multiplies (weight_factors): CATS keeps neuron i when |a_i| * ||W_down[i, :]|| > t, TEAL keeps input
j of a projection W [in, out] when |x_j| * ||W[j, :]|| > t. These factors are derived from the
weights when the criterion is set (model.Transformer.set_criterion), never stored on disk.
"up-rms" (CATS only) keeps neuron i when |a_i| * rms(u_i) > t, rms(u_i) being the root mean square
of the neuron's up projection u = x W_up over the calibration text: an estimate of |a_i u_i|, the
value that W_down multiplies, without reading W_up. Those factors are measured at calibration and
stored with the thresholds. Whatever the criterion, the number of weight rows skipped, and so the
kernels' speed, is the same.

A *site* is where a threshold applies, one threshold per (layer, site); a *mode* is the set of
sites a model thresholds. How they are computed (jnp or a Pallas kernel) is chosen separately.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The rules are defined beside their kernels, which import nothing from cats_jax.
from pallas_kernels.cats_mlp import cats_activation  # noqa: F401
from pallas_kernels.sparse_gemv import keep, score, teal_input  # noqa: F401

# magnitude: the papers' (default); weighted: |v| * weight row norm; up-rms: |a_i| * rms(u_i), CATS only
CRITERIA = ("magnitude", "weighted", "up-rms")
CATS_ONLY_CRITERIA = ("up-rms",)

# How the model's gated MLP is computed: dense SiLU or the CATS activation (cats_jax.decode runs
# decode steps of the latter through the Pallas kernel, pallas_kernels.cats_mlp).
MLP_IMPLS = ("dense", "cats-jnp")

CATS_SITE = "mlp.act"  # |SiLU(x W_gate)| in the gated MLP
ATTN_SITES = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj")  # TEAL: each projection's input
MLP_SITES = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
TEAL_SITES = ATTN_SITES + MLP_SITES
MODES = {
    "dense": (),
    "cats": (CATS_SITE,),
    "teal": TEAL_SITES,
    "cats+teal-attn": (CATS_SITE,) + ATTN_SITES,  # CATS on the MLP, TEAL on the attention inputs
}


def weight_factors(w: jax.Array) -> jax.Array:
    """The weighted criterion's factors of a weight matrix w [in, out] (Flax layout): the L2 norm
    of each input's row, fp32 [in]."""
    w = w.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(w * w, axis=1))


def site_weights(cfg) -> dict[str, float]:
    """Weight rows a site lets skip, relative to q_proj's (TEAL's greedy weights): q, o 1; k, v
    num_kv_heads / num_heads; gate, up, down intermediate / hidden. The CATS activation skips rows
    of both up and down."""
    kv, mlp = cfg.num_kv_heads / cfg.num_heads, cfg.intermediate_size / cfg.hidden_size
    return {"attn.q_proj": 1.0, "attn.k_proj": kv, "attn.v_proj": kv, "attn.o_proj": 1.0,
            "mlp.gate_proj": mlp, "mlp.up_proj": mlp, "mlp.down_proj": mlp, CATS_SITE: 2 * mlp}


def weighted_mean(per_site: dict, cfg):
    """sum_s w_s v_s / sum_s w_s over the sites given (site_weights). Of per-site sparsities: a
    layer's effective sparsity, the fraction of its thresholded weight rows that are skipped."""
    w = site_weights(cfg)
    return sum(w[s] * v for s, v in per_site.items()) / sum(w[s] for s in per_site)


def gated_mlp(x, w_gate, w_up, w_down, threshold=None):
    """Reference gated MLP on raw Flax-layout weights ([H, I], [H, I], [I, H]).

    threshold None is the dense SiLU MLP. Accumulates in fp32; the kernels must equal this.
    """
    f32 = jnp.float32
    g = jnp.dot(x.astype(f32), w_gate.astype(f32))
    a = jax.nn.silu(g) if threshold is None else cats_activation(g, threshold)
    u = jnp.dot(x.astype(f32), w_up.astype(f32))
    return jnp.dot(a * u, w_down.astype(f32))


def active_fraction(a: jax.Array, axis=None) -> jax.Array:
    """Fraction of non-zero activations (1 - sparsity), over `axis` (default: all)."""
    return jnp.mean((a != 0).astype(jnp.float32), axis=axis)
