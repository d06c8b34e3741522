"""The inference path: decode weights prepared once from a model, and the forward pass over them.

    decoder = decode.prepare(model, "pallas")     # the model's mode and thresholds, fixed here
    logits, cache, kept = decode.forward(decoder.weights, tokens, positions, cache, plan=decoder.plan)

`prepare` reads the model (Flax NNX, the definition: cats_jax.model) and its sparsity settings
(set_mode, set_thresholds) and builds a plain pytree of the layouts each kernel wants:
q|k|v fused into one [H, (N + 2K) D] matrix (one GEMV reads x once for three projections; XLA
would otherwise rewrite the narrow k / v GEMVs), gate|up fused [H, 2I] (dense and TEAL), or held
neuron-major [2I, H] for the CATS kernel, and one fp32 scalar threshold per layer and site. An
int8 model's matrices stay int8, each with its fp32 per-output-channel scales beside it
("<name>_scale", concatenated as the columns are; per row of the neuron-major gate|up), applied
after the fp32 accumulation of every product (cats_jax.quantize.dot; the kernels take them too),
so no step dequantizes a matrix; an int8 LM head likewise ("head", "head_scale"). The model is not
changed. `Plan` (static) says which sites are thresholded and whether decode steps may run the
Pallas kernels; which kernel runs where is then decided from the shapes at trace time
(`Plan.*_kernel`). Rebuild the decoder after changing the model's thresholds. On the kernels, a
GEMV's output reaches the next kernel (decode attention, the residual add + norm, and for TEAL's
and dense int8's gate|up the down GEMV, which computes silu(gate) * up) as the GEMV leaves it
(`Sums`): that kernel scales and rounds it as it loads it, so no launch does only that. GEMVs on
the masked tiles add into fp32 buffers that the add + norm launch before them zeroed
(`_sum_buffers`), no memset of XLA's. The other way round, a TEAL GEMV on the gather path (batch
1) gets its input already thresholded and compacted (sparse_gemv.Compacted) by the kernel that
makes it: the add + norm before q|k|v and gate|up, the attention's combine before o
(`_compaction`); where XLA computes o, that combine applies o's rule.

The math is the model's (same functions: rms_norm, attend, the sparsity rules); tests check that
greedy tokens equal those of the model in fp32. With several thresholded projections fused in one
matrix, each reads its own thresholded input: up to MAX_STACKED_ROWS rows the inputs are stacked
and the matrix read once (extra multiplies, no copy); longer inputs (long prefills) take each
projection's columns apart.

Tensor parallel: a decoder placed on a mesh (cats_jax.sharding.shard) has the mesh in its plan;
forward then runs per device on its shard under jax.shard_map and adds the shards' partial sums
after o and after down (cats_jax.sharding says how the weights are split).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from cats_jax import sharding, sparsity
from cats_jax.config import ModelConfig
from cats_jax.model import QLinear, Transformer, attend, rms_norm, rope_angles, rope_inv_freq, site_threshold
from cats_jax.quantize import dot
from pallas_kernels import attention, cats_mlp, norm, sparse_gemv
from pallas_kernels.common import finished, kernels_enabled

f32 = jnp.float32
IMPLS = ("jnp", "pallas")
# Thresholded inputs stacked into one product while it has at most this many rows. Stacked, a
# product of S segments multiplies S times the rows it needs; apart, each segment's columns are a
# slice of W, which XLA copies before its GEMM. Mistral-7B on an H100 (bf16, ~700 TFLOP/s, ~3 TB/s):
# q|k|v's copy (100 MB moved, ~33 us) costs what its stack's two extra rows a row cost (0.14 us) at
# ~230 rows, 690 stacked; gate|up's (470 MB, ~150 us) at ~440 rows (0.34 us), 880 stacked.
MAX_STACKED_ROWS = 512


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static: the model's shapes, its thresholded sites and whether decode steps may use kernels."""

    cfg: ModelConfig
    sites: tuple[str, ...]
    kernels: bool  # impl "pallas": decode steps (one token per row) through the Pallas kernels on GPU
    # fused groups ("qkv", "gate_up") whose sites hold one threshold in every layer (uniform TEAL
    # allocation: one input, one quantile): off the kernels one thresholded input and one plain
    # product serve them
    shared: tuple[str, ...] = ()
    mesh: jax.sharding.Mesh | None = None  # tensor parallel over its axis "tp" (sharding.shard)
    axis: str | None = None  # inside shard_map: the mesh axis whose partial sums are added

    @property
    def cats(self) -> bool:
        return sparsity.CATS_SITE in self.sites

    def _step_kernels(self, x) -> bool:
        return self.kernels and x.shape[1] == 1 and kernels_enabled()

    def attention_kernel(self, x) -> bool:
        d = self.cfg.head_dim
        return self._step_kernels(x) and d >= 16 and not d & (d - 1)

    def gemv_kernel(self, x, w) -> bool:
        if w.dtype == jnp.int8:  # XLA converts a whole int8 matrix before its GEMV: the kernels read int8 rows
            return self._step_kernels(x) and x.shape[0] <= sparse_gemv.MAX_INT8_BATCH
        return self._step_kernels(x) and sparse_gemv.kernel_pays(x.shape[0], *w.shape)

    def product_kernel(self, x, w, thresholded: bool) -> bool:
        """Whether x @ w runs on the GEMV kernels: thresholded or int8 where they pay (gemv_kernel), a
        dense float product only where this device lists tuned blocks for it (sparse_gemv.dense_pays)."""
        if thresholded or w.dtype == jnp.int8:
            return self.gemv_kernel(x, w)
        return self._step_kernels(x) and sparse_gemv.dense_pays(x.shape[0], *w.shape)

    def cats_kernel(self, x) -> bool:
        return self._step_kernels(x) and cats_mlp.kernel_pays(x.shape[0])

    def norm_kernel(self, x, scale) -> bool:
        return self._step_kernels(x) and scale.dtype == x.dtype


