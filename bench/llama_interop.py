"""Interop with llama.cpp itself, where `llama-cpp-python` is installed (benchmarks only, never CI):

1. our quantisers (dmoe/kquants.py) against libggml's ggml_quantize_chunk, byte for byte, every type;
2. llama.cpp's quantiser (llama_model_quantize) turns an F32 file of ours into each of its file types: the
   tensor types must be our mix rule's (dmoe/mixes.py) and the bytes our quantisers' on the same values,
   and dmoe must run the file;
3. llama.cpp runs our files: the logits of llama.cpp and dmoe on the same file and prompt.

    python bench/llama_interop.py --llama-python /work/llama-venv/bin/python
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dmoe import kquants, quant  # noqa: E402
from dmoe.config import ModelConfig  # noqa: E402
from dmoe.engine import Engine  # noqa: E402
from dmoe.mixes import FILE_TYPES, tensor_types  # noqa: E402
from dmoe.modelfile import ModelFile  # noqa: E402
from dmoe.modelwriter import write_model  # noqa: E402
from dmoe.qwen_tokenizer import build_qwen3_tokenizer_json, qwen3_chat_template  # noqa: E402
from dmoe.synthetic import write_synthetic  # noqa: E402
from dmoe.tokenizer import write_tokenizer_metadata  # noqa: E402

# small, every width a multiple of 256; the real Qwen3 vocabulary (llama.cpp needs a tokenizer to load a file)
CFG = ModelConfig(vocab_size=151936, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, moe_intermediate_size=512, num_experts=8,
                  num_experts_per_tok=2)
FILE_TYPES_CHECKED = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m",
                      "q6_k", "iq4_nl", "iq4_xs")

_LLAMA_QUANTIZE = """
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype, params.nthread = int(sys.argv[3]), 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))
"""
_LLAMA_LOGITS = """
import json, sys, numpy as np
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=64, n_threads=2, logits_all=True, verbose=False)
ids = json.loads(sys.argv[2])
llm.eval(ids)
print(json.dumps(np.asarray(llm.scores[:len(ids)]).tolist()))
"""


def libggml(llama_python: str) -> ctypes.CDLL:
    site = subprocess.run([llama_python, "-c", "import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    lib = ctypes.CDLL(glob.glob(os.path.join(site, "lib", "libggml-base.*"))[0])
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def check_quantisers(lib: ctypes.CDLL) -> dict[str, int]:
    """Differing blocks per type on Gaussian, heavy-tailed, sparse and tiny rows."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4096)).astype(np.float32) * 0.02
    x[:16] = rng.standard_t(3, (16, 4096)) * 0.01
    x[16:20, ::97] *= 300
    x[20:24, 128:640] = 0
    x[24:28] *= np.float32(1e-6)
    out = {}
    for qt in kquants.QUANTISERS:
        want = np.zeros((x.shape[0], quant.row_bytes(qt, x.shape[1])), np.uint8)
        lib.ggml_quantize_chunk(int(qt), x.ctypes.data, want.ctypes.data, 0, x.shape[0], x.shape[1], None)
        per = quant.BLOCK_BYTES[qt]
        ours = kquants.quantize_blocks(x, qt)
        out[qt.name] = int((ours.reshape(-1, per) != want.reshape(-1, per)).any(1).sum())
    return out


