"""Train the bundled demo model: a small Qwen3-MoE with the real Qwen3 tokenizer, on the Python
documentation that ships with every Python (`pydoc_data.topics`, PSF licence), so a fresh machine can
run `python launch.py --prompt ...` with nothing downloaded.

    python scripts/train_demo.py -o dmoe/demo/qwen3-moe-demo.m

The 151936-wide output layer is what costs on a CPU, and the corpus uses only ~6k of those ids. Embeddings
are tied, and during training the model holds only the rows of the ids that occur; every other row is zero
in the saved model, so its logit is exactly 0. The loss is the exact full-vocabulary cross-entropy of that
saved model: the softmax normaliser is the used logits' plus (V - U) * exp(0), one constant term. Training
therefore lifts the chosen logits well above 0, so an id absent from the corpus can never win the argmax
(the sample at the end checks it through dmoe's engine). The last quarter of training computes with the
weights rounded exactly as the Q4_0 file stores them, so the file loses almost nothing to quantisation.
Same Python (same text), same machine and same thread count: the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import sys
import tempfile
import time

# Threads sleep rather than spin when idle: on a busy machine spinning threads starve each other (5x slower).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dmoe import quant  # noqa: E402
from dmoe.mixes import FILE_TYPES  # noqa: E402
from dmoe.qwen_tokenizer import QWEN3_VOCAB_SIZE, build_qwen3_tokenizer_json, write_qwen3_tokenizer_files  # noqa: E402

SEED = 1234
THREADS = 2
END_OF_TEXT = 151643  # <|endoftext|>: separates topics, so the model learns where a text ends
# A real Qwen3-MoE layout in miniature: GQA 2, head_dim larger than hidden / heads, q/k norm, top-2 of 8.
DIMS = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)
SEQ_LEN = 256
BATCH = 4
STEPS = 2000
LR = 1e-2
EMBED_STD = 0.125  # 1 / sqrt(hidden): logits start near unit scale, not HF's 0.02 (which takes ~200 steps to grow)
WARMUP = 100
QAT_FRACTION = 0.25  # the last quarter of training computes with the weights as the file stores them (Q4_0)
AUX_LOSS = 0.01  # Switch-style load balancing, so every expert gets used
QTYPE = "q40"
QT_Q4_0 = FILE_TYPES[QTYPE].base
PROMPTS = ("The list", "A dictionary is", "To open a file")


def corpus() -> list[str]:
    """The pydoc topics in sorted key order (the text differs between Python versions, so the hash is printed)."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def tokenize(texts: list[str]) -> np.ndarray:
    """One stream of Qwen3 ids: every topic followed by <|endoftext|>."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(build_qwen3_tokenizer_json())
    ids: list[int] = []
    for text in texts:
        ids += tok.encode(text).ids + [END_OF_TEXT]
    return np.array(ids, dtype=np.int64)


def hf_config(vocab_size: int) -> dict:
    """The transformers config; `vocab_size` is the compact one during training and 151936 when saved."""
    return dict(DIMS, vocab_size=vocab_size, tie_word_embeddings=True, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                max_position_embeddings=4096, router_aux_loss_coef=AUX_LOSS,
                **({"bos_token_id": END_OF_TEXT, "eos_token_id": END_OF_TEXT} if vocab_size > END_OF_TEXT else {}))


def full_vocab_loss(logits: torch.Tensor, targets: torch.Tensor, unused: int) -> torch.Tensor:
    """Cross-entropy over all 151936 ids when the `unused` ids have logit exactly 0 (zero embedding rows):
    their softmax mass is `unused` * exp(0), one constant term in the normaliser."""
    lse = torch.logaddexp(torch.logsumexp(logits, -1), torch.tensor(math.log(unused)))  # [B, T]
    return (lse - logits.gather(-1, targets[..., None])[..., 0]).mean()


def q4_0_round_trip(w: torch.Tensor) -> torch.Tensor:
    """`w` as the converter will store it: ggml's Q4_0 along the last dimension, bit for bit, dequantised."""
    x = w.detach().reshape(-1, w.shape[-1]).numpy()
    return torch.from_numpy(quant.dequantize(quant.quantize(x, QT_Q4_0), QT_Q4_0, x.shape[-1])).reshape(w.shape)


