"""Fuzzing the file reader: mutations of a small valid file (bit flips in the header and the data, truncations,
huge counts, sizes and offsets written over header fields, other type ids) are each refused with one line
(ModelFileError) or load and run; never another exception, a hang, or an allocation beyond the file's size (and
1 MiB) while its header is read. DMOE_FUZZ_EXAMPLES sets how many (default 3,000, about 13 s)."""

from __future__ import annotations

import os
import signal
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from dmoe.config import ModelConfig
from dmoe.engine import Engine
from dmoe.info import describe
from dmoe.modelfile import ModelFile, ModelFileError
from dmoe.synthetic import write_synthetic

EXAMPLES = int(os.environ.get("DMOE_FUZZ_EXAMPLES", "3000"))
HANG_S = 20  # an example that takes this long is a hang
# values written over header fields: zero, one, around 2^31 and 2^32, the largest signed and unsigned 64-bit
EXTREMES = (0, 1, 3, 255, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**64 - 1)


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, int, Path]:
    """(the bytes of a small valid file (Q4_0 and Q8_0 tensors, no tokenizer), where its header ends, a scratch
    path for the mutants)."""
    cfg = ModelConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=4,
                      num_experts_per_tok=2, max_position_embeddings=64)
    d = tmp_path_factory.mktemp("fuzz")
    write_synthetic(cfg, "q40", str(d / "valid.m"), progress=False)
    data = (d / "valid.m").read_bytes()
    with ModelFile(str(d / "valid.m")) as mf:
        header = min(t.offset for t in mf.tensors.values())
    return data, header, d / "mutant.m"


# one mutation: (kind, where: taken modulo the range the kind acts on, the value a field gets, its width)
MUTATION = st.tuples(st.sampled_from(["flip header", "flip data", "field", "cut"]), st.integers(0, 2**40),
                     st.sampled_from(EXTREMES), st.sampled_from([4, 8]))


def mutate(data: bytes, header: int, mutations: list[tuple[str, int, int, int]]) -> bytes:
    buf = bytearray(data)
    for kind, where, value, width in mutations:
        end = min(header, len(buf))
        if kind == "flip header" and end:
            buf[where % end] ^= 1 << where % 8
        elif kind == "flip data" and len(buf) > header:
            buf[header + where % (len(buf) - header)] ^= 1 << where % 8
        elif kind == "field" and end >= width:  # a count, length, dimension, offset or type id
            at = where % (end - width + 1)
            buf[at:at + width] = struct.pack("<I" if width == 4 else "<Q", value % (1 << 8 * width))
        elif kind == "cut":
            del buf[where % max(1, len(buf)):]
    return bytes(buf)


def _hang(*_: object) -> None:
    raise TimeoutError(f"one mutant took over {HANG_S} s")


def test_mutated_files_are_refused_in_one_line_or_run(valid: tuple[bytes, int, Path]) -> None:
    path = valid[2]
    path.write_bytes(valid[0])  # the valid file first, untimed: numba compiles the kernels it needs (cold: ~1 min)
    Engine.load(str(path), max_seq_len=16, nthreads=1, kv_type="f32").forward([1, 2])

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.generate, Phase.shrink],  # not explain: it traces every line, 20x slower
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(MUTATION, min_size=1, max_size=3))
    def check(mutations: list[tuple[str, int, int, int]]) -> None:
        mutant = mutate(valid[0], valid[1], mutations)
        path.write_bytes(mutant)
        old = signal.signal(signal.SIGALRM, _hang)
        signal.alarm(HANG_S)
        try:
            refused = None
            tracemalloc.start()
            try:
                describe(str(path))  # `launch.py info`: the whole header
            except ModelFileError as e:
                refused = e
            finally:
                header_peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
            assert header_peak < len(mutant) + (1 << 20), f"{header_peak} bytes to read a {len(mutant)}-byte file"
            if refused is None:
                try:  # the loader checks what only the kernels care about (e.g. gate and up both quantised)
                    engine = Engine.load(str(path), max_seq_len=16, nthreads=1, kv_type="f32")
                    assert engine.forward([1, 2]).shape == (1, engine.config.vocab_size)
                except ModelFileError as e:
                    refused = e
            if refused is not None:
                assert str(refused).strip() and "\n" not in str(refused), repr(refused)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)

    with np.errstate(all="ignore"):  # flipped scales may make infinities: that file runs, its logits are its own
        check()
