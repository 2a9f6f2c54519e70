"""`launch.py plan`'s per-rank bytes against what each rank's loader really packs (weights.load_weights on every
shard of the plan, in this one process) and what the engine allocates for its KV cache."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dmoe.cli import DEMO_MODEL
from dmoe.engine import Engine
from dmoe.footprint import DEFAULT_SLOTS, fit_slots, footprint
from dmoe.kernels import ExpertWeights, RowStack
from dmoe.modelfile import ModelFile
from dmoe.packcache import PackStore
from dmoe.plan import ShardPlan
from dmoe.weights import load_weights

ROOT = Path(__file__).resolve().parent.parent


def resident(value: object) -> int:
    """Bytes of the arrays a loaded weight object holds."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, RowStack):
        return sum(resident(w) for w in value.parts)
    if isinstance(value, ExpertWeights):
        return value.data.nbytes
    return 0


@pytest.mark.parametrize(("n", "moe_split", "routing"),
                         [(1, "ffn", "root"), (3, "ffn", "root"), (2, "experts", "root"), (5, "ffn", "root"),
                          (2, "ffn", "every-rank")])
def test_plan_matches_what_ranks_pack(n: int, moe_split: str, routing: str, mix_file) -> None:
    """A Q4_K_M mix (q/k/v of two layouts, down slices that cut super-blocks at 3 and 5 ranks); with every
    rank routing, every rank holds the routers."""
    with ModelFile(mix_file("q4_k_m")) as mf:
        cfg, types = mf.config, {name: t.qtype for name, t in mf.tensors.items()}
        plan = ShardPlan.make(cfg, n, moe_split, routing=routing)
        for shard, predicted in zip(plan.shards, footprint(cfg, types, plan, 50, "f16"), strict=True):
            w = load_weights(mf, shard, PackStore())
            packed = sum(resident(v) for layer in w.layers for v in vars(layer).values())
            assert predicted.weights == packed + resident(w.output_norm) + resident(w.output), shard
            # f16 values for 50 positions, and keys for 64 (whole blocks of 16 positions)
            assert predicted.kv_cache == cfg.num_hidden_layers * shard.n_kv_heads * (50 + 64) * cfg.head_dim * 2


def test_kv_cache_as_the_engine_allocates(mix_file) -> None:
    engine = Engine.load(mix_file("q4_k_m"), max_seq_len=48, nthreads=1, kv_type="f32", parallel=3)
    cfg = engine.config
    types = {name: t.qtype for name, t in engine.file.tensors.items()}
    assert footprint(cfg, types, engine.plan, 48, "f32", parallel=3)[0].kv_cache == engine.kv_bytes


def test_launch_plan_for_a_config() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "launch.py"), "plan", "--config",
                        str(ROOT / "configs" / "qwen3-235b-a22b.json"), "--type", "q4_k_m", "-n", "1", "4"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.split()[:1] in (["1"], ["4"])]
    one = next(float(c[2]) for c in rows if c[:2] == ["1", "all"])
    assert 140 < one < 150  # Qwen's Q4_K_M file of this model is 142 GB: the packed layouts within a few %
    assert len([c for c in rows if c[0] == "4" and c[1] != "all"]) == 4
    bad = subprocess.run([sys.executable, str(ROOT / "launch.py"), "plan", "--config", "/nonexistent.json"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.startswith("dmoe: error: /nonexistent.json"), bad.stderr
    assert "Traceback" not in bad.stderr


class _Ranks:
    """What fit_slots reads of a communicator: every rank's (host, memory, need, slot) as given (the caller's own
    figures are not asked for)."""

    def __init__(self, shares: list[tuple[str, int, int, int]]) -> None:
        self.shares, self.host = shares, shares[0][0]

    def allgather_obj(self, obj: object) -> list[tuple[str, int, int, int]]:
        return self.shares


GB = 10**9


@pytest.mark.parametrize(("shares", "parallel", "slots"), [
    ([("a", 10 * GB, 4 * GB, GB)], None, 4),  # room for 6: the default's 4
    ([("a", 10 * GB, 7_500_000_000, GB)], None, 2),  # room for 2.5
    ([("a", 10 * GB, 4 * GB, GB)], 5, 5),  # asked for, and they fit
    ([("a", 10 * GB, 3 * GB, GB), ("a", 10 * GB, 3 * GB, GB)], None, 2),  # one host's memory for both ranks
    ([("a", 10 * GB, 3 * GB, GB), ("b", 10 * GB, 3 * GB, GB)], None, 4),  # each its own host
    ([("a", 10 * GB, 3 * GB, GB), ("b", 5 * GB, 3 * GB, GB)], None, 2),  # the smallest room decides
    ([("a", 10 * GB, 3 * GB, GB), ("b", 10 * GB, 3 * GB, 0)], 6, 6),  # b's rank holds no KV heads: no bound there
])
def test_slots_fit_every_host(shares: list[tuple[str, int, int, int]], parallel: int | None, slots: int) -> None:
    assert fit_slots(_Ranks(shares), 0, 0, parallel, "8 tokens (f16)") == slots


@pytest.mark.parametrize(("parallel", "need", "slot", "per_slot"), [
    (None, 9_800_000_000, GB, "1,000"), (7, 9_800_000_000, GB, "1,000"),
    (None, 10_800_000_000, 0, "0"),  # no KV heads on the rank, but weights larger than the host
])
def test_slots_that_do_not_fit_are_refused(parallel: int | None, need: int, slot: int, per_slot: str) -> None:
    with pytest.raises(ValueError, match=r"KV cache slot\(s\) of 8 tokens \(f16\) and the weights need .* GB on a, "
                                         rf"which has 10.0 GB \({per_slot} MB a slot\): lower --parallel"):
        fit_slots(_Ranks([("a", 10 * GB, need, slot)]), 0, 0, parallel, "8 tokens (f16)")


def test_the_engine_sizes_its_cache_to_the_host() -> None:
    """No --parallel: the default 4 slots (the demo model's fit any host); a number no host holds: one line, before
    anything is allocated."""
    assert Engine.load(DEMO_MODEL, nthreads=1, parallel=None, pack_cache=None).parallel == DEFAULT_SLOTS
    with pytest.raises(ValueError, match="lower --parallel or --max-seq-len"):
        Engine.load(DEMO_MODEL, nthreads=1, parallel=10**9, pack_cache=None)
