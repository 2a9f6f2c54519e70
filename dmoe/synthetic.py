"""Synthetic models: a config's exact shapes with random weights, written straight into a .m file.

For benchmarks at full size (Qwen3-30B-A3B is 17 GB in Q4_0) without a real checkpoint.
Quantised tensors are random bytes with scales fixed so weights have a std of about 0.02
(the HF initialiser's), which keeps activations finite through every layer; no float
tensor is ever materialised for them, which is what makes this fast. `--type` takes our file
types and llama.cpp's (`q4_k_m`, `iq4_xs`, ...: mixes.py), so hub-like files can be benchmarked.

    python -m dmoe.synthetic configs/qwen3-30b-a3b.json --type q40 -o models/synth-30b-a3b-q40.m
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from collections.abc import Iterator

import numba
import numpy as np
from gguf import GGMLQuantizationType as QT

from dmoe import quant
from dmoe.blocks import random_blocks
from dmoe.config import ConfigError, ModelConfig
from dmoe.mixes import FILE_TYPES, tensor_types
from dmoe.modelfile import expected_shapes
from dmoe.modelwriter import write_model

WEIGHT_STD = 0.02
CHUNK_BYTES = 64 << 20
# Per-block scales that give WEIGHT_STD: Q4_0's (q - 8) has std 4.2, Q8_0's q 73.5 (see _SYMMETRIC).
_SCALE = {QT.Q4_0: np.float16(WEIGHT_STD / 4.2), QT.Q8_0: np.float16(WEIGHT_STD / 73.5)}
# Random bytes give weights of mean -0.5 quanta (Q4_0's q - 8 spans -8..7, int8 -128..127). That bias, summed
# over a row, adds the same value to every output, the residual stream fills with one common direction, and
# the router then sends every token to the same 8 experts: a benchmark of a model no one has. So the one
# value without a mirror image is replaced by zero (nibble 0 -> 8, int8 -128 -> 0): zero-mean weights.
_SYMMETRIC = {QT.Q4_0: np.array([(b if b & 0x0F else b | 0x08) if b & 0xF0 else (b | 0x80 if b & 0x0F else 0x88)
                                 for b in range(256)], np.uint8),
              QT.Q8_0: np.array([0 if b == 0x80 else b for b in range(256)], np.uint8)}


@numba.njit(parallel=True, cache=True)
def _map_bytes(data: np.ndarray, table: np.ndarray) -> None:
    for i in numba.prange(data.size):
        data[i] = table[data[i]]


@functools.cache
def _block_scale(qtype: QT) -> float:
    """random_blocks' `scale` that gives weights of std WEIGHT_STD in this type (measured on a sample)."""
    sample = random_blocks(qtype, 64, 256 * 4, np.random.default_rng(0), 1.0)
    return WEIGHT_STD / float(quant.dequantize(sample, qtype, 256 * 4).std())


def random_chunks(shape: tuple[int, ...], qtype: QT, rng: np.random.Generator, is_norm: bool) -> Iterator[np.ndarray]:
    """A tensor's data in row chunks of about CHUNK_BYTES: random blocks for the block types, values otherwise.
    (Q4_0 and Q8_0 with zero-mean payloads; the other types' random payloads keep their format's bias.)"""
    cols = shape[-1]
    rows = int(np.prod(shape[:-1]))
    if is_norm:
        yield np.ones((rows, cols), np.float32)
        return
    rb = quant.row_bytes(qtype, cols)
    step = max(1, CHUNK_BYTES // rb)
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        if qtype in _SCALE:
            data = np.frombuffer(rng.bytes(n * rb), np.uint8).copy()
            _map_bytes(data, _SYMMETRIC[qtype])
            data = data.reshape(n, rb // quant.BLOCK_BYTES[qtype], -1)
            data[:, :, :2] = np.array([_SCALE[qtype]]).view(np.uint8)
            yield data.reshape(n, rb)
        elif qtype in quant.BLOCK_BYTES:
            yield random_blocks(qtype, n, cols, rng, _block_scale(qtype))
        else:
            yield (rng.standard_normal((n, cols), np.float32) * np.float32(WEIGHT_STD))


def write_synthetic(cfg: ModelConfig, file_type: str, path: str, seed: int = 0, progress: bool = True,
                    tokenizer_json: str | None = None, chat_template: str | None = None) -> dict[str, float]:
    """Write a random model of `cfg`'s shapes and `file_type`'s tensor types; returns the writer's summary."""
    rng = np.random.default_rng(seed)
    types = tensor_types(cfg, file_type)
    shapes = expected_shapes(cfg)
    tokenizer = None
    if tokenizer_json is not None:
        from dmoe.tokenizer import write_tokenizer_metadata

        def tokenizer(w):  # type: ignore[no-untyped-def]
            write_tokenizer_metadata(w, tokenizer_json, chat_template, None, vocab_size=cfg.vocab_size)

    return write_model(
        path, cfg, file_type, lambda name: random_chunks(shapes[name], types[name], rng, len(shapes[name]) == 1),
        metadata={"general.name": "synthetic"}, tokenizer=tokenizer, progress=progress,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write a random-weight .m file with a config's exact shapes.")
    p.add_argument("config", help="a HF config.json (see configs/)")
    p.add_argument("--type", default="q40", choices=list(FILE_TYPES), help="file type: ours or llama.cpp's mixes")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--layers", type=int, help="keep only this many layers (for quick runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--qwen-tokenizer", action="store_true",
                   help="embed the real Qwen3 tokenizer (needs the dashscope package)")
    args = p.parse_args(argv)
    try:
        cfg = ModelConfig.from_hf_file(args.config, args.layers)
    except ConfigError as e:
        print(f"synthetic: error: {e}", file=sys.stderr)
        return 1
    tok_json = template = None
    if args.qwen_tokenizer:
        from dmoe.qwen_tokenizer import build_qwen3_tokenizer_json, qwen3_chat_template

        try:
            tok_json, template = build_qwen3_tokenizer_json(), qwen3_chat_template()
        except ModuleNotFoundError as e:
            print(f"synthetic: error: {e}", file=sys.stderr)
            return 1
    try:
        if os.path.dirname(args.output):
            os.makedirs(os.path.dirname(args.output), exist_ok=True)
        s = write_synthetic(cfg, args.type, args.output, args.seed, tokenizer_json=tok_json,
                            chat_template=template)
    except OSError as e:  # a full disk, a path we cannot write: one line, and no half-written file left
        with contextlib.suppress(OSError):
            os.remove(args.output)
        print(f"synthetic: error: cannot write {args.output}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}: {s['bytes'] / 1e9:.2f} GB in {s['seconds']:.1f} s ({s['mb_s']:.0f} MB/s), "
          f"peak RSS {s['peak_rss_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
