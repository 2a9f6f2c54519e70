"""Micro-benchmark of dmoe/kernels.py on full-size Qwen3-30B-A3B shapes with random Q4_0 weights.

Decode: one token's worth of weight work, per layer a matvec of the fused q/k/v weight [5120, 2048]
and of o [2048, 4096] and moe_forward with T = 1, k = 8, for 48 layers, plus the output matrix
[151936, 2048]: ~1.75 GB of weights, so that it streams from RAM as a real decode does. Only the 8
experts a token uses are allocated per layer (the others would not be read).
Prefill: the same work for T tokens (the output matrix for the last token only), measured on a few
layers that each hold all 128 experts (a prompt of 64 tokens touches almost all of them), scaled to
48 layers.
Batch: the output matrix (Q4_0, and Q6_K as hub files and our converter store it) times B tokens, as a
step of B decoding sequences runs it: GMAC/s.

Run: python bench/bench_kernels.py [--layers 48] [--prefill-layers 4] [--batch 4 8] [--threads 1 2] [--rounds 5]

Measured on the 2-core dev box (AMD EPYC, AVX2, 24 GB), which other users share: each figure is the
range of the best-of-rounds results over several quiet minutes (llama.cpp: /work/shared/PEERS.md).

| full-size Qwen3-30B-A3B, Q4_0   | 1 thread                 | 2 threads                  | llama.cpp 2 thr |
|---------------------------------|--------------------------|----------------------------|-----------------|
| decode, 1.704 GB/token: GB/s    | 14.4-15.7                | 22.6-25.7                  |                 |
| decode: tok/s                   | 8.4-9.2                  | 13.3-15.1                  | 7.27            |
| prefill T = 64: tok/s           | 18.6-19.4                | 32.4-37.4                  | 22.4            |
| prefill T = 512: tok/s          | 19.0-20.4                | 35.0-40.5                  |                 |
| tiny matvec, Python + launch    | 3.0-4.3 us               | 3.5-4.2 us                 |                 |
| repack (with first touch)       | 0.8-1.1 s/GB; the copy alone 0.4-0.5 s/GB             |                 |

Parts of a decode step, 2 threads: q/k/v 23 GB/s, o 27 GB/s, moe_forward 27 GB/s, output 35 GB/s.
Compiling (first run, empty numba cache), per weight format: 8 s for matvec/matmul, 12 s for
moe_forward, 1 s for the repack; 0.6 s to load them from the cache afterwards.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numba
import numpy as np
from gguf import GGMLQuantizationType as QT

from dmoe.blocks import random_blocks
from dmoe.kernels import ExpertWeights, Weight, moe_forward, pack_experts, pack_weight

D, FF, N_EXP, K, VOCAB, LAYERS = 2048, 768, 128, 8, 151936, 48
QKV, O_IN = 4096 + 512 + 512, 4096


def random_q4_0(rng: np.random.Generator, shape: tuple[int, ...], cols: int) -> np.ndarray:
    """Valid Q4_0 bytes [*shape, cols / 32 * 18]: random nibbles, finite f16 scales around 0.01."""
    raw = rng.integers(0, 256, size=(*shape, cols // 32, 18), dtype=np.uint8)
    scales = (0.005 + 0.01 * rng.random((*shape, cols // 32), dtype=np.float32)).astype(np.float16)
    raw[..., :2] = scales.view(np.uint8).reshape(*scales.shape, 2)
    return raw.reshape(*shape, cols // 32 * 18)


class Repacker:
    """Makes random weights and times only their repacking."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.seconds = self.bytes = 0.0

    def weight(self, rows: int, cols: int) -> Weight:
        raw = random_q4_0(self.rng, (rows,), cols)
        t0 = time.perf_counter()
        w = pack_weight([raw], [QT.Q4_0], cols)
        self.seconds += time.perf_counter() - t0
        self.bytes += raw.nbytes
        return w

    def experts(self, n_exp: int, rows: int, cols: int) -> ExpertWeights:
        raw = random_q4_0(self.rng, (n_exp, rows), cols)
        t0 = time.perf_counter()
        w = pack_experts(raw, QT.Q4_0, cols)
        self.seconds += time.perf_counter() - t0
        self.bytes += raw.nbytes
        return w