def train(stream: np.ndarray, used: np.ndarray, steps: int) -> torch.nn.Module:
    """Train the compact-vocabulary model on random windows of `stream` (compact ids), seeded."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    torch.manual_seed(SEED)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**hf_config(len(used)))).train()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, EMBED_STD)
    # Decay only the matrices inside the blocks: the (tied) embedding must grow to lift the chosen logits
    # above the unused ids' 0, and norms are scales.
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    data = torch.from_numpy(stream)
    gen = torch.Generator().manual_seed(SEED)
    unused = QWEN3_VOCAB_SIZE - len(used)
    # Quantisation-aware phase: the forward and backward see Q4_0-rounded weights, the update goes to the float
    # masters (a straight-through estimator). Norms and the router stay F32 in the file, so they are not rounded.
    qat_from = int(steps * (1 - QAT_FRACTION))
    rounded = [p for n, p in model.named_parameters() if p.ndim >= 2 and not n.endswith("mlp.gate.weight")]
    t0, curve = time.perf_counter(), []
    for step in range(steps):
        starts = torch.randint(0, len(data) - SEQ_LEN - 1, (BATCH,), generator=gen)
        window = torch.stack([data[s:s + SEQ_LEN + 1] for s in starts.tolist()])  # [B, T+1]
        qat = step >= qat_from
        if qat:
            masters = [p.detach().clone() for p in rounded]
            with torch.no_grad():
                for p in rounded:
                    p.copy_(q4_0_round_trip(p))
        out = model.model(input_ids=window[:, :-1], output_router_logits=True)
        logits = model.lm_head(out.last_hidden_state)  # [B, T, U]
        loss = full_vocab_loss(logits, window[:, 1:], unused)
        aux = load_balancing_loss_func(out.router_logits, DIMS["num_experts"], DIMS["num_experts_per_tok"])
        opt.zero_grad(set_to_none=True)
        (loss + AUX_LOSS * aux).backward()
        if qat:
            with torch.no_grad():
                for p, master in zip(rounded, masters, strict=True):
                    p.copy_(master)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        curve.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {np.mean(curve[-100:]):.3f}  aux {aux.item():.3f}  "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    marks = np.linspace(0, steps, 11).astype(int)
    print("loss curve (mean per tenth of training): "
          + " ".join(f"{np.mean(curve[a:b]):.2f}" for a, b in zip(marks[:-1], marks[1:], strict=True) if b > a))
    return model.eval()


def save_full(model: torch.nn.Module, used: np.ndarray, directory: str) -> None:
    """The trained model as a 151936-vocabulary HF checkpoint: used rows in place, all others zero."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    full = Qwen3MoeForCausalLM(Qwen3MoeConfig(**hf_config(QWEN3_VOCAB_SIZE)))
    state = {k: v for k, v in model.state_dict().items() if k not in ("model.embed_tokens.weight", "lm_head.weight")}
    embed = torch.zeros(QWEN3_VOCAB_SIZE, DIMS["hidden_size"])
    embed[torch.from_numpy(used)] = model.model.embed_tokens.weight.detach()
    state["model.embed_tokens.weight"] = embed
    missing, unexpected = full.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    full.tie_weights()
    full.save_pretrained(directory)
    write_qwen3_tokenizer_files(directory)


# .m tensor names of the transformers parameters outside the layers, and inside a layer (experts' gate_up_proj
# is two tensors); a tied lm_head is the embedding and is not a parameter of its own
_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}
_LAYER_NAMES = {"self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
                "self_attn.v_proj.weight": "attn_v", "self_attn.o_proj.weight": "attn_output",
                "self_attn.q_norm.weight": "attn_q_norm", "self_attn.k_norm.weight": "attn_k_norm",
                "mlp.gate.weight": "ffn_gate_inp", "input_layernorm.weight": "attn_norm",
                "post_attention_layernorm.weight": "ffn_norm", "mlp.experts.down_proj": "ffn_down_exps"}


