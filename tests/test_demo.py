"""The bundled demo model (dmoe/demo/qwen3-moe-demo.m): the file a fresh checkout runs with no download.
It must open, carry Qwen3's real tokenizer and chat template, speak pydoc-like English through launch.py's
defaults, never emit an id it was not trained on, and compute what transformers computes on its weights."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from dmoe.cli import DEMO_MODEL
from dmoe.engine import Engine
from dmoe.modelfile import ModelFile
from dmoe.qwen_tokenizer import QWEN3_VOCAB_SIZE, qwen3_chat_template
from dmoe.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ("The list", "A dictionary is")
STEPS = 32


@pytest.fixture(scope="module")
def demo() -> Iterator[ModelFile]:
    mf = ModelFile(DEMO_MODEL)
    yield mf
    mf.close()


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    eng = Engine.load(DEMO_MODEL, max_seq_len=128, kv_type="f32", nthreads=1)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def generated(engine: Engine) -> list[dict]:
    """Greedy continuations of PROMPTS: the first through launch.py with no --model (the path a new user
    takes), the others through the engine in this process (each new process pays numba's start-up)."""
    cmd = [sys.executable, os.path.join(ROOT, "launch.py"), "--prompt", PROMPTS[0], "--temperature", "0",
           "--steps", str(STEPS), "--json", "--nthreads", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    outs = [json.loads(run.stdout.strip().splitlines()[-1])]
    tok = engine.tokenizer
    for prompt in PROMPTS[1:]:
        engine.reset()
        ids, logits = [], engine.forward(tok.encode(prompt))
        while len(ids) < STEPS and (not ids or ids[-1] not in tok.eos_ids):
            ids.append(int(logits[-1].argmax()))
            logits = engine.forward([ids[-1]])
        outs.append({"ids": ids, "text": tok.decode([i for i in ids if i not in tok.eos_ids])})
    return outs


def test_demo_is_small_and_has_qwen3_tokenizer_and_template(demo: ModelFile) -> None:
    # 6 MB of weights (mostly the 151936 x 64 Q4_0 embedding) and 12 MB of Qwen's tokenizer, which the file
    # carries twice: as llama.cpp's token and merge lists, and as the HF tokenizer.json
    assert os.path.getsize(DEMO_MODEL) <= 20 * 2**20
    cfg = demo.config
    assert cfg.vocab_size == QWEN3_VOCAB_SIZE and cfg.tie_word_embeddings
    assert cfg.num_experts > cfg.num_experts_per_tok > 1 and cfg.num_attention_heads > cfg.num_key_value_heads
    tok = Tokenizer.from_gguf_fields(demo.metadata)
    assert tok is not None and tok.chat_template == qwen3_chat_template()
    assert tok.encode("Hello world") == [9707, 1879]  # Qwen's ids, not a toy vocabulary
    assert tok.token_to_id("<|im_end|>") == 151645 and tok.eos_ids >= {151643, 151645}
    assert "<|im_start|>assistant" in tok.render_chat([{"role": "user", "content": "hi"}])


def _pydoc_words() -> set[str]:
    from pydoc_data.topics import topics

    return {w.lower() for text in topics.values() for w in re.findall(r"[A-Za-z]+", text)}


def test_launch_default_model_writes_pydoc_english(generated: list[dict]) -> None:
    vocabulary = _pydoc_words()
    for out in generated:
        words = [w.lower() for w in re.findall(r"[A-Za-z]+", out["text"])]
        assert len(words) >= 8, out["text"]
        known = sum(w in vocabulary for w in words) / len(words)
        assert known >= 0.9, out["text"]
        assert len(set(words)) >= 5, out["text"]  # sentences, not one word repeated


def test_greedy_never_picks_an_untrained_id(demo: ModelFile, generated: list[dict]) -> None:
    """Ids absent from the training text have zero embedding rows (logit exactly 0); trained ones win."""
    zero = ~demo.dequantize("token_embd.weight").any(axis=1)  # [V]
    assert 1000 < (~zero).sum() < 20000
    for out in generated:
        assert not zero[out["ids"]].any(), out["ids"]


def test_engine_logits_match_transformers_on_dequantised_weights(demo: ModelFile, engine: Engine) -> None:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from scripts.train_demo import load_file_weights

    engine.reset()
    ids = engine.tokenizer.encode("A dictionary is a mapping object that maps keys to values.")
    ours = engine.forward(ids, all_logits=True)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**demo.config.to_hf())).eval()
    load_file_weights(model, DEMO_MODEL)  # transformers on the file's dequantised weights
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].double().numpy()
    # Q4_0 weights multiply Q8_0-quantised activations (as llama.cpp does); the float reference does not.
    per_position = np.abs(ours - ref).max(axis=1) / np.abs(ref).max()
    assert np.median(per_position) <= 0.03
    assert (ours.argmax(1) == ref.argmax(1)).mean() >= 0.9