class Decoder(NamedTuple):
    weights: dict  # a pytree of arrays
    plan: Plan


class Sums(NamedTuple):
    """A decode step's projection as its kernel leaves it (sparse_gemv's finish=False): fp32 sums
    [R >= B, P >= out] (padding rows and columns zeros), unscaled, with the int8 scale [out] or
    None. The next kernel (decode attention, add_rms_norm, the down GEMV of silu(gate) * up) scales
    and rounds them as it loads them: one launch fewer than finishing them apart. `_finished` is
    the same in jnp, for any other consumer."""
    sums: jax.Array
    scale: jax.Array | None


def _finished(y, b: int, n: int, dtype):
    """y itself, or Sums finished as sparse_gemv would: [b, 1, n] in dtype."""
    if not isinstance(y, Sums):
        return y
    return finished(y.sums[:b, :n], y.scale, dtype)[:, None]


QKV = ("attn.q_proj", "attn.k_proj", "attn.v_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
GROUPS = {"qkv": QKV, "gate_up": GATE_UP}


def _fuse(layout: dict, name: str, *linears, neuron_major: bool = False) -> None:
    """layout[name]: the linears' kernels side by side [in, sum of outs] (neuron_major: transposed,
    stacked [sum of outs, in]); int8 ones with their scales concatenated as layout[name + "_scale"]."""
    kernels = [lin.kernel[...] for lin in linears]
    layout[name] = jnp.concatenate([k.T for k in kernels]) if neuron_major else jnp.concatenate(kernels, axis=1)
    if isinstance(linears[0], QLinear):
        layout[f"{name}_scale"] = jnp.concatenate([lin.scales[...] for lin in linears])


def prepare(model: Transformer, impl: str = "jnp") -> Decoder:
    """Decode weights and plan from the model's weights, mode and thresholds (module docstring)."""
    check_impl(impl)
    layers = [prepare_layer(model, layer, impl) for layer in model.layers]
    return Decoder(dict(prepare_top(model), layers=layers), make_plan(model, impl, layers))


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r} (choose from {', '.join(IMPLS)})")