def check_llama_files(llama_python: str, work: str) -> dict[str, dict]:
    """llama.cpp's quantiser on our F32 file: mix, bytes and a dmoe run, per file type."""
    src = os.path.join(work, "f32.m")
    write_synthetic(CFG, "f32", src, progress=False, tokenizer_json=build_qwen3_tokenizer_json(),
                    chat_template=qwen3_chat_template())
    ref = ModelFile(src)  # Gaussian weights (std 0.02), the norms 1
    results = {}
    for name in FILE_TYPES_CHECKED:
        dst = os.path.join(work, f"llama-{name}.gguf")
        r = subprocess.run([llama_python, "-c", _LLAMA_QUANTIZE, src, dst, str(FILE_TYPES[name].ftype)],
                           capture_output=True, text=True)
        if r.returncode:
            results[name] = {"error": r.stderr[-300:]}
            continue
        mf = ModelFile(dst)
        want = tensor_types(CFG, name)
        wrong_type = [n for n, t in mf.tensors.items() if t.qtype != want[n]]
        wrong_bytes = [n for n, t in mf.tensors.items() if t.qtype in kquants.QUANTISERS and not np.array_equal(
            kquants.quantize_blocks(ref.dequantize(n).reshape(-1, t.shape[-1]), t.qtype),
            mf.raw(n).reshape(-1, t.row_bytes))]
        eng = Engine.load(dst, max_seq_len=64, kv_type="f32")
        logits = eng.forward([1, 2, 3, 4], all_logits=True)
        eng.close()
        results[name] = {"tensors_of_another_type": wrong_type[:5], "n_tensors_of_another_type": len(wrong_type),
                         "tensors_with_other_bytes": wrong_bytes[:5], "n_tensors_with_other_bytes": len(wrong_bytes),
                         "dmoe_runs": bool(np.isfinite(logits).all())}
        mf.close()
    return results


def exact_logits(path: str, ids: list[int], work: str) -> np.ndarray:
    """dmoe's logits on an F32 copy of the file's dequantised weights: no engine's rounding of activations."""
    mf = ModelFile(path)
    f32 = os.path.join(work, "exact.m")
    write_model(f32, mf.config, "f32", lambda n: [mf.dequantize(n)], progress=False)
    mf.close()
    eng = Engine.load(f32, max_seq_len=64, kv_type="f32")
    out = eng.forward(ids, all_logits=True)
    eng.close()
    return out


def check_our_files(llama_python: str, work: str) -> dict[str, dict]:
    """llama.cpp runs files we write (Gaussian weights quantised by our converter's quantisers): its logits and
    ours on the same prompt, each against the exact logits of the file's dequantised weights (both engines
    round activations, each its own way)."""
    ids = [9707, 11, 1879, 374, 264, 1273, 13, 576]
    src = ModelFile(os.path.join(work, "f32.m"))
    tok = build_qwen3_tokenizer_json()
    results = {}
    for name in ("q40", "q4_k_m", "q5_k_m", "q6_k", "iq4_xs", "q8_0"):
        path = os.path.join(work, f"ours-{name}.m")
        write_model(path, CFG, name, lambda n: [src.dequantize(n)], progress=False,
                    tokenizer=lambda w: write_tokenizer_metadata(w, tok, None, None, vocab_size=CFG.vocab_size))
        r = subprocess.run([llama_python, "-c", _LLAMA_LOGITS, path, json.dumps(ids)], capture_output=True, text=True)
        if r.returncode:
            results[name] = {"error": r.stderr[-300:]}
            continue
        theirs = np.array(json.loads(r.stdout))
        eng = Engine.load(path, max_seq_len=64, kv_type="f32")
        ours = eng.forward(ids, all_logits=True)
        eng.close()
        exact = exact_logits(path, ids, work)
        scale = np.abs(exact).max()
        results[name] = {"llama_vs_exact_median": float(np.median(np.abs(theirs - exact).max(1)) / scale),
                         "dmoe_vs_exact_median": float(np.median(np.abs(ours - exact).max(1)) / scale),
                         "llama_argmax_vs_exact": float((theirs.argmax(1) == exact.argmax(1)).mean()),
                         "dmoe_argmax_vs_exact": float((ours.argmax(1) == exact.argmax(1)).mean())}
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-python", required=True, help="an interpreter that has llama-cpp-python")
    args = p.parse_args()
    report = {"quantisers_differing_blocks": check_quantisers(libggml(args.llama_python))}
    with tempfile.TemporaryDirectory() as work:
        report["llama_quantised_files"] = check_llama_files(args.llama_python, work)
        report["llama_runs_our_files"] = check_our_files(args.llama_python, work)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
