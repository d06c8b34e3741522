"""Llama / Mistral decoder in Flax NNX, with a KV cache and a pluggable (CATS) gated MLP.

Shapes: B batch, T tokens in this call, S cache slots, H hidden, I intermediate, N query heads,
K kv heads, D head dim, V vocab. Weights use the Flax layout [in, out]. A config quantized "int8"
holds its blocks' linear layers as QLinear (int8 weights, fp32 scales: cats_jax.quantize), and
with quantize_head its LM head too.

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

from cats_jax import quantize, sparsity
from cats_jax.config import ModelConfig

f32 = jnp.float32
Cache = list  # per layer: (k [B, S, K, D], v [B, S, K, D])


class Threshold(nnx.Variable):
    """A calibrated sparsity threshold: model state that is saved and loaded, never trained."""


class Factor(nnx.Variable):
    """A criterion's factors of a projection's inputs, fp32 [in], set by Transformer.set_criterion
    and not saved with the weights: the weighted criterion's (sparsity.weight_factors of the
    projection's weights), or up-rms's of the CATS neurons (down_proj's inputs: rms(u_i), measured
    at calibration, stored with the thresholds)."""


class UpSquares(nnx.Variable):
    """The sum over a call's tokens of each neuron's squared up projection u = x W_up (fp32 [I]),
    sown by the CATS MLP only under nnx.capture(fn, UpSquares): the up-rms criterion's statistic
    (cats_jax.quantiles.up_rms)."""


class Activation(nnx.Variable):
    """What a sparse site tests, whole: a CATS MLP's activation a (fp32 [B, T, I], "act") or a
    TEAL projection's input ("<proj>_input"), times its factors under a criterion that has them
    (fp32; the factors are >= 0, so |sown| is the score the rule compares), sown only under
    nnx.capture(fn, Activation): calibration takes its |.| quantiles (cats_jax.calibrate, cats_jax.teal).
    Its own type, so that capturing nnx.Intermediate (generation statistics) never collects it."""


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


def rope_angles(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [..., D/2] in fp32 of RoPE's angles positions x inv_freq, positions [...]."""
    freqs = positions[..., None].astype(f32) * inv_freq
    return jnp.cos(freqs), jnp.sin(freqs)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """HF rotate-half RoPE. x [B, T, heads, D], positions [B, T]."""
    cos, sin = (jnp.concatenate([a, a], axis=-1)[:, :, None, :] for a in rope_angles(positions, inv_freq))
    x1, x2 = jnp.split(x.astype(f32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(f32) * cos + rotated * sin).astype(x.dtype)


def rms_norm(x, scale, eps: float):
    xf = x.astype(f32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return scale * y.astype(x.dtype)  # cast then scale, as HF does


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.scale[...], self.eps)


class QLinear(nnx.Module):
    """A linear layer of int8 weights: kernel int8 [in, out] and its per-output-channel scales fp32
    [out] (cats_jax.quantize); x @ W = (x @ kernel) * scales, accumulated in fp32, in x's dtype.
    Made empty (zeros): its weights come from a checkpoint or quantize_model."""

    def __init__(self, n_in: int, n_out: int):
        self.kernel = nnx.Param(jnp.zeros((n_in, n_out), jnp.int8))
        self.scales = nnx.Param(jnp.ones((n_out,), f32))

    def __call__(self, x, preferred_element_type=None):
        return quantize.dot(x, self.kernel[...], self.scales[...], preferred_element_type)


def _float_linear(n_in, n_out, dtype, rngs):
    return nnx.Linear(n_in, n_out, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)


def _linear(cfg: ModelConfig, n_in, n_out, dtype, rngs):
    """A block's linear layer: float, or int8 if the config is quantized."""
    return _float_linear(n_in, n_out, dtype, rngs) if cfg.quantization is None else QLinear(n_in, n_out)


def weight(linear) -> jax.Array:
    """A linear layer's weights [in, out] as they act (an int8 layer's dequantized, fp32)."""
    if isinstance(linear, QLinear):
        return quantize.dequantize(linear.kernel[...], linear.scales[...])
    return linear.kernel[...]


def _input_thresholds(projs) -> nnx.Dict:
    return nnx.Dict({p: Threshold(jnp.zeros((), f32)) for p in projs})


def _input_factors(module, projs) -> nnx.Dict:
    return nnx.Dict({p: Factor(jnp.ones((getattr(module, p).kernel.shape[0],), f32)) for p in projs})


def _factor(module, proj: str):
    """The criterion's factors of module.<proj>'s TEAL inputs: None but under the weighted criterion."""
    return module.input_factor[proj][...] if module.criterion == "weighted" else None


def _weighed(v, factor):
    """v as the rule weighs it (Activation): v itself, or v * factor in fp32."""
    return v if factor is None else v.astype(f32) * factor


def _sparse_input(module, proj: str, x):
    """The input of module.<proj>: TEAL's rule with its threshold if proj is one of the module's
    `sparse_inputs` (static), else x untouched. Under nnx.capture it sows x (Activation, for
    calibration) and the per-token fraction of kept inputs [B, T] (nnx.Intermediate)."""
    if proj not in module.sparse_inputs:
        return x
    factor = _factor(module, proj)
    module.sow(Activation, f"{proj}_input", _weighed(x, factor), capture_noop=True)
    x = sparsity.teal_input(x, module.input_threshold[proj][...], factor)
    module.sow(nnx.Intermediate, f"{proj}_active_fraction", sparsity.active_fraction(x, axis=-1), capture_noop=True)
    return x


# What each site sows under nnx.capture, per kind: (the CATS MLP's name, a TEAL site's suffix).
_SOWN = {"active_fraction": ("active_fraction", "_active_fraction"), "input": ("act", "_input")}


def sown_by_site(sown: dict, kind: str) -> dict:
    """Site -> the values every layer sowed for it, stacked [L, ...], from nnx.to_pure_dict of what
    nnx.capture collected. kind "active_fraction" (nnx.Intermediate: per-token fraction of kept
    values [B, T]) or "input" (Activation: what the site tests). The CATS MLP sows mlp/active_fraction
    and mlp/act (site "mlp.act"); a TEAL site <module>/<proj>_active_fraction and <module>/<proj>_input."""
    cats_name, suffix = _SOWN[kind]
    per_site: dict = {}
    for _, layer in sorted(sown.get("layers", {}).items()):
        for module, values in layer.items():
            for name, (value,) in values.items():
                if module == "mlp" and name == cats_name:
                    site = sparsity.CATS_SITE
                elif name.endswith(suffix):
                    site = f"{module}.{name.removesuffix(suffix)}"
                else:
                    continue
                per_site.setdefault(site, []).append(value)
    return {site: jnp.stack(v) for site, v in per_site.items()}


def site_threshold(layer: Block, site: str) -> Threshold:
    """The Threshold of `site` (sparsity.CATS_SITE or one of sparsity.TEAL_SITES) in a layer."""
    if site == sparsity.CATS_SITE:
        return layer.mlp.threshold
    if site not in sparsity.TEAL_SITES:
        known = ", ".join((sparsity.CATS_SITE, *sparsity.TEAL_SITES))
        raise ValueError(f"unknown sparsity site {site!r} (known: {known})")
    module, proj = site.split(".")
    return getattr(layer, module).input_threshold[proj]


QKV = ("q_proj", "k_proj", "v_proj")


def _projection(module, proj: str, x):
    """module.<proj> of its TEAL input of x."""
    return getattr(module, proj)(_sparse_input(module, proj, x))


def attend(cfg: ModelConfig, q, key, val, positions, kv=None):
    """Attention after the projections: RoPE on q and key, the cache write, GQA softmax attention.

    q [B, T, N, D], key and val [B, T, K, D] before RoPE, positions [B, T]. kv: the layer's cache
    (k, v) [B, S, K, D]: this call's keys and values are written at their slots, then the queries
    attend over every slot with slot <= position (and inside the sliding window); without a cache,
    over this call's tokens. Returns (out [B, T, N D] in q's dtype, the updated kv or None).
    The decode kernel (pallas_kernels.attention) must equal this at T = 1."""
    b, t, n, d = q.shape
    k = key.shape[2]
    inv_freq = rope_inv_freq(cfg)
    q, key = apply_rope(q, positions, inv_freq), apply_rope(key, positions, inv_freq)
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
    if cfg.sliding_window is not None:
        mask &= positions[:, :, None] - key_pos[:, None, :] < cfg.sliding_window
    qg = q.reshape(b, t, k, n // k, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, keys, preferred_element_type=f32) / math.sqrt(d)
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(vals.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, vals, preferred_element_type=f32)
    return out.reshape(b, t, n * d).astype(q.dtype), kv


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = _linear(cfg, h, cfg.num_heads * d, dtype, rngs)
        self.k_proj = _linear(cfg, h, cfg.num_kv_heads * d, dtype, rngs)
        self.v_proj = _linear(cfg, h, cfg.num_kv_heads * d, dtype, rngs)
        self.o_proj = _linear(cfg, cfg.num_heads * d, h, dtype, rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.cfg = cfg  # static (hashable); RoPE frequencies are derived from it at trace time
        # TEAL: the projections whose inputs are thresholded (static), each with its own threshold
        self.sparse_inputs: tuple[str, ...] = ()
        self.input_threshold = _input_thresholds(("q_proj", "k_proj", "v_proj", "o_proj"))
        self.criterion = "magnitude"  # static: sparsity.CRITERIA (Transformer.set_criterion)
        self.input_factor = _input_factors(self, ("q_proj", "k_proj", "v_proj", "o_proj"))

    def _qkv(self, x):
        """q [B, T, N D], k, v [B, T, K D] of the (normed) input x, each projection reading its TEAL input."""
        return tuple(_projection(self, p, x) for p in QKV)

    def keys_values(self, x, positions):
        """Keys (RoPE applied) and values [B, T, K, D] of the (normed) input x."""
        b, t, _ = x.shape
        k, d = self.num_kv_heads, self.head_dim
        _, key, val = self._qkv(x)
        return apply_rope(key.reshape(b, t, k, d), positions, rope_inv_freq(self.cfg)), val.reshape(b, t, k, d)

    def __call__(self, x, positions, kv=None):
        b, t, _ = x.shape
        n, k, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, key, val = self._qkv(x)
        q, key, val = q.reshape(b, t, n, d), key.reshape(b, t, k, d), val.reshape(b, t, k, d)
        out, kv = attend(self.cfg, q, key, val, positions, kv)
        return _projection(self, "o_proj", out.astype(x.dtype)), kv


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)). `impl` (static, one of sparsity.MLP_IMPLS): dense SiLU
    or the CATS activation. `sparse_inputs` (static): the projections whose inputs TEAL thresholds.
    The decode kernels' layouts live in cats_jax.decode, never here."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.gate_proj = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, dtype, rngs)
        self.up_proj = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, dtype, rngs)
        self.down_proj = _linear(cfg, cfg.intermediate_size, cfg.hidden_size, dtype, rngs)
        self.threshold = Threshold(jnp.zeros((), f32))
        self.impl = "dense"
        self.sparse_inputs: tuple[str, ...] = ()
        self.input_threshold = _input_thresholds(("gate_proj", "up_proj", "down_proj"))
        # static: sparsity.CRITERIA; CATS's factor of neuron i is down_proj's of input i
        # (weighted: ||W_down[i, :]||; up-rms: rms(u_i))
        self.criterion = "magnitude"
        self.input_factor = _input_factors(self, ("gate_proj", "up_proj", "down_proj"))

    def __call__(self, x):
        if self.impl == "dense":
            g, u = (_projection(self, p, x) for p in ("gate_proj", "up_proj"))
            return _projection(self, "down_proj", jax.nn.silu(g) * u)
        xg, xu = _sparse_input(self, "gate_proj", x), _sparse_input(self, "up_proj", x)
        # fp32 gate: the threshold test must not depend on the bf16 rounding of x W_gate
        # (the Pallas kernel and sparsity.gated_mlp test the fp32 value too)
        gate = self.gate_proj  # QLinear and an adapter (train.lora.LoRALinear) take preferred_element_type
        g = (jnp.dot(xg, gate.kernel[...], preferred_element_type=f32) if type(gate) is nnx.Linear
             else gate(xg, preferred_element_type=f32))
        factor = self.input_factor["down_proj"][...] if self.criterion != "magnitude" else None
        a = sparsity.cats_activation(g, self.threshold[...], factor)
        # Measured sparsity: the per-token fraction of kept neurons [B, T], recorded only
        # under nnx.capture(nnx.Intermediate); a no-op otherwise.
        self.sow(nnx.Intermediate, "active_fraction", sparsity.active_fraction(a, axis=-1), capture_noop=True)
        self.sow(Activation, "act", _weighed(a, factor), capture_noop=True)
        u = self.up_proj(xu)
        self.sow(UpSquares, "up_squares", jnp.sum(jnp.square(u.astype(f32)), axis=(0, 1)), capture_noop=True)
        return _projection(self, "down_proj", a.astype(x.dtype) * u)


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
        if cfg.quantize_head:  # its own int8 matrix, tied or not: the embedding gather stays float
            self.lm_head = QLinear(cfg.hidden_size, cfg.vocab_size)
        else:
            tied = cfg.tie_word_embeddings
            self.lm_head = None if tied else _float_linear(cfg.hidden_size, cfg.vocab_size, dtype, rngs)
        self.remat = False  # training: recompute each block's activations in the backward pass

    def hidden(self, tokens, positions, cache: Cache | None = None):
        """Final-norm hidden states [B, T, H] and the updated cache (None without a cache)."""
        x = self.embed(tokens)
        new_cache = None if cache is None else []
        call = nnx.remat(Block.__call__) if self.remat else Block.__call__
        for i, layer in enumerate(self.layers):
            x, kv = call(layer, x, positions, None if cache is None else cache[i])
            if cache is not None:
                new_cache.append(kv)
        return self.norm(x), new_cache

    def logits(self, h):
        """fp32 logits of hidden states [..., H] (an int8 head: (h @ q) * scales, accumulated in fp32)."""
        if isinstance(self.lm_head, QLinear):
            return self.lm_head(h, f32)
        w = self.embed.embedding[...].T if self.lm_head is None else self.lm_head.kernel[...]
        return jnp.dot(h, w, preferred_element_type=f32)

    def __call__(self, tokens, positions=None, cache: Cache | None = None):
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        h, cache = self.hidden(tokens, positions, cache)
        return self.logits(h), cache

    # ---- sparsity settings --------------------------------------------------------------
    def set_mode(self, mode: str):
        """Threshold the sites of `mode` (sparsity.MODES: dense, cats, teal, cats+teal-attn) and no
        others, in jnp. The thresholds are set apart (set_thresholds); cats_jax.decode.prepare then
        builds the decode weights and picks the kernels."""
        if mode not in sparsity.MODES:
            raise ValueError(f"unknown sparsity mode {mode!r} (choose from {', '.join(sparsity.MODES)})")
        sites = sparsity.MODES[mode]
        self.set_mlp_impl("cats-jnp" if sparsity.CATS_SITE in sites else "dense")
        for layer in self.layers:
            for name in ("attn", "mlp"):
                teal = (s for s in sites if s in sparsity.TEAL_SITES and s.startswith(name + "."))
                getattr(layer, name).sparse_inputs = tuple(s.split(".")[1] for s in teal)

    def set_criterion(self, criterion: str, layers=None, factors=None):
        """What every site compares with its threshold (sparsity.CRITERIA): weighted derives each
        projection's input factors from its weights now (rederive after changing the weights; of
        `layers` only, when given); up-rms takes the CATS neurons' factors, fp32 [layers, I]."""
        if criterion not in sparsity.CRITERIA:
            raise ValueError(f"unknown selection criterion {criterion!r} (choose from {', '.join(sparsity.CRITERIA)})")
        if (criterion == "up-rms") != (factors is not None):
            raise ValueError("the up-rms criterion takes its factors [layers, intermediate] (calibrated), "
                             "and only it takes factors")
        if factors is not None:
            want = (len(self.layers), self.cfg.intermediate_size)
            if layers is not None or np.shape(factors) != want:
                raise ValueError(f"up-rms factors {np.shape(factors)} for the whole model; expected {want}")
            for layer, f in zip(self.layers, np.asarray(factors, np.float32)):
                layer.mlp.input_factor["down_proj"][...] = jnp.asarray(f)
        for layer in self.layers if layers is None else layers:
            for module in (layer.attn, layer.mlp):
                module.criterion = criterion
                if criterion == "weighted":
                    for proj, factor in module.input_factor.items():
                        factor[...] = sparsity.weight_factors(weight(getattr(module, proj)))

    @property
    def criterion(self) -> str:
        return self.layers[0].mlp.criterion

    @property
    def sites(self) -> tuple[str, ...]:
        """The sites this model thresholds now (see set_mode)."""
        layer = self.layers[0]
        cats = (sparsity.CATS_SITE,) if layer.mlp.impl != "dense" else ()
        return cats + tuple(f"{m}.{p}" for m in ("attn", "mlp") for p in getattr(layer, m).sparse_inputs)

    def set_thresholds(self, site: str, thresholds):
        """One threshold per layer for `site` (sparsity.CATS_SITE or one of sparsity.TEAL_SITES)."""
        thresholds = np.asarray(thresholds, np.float32)
        if thresholds.shape != (len(self.layers),):
            raise ValueError(
                f"{site} thresholds have shape {thresholds.shape}, this model needs one per layer ({len(self.layers)},)"
            )
        for layer, t in zip(self.layers, thresholds):
            site_threshold(layer, site)[...] = jnp.asarray(t)

    def set_mlp_impl(self, impl: str):
        if impl not in sparsity.MLP_IMPLS:
            raise ValueError(f"unknown MLP implementation {impl!r} (choose from {sparsity.MLP_IMPLS})")
        for layer in self.layers:
            layer.mlp.impl = impl

    def set_cats_thresholds(self, thresholds):
        self.set_thresholds(sparsity.CATS_SITE, thresholds)


