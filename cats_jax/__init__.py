"""cats-jax: CATS and TEAL activation sparsity for Llama / Mistral decode in JAX.

    import cats_jax
    lm = cats_jax.load("checkpoints/smollm2", sparsity=0.5)  # thresholds.json's level 0.5
    print(lm.generate("What is the capital of France?", chat=True))

Thin wrappers over cats_jax.generate (load, generate_text); the
submodules hold the rest. Importing this package imports nothing heavy (cats_jax.hub runs in a
venv without jax).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class LM:
    """A loaded checkpoint: the model (thresholds applied, if any) and its tokenizer."""

    model: Any  # cats_jax.decode.Decoder: the model prepared once for generation
    tokenizer: Any  # the checkpoint's HF tokenizer
    ckpt: Path

    def generate(self, prompt: str | list[str], max_new_tokens: int = 256, *, chat: bool = False,
                 system: str | None = None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 repetition_penalty: float = 1.0, stop: tuple[str, ...] = (), seed: int = 0) -> str | list[str]:
        """The completion of a prompt (a list of them: one completion each, generated as a batch).
        temperature 0 is greedy; chat wraps each prompt in the tokenizer's chat template."""
        from cats_jax.generate import generate_text
        from cats_jax.sampling import Sampling

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        texts, _ = generate_text(self.model, self.tokenizer, prompts, max_new_tokens,
                                 Sampling(temperature, top_k, top_p, repetition_penalty), chat=chat, system=system,
                                 stop=tuple(stop), seed=seed)
        return texts[0] if isinstance(prompt, str) else texts


def load(ckpt: str | Path, sparsity: float | None = None, *, mode: str | None = None, impl: str = "jnp",
         dtype: str = "bfloat16", criterion: str | None = None, allow_quantization_mismatch: bool = False,
         tp: int = 1) -> LM:
    """Load a converted checkpoint, dense or at a calibrated `sparsity` of its thresholds.json.

    mode: the sparsity sites (default: the calibration's method, "cats" or "teal"); impl "jnp" (any
    device) or "pallas" (GPU kernels for decode steps); dtype "bfloat16" or "float32" (float32
    reproduces the HF transformers reference's greedy text); criterion: the selection criterion
    (sparsity.CRITERIA) the thresholds must have (default: theirs); allow_quantization_mismatch:
    apply thresholds of the same weights at another quantization (the bf16 model's on its int8 copy);
    tp > 1: tensor parallel over the first tp devices, the weights loaded layer by layer."""
    from cats_jax import cli, generate

    cli.quiet()  # transformers' banner and orbax's warnings tell a caller nothing either
    decoder, tokenizer = generate.load(ckpt, sparsity, mode=mode, impl=impl, dtype=dtype, criterion=criterion,
                                       allow_quantization_mismatch=allow_quantization_mismatch, tp=tp)
    return LM(decoder, tokenizer, Path(ckpt))


__all__ = ["LM", "load"]
