"""Convert a Hugging Face Qwen3-MoE checkpoint into one .m file (GGUF, llama.cpp's qwen3moe names).

    python converter/convert_hf.py --arch qwen3_moe HF_DIR --type q40 -o model.m    (a checkout)
    dmoe convert --arch qwen3_moe HF_DIR --type q40 -o model.m                       (an install)

Streams tensor by tensor (experts one at a time), so memory stays a few hundred MB above
the largest single tensor whatever the model size.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterator

import numpy as np

from dmoe.config import ModelConfig
from dmoe.hf_checkpoint import CheckpointError, HFCheckpoint
from dmoe.mixes import FILE_TYPES
from dmoe.modelfile import expected_shapes
from dmoe.modelwriter import write_model
from dmoe.tokenizer import write_tokenizer_metadata

# llama.cpp name -> HF name, for tensors that map one to one
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_LAYER = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm", "ffn_gate_inp": "mlp.gate",
}
_EXPERT = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def tensor_chunks(ckpt: HFCheckpoint, cfg: ModelConfig, name: str) -> Iterator[np.ndarray]:
    """The float32 data of one .m tensor, in row order; experts one at a time."""
    shape = expected_shapes(cfg)[name]
    if name in _GLOBAL:
        yield ckpt.get(_GLOBAL[name], shape)
        return
    m = _BLOCK_NAME.fullmatch(name)
    assert m is not None, name
    layer, kind = m.group(1), m.group(2)
    prefix = f"model.layers.{layer}."
    if kind in _LAYER:
        yield ckpt.get(f"{prefix}{_LAYER[kind]}.weight", shape)
        return
    E, rows, cols = shape
    fused_gate_up, fused_down = f"{prefix}mlp.experts.gate_up_proj", f"{prefix}mlp.experts.down_proj"
    for e in range(E):
        if kind != "ffn_down_exps" and ckpt.has(fused_gate_up):  # transformers 5 layout: [E, 2*ff, d]
            both = ckpt.get(fused_gate_up, (E, 2 * rows, cols), e)
            yield both[:rows] if kind == "ffn_gate_exps" else both[rows:]
        elif kind == "ffn_down_exps" and ckpt.has(fused_down):
            yield ckpt.get(fused_down, shape, e)
        else:
            yield ckpt.get(f"{prefix}mlp.experts.{e}.{_EXPERT[kind]}.weight", (rows, cols))


def convert(hf_dir: str, out: str, qtype_name: str, progress: bool = True) -> dict[str, float]:
    ckpt = HFCheckpoint(hf_dir)
    cfg = ckpt.config
    try:
        if not cfg.tie_word_embeddings and not ckpt.has("lm_head.weight"):
            raise CheckpointError("missing tensor lm_head.weight (and tie_word_embeddings is false)")
        tokenizer = None
        if ckpt.tokenizer_json is not None:
            eos = ckpt.hf_config.get("eos_token_id")

            def tokenizer(w):  # type: ignore[no-untyped-def]
                write_tokenizer_metadata(w, ckpt.tokenizer_json, ckpt.chat_template,
                                         eos if isinstance(eos, int) else None, vocab_size=cfg.vocab_size)

        name = os.path.basename(os.path.normpath(hf_dir))
        summary = write_model(out, cfg, qtype_name, lambda n: tensor_chunks(ckpt, cfg, n),
                              metadata={"general.name": name}, tokenizer=tokenizer, progress=progress)
        return {**summary, "input_bytes": ckpt.nbytes}
    finally:
        ckpt.close()


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description="Convert a Hugging Face Qwen3-MoE checkpoint to a .m file.")
    p.add_argument("hf_dir", help="directory with config.json, *.safetensors and tokenizer.json")
    p.add_argument("--arch", required=True, choices=["qwen3_moe"], help="model architecture")
    p.add_argument("--type", required=True, choices=list(FILE_TYPES),
                   help="file type: ours (q40, q80, bf16, f16, f32) or llama.cpp's (q4_k_m, q6_k, iq4_xs, ...)")
    p.add_argument("-o", "--output", required=True, help="output .m file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        s = convert(args.hf_dir, args.output, args.type, progress=not args.quiet)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"{prog or 'convert_hf'}: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}: {s['bytes'] / 1e9:.2f} GB from {s['input_bytes'] / 1e9:.2f} GB in "
          f"{s['seconds']:.1f} s ({s['input_bytes'] / 2**20 / s['seconds']:.0f} MB/s read), "
          f"peak RSS {s['peak_rss_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
