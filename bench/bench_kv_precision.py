"""What an 8-bit KV cache costs in precision, in numpy (float64 otherwise): one layer's attention of 8 query heads over
1,024 Gaussian keys and values, each input (keys, values and decode's query) quantised to int8 with a scale a 32
values, as `--kv-type q8` and llama.cpp's q8_0 do, or a 128 (one a head, as q8 did at first), against f16 and the
exact result: the largest error relative to the largest output. With plain Gaussian inputs, and with 5% of the
channels 8x larger (trained models' keys have such channels), at two sharpnesses of attention.

    python bench/bench_kv_precision.py
"""

from __future__ import annotations

import numpy as np

D, S, H = 128, 1024, 8


def quantised(x: np.ndarray, group: int) -> np.ndarray:
    """x with each run of `group` values rounded to int8 steps of its largest magnitude / 127."""
    runs = x.reshape(*x.shape[:-1], x.shape[-1] // group, group)
    step = np.abs(runs).max(-1, keepdims=True) / 127
    return (np.rint(runs / np.where(step > 0, step, 1)) * step).reshape(x.shape)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    s = q @ k.T / np.sqrt(D)
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True) @ v


def main() -> None:
    rng = np.random.default_rng(0)
    channels = {"gaussian": np.ones(D), "5% channels 8x": np.where(rng.random(D) < 0.05, 8.0, 1.0)}
    for name, scale in channels.items():
        for sharpness in (1.0, 3.0):
            q = rng.standard_normal((H, D)) * sharpness * scale
            k, v = rng.standard_normal((S, D)) * scale, rng.standard_normal((S, D))
            exact = attention(q, k, v)
            half = [a.astype(np.float16).astype(np.float64) for a in (k, v)]
            errors = {"f16": attention(q, *half)}
            for group in (128, 32):
                errors[f"int8 a {group}"] = attention(*(quantised(a, group) for a in (q, k, v)))
            line = ", ".join(f"{what} {np.abs(out - exact).max() / np.abs(exact).max():.2%}"
                             for what, out in errors.items())
            print(f"{name}, query x{sharpness:g}: {line}")


if __name__ == "__main__":
    main()
