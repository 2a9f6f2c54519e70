"""dmoe against llama.cpp on the same .m file (a GGUF llama.cpp reads), in one run, same thread counts:
prefill tok/s (64- and 512-token prompts), decode tok/s (128 tokens), time to first token, peak memory,
and the ratio ours / llama.cpp; also dmoe over several ranks. Writes JSON and an SVG plot.

    pip install llama-cpp-python          # benchmarks only (it builds llama.cpp from source)
    python bench/bench_peer.py --model models/synth-30b-a3b-q40.m --threads 1 2 --ranks 1 2

`--llama-python` runs llama.cpp's side in another interpreter (e.g. a venv that has llama-cpp-python).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
METRICS = ("prefill64_tok_s", "prefill512_tok_s", "decode_tok_s")


def run_json(cmd: list[str]) -> dict[str, Any]:
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def evict(paths: list[str]) -> None:
    """Drop files from the page cache (no root needed). Here: dmoe maps its pack cache, llama.cpp the model
    file; together they exceed this box's RAM, and the kernel keeps the pages the last engine used hot at the
    expense of the pages the next one reads in, so that engine would be timed paging in from disk. Each run
    starts with the other engine's file evicted."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def pack_files(model: str) -> list[str]:
    """dmoe's pack cache files for `model` (see dmoe/packcache.py), every world size."""
    from dmoe.packcache import default_dir

    folder = os.environ.get("DMOE_PACK_CACHE") or default_dir()
    return glob.glob(os.path.join(folder, glob.escape(os.path.basename(model)) + "-*.pack"))


def ours(model: str, ranks: int, threads: int, prompts: str, steps: int) -> dict[str, Any]:
    evict([model])
    launch = [sys.executable, "launch.py", "bench", "--model", model, "--nthreads", str(threads),
              "--prompt-len", prompts, "--steps", str(steps), "--json"]
    return run_json((["mpirun", "-n", str(ranks)] if ranks > 1 else []) + launch)


def llama(python: str, model: str, threads: int, prompts: str, steps: int, no_repack: bool) -> dict[str, Any]:
    evict(pack_files(model))
    cmd = [python, os.path.join(HERE, "llama_peer.py"), model, "--threads", str(threads), "--prompt-len", prompts,
           "--steps", str(steps)]
    return run_json(cmd + (["--no-repack"] if no_repack else []))


def svg_bars(groups: dict[str, dict[str, float]], title: str) -> str:
    """A grouped bar chart: one group per configuration, one bar per metric (no plotting library needed)."""
    colors = ["#4878d0", "#ee854a", "#6acc64", "#d65f5f"]
    metrics = sorted({m for g in groups.values() for m in g})
    top = max((v for g in groups.values() for v in g.values()), default=1.0) * 1.15
    w, h, left, bottom, bar = 80 + 130 * len(groups), 320, 50, 260, 110 / max(1, len(metrics))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
           f'font-size="11"><text x="{left}" y="16" font-size="13">{title}</text>']
    for i, (name, values) in enumerate(groups.items()):
        x0 = left + 130 * i
        for j, m in enumerate(metrics):
            v = values.get(m, 0.0)
            bh = (bottom - 30) * v / top
            out.append(f'<rect x="{x0 + j * bar:.0f}" y="{bottom - bh:.0f}" width="{bar - 2:.0f}" height="{bh:.0f}" '
                       f'fill="{colors[j % 4]}"/><text x="{x0 + j * bar:.0f}" y="{bottom - bh - 3:.0f}">{v:.1f}</text>')
        out.append(f'<text x="{x0}" y="{bottom + 15}">{name}</text>')
    for j, m in enumerate(metrics):
        out.append(f'<rect x="{left + 150 * j}" y="{h - 28}" width="10" height="10" fill="{colors[j % 4]}"/>'
                   f'<text x="{left + 150 * j + 14}" y="{h - 19}">{m}</text>')
    return "\n".join(out + ["</svg>"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2],
                   help="dmoe world sizes; each rank gets the largest --threads divided by the ranks")
    p.add_argument("--prompt-len", default="64,512")
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--llama-python", default=sys.executable)
    p.add_argument("--no-llama", action="store_true", help="only dmoe")
    p.add_argument("--out", default=os.path.join(HERE, "results", "peer"))
    args = p.parse_args()
    results: dict[str, Any] = {"model": args.model, "runs": []}
    for t in args.threads:
        a = ours(args.model, 1, t, args.prompt_len, args.steps)
        entry = {"threads": t, "ranks": 1, "dmoe": a}
        if not args.no_llama:
            b = llama(args.llama_python, args.model, t, args.prompt_len, args.steps, False)
            c = llama(args.llama_python, args.model, t, args.prompt_len, args.steps, True)
            entry |= {"llama.cpp": b, "llama.cpp_no_repack": c,
                      "ratio": {m: a[m] / b[m] for m in METRICS if a.get(m) and b.get(m)}}
        results["runs"].append(entry)
        print(json.dumps(entry), flush=True)
    t_max = max(args.threads)
    for n in args.ranks:
        if n > 1:
            a = ours(args.model, n, max(1, t_max // n), args.prompt_len, args.steps)
            results["runs"].append({"threads": max(1, t_max // n), "ranks": n, "dmoe": a})
            print(json.dumps(results["runs"][-1]), flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=1)
    groups = {}
    for r in results["runs"]:
        groups[f"dmoe {r['ranks']}x{r['threads']}"] = {m: r["dmoe"][m] for m in METRICS if m in r["dmoe"]}
        if "llama.cpp" in r:
            groups[f"llama.cpp 1x{r['threads']}"] = {m: r["llama.cpp"][m] for m in METRICS if m in r["llama.cpp"]}
    with open(args.out + ".svg", "w") as f:
        f.write(svg_bars(groups, f"tok/s on {os.path.basename(args.model)} (ranks x threads)"))
    print(f"wrote {args.out}.json and {args.out}.svg", file=sys.stderr)


if __name__ == "__main__":
    main()
