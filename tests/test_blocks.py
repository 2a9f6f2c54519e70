"""Every ggml block type we read, decoded by blocks.py and dequantised by quant.dequantize, against the
`gguf` package's own numpy dequantisers (an independent implementation of ggml-quants.c): bit for bit,
on random bytes (every payload bit pattern, every packing of the K-quants' 6-bit scales and mins) and
with extreme f16 scales (the largest, subnormals, zero, negative)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize

from dmoe import quant
from dmoe.blocks import BLOCK_BYTES, BLOCK_WEIGHTS, DECODED, HALF_FIELDS, random_blocks

EXTREME_HALVES = np.array([65504.0, -65504.0, 6e-8, -6e-8, 6.1e-5, 0.0, -0.0, 1.0, -2.5], np.float16)


@pytest.mark.parametrize("qtype", DECODED, ids=lambda t: t.name)
def test_dequantize_equals_gguf(qtype: QT) -> None:
    rng = np.random.default_rng(int(qtype))
    cols = 4 * BLOCK_WEIGHTS[qtype]
    raw = random_blocks(qtype, 64, cols, rng)
    np.testing.assert_array_equal(quant.dequantize(raw, qtype, cols), gguf_dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", DECODED, ids=lambda t: t.name)
def test_dequantize_extreme_scales(qtype: QT) -> None:
    rng = np.random.default_rng(int(qtype) + 1)
    cols = 2 * BLOCK_WEIGHTS[qtype]
    raw = random_blocks(qtype, 40, cols, rng).reshape(40, 2, BLOCK_BYTES[qtype])
    for o in HALF_FIELDS[qtype]:
        raw[..., o:o + 2] = rng.choice(EXTREME_HALVES, raw.shape[:2]).view(np.uint8).reshape(*raw.shape[:2], 2)
    raw = raw.reshape(40, -1)
    with np.errstate(over="ignore", invalid="ignore"):
        ref = gguf_dequantize(raw, qtype)
    np.testing.assert_array_equal(quant.dequantize(raw, qtype, cols), ref)


def test_dequantize_strided_rows() -> None:
    """Rows as a mapped tensor hands them over: a subset of experts and rows (a non-contiguous view)."""
    rng = np.random.default_rng(0)
    raw = random_blocks(QT.Q6_K, 24, 512, rng).reshape(4, 6, -1)
    view = raw[1:4:2, 1:5]
    np.testing.assert_array_equal(quant.dequantize(view, QT.Q6_K, 512),
                                  gguf_dequantize(np.ascontiguousarray(view), QT.Q6_K))


def test_row_bytes_need_whole_super_blocks() -> None:
    assert quant.row_bytes(QT.Q4_K, 768) == 3 * 144
    with pytest.raises(ValueError, match="multiple of 256"):
        quant.row_bytes(QT.Q4_K, 384)
    with pytest.raises(ValueError, match="not supported"):
        quant.row_bytes(QT.IQ2_XXS, 256)