class Layer:
    """The weights of one layer that a forward step reads, with its buffers."""

    def __init__(self, rp: Repacker, n_exp: int) -> None:
        self.qkv, self.o = rp.weight(QKV, D), rp.weight(D, O_IN)
        self.gate, self.up, self.down = rp.experts(n_exp, FF, D), rp.experts(n_exp, FF, D), rp.experts(n_exp, D, FF)

    def nbytes(self, n_exp_read: float) -> float:
        """Weight bytes read by a step that touches n_exp_read experts."""
        per_exp = sum(w.data[0].nbytes for w in (self.gate, self.up, self.down))
        return sum(w.data.nbytes for w in (self.qkv, self.o)) + n_exp_read * per_exp

    def step(self, h: np.ndarray, qkv: np.ndarray, attn: np.ndarray, o: np.ndarray, ids: np.ndarray,
             wts: np.ndarray, y: np.ndarray) -> None:  # fmt: skip
        """The layer's weight work for len(h) tokens (attention itself is not a weight kernel)."""
        if len(h) == 1:
            self.qkv.matvec(h[0], qkv[0])
            self.o.matvec(attn[0], o[0])
        else:
            self.qkv.matmul(h, qkv)
            self.o.matmul(attn, o)
        moe_forward(self.gate, self.up, self.down, h, ids, wts, y)


def buffers(rng: np.random.Generator, n_tok: int, n_exp: int) -> tuple[np.ndarray, ...]:
    """(h, qkv, attn, o, ids, weights, y) for n_tok tokens routed to k distinct random experts each."""
    ids = np.stack([rng.choice(n_exp, K, replace=False) for _ in range(n_tok)]).astype(np.int32)
    return (
        rng.standard_normal((n_tok, D), dtype=np.float32),
        np.zeros((n_tok, QKV), np.float32),
        rng.standard_normal((n_tok, O_IN), dtype=np.float32),
        np.zeros((n_tok, D), np.float32),
        ids,
        np.full((n_tok, K), 1.0 / K, np.float32),
        np.zeros((n_tok, D), np.float32),
    )


def measure(cases: dict[str, Callable[[], None]], threads: list[int], rounds: int) -> dict[tuple[str, int], float]:
    """Best seconds per (case, threads) over `rounds` interleaved rounds (after one warm-up run each): on
    a shared machine the numbers drift by ~30% from minute to minute, and a busy neighbour hurts
    whichever case runs at the time."""
    best: dict[tuple[str, int], float] = {}
    for r in range(rounds):
        for nt in threads:
            numba.set_num_threads(nt)
            for name, fn in cases.items():
                if r == 0:
                    fn()
                t0 = time.perf_counter()
                fn()
                best[name, nt] = min(best.get((name, nt), float("inf")), time.perf_counter() - t0)
    return best


def decode_case(rp: Repacker, n_layers: int) -> tuple[Callable[[], None], float]:
    """One token of decode weight work over 48 layers (n_layers allocated, cycled) and its GB read."""
    layers = [Layer(rp, K) for _ in range(n_layers)]
    output = rp.weight(VOCAB, D)
    bufs = buffers(rp.rng, 1, K)
    logits = np.zeros(VOCAB, np.float32)

    def token() -> None:
        for i in range(LAYERS):
            layers[i % n_layers].step(*bufs)
        output.matvec(bufs[0][0], logits)

    return token, (sum(lay.nbytes(K) for lay in layers) * LAYERS / n_layers + output.data.nbytes) / 1e9


