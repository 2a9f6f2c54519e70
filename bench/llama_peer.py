"""llama.cpp's side of bench_peer.py, run in the interpreter that has `llama-cpp-python` installed:
the same measurements as `launch.py bench --json`, on the same .m file (a GGUF), printed as one JSON line.

    python bench/llama_peer.py MODEL.m --threads 2 --prompt-len 64,512 --steps 128 [--no-repack]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--prompt-len", type=lambda v: [int(x) for x in v.split(",")], default=[64])
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--no-repack", action="store_true", help="llama.cpp without its weight repacking")
    args = p.parse_args()
    import llama_cpp.llama_cpp as lib
    from llama_cpp import Llama

    if args.no_repack:  # Llama() takes no such option: change the defaults it starts from
        defaults = lib.llama_model_default_params

        def no_repack():  # type: ignore[no-untyped-def]
            params = defaults()
            params.use_extra_bufts = False
            return params

        lib.llama_model_default_params = no_repack
    t0 = time.perf_counter()
    chunk = bytearray(1 << 24)  # the whole file into the page cache first, as dmoe's bench preloads its weights
    with open(args.model, "rb", buffering=0) as f:
        while f.readinto(chunk):
            pass
    llm = Llama(args.model, n_threads=args.threads, n_threads_batch=args.threads, n_ctx=max(args.prompt_len) + 256,
                n_batch=max(args.prompt_len), n_ubatch=max(args.prompt_len), verbose=False)
    result: dict[str, float | int | list[float]] = {"threads": args.threads, "load_s": time.perf_counter() - t0}
    rng = np.random.default_rng(0)
    llm.eval([int(t) for t in rng.integers(0, 100_000, max(args.prompt_len))])  # untimed: maps the weights in
    for i, n in enumerate(args.prompt_len):
        ids = [int(t) for t in rng.integers(0, 100_000, n)]
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        prefill = time.perf_counter() - t0
        result[f"prefill{n}_tok_s"] = n / prefill
        result[f"ttft{n}_s"] = prefill
        if i == 0:
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            t0 = time.perf_counter()
            for _ in range(args.steps - 1):
                llm.eval([token])
                token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            result["decode_tok_s"] = (args.steps - 1) / (time.perf_counter() - t0)
    result["peak_rss_gb_per_rank"] = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
