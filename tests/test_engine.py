"""The engine on one process against transformers' Qwen3MoeForCausalLM on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_models import CONFIGS, load_reference, reference_logits, reference_on_file_weights

from dmoe.engine import ContextFullError, Engine
from dmoe.model import SHARED_STEP_TOKENS

SEQ = 24


def _ids(vocab: int, n: int = SEQ, seed: int = 0) -> list[int]:
    return [int(i) for i in np.random.default_rng(seed).integers(0, vocab, n)]


def test_forward_from_another_thread_uses_the_engines_threads(model_file) -> None:
    """numba's thread count is per OS thread: a forward run from a fresh thread (whose count is every core)
    must still run on the engine's nthreads, which its per-thread attention scratch is sized for."""
    import threading

    import numba

    eng = Engine.load(model_file("a", "f32"), max_seq_len=64, kv_type="f32", nthreads=1)
    ids = _ids(eng.config.vocab_size)
    here = eng.forward(ids, all_logits=True)
    eng.reset()
    seen: dict[str, object] = {}

    def run() -> None:
        seen["logits"] = eng.forward(ids, all_logits=True)
        seen["threads"] = numba.get_num_threads()

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert seen["threads"] == 1
    np.testing.assert_array_equal(seen["logits"], here)


def test_package_exports_the_engine() -> None:
    import dmoe

    assert dmoe.Engine is Engine


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_f32_logits_match_transformers(name: str, hf_checkpoint, model_file) -> None:
    eng = Engine.load(model_file(name, "f32"), max_seq_len=128, kv_type="f32", nthreads=2)
    ids = _ids(eng.config.vocab_size)
    ours = eng.forward(ids, all_logits=True)
    ref = reference_logits(load_reference(hf_checkpoint(name)), ids)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize(("name", "kv_type"), [("d", "f32"), ("b", "f16"), ("c", "f32")])
def test_a_long_prompt_matches_transformers(name: str, kv_type: str, hf_checkpoint, model_file) -> None:
    """A prompt longer than a shared step (SHARED_STEP_TOKENS) attends by tiles of tokens (GQA 4: tiles of 8
    tokens; GQA 6: 5; MHA: 32), the same prompt fed in chunks token by token: both match transformers."""
    eng = Engine.load(model_file(name, "f32"), max_seq_len=320, kv_type=kv_type, nthreads=2)
    ids = _ids(eng.config.vocab_size, SHARED_STEP_TOKENS + 43, seed=3)
    ref = reference_logits(load_reference(hf_checkpoint(name)), ids)
    tiled = eng.forward(ids, all_logits=True)
    eng.reset()
    chunked = np.concatenate([eng.forward(ids[i:i + 100], all_logits=True) for i in range(0, len(ids), 100)])
    tolerance = (1e-4 if kv_type == "f32" else 3e-3) * np.abs(ref).max()
    assert np.abs(tiled - ref).max() <= tolerance
    assert np.abs(chunked - ref).max() <= tolerance


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_f32_greedy_continuation_matches_transformers(name: str, hf_checkpoint, model_file) -> None:
    eng = Engine.load(model_file(name, "f32"), max_seq_len=128, kv_type="f32", nthreads=2)
    prompt = _ids(eng.config.vocab_size, 8, seed=1)
    ours, logits = [], eng.forward(prompt)
    for _ in range(32):
        ours.append(int(logits[-1].argmax()))
        logits = eng.forward([ours[-1]])
    ref = load_reference(hf_checkpoint(name))
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, pad_token_id=0)
    assert ours == out[0, len(prompt):].tolist()


# Float weights are used as they are: the only difference from the reference is summation order.
# Q8_0/Q4_0 weights multiply Q8_0-quantised activations (as llama.cpp does): each activation is
# rounded to 1/254 of its 32-block's largest value, which moves these small random models' logits
# by a median of 1-3% of the largest logit; where that perturbation flips a near-tied router
# choice a single position can move more, so the bound is on the median and the 80th percentile.
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("qtype", ["f16", "bf16", "q80", "q40"])
def test_other_types_match_reference_on_dequantised_weights(name: str, qtype: str, hf_checkpoint,
                                                            model_file) -> None:
    path = model_file(name, qtype)
    eng = Engine.load(path, max_seq_len=128, kv_type="f32", nthreads=2)
    ids = _ids(eng.config.vocab_size)
    ours = eng.forward(ids, all_logits=True)
    ref = reference_logits(reference_on_file_weights(hf_checkpoint(name), path), ids)
    scale = np.abs(ref).max()
    per_position = np.abs(ours - ref).max(axis=1) / scale
    if qtype in ("f16", "bf16"):
        assert per_position.max() <= 1e-4
    else:
        assert np.median(per_position) <= 0.04
        assert np.quantile(per_position, 0.8) <= 0.06
        assert (ours.argmax(1) == ref.argmax(1)).mean() >= 0.75