def prefill_cases(rp: Repacker, n_layers: int, sizes: list[int]) -> dict[str, Callable[[], None]]:
    """A prompt of each size through n_layers layers holding all 128 experts (times 48 / n_layers is the
    whole model; the output matrix's one matvec for the last token, ~10 ms, is left out)."""
    layers = [Layer(rp, N_EXP) for _ in range(n_layers)]
    cases = {}
    for n_tok in sizes:
        bufs = buffers(rp.rng, n_tok, N_EXP)

        def prompt(bufs: tuple[np.ndarray, ...] = bufs) -> None:
            for lay in layers:
                lay.step(*bufs)

        cases[f"prefill T={n_tok}"] = prompt
    return cases


def batch_cases(rng: np.random.Generator, sizes: list[int]) -> dict[str, Callable[[], None]]:
    """The output matrix times each batch size of tokens, in Q4_0 and Q6_K."""
    cases = {}
    for qtype in (QT.Q4_0, QT.Q6_K):
        w = pack_weight([random_blocks(qtype, VOCAB, D, rng)], [qtype], D)
        for n_tok in sizes:
            x, out = rng.standard_normal((n_tok, D), dtype=np.float32), np.zeros((n_tok, VOCAB), np.float32)
            cases[f"batch {qtype.name} B={n_tok}"] = lambda w=w, x=x, out=out: w.matmul(x, out)
    return cases


def launch_case() -> Callable[[], None]:
    """100 calls of a tiny matvec: Python dispatch plus a parallel launch, with next to no work."""
    w = Repacker(2).weight(32, 64)
    x, out = np.ones(64, np.float32), np.zeros(32, np.float32)
    return lambda: [w.matvec(x, out) for _ in range(100)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=LAYERS, help="decode layers allocated (work is always 48 layers)")
    ap.add_argument("--prefill-layers", type=int, default=4, help="layers with all 128 experts for prefill")
    ap.add_argument("--prefill", type=int, nargs="*", default=[64, 512], help="prompt lengths")
    ap.add_argument("--batch", type=int, nargs="*", default=[4, 8], help="tokens a batched output-matrix product")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the best of each case is kept")
    args = ap.parse_args()
    t0 = time.perf_counter()
    launch = launch_case()
    launch()
    print(f"first call (compile, or load from numba's cache): {time.perf_counter() - t0:.1f} s")
    rp = Repacker(0)
    token, gb = decode_case(rp, args.layers)
    print(f"repack: {rp.bytes / 1e9:.2f} GB in {rp.seconds:.2f} s, {rp.seconds / rp.bytes * 1e9:.2f} s/GB")
    cases: dict[str, Callable[[], None]] = {"launch": launch, "decode": token}
    if args.prefill:
        cases |= prefill_cases(Repacker(1), args.prefill_layers, args.prefill)
    if args.batch:
        cases |= batch_cases(np.random.default_rng(3), args.batch)
    best = measure(cases, args.threads, args.rounds)
    print(f"threading layer {numba.threading_layer()}; decode reads {gb:.3f} GB per token")
    for (name, nt), s in best.items():
        if name == "launch":
            print(f"{name:14s} threads={nt}: {s * 1e4:7.1f} us per call (tiny matvec)")
        elif name == "decode":
            print(f"{name:14s} threads={nt}: {s * 1e3:7.1f} ms/token  {gb / s:5.1f} GB/s  {1 / s:5.2f} tok/s")
        elif name.startswith("batch"):
            macs = int(name.split("=")[1]) * VOCAB * D
            print(f"{name:14s} threads={nt}: {s * 1e3:7.2f} ms       {macs / s / 1e9:6.1f} GMAC/s")
        else:
            s *= LAYERS / args.prefill_layers
            print(f"{name:14s} threads={nt}: {s:7.2f} s          {int(name.split('=')[1]) / s:6.1f} tok/s")


if __name__ == "__main__":
    main()