def load_file_weights(model: torch.nn.Module, path: str, rows: np.ndarray | None = None) -> None:
    """Copy a .m file's dequantised tensors into a transformers Qwen3MoeForCausalLM (only embedding `rows`, for
    the compact model): what the engine computes from the file, computed by transformers. The tests use it as
    the reference for quantised files, since it isolates our compute from the format's rounding."""
    from dmoe.modelfile import ModelFile

    with ModelFile(path) as mf, torch.no_grad():
        for name, p in model.named_parameters():
            if name in _NAMES:
                value = mf.dequantize(_NAMES[name])
                value = value if rows is None or name != "model.embed_tokens.weight" else value[rows]
            else:
                layer, rest = name.split(".", 3)[2:]
                b = f"blk.{layer}."
                if rest == "mlp.experts.gate_up_proj":
                    value = np.concatenate([mf.dequantize(b + "ffn_gate_exps.weight"),
                                            mf.dequantize(b + "ffn_up_exps.weight")], axis=1)
                else:
                    value = mf.dequantize(b + _LAYER_NAMES[rest] + ".weight")
            p.copy_(torch.from_numpy(np.ascontiguousarray(value)).reshape(p.shape))
    model.tie_weights()


def corpus_loss(model: torch.nn.Module, stream: np.ndarray, unused: int) -> float:
    """The full-vocabulary loss of the compact model on 64 evenly spaced windows of the corpus."""
    starts = np.linspace(0, len(stream) - SEQ_LEN - 1, 64).astype(np.int64)
    x = torch.from_numpy(np.stack([stream[s:s + SEQ_LEN + 1] for s in starts]))
    with torch.no_grad():
        losses = [full_vocab_loss(model(input_ids=b[:, :-1]).logits, b[:, 1:], unused) for b in x.split(16)]
    return float(torch.stack(losses).mean())


def sample(path: str, used: np.ndarray, steps: int = 48) -> None:
    """Greedy continuations from the .m file through dmoe's engine; checks no unused id ever wins."""
    from dmoe.engine import Engine

    eng = Engine.load(path, max_seq_len=512, nthreads=THREADS)
    tok, allowed, lowest = eng.tokenizer, set(used.tolist()), math.inf
    for prompt in PROMPTS:
        eng.reset()
        ids, logits = [], eng.forward(tok.encode(prompt))
        for _ in range(steps):
            ids.append(int(logits[-1].argmax()))
            lowest = min(lowest, float(logits[-1, ids[-1]]))
            if ids[-1] not in allowed:
                raise AssertionError(f"greedy decoding picked unused id {ids[-1]} after {prompt!r}")
            if ids[-1] in tok.eos_ids:
                break
            logits = eng.forward([ids[-1]])
        print(f"{prompt!r} -> {tok.decode(ids)!r}")
    print(f"every greedy pick is a corpus id; the lowest winning logit was {lowest:.1f} (unused ids: 0)")
    eng.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train and convert the bundled Qwen3-MoE demo model.")
    p.add_argument("-o", "--output", required=True, help="the .m file to write")
    p.add_argument("--steps", type=int, default=STEPS, help=f"optimiser steps (default {STEPS})")
    p.add_argument("--hf-dir", help="keep the HF checkpoint here (default: a temporary directory); the file's "
                                    "general.name is this directory's name")
    args = p.parse_args(argv)
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()
    texts = corpus()
    digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()[:16]
    stream = tokenize(texts)
    used = np.unique(stream)  # the compact vocabulary: sorted Qwen3 ids that occur
    compact = np.searchsorted(used, stream)
    print(f"corpus: {len(texts)} pydoc topics (Python {sys.version.split()[0]}, sha256 {digest}), "
          f"{len(stream)} tokens, {len(used)} distinct ids; {time.perf_counter() - t0:.0f} s", flush=True)
    model = train(compact, used, args.steps)
    print(f"trained in {time.perf_counter() - t0:.0f} s ({time.process_time():.0f} s of CPU)", flush=True)

    from converter.convert_hf import convert

    # The converter names the model after the directory: a fixed name keeps the file's bytes reproducible.
    tmp = None if args.hf_dir else tempfile.mkdtemp(prefix="dmoe-demo-")
    hf_dir = args.hf_dir or os.path.join(tmp, "qwen3-moe-demo")
    try:
        save_full(model, used, hf_dir)
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        summary = convert(hf_dir, args.output, QTYPE, progress=False)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    unused = QWEN3_VOCAB_SIZE - len(used)
    trained = corpus_loss(model, compact, unused)
    load_file_weights(model, args.output, used)
    print(f"wrote {args.output}: {summary['bytes'] / 2**20:.2f} MiB ({QTYPE}); corpus loss {trained:.3f} trained, "
          f"{corpus_loss(model, compact, unused):.3f} from the file")
    sample(args.output, used)
    print(f"total {time.perf_counter() - t0:.0f} s ({time.process_time():.0f} s of CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
