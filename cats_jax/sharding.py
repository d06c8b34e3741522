"""Tensor-parallel decode: the decode weights and the KV cache split over the devices of one mesh axis, "tp".

    mesh = sharding.make_mesh(4)                                # the first 4 devices
    decoder = sharding.shard(decode.prepare(model, impl), mesh)
    generate(decoder, prompts, 64)                              # or decode.forward(..., plan=decoder.plan)

The split (Megatron's): attention over heads, q|k|v column-parallel and o row-parallel; the MLP over
its neurons, gate|up column-parallel (the CATS kernel's neuron-major gate|up over its rows) and down
row-parallel; the KV cache over KV heads. Each layer then needs one all-reduce after o and one after
down; the activations, embedding, norms, LM head and thresholds are replicated. The rules live here
only: LOGICAL names each axis of every decode weight and of the cache, RULES maps names to the mesh axis.

The fused matrices. decode.prepare fuses q|k|v as [q heads | k heads | v heads] columns; a plain
column split would hand shard 0 only q columns. `shard` re-orders the columns into tp blocks, block s
= [its N/tp q heads | its K/tp k heads | its K/tp v heads] (query heads s N/tp.. attend to KV heads
s K/tp.., so GQA stays within a shard), and gate|up into blocks [its I/tp gate | its I/tp up neurons]
(the rows of the neuron-major gate|up alike; down's rows, split in order, hold the same neurons).
Each device then holds exactly the fused matrices of a model with N/tp heads, K/tp KV heads and I/tp
neurons (`local_config`), in decode.prepare's layout.

So decode.forward runs on each device's shard under jax.shard_map with that local config, the same
code for the jnp path and the Pallas kernels (each kernel at its shard's shapes: a TEAL threshold on
o's or down's input tests the device's own slice of it, a CATS threshold the device's own neurons),
plus one psum after o and one after down (and a pmean of the CATS kept fraction, a statistic). Why
shard_map for the jnp path too, not jit with shardings (GSPMD): one path for both impls, the fused
layouts never need a global re-shuffle in forward, and the collectives are exactly the two written
psums. Without a mesh (tp = 1) forward is unchanged. The psums add bf16 partial sums in bf16 (as
Megatron does), so bf16 logits differ from one device's by rounding; fp32 agrees to ~1e-6.

Not yet: loading a checkpoint shard by shard (shard() places a decoder held whole on one device).
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cats_jax.config import ModelConfig

TP = "tp"  # the mesh axis

# The logical axes of each decode weight (decode.prepare's keys) and of the cache; 0-d arrays
# (per-layer thresholds) are replicated.
LOGICAL = {
    "embed": ("vocab", "embed"),
    "head": ("embed", "vocab"),
    "norm": ("embed",),
    "attn_norm": ("embed",),
    "mlp_norm": ("embed",),
    "qkv": ("embed", "qkv_heads"),  # columns in tp blocks (`shard`)
    "o": ("heads", "embed"),
    "gate_up": ("embed", "mlp"),  # columns in tp blocks (`shard`)
    "gate_up_t": ("mlp", "embed"),  # rows in tp blocks (`shard`)
    "down": ("mlp", "embed"),
    # an int8 model's per-output-channel scales (decode.prepare): split as their matrix's outputs
    "qkv_scale": ("qkv_heads",),
    "o_scale": ("embed",),
    "gate_up_scale": ("mlp",),
    "gate_up_t_scale": ("mlp",),
    "down_scale": ("embed",),
    "head_scale": ("vocab",),
}
CACHE = ("batch", "slots", "kv_heads", "head_dim")  # each layer's k and v, model.init_cache
RULES = {"qkv_heads": TP, "heads": TP, "kv_heads": TP, "mlp": TP}  # any other name: replicated


def spec(logical: tuple[str, ...]) -> P:
    return P(*(RULES.get(name) for name in logical))


def weight_specs(weights) -> dict:
    """The PartitionSpec of every decode weight (a pytree like decode.prepare's weights)."""
    return jax.tree_util.tree_map_with_path(lambda path, w: spec(LOGICAL[path[-1].key]) if w.ndim else P(), weights)


def cache_specs(cache) -> list:
    return jax.tree.map(lambda _: spec(CACHE), cache)


def make_mesh(tp: int) -> jax.sharding.Mesh:
    """A 1-d mesh over the first tp devices, axis "tp"."""
    n = len(jax.devices())
    if not 1 <= tp <= n:
        raise ValueError(f"tensor parallelism over {tp} devices: {n} {jax.default_backend()} device(s) here "
                         f"(choose 1..{n})")
    return jax.make_mesh((tp,), (TP,), (jax.sharding.AxisType.Auto,), devices=jax.devices()[:tp])


def tp_size(mesh: jax.sharding.Mesh) -> int:
    return mesh.shape[TP]


def local_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The shapes one device of a tp-way split computes: its share of heads, KV heads and neurons."""
    sizes = {"heads": cfg.num_heads, "KV heads": cfg.num_kv_heads, "intermediate size": cfg.intermediate_size}
    bad = [f"{name} {n}" for name, n in sizes.items() if n % tp]
    if bad:
        raise ValueError(f"{cfg.name or 'the model'}: tensor parallelism over {tp} devices needs heads, KV heads and "
                         f"intermediate size divisible by {tp}; {', '.join(bad)} not (choose a tp that divides them)")
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // tp, num_kv_heads=cfg.num_kv_heads // tp,
                               intermediate_size=cfg.intermediate_size // tp)


def _blocks(w, widths: tuple[int, ...], tp: int):
    """Columns [A | B | ...] of the given widths re-ordered into tp blocks [A_s | B_s | ...]."""
    parts = jnp.split(w, list(itertools.accumulate(widths))[:-1], axis=1)
    return jnp.concatenate([p.reshape(w.shape[0], tp, -1) for p in parts], axis=2).reshape(w.shape)


def shard(decoder, mesh: jax.sharding.Mesh):
    """decoder (decode.prepare's) with its weights re-ordered (module docstring) and placed on the mesh,
    each device holding only its shard; its plan carries the mesh, so decode.forward runs per shard."""
    plan = decoder.plan
    if plan.mesh is not None:  # its columns are in blocks already
        raise ValueError("this decoder is sharded already; shard the one decode.prepare returned")
    if any("factors" in lw for lw in decoder.weights["layers"]):
        raise ValueError("tensor parallelism takes the magnitude criterion only for now (the weighted "
                         "criterion's factors are not split over devices)")
    cfg, tp = plan.cfg, tp_size(mesh)
    local_config(cfg, tp)  # the shapes divide
    d, size = cfg.head_dim, cfg.intermediate_size
    layers = []
    qkv = (cfg.num_heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d)
    for lw in decoder.weights["layers"]:
        lw = dict(lw, qkv=_blocks(lw["qkv"], qkv, tp))
        if "gate_up" in lw:
            lw["gate_up"] = _blocks(lw["gate_up"], (size, size), tp)
        else:  # neuron-major: the same blocks of rows
            lw["gate_up_t"] = _blocks(lw["gate_up_t"].T, (size, size), tp).T
        for name, widths in (("qkv", qkv), ("gate_up", (size, size)), ("gate_up_t", (size, size))):
            if f"{name}_scale" in lw:  # int8: the scales follow their columns (rows)
                lw[f"{name}_scale"] = _blocks(lw[f"{name}_scale"][None], widths, tp)[0]
        layers.append(lw)
    weights = dict(decoder.weights, layers=layers)
    placed = jax.tree.map(lambda w, s: jax.device_put(w, NamedSharding(mesh, s)), weights, weight_specs(weights))
    return decoder._replace(weights=placed, plan=dataclasses.replace(plan, mesh=mesh))


def place_cache(cache, mesh: jax.sharding.Mesh):
    """A KV cache (model.init_cache) split over KV heads; inside jit, a sharding constraint."""
    return jax.tree.map(lambda c, s: jax.lax.with_sharding_constraint(c, NamedSharding(mesh, s)), cache,
                        cache_specs(cache))