def prepare_layer(model: Transformer, layer, impl: str) -> dict:
    """One layer's decode weights under the model's mode, thresholds and criterion."""
    sites = model.sites
    cats = sparsity.CATS_SITE in sites
    kernels = impl == "pallas"
    a, m = layer.attn, layer.mlp
    lw = {
        "attn_norm": layer.input_norm.scale[...],
        "mlp_norm": layer.post_attn_norm.scale[...],
        "thresholds": {s: jnp.asarray(site_threshold(layer, s)[...], f32) for s in sites},
    }
    _fuse(lw, "qkv", a.q_proj, a.k_proj, a.v_proj)
    _fuse(lw, "o", a.o_proj)
    _fuse(lw, "down", m.down_proj)
    if model.criterion == "weighted":  # the layer's factors, one [in] row per fused segment
        fa, fm = ({p: f[...] for p, f in mod.input_factor.items()} for mod in (a, m))
        lw["factors"] = {"qkv": jnp.stack([fa["q_proj"], fa["k_proj"], fa["v_proj"]]), "o": fa["o_proj"][None],
                         "gate_up": jnp.stack([fm["gate_proj"], fm["up_proj"]]), "down": fm["down_proj"][None]}
    elif model.criterion == "up-rms" and cats:  # the CATS neurons' calibrated factors only
        lw["factors"] = {"down": m.input_factor["down_proj"][...][None]}
    # the CATS kernel skips neurons: each neuron's weights one contiguous row (its scale: the row's)
    _fuse(lw, "gate_up_t" if cats and kernels else "gate_up", m.gate_proj, m.up_proj, neuron_major=cats and kernels)
    return lw


def prepare_top(model: Transformer) -> dict:
    """The decode weights outside the layers: embedding, final norm, LM head."""
    weights = {"embed": model.embed.embedding[...], "norm": model.norm.scale[...]}
    if model.lm_head is None:  # tied
        weights["head"] = model.embed.embedding[...].T
    else:  # float, or int8 with its "head_scale"
        _fuse(weights, "head", model.lm_head)
    return weights


def make_plan(model: Transformer, impl: str, layers: list[dict]) -> Plan:
    """The plan of the model's mode on these prepared layers: a group shares one threshold
    segment when every layer thresholds its sites alike (magnitude criterion)."""
    sites = model.sites
    shared = tuple(g for g, group in GROUPS.items() if set(group) <= set(sites) and all(
        "factors" not in lw and len({float(lw["thresholds"][s]) for s in group}) == 1 for lw in layers))
    return Plan(model.cfg, sites, impl == "pallas", shared)


def _product(plan: Plan, x, w, thresholds, widths, factors=None, scale=None, dtype=None, sums=False, out=None):
    """x [B, T, in] @ w [in, out] in `dtype` (default x's), where the columns of w come in segments
    of `widths`, each reading x thresholded by its own TEAL threshold (None: x as it is) and, under
    the weighted criterion, its own factors (factors [segments, in]; None: magnitude). w int8:
    scale fp32 [out]. sums: a product on the kernels comes back as Sums, for the next kernel to finish.
    x Sums (a gate|up product on the kernels, for the down projection): the input is silu(gate) * up,
    computed by the down GEMV's kernels as they read x (sparse_gemv's gated input). out: the output
    buffer of a GEMV on the masked tiles, zeroed by the add + norm before (_sum_buffers), or None."""
    if isinstance(x, Sums):
        return _gated_product(x, w, thresholds, factors, scale, dtype, sums, out)
    if isinstance(x, sparse_gemv.Compacted):  # thresholded and compacted by the kernel that made it
        y = sparse_gemv.sparse_gemv(x, w, segments=widths, scale=scale, out_dtype=dtype, finish=not sums)
        return Sums(y, scale) if sums else y[:, None]
    b, t, n_in = x.shape
    thresholded = any(th is not None for th in thresholds)
    if plan.product_kernel(x, w, thresholded):
        if not thresholded:  # dense: the masked tiles read every row, with nothing to compact or test
            y = sparse_gemv.sparse_gemv(x.reshape(b, n_in), w, scale=scale, out_dtype=dtype, finish=not sums,
                                        skip_zeros=False, zeroed=out)
        else:
            y = sparse_gemv.sparse_gemv(x.reshape(b, n_in), w, _kernel_thresholds(thresholds), segments=widths,
                                        factors=factors, scale=scale, out_dtype=dtype, finish=not sums, zeroed=out)
        return Sums(y, scale) if sums else y.reshape(b, t, -1)
    if not thresholded:
        return dot(x, w, scale, dtype)
    xs = [x if th is None else sparsity.teal_input(x, th, None if factors is None else factors[i])
          for i, th in enumerate(thresholds)]
    if len(xs) == 1:
        return dot(xs[0], w, scale, dtype)
    cuts = list(itertools.accumulate(widths))[:-1]
    if len(xs) * b * t <= MAX_STACKED_ROWS:  # one product reading w once; each segment keeps its rows
        y = dot(jnp.stack(xs), w, scale, dtype)  # [segments, B, T, out]
        return jnp.concatenate([part[i] for i, part in enumerate(jnp.split(y, cuts, axis=-1))], axis=-1)
    scales = [None] * len(xs) if scale is None else jnp.split(scale, cuts)
    return jnp.concatenate([dot(xi, wi, si, dtype) for xi, wi, si in zip(xs, jnp.split(w, cuts, axis=1), scales)],
                           axis=-1)


