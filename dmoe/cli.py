"""Command line: generate (the default), chat, serve, bench, info, plan. The same command runs on every MPI rank;
rank 0 does all user I/O and workers follow the engine's commands. Errors are one line and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

from dmoe import __doc__ as package_doc
from dmoe.plan import OUTPUTS, ROUTINGS
from dmoe.supervisor import Supervisor, one_line
from dmoe.wire import WIRE_TYPES

COMMANDS = ("generate", "chat", "serve", "bench", "info", "plan", "convert")
DEPTH_CHUNK = 512  # bench --depth fills the context this many tokens a step
DEMO_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo", "qwen3-moe-demo.m")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=package_doc,
        epilog="Run on several ranks with: mpirun -n N python launch.py ...  (see README)")
    sub = p.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")

    def pause_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--max-pause", type=float,
                        help="while requests decode, read new prompts in chunks sized (from the measured speed) so a "
                        "step takes about this many seconds: the pause the decoding streams see (default 1; chunks "
                        "of 64 to 256 tokens: scheduler.py)")

    def model_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", default=DEMO_MODEL, help="the .m file (default: the bundled demo model)")
        sp.add_argument("--max-seq-len", type=int, default=4096, help="KV cache length in tokens (default 4096)")
        sp.add_argument("--nthreads", type=int, help="threads per rank (default: cores / ranks on the host)")
        sp.add_argument("--kv-type", choices=["f16", "f32", "q8"], default="f16",
                        help="KV cache type: f16 (default), f32, or q8 (int8 with a scale a 32 values: 56%% "
                             "of f16's memory, faster at long contexts)")
        sp.add_argument("--moe-split", choices=["ffn", "experts"], default="ffn",
                        help="how ranks share the experts: a slice of every expert (ffn, default) or whole experts")
        sp.add_argument("--pack-cache", default=os.environ.get("DMOE_PACK_CACHE", "auto"),
                        help="directory that keeps the weights as the kernels lay them out, so later starts skip "
                        "repacking (default: ~/.cache/dmoe, or $DMOE_PACK_CACHE); 'off' for none")
        sp.add_argument("--comm-type", choices=WIRE_TYPES, default="f32",
                        help="how the per-layer sums travel between ranks: f32 (exact, default), bf16 (half the "
                        "bytes) or q8_0 (3.6x fewer), for slow links")
        sp.add_argument("--output", choices=OUTPUTS, default="split",
                        help="where the output matrix runs: split over the ranks (default; rank 0 gathers 4 bytes a "
                        "vocabulary row a token) or all on rank 0 (no logits cross the network: for slow links)")
        sp.add_argument("--routing", choices=ROUTINGS, default="root",
                        help="who runs each layer's router: rank 0, which broadcasts its choices (default), or every "
                        "rank for itself (one message fewer a layer: for links with a long round trip)")
        sp.add_argument("--shares", help="each rank's part of the work, one number a rank (e.g. 3,1 when rank 0's "
                        "host is 3 times as fast as rank 1's); default equal")
        sp.add_argument("--verbose", action="store_true", help="print per-phase timings")

    def sampling_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default 0.6, Qwen3's advice)")
        sp.add_argument("--top-k", type=int, default=20, help="0 = off (default 20)")
        sp.add_argument("--top-p", type=float, default=0.95, help="1 = off (default 0.95)")
        sp.add_argument("--min-p", type=float, default=0.0, help="0 = off (default)")
        sp.add_argument("--repeat-penalty", type=float, default=1.0, help="1 = off (default)")
        sp.add_argument("--seed", type=int, help="same seed, same text")
        sp.add_argument("--steps", type=int, default=256, help="most tokens to generate (default 256)")

    def chat_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--system", help="system prompt")
        think = sp.add_mutually_exclusive_group()
        think.add_argument("--think", dest="think", action="store_true", default=True,
                           help="let the model think first (default)")
        think.add_argument("--no-think", dest="think", action="store_false", help="answer without thinking")

    g = sub.add_parser("generate", help="continue a prompt (default command)")
    model_args(g)
    sampling_args(g)
    chat_args(g)
    g.add_argument("--prompt", help="the prompt text")
    g.add_argument("--prompt-ids", help="comma-separated token ids instead of text (models without a tokenizer)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")

    c = sub.add_parser("chat", help="talk to the model in the terminal")
    model_args(c)
    sampling_args(c)
    chat_args(c)
    c.add_argument("--tools", help="a JSON file of OpenAI tools the model may call (you type each call's result)")
    c.add_argument("--tool-choice", choices=("auto", "required", "none"), default="auto",
                   help="with --tools: auto (default), required (the first answer of a turn must call one), none")

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP API on rank 0")
    model_args(s)
    sampling_args(s)  # the defaults for requests that leave a setting out; --steps is the default max_tokens
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--api-key", help="require this bearer token")
    s.add_argument("--model-name", help="model id reported by the API (default: the file's name)")
    s.add_argument("--parallel", type=int,
                   help="requests served at once, each in its own KV cache slot of --max-seq-len tokens (default: "
                   "as many as fit the host beside the weights, up to 4; the server prints what it allocated)")
    pause_arg(s)
    s.add_argument("--stall-timeout", type=float, default=60.0,
                   help="/health answers 503 once one forward step has run this many seconds: a rank is stopped "
                   "or far slower than the others (default 60)")

    b = sub.add_parser("bench", help="measure prefill and decode speed")
    model_args(b)
    b.add_argument("--prompt-len", type=lambda v: [int(x) for x in v.split(",")], default=[64],
                   help="prompt tokens for the prefill measurement; a comma list measures each (default 64)")
    b.add_argument("--steps", type=int, default=128, help="tokens to decode")
    b.add_argument("--depth", type=lambda v: [int(x) for x in v.split(",")], default=[],
                   help="also decode --steps tokens after this many tokens of context; a comma list measures each")
    b.add_argument("--clients", type=lambda v: [int(x) for x in v.split(",")], default=[],
                   help="also serve this many concurrent streams of the first --prompt-len and --steps tokens, "
                   "batched as the server does; a comma list measures each (aggregate tok/s, latency)")
    pause_arg(b)
    b.add_argument("--json", action="store_true", help="print one JSON object")

    sub.add_parser("convert", add_help=False,
                   help="a Hugging Face checkpoint to a .m file (`convert --help`; as converter/convert_hf.py)")

    i = sub.add_parser("info", help="describe a model file")
    i.add_argument("--model", default=DEMO_MODEL, help="the .m file")

    pl = sub.add_parser("plan", help="each rank's memory at N ranks (weights, KV cache, buffers), without loading")
    source = pl.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a .m / GGUF file (its own tensor types; only its header is read)")
    source.add_argument("--config", help="a Hugging Face config.json (see configs/), written as --type")
    pl.add_argument("--type", default="q4_k_m", help="file type for --config (default q4_k_m)")
    pl.add_argument("-n", "--ranks", type=int, nargs="+", default=[1, 2, 4], help="world sizes (default 1 2 4)")
    pl.add_argument("--moe-split", choices=["ffn", "experts"], default="ffn")
    pl.add_argument("--max-seq-len", type=int, default=4096, help="KV cache length in tokens (default 4096)")
    pl.add_argument("--kv-type", choices=["f16", "f32", "q8"], default="f16")
    pl.add_argument("--prompt-len", type=int, default=512, help="the longest prefill to hold buffers for")
    pl.add_argument("--parallel", type=int, default=1, help="KV cache slots (serve's --parallel; default 1)")
    pl.add_argument("--output", choices=OUTPUTS, default="split", help="where the output matrix runs")
    pl.add_argument("--shares", help="each rank's part of the work (one -n only), e.g. 3,1")
    pl.add_argument("--routing", choices=ROUTINGS, default="root", help="who runs the router (every-rank: all hold it)")
    pl.add_argument("--nthreads", type=int, default=1, help="threads per rank (attention scratch)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["generate", *argv]
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["convert"]:
        from dmoe.convert import main as convert

        sys.exit(convert(argv[1:], prog="dmoe convert"))
    args = parse_args(argv)
    if args.command == "info":
        from dmoe.info import describe

        _run_or_exit(lambda: print(describe(args.model)))
        return
    if args.command == "plan":
        _run_or_exit(lambda: print(_plan(args)))
        return
    _check_args(args)
    from dmoe.comm import make_comm

    comm = None
    try:
        comm = make_comm()
        sup = Supervisor(comm)
    except Exception as e:  # noqa: BLE001 - no supervisor yet: say it here; the launcher stops the other ranks
        who = f"rank {comm.rank} ({comm.host}) " if comm is not None and comm.size > 1 else ""
        print(f"dmoe: error: {who}could not start: {one_line(e)}", file=sys.stderr, flush=True)
        os._exit(1)
    try:
        if comm.rank != 0:  # the root decides what Ctrl-C and SIGTERM mean; mpirun forwards both to every rank
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # (a worker still ends when the root does: Supervisor)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        engine = _load(args, comm, sup)
        if comm.rank != 0:
            engine.serve_forever()
            sup.close()
            return
        _run_root(args, engine, sup)
    except KeyboardInterrupt:
        sup.fail("interrupted")
    except Exception as e:  # noqa: BLE001 - every failure becomes one line and a clean stop of all ranks
        sup.fail(one_line(e))


def _run_root(args: argparse.Namespace, engine: Any, sup: Any) -> None:
    from dmoe.engine import ContextFullError

    try:
        if args.command == "generate":
            code = _generate(args, engine)
        elif args.command == "chat":
            from dmoe.chat import run_chat

            code = run_chat(args, engine)
        elif args.command == "serve":
            from dmoe.server import serve

            code = serve(args, engine)
        else:
            code = _bench(args, engine)
    except (ValueError, ContextFullError) as e:  # user errors found before any collective: a clean stop
        print(f"dmoe: error: {one_line(e)}", file=sys.stderr)
        code = 1
    sup.close()
    engine.close()
    sys.stdout.flush()
    if code:
        sys.exit(code)


def _check_args(args: argparse.Namespace) -> None:
    problems = []
    if args.max_seq_len < 1:
        problems.append("--max-seq-len must be >= 1")
    if args.nthreads is not None and args.nthreads < 1:
        problems.append("--nthreads must be >= 1")
    if getattr(args, "steps", 1) < 1:
        problems.append("--steps must be >= 1")
    parallel = getattr(args, "parallel", 1)  # None: serve's default, as many as fit
    if parallel is not None and parallel < 1:
        problems.append("--parallel must be >= 1")
    if args.command == "generate":
        if (args.prompt is None) == (args.prompt_ids is None):
            problems.append("give exactly one of --prompt and --prompt-ids")
        if args.prompt_ids is not None and args.chat:
            problems.append("--chat needs a text --prompt, not --prompt-ids")
    if args.command == "bench" and min(args.prompt_len) < 1:
        problems.append("--prompt-len must be >= 1")
    if args.command == "bench" and args.depth and min(args.depth) < 1:
        problems.append("--depth must be >= 1")
    if getattr(args, "max_pause", None) is not None and args.max_pause <= 0:
        problems.append("--max-pause must be > 0")
    if args.command == "bench" and args.clients and min(args.clients) < 1:
        problems.append("--clients must be >= 1")
    if args.command == "bench":
        args.parallel = max(args.clients, default=1)
    if problems:
        print(f"dmoe: error: {problems[0]}", file=sys.stderr)
        sys.exit(2)
    if args.command in ("generate", "chat", "serve"):
        from dmoe.sampling import SamplingParams

        try:
            args.sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p, args.repeat_penalty,
                                           args.seed)
        except ValueError as e:
            print(f"dmoe: error: {e}", file=sys.stderr)
            sys.exit(2)


def _run_or_exit(fn: Any) -> None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        print(f"dmoe: error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)


def _plan(args: argparse.Namespace) -> str:
    from dmoe.footprint import report

    if min(args.ranks) < 1 or args.max_seq_len < 1 or args.prompt_len < 1 or args.nthreads < 1:
        raise ValueError("-n, --max-seq-len, --prompt-len and --nthreads must be >= 1")
    if args.model is not None:
        from dmoe.modelfile import ModelFile

        with ModelFile(args.model) as mf:
            cfg, types = mf.config, {n: t.qtype for n, t in mf.tensors.items()}
        what = os.path.basename(args.model)
    else:
        from dmoe.config import ModelConfig
        from dmoe.mixes import FILE_TYPES, tensor_types

        if args.type not in FILE_TYPES:
            raise ValueError(f"--type must be one of {', '.join(FILE_TYPES)}, got {args.type!r}")
        cfg = ModelConfig.from_hf_file(args.config)
        types, what = tensor_types(cfg, args.type), f"{os.path.basename(args.config)} as {args.type}"
    return report(cfg, types, what, args.ranks, args.moe_split, args.max_seq_len, args.kv_type, args.prompt_len,
                  args.nthreads, args.parallel, args.output, args.shares, args.routing)


def _load(args: argparse.Namespace, comm: Any, sup: Supervisor) -> Any:
    from dmoe.engine import Engine

    t0 = time.perf_counter()
    from dmoe.packcache import default_dir

    cache = {"off": None, "auto": default_dir()}.get(args.pack_cache, args.pack_cache)
    engine = Engine.load(args.model, max_seq_len=args.max_seq_len, nthreads=args.nthreads, kv_type=args.kv_type,
                         moe_split=args.moe_split, comm=comm, supervisor=sup,
                         progress=comm.rank == 0 and sys.stderr.isatty(), pack_cache=cache,
                         preload=args.command == "bench", parallel=getattr(args, "parallel", 1),
                         comm_type=args.comm_type, output=args.output, shares=args.shares, routing=args.routing)
    if comm.rank == 0:
        cfg = engine.config
        print(f"dmoe: {os.path.basename(args.model)}: {cfg.num_hidden_layers} layers, {cfg.num_experts} experts "
              f"(top-{cfg.num_experts_per_tok}), {comm.size} rank(s) x {engine.nthreads} thread(s); KV cache "
              f"{engine.kv_bytes / 2**20:.0f} MB ({args.kv_type}, "
              + (f"{engine.parallel} slots of " if engine.parallel > 1 else "") + f"{engine.max_seq_len} tokens)"
              + (f"; loaded in {time.perf_counter() - t0:.1f} s" if args.verbose else "")
              + (" from the pack cache" if args.verbose and engine.pack_cache_hit else ""), file=sys.stderr)
    return engine


def prompt_ids(args: argparse.Namespace, engine: Any) -> list[int]:
    """The prompt as ids: --prompt-ids as given, else --prompt encoded (through the chat template with --chat)."""
    if args.prompt_ids is not None:
        try:
            return [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    tok = engine.tokenizer
    if tok is None:
        raise ValueError(f"{args.model} has no tokenizer; give --prompt-ids instead of --prompt")
    text = args.prompt
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": text}]
        text = tok.render_chat(messages, enable_thinking=args.think)
    return tok.encode(text)


class _Interrupt:
    """Ctrl-C during generation finishes the current token, then stops cleanly (all ranks stay in step)."""

    def __init__(self) -> None:
        self.flag = False

    def __enter__(self) -> _Interrupt:
        self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, *_: object) -> None:
        self.flag = True

    def __exit__(self, *_: object) -> None:
        signal.signal(signal.SIGINT, self._old)


def _generate(args: argparse.Namespace, engine: Any) -> int:
    from dmoe.generation import GenerationStats, TextStream, generate

    ids = prompt_ids(args, engine)
    stats = GenerationStats()
    tok = engine.tokenizer
    stop_ids = tok.eos_ids if tok is not None else frozenset()
    out_ids: list[int] = []
    stream = TextStream(tok) if tok is not None else None
    phases = dict(engine.phase_seconds)
    with _Interrupt() as interrupt:
        for token in generate(engine, ids, args.sampling, args.steps, stop_ids, stats, lambda: interrupt.flag):
            out_ids.append(token)
            if not args.json:  # text as it comes; a model without a tokenizer streams its ids
                sys.stdout.write(stream.feed(token) if stream is not None else f"{',' if out_ids[1:] else ''}{token}")
                sys.stdout.flush()
    if args.json:
        text = tok.decode([i for i in out_ids if i not in stop_ids]) if tok is not None else None
        print(json.dumps({
            "prompt_ids": ids, "ids": out_ids, "text": text, "finish_reason": stats.finish_reason,
            "prompt_tokens": stats.prompt_tokens, "generated_tokens": stats.generated_tokens,
            "prefill_tok_s": stats.prefill_tok_s, "decode_tok_s": stats.decode_tok_s, "ttft_s": stats.ttft_s,
            "comm_ms_per_token": stats.comm_ms_per_token, "ranks": engine.comm.size, "threads": engine.nthreads,
        }))
    else:
        if stream is not None:
            sys.stdout.write(stream.finish())
        sys.stdout.write("\n")
        print(f"dmoe: {stats.summary()}", file=sys.stderr)
    if args.verbose:
        spent = {name: seconds - phases[name] for name, seconds in engine.phase_seconds.items()}
        print("dmoe: rank 0's forward time: " + ", ".join(f"{name} {s:.2f} s" for name, s in spent.items())
              + f" (the collectives inside them: {stats.comm_seconds:.2f} s)", file=sys.stderr)
    return 0


def _bench(args: argparse.Namespace, engine: Any) -> int:
    """For each --prompt-len: prefill that many random ids from an empty cache; after the first, also decode
    --steps tokens greedily; for each --depth, decode --steps tokens after that many tokens of context; for
    each --clients, that many concurrent streams (servebench.py). Reports tok/s, time to first token, load time
    and each rank's peak memory.
    The weights are read in whole at load (preload) and an untimed prefill of the longest prompt and a decode
    step run first, as llama_peer.py does for llama.cpp: the figures are steady state, start-up is load_s."""
    import numpy as np

    from dmoe.generation import GenerationStats, generate
    from dmoe.sampling import SamplingParams
    from dmoe.servebench import run_streams

    if args.clients and engine.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer; --clients serves text, which needs one")
    rng = np.random.default_rng(0)

    def random_ids(n: int) -> list[int]:
        return [int(t) for t in rng.integers(0, min(engine.config.vocab_size, 100_000), n)]

    engine.forward(random_ids(max(args.prompt_len)))
    engine.forward(random_ids(1))  # and a decode step: its kernels compile (cold numba cache) untimed too
    result: dict[str, Any] = {"ranks": engine.comm.size, "threads": engine.nthreads,
                              "load_s": engine.load_seconds}
    for i, n in enumerate(args.prompt_len):
        ids = random_ids(n)
        stats, sent = GenerationStats(), engine.comm.bytes_sent
        engine.reset()
        for _ in generate(engine, ids, SamplingParams(), args.steps if i == 0 else 1, frozenset(), stats):
            pass
        result[f"prefill{n}_tok_s"] = stats.prefill_tok_s
        result[f"ttft{n}_s"] = stats.ttft_s
        if i == 0:
            result |= {"decode_tok_s": stats.decode_tok_s, "generated_tokens": stats.generated_tokens,
                       "comm_ms_per_token": stats.comm_ms_per_token, "comm_kb_per_token_per_rank":
                       (engine.comm.bytes_sent - sent) / 1024 / max(1, n + stats.generated_tokens - 1)}
        if not args.json:
            print(f"dmoe: {stats.summary()}")
    for depth in args.depth:  # the context fills in untimed chunks; then decode from one more prompt token
        ids = random_ids(depth + 1)
        engine.reset()
        for start in range(0, depth, DEPTH_CHUNK):
            engine.forward(ids[start:min(depth, start + DEPTH_CHUNK)])
        stats = GenerationStats()
        for _ in generate(engine, ids, SamplingParams(), args.steps, frozenset(), stats):
            pass
        result[f"decode_at{depth}_tok_s"] = stats.decode_tok_s
        if not args.json:
            print(f"dmoe: after {depth} tokens of context: {stats.summary()}")
    if args.clients:  # untimed: the scheduler's first run (text decoding, batched steps) warms up
        run_streams(engine, max(args.clients), 8, 2, rng, args.max_pause)
    for clients in args.clients:
        served = run_streams(engine, clients, args.prompt_len[0], args.steps, rng, args.max_pause)
        result[f"serve{clients}"] = served
        if not args.json:
            print(f"dmoe: {clients} concurrent streams: {served['aggregate_tok_s']:.1f} tok/s in all (decode "
                  f"{served['decode_tok_s']:.1f}), time to first token {served['ttft_p50_ms']:.0f} ms (median), "
                  f"between tokens {served['itl_p50_ms']:.1f} ms (p50) {served['itl_p99_ms']:.1f} ms (p99)")
    result["peak_rss_gb_per_rank"] = [rss for rss, _ in engine.rank_report()]
    if args.json:
        print(json.dumps(result))
    return 0
