"""Batched steps: each sequence of a batch gets the logits it gets alone, whatever runs beside it, on one
rank and several, with an f32 and an f16 KV cache."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from dmoe.engine import Engine

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize(("ranks", "kv_type", "qtype"), [(1, "f32", "f32"), (1, "f16", "q40"), (2, "f32", "f32"),
                                                         (3, "f16", "q80"), (3, "q8", "q40")])
def test_a_batch_gives_each_sequence_its_logits_alone(ranks: int, kv_type: str, qtype: str, model_file,
                                                       tmp_path) -> None:
    out = str(tmp_path / "r.npz")
    cmd = [sys.executable, os.path.join(HERE, "mpi_batch.py"), model_file("d", qtype), kv_type, out]
    r = subprocess.run((["mpirun", "-n", str(ranks)] if ranks > 1 else []) + cmd, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    with np.load(out) as f:
        results = dict(f)
    for name in ("a", "b", "c", "d"):
        alone, batched = results[f"alone_{name}"], results[f"batched_{name}"]
        assert batched.shape == alone.shape
        assert np.abs(batched - alone).max() <= 1e-5 * np.abs(alone).max(), name


def test_step_refuses_bad_batches(model_file) -> None:
    engine = Engine.load(model_file("a", "f32"), max_seq_len=8, kv_type="f32", nthreads=1, parallel=2)
    for batch, message in [([], "at least one sequence"), ([(2, [1])], "slot 2 is outside 0..1"),
                           ([(0, [1]), (0, [2])], "each slot at most once"), ([(1, [])], "at least one token"),
                           ([(1, [1] * 9)], "do not fit the context")]:
        with pytest.raises(ValueError, match=message):
            engine.step(batch)
    assert engine.slots == [[], []]