def _gated_product(gu: Sums, w, thresholds, factors, scale, dtype, sums, out):
    """The down projection of silu(gate) * up, with gate|up as its kernel left them (_product);
    no thresholds (dense int8): every row read."""
    dense = all(th is None for th in thresholds)
    y = sparse_gemv.sparse_gemv(gu.sums, w, None if dense else _kernel_thresholds(thresholds), factors=factors,
                                scale=scale, out_dtype=dtype, finish=not sums, gated=True, x_scale=gu.scale,
                                skip_zeros=not dense, zeroed=out)
    return Sums(y, scale) if sums else y[:, None]


def _kernel_thresholds(thresholds):
    """Per segment the kernels' threshold: its own, or -1 (keep every input) where it has none."""
    return [jnp.full((), -1.0, f32) if th is None else th for th in thresholds]


def _site(lw, site):
    return lw["thresholds"].get(site)


def _scale(lw, name):
    """The fp32 scales of the int8 decode weight lw[name] (a layer's, or the head's in weights); None for float."""
    return lw.get(f"{name}_scale")


def _factors(lw, name):
    return lw.get("factors", {}).get(name)


def _shared_rule(plan: Plan, lw, x, group: str):
    """The one threshold that a fused group's sites share (Plan.shared), where its product runs off
    the kernels: the add + norm before applies it (the group's product then reads x as it is).
    None elsewhere: on the kernels one segment ran slower than three equal ones (docs/decisions.md)."""
    if group in plan.shared and group in lw and not plan.gemv_kernel(x, lw[group]):
        return _site(lw, GROUPS[group][0])
    return None


SITES = {**GROUPS, "o": ("attn.o_proj",), "down": ("mlp.down_proj",)}


def _thresholds(lw, name: str) -> list:
    """The threshold (or None) of each site whose columns decode weight lw[name] holds, in order."""
    return [_site(lw, s) for s in SITES[name]]


