"""The pack cache: a warm start maps the packed weights instead of repacking, with identical results, and a
cache that no longer matches (model changed, file damaged, directory unwritable) is never used."""

from __future__ import annotations

import os
import shutil

import numpy as np

from dmoe.engine import Engine

IDS = [3, 1, 4, 1, 5, 9, 2, 6]


def _run(path: str, cache: str | None, moe_split: str = "ffn") -> tuple[Engine, np.ndarray]:
    engine = Engine.load(path, max_seq_len=64, kv_type="f32", nthreads=1, moe_split=moe_split, pack_cache=cache)
    return engine, engine.forward(IDS, all_logits=True)


def test_warm_start_maps_the_cache_with_identical_logits(model_file, tmp_path) -> None:
    cache = str(tmp_path / "cache")
    cold, cold_logits = _run(model_file("d", "q40"), cache)
    warm, warm_logits = _run(model_file("d", "q40"), cache)
    assert not cold.pack_cache_hit and warm.pack_cache_hit
    assert np.array_equal(cold_logits, warm_logits)
    assert len(os.listdir(cache)) == 1
    _run(model_file("d", "q40"), cache, "experts")  # another layout: its own file
    assert len(os.listdir(cache)) == 2


def test_changed_model_replaces_its_cache(model_file, tmp_path) -> None:
    path = str(tmp_path / "model.m")
    shutil.copy(model_file("a", "q80"), path)
    cache = str(tmp_path / "cache")
    _run(path, cache)
    first = os.listdir(cache)
    shutil.copy(model_file("b", "q80"), path)  # same name, another model
    engine, logits = _run(path, cache)
    assert not engine.pack_cache_hit
    assert os.listdir(cache) != first and len(os.listdir(cache)) == 1
    _, fresh = _run(path, None)
    assert np.array_equal(logits, fresh)


def test_damaged_cache_is_rebuilt(model_file, tmp_path) -> None:
    cache = str(tmp_path / "cache")
    _, expected = _run(model_file("c", "q40"), cache)
    (name,) = os.listdir(cache)
    with open(os.path.join(cache, name), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(cache, name)) // 2)
    engine, logits = _run(model_file("c", "q40"), cache)
    assert not engine.pack_cache_hit and np.array_equal(logits, expected)
    assert _run(model_file("c", "q40"), cache)[0].pack_cache_hit


def test_unwritable_cache_directory_still_runs(model_file, tmp_path) -> None:
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("")
    engine, logits = _run(model_file("a", "q40"), str(blocker / "cache"))
    assert not engine.pack_cache_hit and np.isfinite(logits).all()