# The hub's files: llama.cpp's tensor mixes (K-quants with Q6_K output and more-bits layers, IQ4, the legacy
# 32-weight types), on config k, whose widths take 256-weight super-blocks. Same bounds as Q4_0 above.
@pytest.mark.parametrize("file_type", ["q4_k_m", "q5_k_m", "q6_k", "iq4_xs", "q4_0", "q3_k_m", "q2_k", "q4_k_s",
                                       "q5_0", "q4_1", "q5_1", "iq4_nl"])
def test_hub_mixes_match_reference_on_dequantised_weights(file_type: str, hf_checkpoint, mix_file) -> None:
    path = mix_file(file_type)
    eng = Engine.load(path, max_seq_len=128, kv_type="f32", nthreads=2)
    ids = _ids(eng.config.vocab_size)
    ours = eng.forward(ids, all_logits=True)
    ref = reference_logits(reference_on_file_weights(hf_checkpoint("k"), path), ids)
    per_position = np.abs(ours - ref).max(axis=1) / np.abs(ref).max()
    assert np.median(per_position) <= 0.04
    assert np.quantile(per_position, 0.8) <= 0.06
    assert (ours.argmax(1) == ref.argmax(1)).mean() >= 0.75


@pytest.mark.parametrize("name", ["b", "d"])
def test_decode_through_cache_equals_one_pass(name: str, model_file) -> None:
    eng = Engine.load(model_file(name, "f32"), max_seq_len=64, kv_type="f32", nthreads=2)
    ids = _ids(eng.config.vocab_size, 20, seed=2)
    full = eng.forward(ids, all_logits=True)
    eng.reset()
    prefix = eng.forward(ids[:7], all_logits=True)
    steps = np.concatenate([prefix] + [eng.forward([i]) for i in ids[7:]])
    assert np.abs(steps - full).max() <= 1e-5 * np.abs(full).max()


def test_prefix_reuse_after_truncate(model_file) -> None:
    eng = Engine.load(model_file("a", "f32"), max_seq_len=64, kv_type="f32", nthreads=2)
    a, b, c = _ids(256, 6, 3), _ids(256, 5, 4), _ids(256, 4, 5)
    eng.forward(a + b)
    eng.truncate(len(a))
    assert eng.tokens == a
    reused = eng.forward(c, all_logits=True)
    eng.reset()
    fresh = eng.forward(a + c, all_logits=True)[len(a):]
    assert np.abs(reused - fresh).max() <= 1e-5 * np.abs(fresh).max()


@pytest.mark.parametrize(("kv_type", "typical", "worst"), [("f16", 2e-3, 5e-3), ("q8", 3e-2, 0.12)])
def test_compact_kv_caches_stay_close(kv_type: str, typical: float, worst: float, model_file) -> None:
    """The f16 and int8 caches' logits against the f32 cache's, the prompt by tiles and then token by token: each
    row's largest error relative to its largest logit, the median row's and the worst (measured: f16 0.05% and
    0.14%, int8 1.3% and 6.6%; the kernels are exact against their own rounding in test_attention)."""
    logits = {}
    for kv in ("f32", kv_type):
        eng = Engine.load(model_file("c", "f32"), max_seq_len=320, kv_type=kv, nthreads=2)
        ids = _ids(512, SHARED_STEP_TOKENS + 20, 6)
        logits[kv] = np.concatenate([eng.forward(ids[:-10], all_logits=True)]
                                    + [eng.forward([t]) for t in ids[-10:]])
    rows = np.abs(logits[kv_type] - logits["f32"]).max(1) / np.abs(logits["f32"]).max(1)
    assert np.median(rows) <= typical and rows.max() <= worst


def test_q8_needs_whole_runs_of_32(model_file) -> None:
    """An int8 cache scales runs of 32 values of a head: a head dimension of 16 is refused before any loading."""
    with pytest.raises(ValueError, match="multiple of 32"):
        Engine.load(model_file("b", "f32"), kv_type="q8")


def test_context_limit_and_bad_ids(model_file) -> None:
    eng = Engine.load(model_file("a", "f32"), max_seq_len=16, kv_type="f32", nthreads=1)
    eng.forward(_ids(256, 10))
    with pytest.raises(ContextFullError, match="do not fit the context of 16"):
        eng.forward(_ids(256, 7))
    assert eng.position == 10
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.forward([256])
