"""Llama / Mistral decoder in Flax NNX, with a KV cache and a pluggable (CATS) gated MLP.

Shapes: B batch, T tokens in this call, S cache slots, H hidden, I intermediate, N query heads,
K kv heads, D head dim, V vocab. Weights use the Flax layout [in, out].

Positions are per row: row b's token t sits at positions[b, t], and its key/value go to cache
slot positions[b, t]. Prompts of different lengths are right-padded; the causal test
(slot <= query position) never lets a real token see a padding slot, and decode overwrites
padding slots before any query can reach them.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cats_jax import sparsity
from cats_jax.config import ModelConfig
from pallas_kernels import cats_mlp, sparse_gemv

f32 = jnp.float32
Cache = list  # per layer: (k [B, S, K, D], v [B, S, K, D])


class Threshold(nnx.Variable):
    """A calibrated sparsity threshold: model state that is saved and loaded, never trained."""


class Activation(nnx.Variable):
    """What a sparse site tests, whole: a CATS MLP's activation a (fp32 [B, T, I], "act") or a
    TEAL projection's input ("<proj>_input"), sown only under nnx.capture(fn, Activation):
    calibration takes its |.| quantiles (cats_jax.calibrate, cats_jax.teal).
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


def _input_thresholds(projs) -> nnx.Dict:
    return nnx.Dict({p: Threshold(jnp.zeros((), f32)) for p in projs})


def _sparse_input(module, proj: str, x):
    """The input of module.<proj>: TEAL's rule with its threshold if proj is one of the module's
    `sparse_inputs` (static), else x untouched. Under nnx.capture it sows x (Activation, for
    calibration) and the per-token fraction of kept inputs [B, T] (nnx.Intermediate)."""
    if proj not in module.sparse_inputs:
        return x
    module.sow(Activation, f"{proj}_input", x, capture_noop=True)
    x = sparsity.teal_input(x, module.input_threshold[proj][...])
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
        raise ValueError(f"unknown sparsity site {site!r} (known: {sparsity.CATS_SITE}, {', '.join(sparsity.TEAL_SITES)})")
    module, proj = site.split(".")
    return getattr(layer, module).input_threshold[proj]


QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


def _kernel_threshold(module, proj: str):
    """A TEAL site's threshold for the sparse GEMV kernel; -1 (keep every input) if proj is not sparse."""
    return module.input_threshold[proj][...] if proj in module.sparse_inputs else jnp.full((), -1.0, f32)


def _teal_kernel_step(module, x, w_shape) -> bool:
    """Whether x @ w runs the TEAL sparse GEMV kernel: a decode step (one token per row) of a
    module set to use the kernels, with few enough rows and a large enough w (sparse_gemv.kernel_pays)."""
    return module.teal_kernels and x.shape[1] == 1 and sparse_gemv.kernel_pays(x.shape[0], *w_shape)


def _fuse(module, projs: tuple[str, ...], name: str):
    """Hold the kernels of module.<projs> as one [in, sum(out)] Param module.<name>, in place
    (the projections become None). Adapters (train.lora) must be merged first."""
    lins = [getattr(module, p) for p in projs]
    if not all(type(lin) is nnx.Linear for lin in lins):
        raise ValueError(f"cannot fuse {', '.join(projs)}: not plain Linear layers (merge LoRA adapters first)")
    setattr(module, name, nnx.Param(jnp.concatenate([lin.kernel[...] for lin in lins], axis=1)))
    for p in projs:
        setattr(module, p, None)


def _unfuse(module, projs: tuple[str, ...], name: str, sizes: tuple[int, ...]):
    """Undo _fuse: plain Linear layers module.<projs> again, module.<name> None."""
    w = getattr(module, name)[...]
    for p, wp in zip(projs, jnp.split(w, list(itertools.accumulate(sizes))[:-1], axis=1)):
        lin = nnx.Linear(*wp.shape, use_bias=False, dtype=wp.dtype, param_dtype=wp.dtype,
                         kernel_init=nnx.initializers.zeros_init(), rngs=nnx.Rngs(0))
        lin.kernel.set_value(wp)
        setattr(module, p, lin)
    setattr(module, name, None)


