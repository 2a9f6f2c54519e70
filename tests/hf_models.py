"""Small random Qwen3MoeForCausalLM checkpoints, made by transformers itself, for the tests.

The configs vary every dimension that can vary: head_dim (also larger than hidden/heads, as in
the real models), GQA ratio (1, 2, 6, 4), expert count, top-k, norm_topk_prob, tied
embeddings, rope theta; they are saved as f32 or bf16, in one shard or several. Weights are
drawn wider than HF's initialiser so that logits and router choices are decisive (no
near-ties for two implementations to break differently).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

CONFIGS: dict[str, dict] = {
    # GQA 2, head_dim 32, top-2 of 8, renormalised
    "a": dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=32, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
              tie_word_embeddings=False, rope_theta=10000.0, dtype="float32", shards=1),
    # GQA 6, head_dim 16, top-3 of 6, not renormalised, tied embeddings, bf16 in three shards
    "b": dict(vocab_size=320, hidden_size=96, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=1,
              head_dim=16, moe_intermediate_size=64, num_experts=6, num_experts_per_tok=3, norm_topk_prob=False,
              tie_word_embeddings=True, rope_theta=1_000_000.0, dtype="bfloat16", shards=3),
    # MHA (GQA 1), head_dim 64, top-8 of 16
    "c": dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8,
              head_dim=64, moe_intermediate_size=32, num_experts=16, num_experts_per_tok=8, norm_topk_prob=True,
              tie_word_embeddings=False, rope_theta=500_000.0, dtype="float32", shards=2),
    # Qwen3's proportions: head_dim 128 > hidden/heads, GQA 4, top-4 of 12
    "d": dict(vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
              head_dim=128, moe_intermediate_size=64, num_experts=12, num_experts_per_tok=4, norm_topk_prob=True,
              tie_word_embeddings=False, rope_theta=1_000_000.0, dtype="float32", shards=1),
    # every width a multiple of 256, so every matrix can take a K-quant (the hub files' types)
    "k": dict(vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=64, moe_intermediate_size=512, num_experts=16, num_experts_per_tok=2, norm_topk_prob=True,
              tie_word_embeddings=False, rope_theta=1_000_000.0, dtype="float32", shards=1),
}


def make_checkpoint(name: str, directory: str, seed: int = 0) -> str:
    """Write config `name` as a HF checkpoint directory; returns the directory."""
    spec = dict(CONFIGS[name])
    dtype, shards = spec.pop("dtype"), spec.pop("shards")
    theta = spec.pop("rope_theta")
    cfg = Qwen3MoeConfig(**spec, rope_parameters={"rope_type": "default", "rope_theta": theta},
                         max_position_embeddings=512, rms_norm_eps=1e-6)
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim == 1:  # norms: around 1, not exactly 1, so a wrong norm weight shows
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "mlp.gate" in pname:  # router: spread logits, decisive top-k
                p.copy_(torch.randn(p.shape, generator=gen) * 2.0 / p.shape[-1] ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    model = model.to(getattr(torch, dtype))
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(directory, max_shard_size=size // shards + 1 if shards > 1 else "10GB")
    return directory


def load_reference(directory: str) -> Qwen3MoeForCausalLM:
    """The checkpoint in transformers, in float32, eager attention."""
    model = Qwen3MoeForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def reference_logits(model: Qwen3MoeForCausalLM, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def hf_tensors(directory: str) -> dict[str, np.ndarray]:
    """Every tensor of the saved checkpoint as float32 (bf16 widened exactly)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(directory)):
        if f.endswith(".safetensors"):
            out.update({k: v.float().numpy() for k, v in load_file(os.path.join(directory, f)).items()})
    return out


def reference_on_file_weights(directory: str, model_path: str) -> Qwen3MoeForCausalLM:
    """The transformers model of `directory` with every weight replaced by the .m file's dequantised
    tensor: the reference for quantised files (it isolates our compute from the format's rounding)."""
    from scripts.train_demo import load_file_weights  # imported late: it sets the torch thread policy

    model = load_reference(directory)
    load_file_weights(model, model_path)
    return model

