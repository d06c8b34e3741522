"""Tensor-parallel decode: the decode weights and the KV cache split over the devices of one mesh axis, "tp".

    decoder, tokenizer = generate.load(ckpt, impl=impl, tp=4)   # the first 4 devices, layer by layer
    decoder = sharding.shard(decode.prepare(model, impl), sharding.make_mesh(4))  # a model in memory
    generate(decoder, prompts, 64)                              # or decode.forward(..., plan=decoder.plan)

The split (Megatron's): attention over heads, q|k|v column-parallel and o row-parallel; the MLP over
its neurons, gate|up column-parallel (the CATS kernel's neuron-major gate|up over its rows) and down
row-parallel; the KV cache over KV heads. Each layer then needs one all-reduce after o and one after
down; the activations, embedding, norms, LM head and thresholds are replicated; the weighted
criterion's factors split as the inputs they weigh (o's and down's with their rows). The rules live here
only: LOGICAL, FACTORS, PARAMS (the model's own weights, for eval) and CACHE name each axis, RULES maps
names to the mesh axis.

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

Loading (generate.load_sharded): layer by layer, so that no host or device ever holds the whole
model. Each layer is read from the checkpoint whole onto the default device, prepared (decode.prepare),
split into its tp blocks (split_layer) and placed on the mesh (place); its whole copies are dropped
before the next layer is read. The peak beyond the shards is one layer, in a few copies (read, fused,
in blocks), plus the replicated embedding and LM head. Why not each device reading only its slice
(orbax restore with a sharding per tensor, as eval does for the model's own weights): a device's block
of q|k|v is three slices of three tensors fused, and decode.prepare's layouts (fusion, the neuron-major
gate|up, int8 scales, thresholds) would need a second, per-shard implementation; one layer is ~1/L
of the model.

eval (the NNX model, not this decoder) takes --tp through `model_shardings`: each device reads its
own slice of every weight (checkpoint.load_params with these specs) and jit splits the computation by
them (GSPMD: Megatron's all-reduces, no weight gathered, as tests/test_sharding.py checks in the
compiled program); the same model code, so the same scores up to the order of the partial sums.
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
# The model's own weights (cats_jax.model, which eval runs): each linear layer's kernel [in, out]
# and an int8 one's scales [out]; every other weight replicated.
PARAMS = {"q_proj": ("embed", "heads"), "k_proj": ("embed", "kv_heads"), "v_proj": ("embed", "kv_heads"),
          "o_proj": ("heads", "embed"), "gate_proj": ("embed", "mlp"), "up_proj": ("embed", "mlp"),
          "down_proj": ("mlp", "embed")}
# The weighted criterion's factors (decode.prepare's "factors", [segments, in]): over the inputs of
# their products, so o's and down's split with their rows, q|k|v's and gate|up's replicated.
FACTORS = {"qkv": (None, "embed"), "o": (None, "heads"), "gate_up": (None, "embed"), "down": (None, "mlp")}
CACHE = ("batch", "slots", "kv_heads", "head_dim")  # each layer's k and v, model.init_cache
RULES = {"qkv_heads": TP, "heads": TP, "kv_heads": TP, "mlp": TP}  # any other name: replicated


class TPError(ValueError):
    """A split this mesh cannot make (too few devices, shapes that do not divide, weights it cannot split)."""


def spec(logical: tuple[str, ...]) -> P:
    return P(*(RULES.get(name) for name in logical))


def weight_specs(weights) -> dict:
    """The PartitionSpec of every decode weight (a pytree like decode.prepare's weights)."""
    def one(path, w):
        factors = any(getattr(p, "key", None) == "factors" for p in path)
        return spec((FACTORS if factors else LOGICAL)[path[-1].key]) if w.ndim else P()
    return jax.tree_util.tree_map_with_path(one, weights)


def model_shardings(mesh: jax.sharding.Mesh):
    """(key path, shape) -> the NamedSharding of that weight of the model (PARAMS), for
    checkpoint.load_params: each device reads its own slice of the checkpoint."""
    def sharding(key: tuple[str, ...], _) -> NamedSharding:
        logical = PARAMS.get(key[-2], ()) if len(key) > 1 else ()
        return NamedSharding(mesh, spec({"kernel": logical, "scales": logical[1:]}.get(key[-1], ())))
    return sharding


def cache_specs(cache) -> list:
    return jax.tree.map(lambda _: spec(CACHE), cache)


def make_mesh(tp: int) -> jax.sharding.Mesh:
    """A 1-d mesh over the first tp devices, axis "tp"."""
    n = len(jax.devices())
    if not 1 <= tp <= n:
        raise TPError(f"tensor parallelism over {tp} devices: {n} {jax.default_backend()} device(s) here "
                         f"(choose 1..{n})")
    return jax.make_mesh((tp,), (TP,), (jax.sharding.AxisType.Auto,), devices=jax.devices()[:tp])


def tp_size(mesh: jax.sharding.Mesh) -> int:
    return mesh.shape[TP]


def local_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The shapes one device of a tp-way split computes: its share of heads, KV heads and neurons."""
    sizes = {"heads": cfg.num_heads, "KV heads": cfg.num_kv_heads, "intermediate size": cfg.intermediate_size}
    bad = [f"{name} {n}" for name, n in sizes.items() if n % tp]
    if bad:
        raise TPError(f"{cfg.name or 'the model'}: tensor parallelism over {tp} devices needs heads, KV heads and "
                         f"intermediate size divisible by {tp}; {', '.join(bad)} not (choose a tp that divides them)")
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // tp, num_kv_heads=cfg.num_kv_heads // tp,
                               intermediate_size=cfg.intermediate_size // tp)


def _blocks(w, widths: tuple[int, ...], tp: int):
    """Columns [A | B | ...] of the given widths re-ordered into tp blocks [A_s | B_s | ...]."""
    parts = jnp.split(w, list(itertools.accumulate(widths))[:-1], axis=1)
    return jnp.concatenate([p.reshape(w.shape[0], tp, -1) for p in parts], axis=2).reshape(w.shape)


def split_layer(lw: dict, cfg: ModelConfig, tp: int) -> dict:
    """One layer's decode weights (decode.prepare's) with the fused columns (rows) in tp blocks."""
    local_config(cfg, tp)  # the shapes divide
    d, size = cfg.head_dim, cfg.intermediate_size
    qkv = (cfg.num_heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d)
    lw = dict(lw, qkv=_blocks(lw["qkv"], qkv, tp))
    if "gate_up" in lw:
        lw["gate_up"] = _blocks(lw["gate_up"], (size, size), tp)
    else:  # neuron-major: the same blocks of rows
        lw["gate_up_t"] = _blocks(lw["gate_up_t"].T, (size, size), tp).T
    for name, widths in (("qkv", qkv), ("gate_up", (size, size)), ("gate_up_t", (size, size))):
        if f"{name}_scale" in lw:  # int8: the scales follow their columns (rows)
            lw[f"{name}_scale"] = _blocks(lw[f"{name}_scale"][None], widths, tp)[0]
    return lw


def place(weights, mesh: jax.sharding.Mesh):
    """Decode weights (a whole decoder's, one layer's or the rest) on the mesh by their specs."""
    return jax.tree.map(lambda w, s: jax.device_put(w, NamedSharding(mesh, s)), weights, weight_specs(weights))


def shard(decoder, mesh: jax.sharding.Mesh):
    """decoder (decode.prepare's) with its weights re-ordered (module docstring) and placed on the mesh,
    each device holding only its shard; its plan carries the mesh, so decode.forward runs per shard."""
    plan = decoder.plan
    if plan.mesh is not None:  # its columns are in blocks already
        raise TPError("this decoder is sharded already; shard the one decode.prepare returned")
    layers = [split_layer(lw, plan.cfg, tp_size(mesh)) for lw in decoder.weights["layers"]]
    placed = place(dict(decoder.weights, layers=layers), mesh)
    return decoder._replace(weights=placed, plan=dataclasses.replace(plan, mesh=mesh))


def place_cache(cache, mesh: jax.sharding.Mesh):
    """A KV cache (model.init_cache) split over KV heads; inside jit, a sharding constraint."""
    return jax.tree.map(lambda c, s: jax.lax.with_sharding_constraint(c, NamedSharding(mesh, s)), cache,
                        cache_specs(cache))