def _fused_outputs(module, projs: tuple[str, ...], w, sizes: tuple[int, ...], x):
    """The outputs of projections `projs` held fused as w = [W_a | W_b | ...] (column widths
    `sizes`), each reading its own TEAL input of x [B, T, in]: on TEAL kernel steps one sparse GEMV
    with a threshold per segment; with no thresholded input one matmul; else one per projection."""
    cuts = list(itertools.accumulate(sizes))[:-1]
    if _teal_kernel_step(module, x, w.shape):
        b, t, h = x.shape
        thr = [_kernel_threshold(module, p) for p in projs]  # apart: stacking them costs an XLA kernel per step
        y = sparse_gemv.sparse_gemv(x.reshape(b, h), w, thr, segments=sizes).reshape(b, t, -1)
        return jnp.split(y, cuts, axis=-1)
    if not set(projs) & set(module.sparse_inputs):
        return jnp.split(jnp.dot(x, w), cuts, axis=-1)
    return [jnp.dot(_sparse_input(module, p, x), wp) for p, wp in zip(projs, jnp.split(w, cuts, axis=1))]


def _projection(module, proj: str, x, n_out: int):
    """module.<proj> of its TEAL input of x [B, T, in]: one sparse GEMV on TEAL kernel steps.
    n_out: the output width (from the config: a LoRA adapter has no out_features)."""
    b, t, n_in = x.shape
    if _teal_kernel_step(module, x, (n_in, n_out)):
        w = getattr(module, proj).kernel[...]
        return sparse_gemv.sparse_gemv(x.reshape(b, n_in), w, _kernel_threshold(module, proj)).reshape(b, t, n_out)
    return getattr(module, proj)(_sparse_input(module, proj, x))


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = _linear(h, cfg.num_heads * d, dtype, rngs)
        self.k_proj = _linear(h, cfg.num_kv_heads * d, dtype, rngs)
        self.v_proj = _linear(h, cfg.num_kv_heads * d, dtype, rngs)
        self.o_proj = _linear(cfg.num_heads * d, h, dtype, rngs)
        self.qkv = nnx.data(None)  # fuse_qkv(): the q/k/v kernels as one [H, (N + 2K) D] Param
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.cfg = cfg  # static (hashable); RoPE frequencies are derived from it at trace time
        # TEAL: the projections whose inputs are thresholded (static), each with its own threshold
        self.sparse_inputs: tuple[str, ...] = ()
        self.input_threshold = _input_thresholds(("q_proj", "k_proj", "v_proj", "o_proj"))
        self.teal_kernels = False  # static: decode steps through pallas_kernels.sparse_gemv

    def fuse_qkv(self):
        """Hold q/k/v as one [H, (N + 2K) D] matrix, in place, once: one GEMV per step instead of
        three. At batch 1 XLA also rewrites the narrow k and v GEMVs as a multiply that writes the
        whole [H, K D] product, then a reduction (measured: ~25 us per layer on an H100, Mistral-7B
        shapes); the fused GEMV stays one matmul. TEAL's kernel then reads x once for its three
        thresholds. LoRA targets q/k/v by name: fine-tune an unfused model."""
        if self.qkv is None:
            _fuse(self, QKV, "qkv")

    def _qkv(self, x):
        """q [B, T, N D], k, v [B, T, K D] of the (normed) input x, each projection reading its TEAL input."""
        if self.qkv is None:
            return tuple(getattr(self, p)(_sparse_input(self, p, x)) for p in QKV)
        n, k, d = self.num_heads, self.num_kv_heads, self.head_dim
        return tuple(_fused_outputs(self, QKV, self.qkv[...], (n * d, k * d, k * d), x))

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
        q = apply_rope(q.reshape(b, t, n, d), positions, rope_inv_freq(self.cfg))
        key = apply_rope(key.reshape(b, t, k, d), positions, rope_inv_freq(self.cfg))
        val = val.reshape(b, t, k, d)
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
        return _projection(self, "o_proj", out.reshape(b, t, n * d).astype(x.dtype), self.cfg.hidden_size), kv


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)). `impl` (static, one of sparsity.MLP_IMPLS) picks
    dense SiLU, the CATS activation in jnp, or the Pallas decode kernel ("cats-pallas": decode
    steps of up to cats_mlp.MAX_KERNEL_BATCH rows on GPU; prefill and the CPU take the jnp path).
    `sparse_inputs` (static): the projections whose inputs TEAL thresholds (jnp path).

    `neuron_major` (static): gate_proj / up_proj kernels are held transposed, [I, H], so that each
    neuron's weights are one contiguous row the kernel can skip. `set_neuron_major` flips it in
    place (set_mlp_impl("cats-pallas") does); every jnp path reads either layout.
    `teal_kernels` (static, set_mode(..., "pallas")): TEAL decode steps run sparse GEMVs, gate
    and up fused into one [H, 2I] matrix (fuse_gate_up). Checkpoints hold the Flax layout [H, I]:
    do not save the params of a prepared model."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.gate_proj = _linear(cfg.hidden_size, cfg.intermediate_size, dtype, rngs)
        self.up_proj = _linear(cfg.hidden_size, cfg.intermediate_size, dtype, rngs)
        self.down_proj = _linear(cfg.intermediate_size, cfg.hidden_size, dtype, rngs)
        self.threshold = Threshold(jnp.zeros((), f32))
        self.impl = "dense"
        self.neuron_major = False
        self.sparse_inputs: tuple[str, ...] = ()
        self.input_threshold = _input_thresholds(("gate_proj", "up_proj", "down_proj"))
        self.teal_kernels = False  # static: TEAL decode steps through pallas_kernels.sparse_gemv
        self.gate_up = nnx.data(None)  # fuse_gate_up(): [H, 2I]
        self.hidden_size, self.intermediate_size = cfg.hidden_size, cfg.intermediate_size

    def fuse_gate_up(self):
        """Hold gate and up as one [H, 2I] matrix, in place: TEAL's decode step is then one sparse
        GEMV with two thresholds (H200, Mistral-7B shapes, 50%: 46.5 us against 2 x 26.8 us)."""
        self.set_neuron_major(False)
        if self.gate_up is None:
            _fuse(self, GATE_UP, "gate_up")

    def unfuse_gate_up(self):
        if self.gate_up is not None:
            _unfuse(self, GATE_UP, "gate_up", (self.intermediate_size,) * 2)

    def set_neuron_major(self, neuron_major: bool):
        """Transpose gate and up kernels to [I, H] (or back), in place, only if the layout changes
        (unfusing gate|up first). Each old matrix is dropped as soon as its transpose exists."""
        if neuron_major:
            self.unfuse_gate_up()
        if self.neuron_major != neuron_major:
            for lin in (self.gate_proj, self.up_proj):
                lin.kernel.set_value(jnp.transpose(lin.kernel[...]))
            self.neuron_major = neuron_major

    def _in_proj(self, lin, x, **kw):
        if self.neuron_major:
            return jnp.einsum("...h,ih->...i", x, lin.kernel[...], **kw)
        if not isinstance(lin, nnx.Linear):  # an adapter (train.lora.LoRALinear) computes its own output
            return lin(x, **kw)
        return jnp.dot(x, lin.kernel[...], **kw) if kw else lin(x)

    def __call__(self, x):
        b, t, _ = x.shape
        # the kernel applies the CATS rule only: TEAL input thresholds on this MLP take the jnp path
        if self.impl == "cats-pallas" and t == 1 and not self.sparse_inputs and cats_mlp.kernel_pays(b):
            return self._decode_kernel(x)
        if self.impl == "dense":
            g, u = self._gate_up(x)
            return _projection(self, "down_proj", jax.nn.silu(g) * u, self.hidden_size)
        if self.gate_up is not None:
            raise ValueError("CATS reads gate_proj / up_proj apart: call unfuse_gate_up() (set_mlp_impl does)")
        xg, xu = _sparse_input(self, "gate_proj", x), _sparse_input(self, "up_proj", x)
        # fp32 gate: the threshold test must not depend on the bf16 rounding of x W_gate
        # (the Pallas kernel and sparsity.gated_mlp test the fp32 value too)
        g = self._in_proj(self.gate_proj, xg, preferred_element_type=f32)
        a = sparsity.cats_activation(g, self.threshold[...])
        # Measured sparsity: the per-token fraction of kept neurons [B, T], recorded only
        # under nnx.capture(nnx.Intermediate) (generation uses it); a no-op otherwise.
        self.sow(nnx.Intermediate, "active_fraction", sparsity.active_fraction(a, axis=-1), capture_noop=True)
        self.sow(Activation, "act", a, capture_noop=True)
        return _projection(self, "down_proj", a.astype(x.dtype) * self._in_proj(self.up_proj, xu), self.hidden_size)

    def _gate_up(self, x):
        """x W_gate and x W_up, each of its TEAL input: through the kernel on TEAL decode steps."""
        if self.gate_up is not None:
            return _fused_outputs(self, GATE_UP, self.gate_up[...], (self.intermediate_size,) * 2, x)
        return [self._in_proj(getattr(self, p), _sparse_input(self, p, x)) for p in GATE_UP]

    def _decode_kernel(self, x):
        if not self.neuron_major:
            raise ValueError("the cats-pallas kernel needs neuron-major weights: call Transformer.prepare_for_kernel()")
        b, _, h = x.shape
        y, hidden = cats_mlp.cats_mlp(x.reshape(b, h), self.gate_proj.kernel[...], self.up_proj.kernel[...],
                                      self.down_proj.kernel[...], self.threshold[...])
        # kept neurons are the non-zeros of a * u (u == 0 exactly is vanishingly rare)
        self.sow(nnx.Intermediate, "active_fraction", sparsity.active_fraction(hidden, axis=-1)[:, None], capture_noop=True)
        return y.reshape(x.shape)


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
        """fp32 logits of hidden states [..., H]."""
        w = self.embed.embedding[...].T if self.lm_head is None else self.lm_head.kernel[...]
        return jnp.dot(h, w, preferred_element_type=f32)

    def __call__(self, tokens, positions=None, cache: Cache | None = None):
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        h, cache = self.hidden(tokens, positions, cache)
        return self.logits(h), cache

    # ---- sparsity settings --------------------------------------------------------------
    def set_mode(self, mode: str, impl: str = "jnp"):
        """Threshold the sites of `mode` (sparsity.MODES: dense, cats, teal, cats+teal-attn) and
        no others, computed by `impl`: "jnp" (the reference, any device) or "pallas" (GPU kernels
        for decode steps: the CATS MLP kernel, TEAL's sparse GEMVs; prefill and the CPU stay on
        jnp). The thresholds are set apart (set_thresholds)."""
        if mode not in sparsity.MODES:
            raise ValueError(f"unknown sparsity mode {mode!r} (choose from {', '.join(sparsity.MODES)})")
        if impl not in ("jnp", "pallas"):
            raise ValueError(f"unknown sparsity implementation {impl!r} (choose from jnp, pallas)")
        sites = sparsity.MODES[mode]
        self.set_mlp_impl(f"cats-{impl}" if sparsity.CATS_SITE in sites else "dense")
        for layer in self.layers:
            for name in ("attn", "mlp"):
                module = getattr(layer, name)
                teal = (s for s in sites if s in sparsity.TEAL_SITES and s.startswith(name + "."))
                module.sparse_inputs = tuple(s.split(".")[1] for s in teal)
                module.teal_kernels = impl == "pallas" and bool(module.sparse_inputs)
            if layer.attn.teal_kernels:
                layer.attn.fuse_qkv()  # the kernel reads x once for q, k and v
            if layer.mlp.teal_kernels:
                layer.mlp.fuse_gate_up()  # the kernel reads x once for gate and up

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
            if impl != "dense":
                layer.mlp.unfuse_gate_up()
        if impl == "cats-pallas":
            self.prepare_for_kernel()

    def prepare_for_kernel(self):
        """Neuron-major gate/up weights for the Pallas MLP kernel (see MLP); in place, once."""
        for layer in self.layers:
            layer.mlp.set_neuron_major(True)

    def prepare_for_decode(self):
        """Inference layout, in place: q/k/v fused (Attention.fuse_qkv). Generation and the
        benchmarks call it; training and LoRA want the separate projections."""
        for layer in self.layers:
            layer.attn.fuse_qkv()

    def set_cats_thresholds(self, thresholds):
        self.set_thresholds(sparsity.CATS_SITE, thresholds)


def forward(graphdef, state, tokens, positions, cache=None):
    """Pure forward over (graphdef, state) for jitted loops: no nnx.jit bookkeeping per call."""
    return nnx.merge(graphdef, state)(tokens, positions, cache)


def init_random(cfg: ModelConfig, seed: int = 0, dtype=jnp.bfloat16) -> Transformer:
    """A model with random weights (benchmarks and tests)."""
    return Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
