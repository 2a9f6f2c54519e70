"""`launch.py info`: what a .m file holds, read from its header alone (nothing is loaded)."""

from __future__ import annotations

import os
from collections import Counter

from dmoe.mixes import FILE_TYPES
from dmoe.modelfile import ModelFile

_ROLES = ("token_embd", "output", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_inp", "ffn_gate_exps",
          "ffn_up_exps", "ffn_down_exps")


def mix(mf: ModelFile) -> list[str]:
    """Types by tensor role, e.g. `ffn_down_exps   Q4_K x24, Q6_K x24` (norms left out: F32 in any file)."""
    by_role: dict[str, Counter[str]] = {}
    for name, t in mf.tensors.items():
        role = name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]
        by_role.setdefault(role, Counter())[t.qtype.name] += 1
    return [f"  {role:<16}" + ", ".join(f"{qt} x{n}" if len(by_role[role]) > 1 or n > 1 else qt
                                      for qt, n in sorted(by_role[role].items()))
            for role in _ROLES if role in by_role]


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
        ftype = meta.get("general.file_type")
        names = [n for n, f in FILE_TYPES.items() if f.ftype == ftype]  # llama.cpp's name first (q4_0, not q40)
        ftype_name = max(names, key=lambda n: "_" in n).upper() if names else None
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
            f"file type       {ftype_name or ftype}" if ftype is not None else "file type       ?",
            "tensors         " + ", ".join(f"{n} x{types[n]} ({sizes[n] / 1e9:.2f} GB)" for n in sorted(types)),
            "mix",
            *mix(mf),
            f"read per token  {active / 1e9:.3f} GB of weights (attention, router, {cfg.num_experts_per_tok} experts, "
            "output)",
            "tokenizer       " + ("yes (HF tokenizer.json inside)" if "tokenizer.huggingface.json" in meta
                                  else "yes (ggml vocabulary)" if "tokenizer.ggml.tokens" in meta else "no"),
            f"chat template   {'yes' if template else 'no'}",
        ]
        return "\n".join(lines)