def forward(graphdef, state, tokens, positions, cache=None):
    """Pure forward over (graphdef, state) for jitted loops: no nnx.jit bookkeeping per call."""
    return nnx.merge(graphdef, state)(tokens, positions, cache)


def init_random(cfg: ModelConfig, seed: int = 0, dtype=jnp.bfloat16) -> Transformer:
    """A model with random weights (benchmarks and tests)."""
    return Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(seed))


def from_params(cfg: ModelConfig, params: dict) -> Transformer:
    """The model of config cfg holding params (nnx.to_pure_dict of its nnx.Param state; the float
    weights' dtype is the model's), its other state (thresholds: 0, dense) at initial values."""
    model = nnx.eval_shape(lambda: Transformer(cfg, dtype=params["embed"]["embedding"].dtype, rngs=nnx.Rngs(0)))
    param_state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(param_state, params)
    nnx.update(model, param_state)
    other = nnx.state(model, nnx.Not(nnx.Param))
    nnx.update(model, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), other))
    return model


def quantize_model(model: Transformer, head: bool = False) -> Transformer:
    """The int8 copy of a float model (cats_jax.quantize; weights on the model's device; head: its
    LM head too), dense; the model itself is unchanged."""
    params = quantize.quantize_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), head)
    return from_params(quantize.quantized_config(model.cfg, head=head), params)