def _widths(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    """The output width of each site's columns in decode weight `name` ("qkv", "gate_up", "o", "down")."""
    n, k, d, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    return {"qkv": (n * d, k * d, k * d), "gate_up": (cfg.intermediate_size,) * 2, "o": (h,), "down": (h,)}[name]


def _grouped(plan: Plan, lw, x, group: str, sums=False, out=None):
    """The product of a fused group's matrix lw[group] (q|k|v or gate|up), each segment with its
    site's threshold (and weighted-criterion factors), or with their shared threshold already
    applied to x (_shared_rule)."""
    w, widths, scale = lw[group], _widths(plan.cfg, group), _scale(lw, group)
    if _shared_rule(plan, lw, x, group) is not None:
        return _product(plan, x, w, [None], (sum(widths),), scale=scale)
    return _product(plan, x, w, _thresholds(lw, group), widths, _factors(lw, group), scale, sums=sums, out=out)


def _compaction(plan: Plan, lw, x, name: str) -> sparse_gemv.Compaction | None:
    """Where the decode-step GEMV of lw[name] ("qkv", "gate_up", "o") reading x runs on the gather path
    with thresholds: its Compaction, for the kernel that makes x to do as it stores it (the add +
    norm, the attention's combine); None elsewhere."""
    w = lw.get(name)
    thresholds = _thresholds(lw, name)
    if w is None or all(t is None for t in thresholds) or not plan.gemv_kernel(x, w):
        return None
    return sparse_gemv.compaction_for(x.shape[0], w.shape[0], _widths(plan.cfg, name), _kernel_thresholds(thresholds),
                                      _factors(lw, name), sparse_gemv.gemv_variant(w.dtype))


def _sum_buffer(plan: Plan, x, w, segments, thresholded: bool, cats_down: bool = False) -> tuple[int, int] | None:
    """Where the decode-step product of x [B, T, in] and w runs on the masked tiles (thresholded,
    int8, or CATS's down GEMV of its sparse hidden activations): the shape of the fp32 buffer it adds
    into (sparse_gemv.sum_shape), for the add + norm before it to zero (one memset launch fewer);
    None elsewhere (XLA's products; the gather path, whose compaction zeroes its own)."""
    if w is None:
        return None
    on = plan.cats_kernel(x) if cats_down else plan.product_kernel(x, w, thresholded)
    dense = not (thresholded or cats_down)
    return sparse_gemv.sum_shape(x.shape[0], w.shape[0], segments, dense,
                                 sparse_gemv.gemv_variant(w.dtype, cats_down, dense)) if on else None


def _sum_buffers(plan: Plan, lw, x, names) -> tuple[tuple[int, int] | None, ...]:
    """_sum_buffer of each decode weight in names ("qkv", "o"; "gate_up", "down"), x the rows of the
    block they run in."""
    return tuple(_sum_buffer(plan, x, lw.get(name), _widths(plan.cfg, name),
                             any(t is not None for t in _thresholds(lw, name)), plan.cats and name == "down")
                 for name in names)


def _attention(plan: Plan, lw, x, positions, rope, kv, outs=(None, None)):
    """rope: RoPE's angles at positions[:, 0] (model.rope_angles) for the kernel; outs: q|k|v's and o's
    zeroed output buffers (_sum_buffers) or None."""
    cfg = plan.cfg
    b, t, _ = x.shape
    n, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    fused = kv is not None and plan.attention_kernel(x)
    qkv = _grouped(plan, lw, x, "qkv", sums=fused, out=outs[0])
    o_t = _site(lw, "attn.o_proj")
    if fused:
        rows, scale = (qkv.sums, qkv.scale) if isinstance(qkv, Sums) else (qkv[:, 0], None)
        # o's TEAL rule where the attention output is made: compacted for o's gather, or applied for
        # XLA's product (weighted criterion: left to the product)
        compaction = _compaction(plan, lw, x, "o")
        early = o_t is not None and "factors" not in lw and not plan.gemv_kernel(x, lw["o"])  # no compaction then
        out, ck, cv = attention.decode_attention(rows, positions[:, 0], *kv, rope, num_heads=n,
                                                 num_kv_heads=k, sliding_window=cfg.sliding_window, qkv_scale=scale,
                                                 out_threshold=o_t if early else None, compaction=compaction)
        out, kv = out if isinstance(out, sparse_gemv.Compacted) else out[:, None], (ck, cv)
        o_t = None if early else o_t
    else:
        q, key, val = jnp.split(qkv, [n * d, (n + k) * d], axis=-1)
        out, kv = attend(cfg, q.reshape(b, t, n, d), key.reshape(b, t, k, d), val.reshape(b, t, k, d), positions, kv)
        out = out.astype(x.dtype)
    o = _product(plan, out, lw["o"], [o_t], _widths(cfg, "o"), _factors(lw, "o"), _scale(lw, "o"),
                 sums=plan.axis is None, out=outs[1])
    return o, kv


class Hidden(NamedTuple):
    """A decode step's CATS hidden activations h [B, I] from the kernel (zero where dropped): _forward
    counts every layer's kept neurons in one reduction after the last layer, not a launch a layer."""
    h: jax.Array


def _mlp(plan: Plan, lw, x, outs=(None, None)):
    """The gated MLP of x [B, T, H]: (y [B, T, H] or on the kernels Sums, the per-token fraction of
    kept neurons [B, T], on the CATS kernel its Hidden, or None). outs: gate|up's and down's zeroed
    output buffers (_sum_buffers) or None."""
    b, t, h = x.shape
    down_t = _thresholds(lw, "down")
    sums = plan.axis is None  # the next add_rms_norm finishes the down projection (not across devices)
    if not plan.cats:
        # on the kernels, the down GEMV computes silu(gate) * up from gate|up as their kernel leaves
        # them: TEAL's in its compaction, dense int8's masked tiles as they load each tile's inputs
        gated = plan.product_kernel(x, lw["down"], down_t[0] is not None)
        gu = _grouped(plan, lw, x, "gate_up", sums=gated, out=outs[0])
        if not isinstance(gu, Sums):
            g, u = jnp.split(gu, 2, axis=-1)
            gu = jax.nn.silu(g) * u
        y = _product(plan, gu, lw["down"], down_t, (h,), _factors(lw, "down"), _scale(lw, "down"), x.dtype,
                     sums=sums, out=outs[1])
        return y if sums else y[:b], None  # a gated input's rows are gate|up's padded ones
    threshold = lw["thresholds"][sparsity.CATS_SITE]
    down = _factors(lw, "down")
    factor = None if down is None else down[0]  # CATS's factor of neuron i: ||W_down[i, :]|| or rms(u_i)
    if plan.cats_kernel(x):
        scales = None if _scale(lw, "down") is None else (_scale(lw, "gate_up_t"), _scale(lw, "down"))
        y, hidden = cats_mlp.cats_mlp(x.reshape(b, h), lw["gate_up_t"], lw["down"], threshold, factor, scales,
                                      finish=not sums, zeroed=outs[1])
        y = Sums(y, _scale(lw, "down")) if sums else y.reshape(x.shape)
        return y, Hidden(hidden)
    # fp32 gate: the threshold test must not depend on the bf16 rounding of x W_gate
    if "gate_up" in lw:
        gu = dot(x, lw["gate_up"], _scale(lw, "gate_up"), f32)
    else:  # neuron-major weights (a batch too large for the kernel, or prefill): one product too
        gu = dot(x, lw["gate_up_t"].T, _scale(lw, "gate_up_t"), f32)
    size = plan.cfg.intermediate_size
    g, u = gu[..., :size], gu[..., size:].astype(x.dtype)
    hidden = sparsity.cats_activation(g, threshold, factor).astype(x.dtype) * u
    # kept neurons counted as the kernel counts them, on a * u: a then has one consumer, so XLA can
    # compute it inside the product's fusion instead of a launch of its own (as 'a != 0' needed)
    return dot(hidden, lw["down"], _scale(lw, "down")), sparsity.active_fraction(hidden, axis=-1)


def _all_reduce(plan: Plan, y):
    """y itself, or inside shard_map the sum over devices of a row-parallel product's partial sums."""
    return y if plan.axis is None else jax.lax.psum(y, plan.axis)


def forward(weights, tokens, positions, cache, *, plan: Plan, last=None):
    """Logits (fp32) [B, T, V] of tokens [B, T] at positions [B, T], the updated cache (model.init_cache's
    layout) and the CATS kept-neuron fractions [L, B, T] (None without CATS). last [B]: only the
    logits of token last[b] of each row, [B, V] (prefill). A plan with a mesh: per shard (module docstring)."""
    if plan.mesh is None:
        return _forward(weights, tokens, positions, cache, last, plan=plan)
    local = dataclasses.replace(plan, cfg=sharding.local_config(plan.cfg, sharding.tp_size(plan.mesh)), mesh=None,
                                axis=sharding.TP)
    cache_specs = sharding.cache_specs(cache)
    per_shard = jax.shard_map(functools.partial(_forward, plan=local), mesh=plan.mesh,
                              in_specs=(sharding.weight_specs(weights), P(), P(), cache_specs, P()),
                              out_specs=(P(), cache_specs, P()),
                              check_vma=not plan.kernels)  # the kernels' outputs carry no per-device typing
    return per_shard(weights, tokens, positions, cache, last)


def _add_norm(plan: Plan, x, h, scale, compaction=None, threshold=None, zeros=()):
    """(x + h, rms_norm(x + h, scale), buffers): the residual stream and the next block's input; h
    None: x itself. threshold: TEAL's rule applied to that input (_shared_rule). Decode steps on the
    kernels take one launch for all (pallas_kernels.norm), which also finishes h when it comes as
    Sums, given the next GEMV's compaction compacts the input for it, and zeroes the output buffers
    of the block's GEMVs on the masked tiles (zeros: their shapes or None, _sum_buffers; buffers: one
    per shape, None where no kernel zeroed one)."""
    eps = plan.cfg.rms_norm_eps
    b, t, n = x.shape
    if h is not None and plan.norm_kernel(x, scale):
        rows, h_scale = (h.sums, h.scale) if isinstance(h, Sums) else (h.reshape(b, n), None)
        x, y, *bufs = norm.add_rms_norm(x.reshape(b, n), rows, scale, eps, h_scale, compaction=compaction,
                                        threshold=threshold, zeros=tuple(z for z in zeros if z is not None))
        bufs = iter(bufs)
        return (x.reshape(b, t, n), y if compaction is not None else y.reshape(b, t, n),
                tuple(None if w is None else next(bufs) for w in zeros))
    x = x if h is None else x + _finished(h, b, n, x.dtype)
    y = rms_norm(x, scale, eps)
    return x, y if threshold is None else sparsity.teal_input(y, threshold), (None,) * len(zeros)


def _kept_fractions(kept) -> jax.Array:
    """[L, B, T]: each layer's fraction of kept neurons, from _mlp's; the kernels' Hidden counted in one
    reduction over all layers (kept neurons are the non-zeros of a * u: u == 0 exactly is
    vanishingly rare)."""
    if isinstance(kept[0], Hidden):
        return sparsity.active_fraction(jnp.stack([k.h for k in kept]), axis=-1)[..., None]
    return jnp.stack(kept)


def _forward(weights, tokens, positions, cache, last, *, plan: Plan):
    x, h = weights["embed"][tokens], None  # h: the last block's output, not yet added to x
    rope = rope_angles(positions[:, 0], rope_inv_freq(plan.cfg))  # once a step, for every layer's attention kernel
    new_cache, kept = [], []
    for lw, kv in zip(weights["layers"], cache):
        x, y, outs = _add_norm(plan, x, h, lw["attn_norm"], _compaction(plan, lw, x, "qkv"),
                               _shared_rule(plan, lw, x, "qkv"), _sum_buffers(plan, lw, x, ("qkv", "o")))
        h, kv = _attention(plan, lw, y, positions, rope, kv, outs)
        x, y, outs = _add_norm(plan, x, _all_reduce(plan, h), lw["mlp_norm"], _compaction(plan, lw, x, "gate_up"),
                               _shared_rule(plan, lw, x, "gate_up"), _sum_buffers(plan, lw, x, ("gate_up", "down")))
        h, frac = _mlp(plan, lw, y, outs)
        h = _all_reduce(plan, h)
        new_cache.append(kv)
        kept.append(frac)
    head = weights["head"]
    if last is None:
        head_sums = _sum_buffer(plan, x, head, head.shape[1:], thresholded=False)
        _, h, (out,) = _add_norm(plan, x, h, weights["norm"], zeros=(head_sums,))
    else:  # prefill: only each row's last token, [B, 1, H]
        x = (x + _finished(h, x.shape[0], x.shape[-1], x.dtype))[jnp.arange(x.shape[0]), last][:, None]
        h = rms_norm(x, weights["norm"], plan.cfg.rms_norm_eps)
        out = None
    # an int8 head is a dense int8 product: on the kernels' masked tiles for one token per row
    logits = _product(plan, h, head, [None], (head.shape[1],), scale=_scale(weights, "head"), dtype=f32, out=out)
    logits = logits if last is None else logits[:, 0]
    if not plan.cats:
        return logits, new_cache, None
    kept = _kept_fractions(kept)  # each device's fraction of its own neurons (equal shares): their mean
    return logits, new_cache, kept if plan.axis is None else jax.lax.pmean(kept, plan.axis)
