"""Converter speed on full-width Qwen3-30B-A3B layers: writes a bf16 HF checkpoint with the real shapes
and `--layers` layers (random values, one shard per layer as the real checkpoints are split), converts
it, and extrapolates to all 48 layers (61 GB of bf16).

    python bench/bench_convert.py --layers 4 --type q40 --workdir /tmp/convbench
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench_peer import evict  # noqa: E402

from dmoe.config import ModelConfig  # noqa: E402


def write_shard(path: str, tensors: dict[str, tuple[int, ...]], rng: np.random.Generator) -> int:
    """A safetensors file of random bf16 tensors (values around +-0.02), written tensor by tensor."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for shape in tensors.values():
            vals = rng.standard_normal(int(np.prod(shape)), np.float32) * np.float32(0.02)
            f.write((vals.view(np.uint32) >> 16).astype(np.uint16).tobytes())
    return offset


def make_checkpoint(directory: str, layers: int) -> tuple[ModelConfig, int]:
    with open(os.path.join(ROOT, "configs", "qwen3-30b-a3b.json")) as f:
        hf = json.load(f)
    hf["num_hidden_layers"] = layers
    cfg = ModelConfig.from_hf(hf)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f)
    rng = np.random.default_rng(0)
    d, ff, q, kv, hd = cfg.hidden_size, cfg.moe_intermediate_size, cfg.q_dim, cfg.kv_dim, cfg.head_dim
    total = write_shard(os.path.join(directory, "model-embed.safetensors"),
                        {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,),
                         "lm_head.weight": (cfg.vocab_size, d)}, rng)
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors: dict[str, tuple[int, ...]] = {
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
            p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
            p + "mlp.gate.weight": (cfg.num_experts, d)}
        for e in range(cfg.num_experts):
            tensors |= {f"{p}mlp.experts.{e}.gate_proj.weight": (ff, d), f"{p}mlp.experts.{e}.up_proj.weight": (ff, d),
                        f"{p}mlp.experts.{e}.down_proj.weight": (d, ff)}
        total += write_shard(os.path.join(directory, f"model-layer{i:02d}.safetensors"), tensors, rng)
    return cfg, total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--type", default="q40")
    p.add_argument("--workdir", default="/tmp/dmoe-convbench")
    p.add_argument("--cold", action="store_true", help="evict the checkpoint from the page cache first")
    args = p.parse_args()
    hf_dir = os.path.join(args.workdir, "hf")
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        make_checkpoint(hf_dir, args.layers)
    layer_bytes = sum(os.path.getsize(os.path.join(hf_dir, f)) for f in os.listdir(hf_dir) if "layer" in f)
    fixed_bytes = os.path.getsize(os.path.join(hf_dir, "model-embed.safetensors"))
    subprocess.run(["sync"], check=False)
    if args.cold:  # read the checkpoint from disk, as a real 61 GB one (more than RAM) would be
        evict([os.path.join(hf_dir, name) for name in os.listdir(hf_dir)])
    out = os.path.join(args.workdir, "out.m")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "converter", "convert_hf.py"), "--arch", "qwen3_moe",
                        hf_dir, "--type", args.type, "-o", out, "--quiet"], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode:
        sys.exit(r.stderr)
    total = layer_bytes + fixed_bytes
    full = fixed_bytes + layer_bytes / args.layers * 48
    rate = total / seconds
    print(r.stdout.strip())
    print(json.dumps({"layers": args.layers, "input_gb": total / 1e9, "seconds": seconds, "mb_s": rate / 2**20,
                      "extrapolated_48_layers_gb": full / 1e9, "extrapolated_minutes": full / rate / 60}))


if __name__ == "__main__":
    main()
