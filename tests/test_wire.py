"""The all-reduces' compact wire forms: bf16 as torch rounds it, q8_0 within half a step of its block."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmoe.wire import BLOCK, check_type, decode, encode, wire_bytes


def _values(n: int) -> np.ndarray:
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-8, 8, n))).astype(np.float32)
    x[:BLOCK] = 0.0  # an all-zero block
    x[BLOCK] = -x[BLOCK + 1]
    return x


def _roundtrip(kind: str, x: np.ndarray) -> np.ndarray:
    data = np.empty(wire_bytes(kind, x.size), np.uint8)
    encode(kind, x, data)
    out = np.full_like(x, np.nan)
    decode(kind, data, out)
    return out


def test_bf16_rounds_as_torch() -> None:
    x = _values(4096)
    expected = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(_roundtrip("bf16", x), expected)


def test_q8_0_is_within_half_a_step() -> None:
    x = _values(4096)
    got = _roundtrip("q8_0", x).reshape(-1, BLOCK)
    step = np.abs(x.reshape(-1, BLOCK)).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(got - x.reshape(-1, BLOCK)) <= step / 2 * (1 + 1e-6))
    assert not got[0].any()  # the zero block stays zero
    assert wire_bytes("q8_0", 4096) * 3.5 < wire_bytes("f32", 4096)


def test_unknown_type_is_refused() -> None:
    with pytest.raises(ValueError, match="comm type must be one of f32, bf16, q8_0"):
        check_type("int4")
