"""Regenerate the golden fixtures of tests/test_model_vs_hf.py with HF transformers (torch).

    /work/oracle311/bin/python scripts/make_golden.py            # everything
    /work/oracle311/bin/python scripts/make_golden.py --only tiny

torch is not a dependency of cats-jax: run this with a separate venv that has torch,
transformers>=5, gguf and accelerate. It writes:

  tests/fixtures/tiny_{llama2,llama3,mistral}/   tiny random HF checkpoints (config.json, fp32
      safetensors; llama3 sharded with an index) + golden_logits.npz (tokens, fp32 logits), the
      logits computed by transformers loading that very directory.
  tests/fixtures/smollm2_golden.json, smollm2_logits.npz   transformers loading the SmolLM2 GGUF
      (gguf_file=, dequantized to fp32): chat-template prompt ids, greedy continuations, and fp32
      logits at a few positions.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cats_jax import hub  # noqa: E402  (stdlib only: importable from this py3.11 torch venv)

FIXTURES = ROOT / "tests" / "fixtures"
SEQ_LEN = 24  # longer than the Mistral sliding window, so the window really masks something

_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, rms_norm_eps=1e-5)
TINY = {
    # Llama-2 style: multi-head attention, untied head, plain RoPE.
    "llama2": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0,
                   max_position_embeddings=256, tie_word_embeddings=False, **_COMMON),
    # Llama-3.x style: GQA, llama3 rope scaling with bands that all occur at head_dim 16, tied head
    # (as Llama-3.2-1B). Sharded, and config.json in the pre-transformers-5 spelling of the hub.
    "llama3": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=64),
                   max_position_embeddings=512, tie_word_embeddings=True, **_COMMON),
    # Mistral: GQA and a sliding window shorter than SEQ_LEN.
    "mistral": dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                    sliding_window=8, max_position_embeddings=256, tie_word_embeddings=False, **_COMMON),
}

SMOLLM2_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the ocean.",
    "Give me three tips for learning to program.",
]
SMOLLM2_NEW_TOKENS = 24


def _spread_weights(model: torch.nn.Module, seed: int) -> None:
    """HF's init (std 0.02, norms 1) gives near-uniform logits that hide mapping bugs: use unit-scale
    activations (std 1/sqrt(fan_in)) and norm scales != 1 instead."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def _legacy_config(path: Path) -> None:
    """Rewrite config.json as hub checkpoints from before transformers 5 spell it (rope_theta and
    rope_scaling at top level), so the converter is tested on what it mostly meets."""
    cfg = json.loads(path.read_text())
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    cfg["rope_scaling"] = rp
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def make_tiny(name: str, spec: dict, seed: int) -> None:
    out = FIXTURES / f"tiny_{name}"
    shutil.rmtree(out, ignore_errors=True)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**spec), dtype=torch.float32)
    _spread_weights(model, seed)
    model.save_pretrained(out, max_shard_size="100KB" if name == "llama3" else "50MB")
    if name == "llama3":
        _legacy_config(out / "config.json")
    # The golden side is transformers reading back exactly the files the converter will read.
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, spec["vocab_size"], (2, SEQ_LEN), generator=g)
    with torch.no_grad():
        logits = model(tokens).logits.float().numpy()
    np.savez_compressed(out / "golden_logits.npz", tokens=tokens.numpy().astype(np.int32), logits=logits)
    print(f"{out.relative_to(ROOT)}: {sorted(p.name for p in out.iterdir())}")


def make_smollm2() -> None:
    gguf = hub.smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    prompt_ids, greedy_ids, texts, rows, where = [], [], [], [], []
    for i, prompt in enumerate(SMOLLM2_PROMPTS):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_dict=True, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(ids).logits[0].float().numpy()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=SMOLLM2_NEW_TOKENS,
                                 do_sample=False, eos_token_id=model.config.eos_token_id)
        new = out[0, ids.shape[1]:].tolist()
        positions = [ids.shape[1] // 2, ids.shape[1] - 1] if i == 0 else [ids.shape[1] - 1]
        for p in positions:
            rows.append(logits[p])
            where.append([i, p])
        prompt_ids.append(ids[0].tolist())
        greedy_ids.append(new)
        texts.append(tok.decode(new, skip_special_tokens=True))
        print(f"{prompt!r} -> {texts[-1]!r}")
    np.savez_compressed(FIXTURES / "smollm2_logits.npz", logits=np.stack(rows).astype(np.float32),
                        where=np.array(where, np.int32))
    golden = {
        "gguf": gguf.name, "sha256": hub.SMOLLM2_SHA256, "prompts": SMOLLM2_PROMPTS,
        "prompt_ids": prompt_ids, "greedy_ids": greedy_ids, "greedy_text": texts,
        "chat_template": tok.chat_template,
    }
    (FIXTURES / "smollm2_golden.json").write_text(json.dumps(golden, indent=1) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("tiny", "smollm2"), help="regenerate only this group")
    args = ap.parse_args()
    FIXTURES.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "tiny"):
        for seed, (name, spec) in enumerate(TINY.items()):
            make_tiny(name, spec, seed)
    if args.only in (None, "smollm2"):
        make_smollm2()


if __name__ == "__main__":
    main()
