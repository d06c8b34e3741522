"""LoRA adapters on the model's linear layers: add, fold into the weights.

y = x W + (alpha / rank) * dropout(x) A B, with A [in, r], B [r, out] as nnx.LoRAParam (so an
optimizer can select them with that filter). B starts at zero: a freshly adapted model computes
exactly what the base model does. The base nnx.Linear is kept whole inside the adapter and is
never touched by training; `merge_lora` folds A B into it and puts it back in place.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from cats_jax.model import Transformer

f32 = jnp.float32
ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
CATS_TARGETS = ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")  # the CATS paper's recipe

# PyTorch's kaiming_uniform(a=sqrt(5)) as peft initialises A: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_init_a = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class LoRALinear(nnx.Module):
    def __init__(self, base: nnx.Linear, rank: int, alpha: float, dropout: float, rngs: nnx.Rngs):
        self.base = base
        # fp32 always: these are the trained weights, the optimizer keeps its state in their dtype.
        self.lora_a = nnx.LoRAParam(_init_a(rngs.params(), (base.in_features, rank), f32))
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, base.out_features), f32))
        self.scale = alpha / rank
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x, preferred_element_type=None):
        """preferred_element_type: the output dtype, as for jnp.dot (the CATS MLP asks for an fp32
        gate so that its threshold test does not see bf16 rounding)."""
        if preferred_element_type is None:
            y = self.base(x)
        else:
            y = jnp.dot(x, self.base.kernel[...], preferred_element_type=preferred_element_type)
        a, b = self.lora_a[...].astype(x.dtype), self.lora_b[...].astype(x.dtype)
        return y + ((self.dropout(x) @ a @ b) * jnp.asarray(self.scale, x.dtype)).astype(y.dtype)

    def delta(self):
        """The update A B * scale as a dense [in, out] fp32 matrix."""
        return (self.lora_a[...].astype(f32) @ self.lora_b[...].astype(f32)) * self.scale


def _sites(model: Transformer, targets):
    """(parent module, attribute name) of every targeted linear layer."""
    unknown = set(targets) - set(ATTN_TARGETS) - set(MLP_TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)} (choose from {ATTN_TARGETS + MLP_TARGETS})")
    for layer in model.layers:
        for parent, names in ((layer.attn, ATTN_TARGETS), (layer.mlp, MLP_TARGETS)):
            for name in names:
                if name in targets:
                    yield parent, name


def apply_lora(model: Transformer, rank: int = 64, alpha: float = 16.0, dropout: float = 0.1,
               targets=CATS_TARGETS, seed: int = 0) -> Transformer:
    """Wrap the targeted linear layers of `model` (in place) in LoRA adapters."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
    for parent, name in _sites(model, targets):
        base = getattr(parent, name)
        if isinstance(base, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter")
        setattr(parent, name, LoRALinear(base, rank, alpha, dropout, rngs))
    return model


def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its base weight (in fp32, then cast to the base dtype) and unwrap
    it, leaving a plain Transformer whose params have the checkpoint layout."""
    for parent, name in _sites(model, ATTN_TARGETS + MLP_TARGETS):
        lora = getattr(parent, name)
        if isinstance(lora, LoRALinear):
            kernel = lora.base.kernel
            kernel[...] = (kernel[...].astype(f32) + lora.delta()).astype(kernel.dtype)
            setattr(parent, name, lora.base)
    return model

