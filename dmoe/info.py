"""`launch.py info`: what a .m file holds, read from its header alone (nothing is loaded)."""

from __future__ import annotations

import os
from collections import Counter

from dmoe.modelfile import ModelFile


def describe(path: str) -> str:
    with ModelFile(path) as mf:
        cfg = mf.config
        meta = mf.metadata
        types: Counter[str] = Counter()
        sizes: Counter[str] = Counter()
        for t in mf.tensors.values():
            types[t.qtype.name] += 1
            sizes[t.qtype.name] += t.nbytes
        active = sum(t.nbytes // (cfg.num_experts if "_exps" in n else 1) * (cfg.num_experts_per_tok if "_exps" in n
                                                                              else 1)
                     for n, t in mf.tensors.items() if n != "token_embd.weight")
        template = meta.get("tokenizer.chat_template")
        lines = [
            f"file            {path} ({os.path.getsize(path) / 1e9:.2f} GB, GGUF v3)",
            f"name            {meta.get('general.name', '?')}",
            f"architecture    {meta['general.architecture']} (Qwen3-MoE)",
            f"layers          {cfg.num_hidden_layers}",
            f"hidden          {cfg.hidden_size}",
            f"heads           {cfg.num_attention_heads} query, {cfg.num_key_value_heads} KV, head_dim {cfg.head_dim}",
            f"experts         {cfg.num_experts}, top-{cfg.num_experts_per_tok}, FFN {cfg.moe_intermediate_size}, "
            f"renormalised top-k: {'yes' if cfg.norm_topk_prob else 'no'}",
            f"vocab           {cfg.vocab_size}" + (" (tied embeddings)" if cfg.tie_word_embeddings else ""),
            f"context         {cfg.max_position_embeddings}, rope theta {cfg.rope_theta:g}, "
            f"rms eps {cfg.rms_norm_eps:g}",
            "tensors         " + ", ".join(f"{n} x{types[n]} ({sizes[n] / 1e9:.2f} GB)" for n in sorted(types)),
            f"read per token  {active / 1e9:.3f} GB of weights (attention, router, 8 experts, output)",
            "tokenizer       " + ("yes (HF tokenizer.json inside)" if "tokenizer.huggingface.json" in meta
                                  else "yes (ggml vocabulary)" if "tokenizer.ggml.tokens" in meta else "no"),
            f"chat template   {'yes' if template else 'no'}",
        ]
        return "\n".join(lines)
