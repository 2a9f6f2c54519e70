"""launch.py as a user meets it: output, JSON, seeds, Ctrl-C, and one-line errors with non-zero exits."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from hf_models import load_reference
from processes import wait_for_output

from dmoe.cli import COMMANDS, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch.py", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def test_json_greedy_matches_transformers(hf_checkpoint, model_file) -> None:
    r = launch("--model", model_file("a", "f32"), "--prompt-ids", "5,17,42", "--steps", "12", "--temperature", "0",
               "--kv-type", "f32", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("prompt_ids", "ids", "text", "prefill_tok_s", "decode_tok_s", "ttft_s", "comm_ms_per_token"):
        assert key in out
    assert out["prompt_ids"] == [5, 17, 42] and out["finish_reason"] == "length"
    with torch.no_grad():
        ref = load_reference(hf_checkpoint("a")).generate(torch.tensor([[5, 17, 42]]), max_new_tokens=12,
                                                          do_sample=False, pad_token_id=0)
    assert out["ids"] == ref[0, 3:].tolist()


def test_seed_reproduces(model_file) -> None:
    def ids(seed: str) -> list[int]:
        r = launch("--model", model_file("c", "q80"), "--prompt-ids", "1,2", "--steps", "24", "--temperature", "1.5",
                   "--top-k", "0", "--top-p", "1", "--seed", seed, "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["ids"]

    first = ids("7")
    assert ids("7") == first
    assert ids("8") != first


def test_text_prompt_streams_and_reports(text_model) -> None:
    r = launch("--model", text_model(), "--prompt", "Once upon a time", "--steps", "10", "--seed", "1", "--verbose")
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n") and len(r.stdout) > 1
    *_, loaded, timing, phases = r.stderr.strip().splitlines()
    assert "loaded in" in loaded
    assert "prompt 4 tokens" in timing and "tok/s" in timing and "time to first token" in timing
    spent = dict(re.findall(r"(\w+) (\d+\.\d+) s", phases))
    assert set(spent) >= {"embedding", "attention", "experts", "output"}, phases


def test_info(text_model) -> None:
    r = launch("info", "--model", text_model())
    assert r.returncode == 0, r.stderr
    for line in ("architecture    qwen3moe", "experts         8, top-2", "vocab           151936",
                 "tokenizer       yes (HF tokenizer.json inside)", "chat template   yes"):
        assert line in r.stdout


def test_info_shows_the_mix(mix_file) -> None:
    """A Q4_K_M file of 2 layers: llama.cpp raises attn_v and ffn_down of layer 1 (the last eighth) to Q6_K."""
    r = launch("info", "--model", mix_file("q4_k_m"))
    assert r.returncode == 0, r.stderr
    for line in ("file type       Q4_K_M", "  output          Q6_K", "  attn_v          Q4_K x1, Q6_K x1",
                 "  ffn_down_exps   Q4_K x1, Q6_K x1", "  ffn_gate_inp    F32 x2", "  token_embd      Q4_K"):
        assert line in r.stdout, r.stdout


@pytest.mark.parametrize("args,code,message", [
    (["--model", "/no/such.m", "--prompt-ids", "1"], 1, "/no/such.m: no such file"),
    (["--prompt-ids", "1", "--top-p", "2"], 2, "top_p"),
    (["--prompt-ids", "1", "--steps", "0"], 2, "--steps must be >= 1"),
    (["--temperature", "0"], 2, "give exactly one of --prompt and --prompt-ids"),
    (["--prompt-ids", "1,x"], 1, "--prompt-ids must be comma-separated integers"),
    (["--prompt-ids", "1,99999"], 1, "outside the vocabulary"),
    (["--prompt-ids", ",".join(["1"] * 40), "--max-seq-len", "32"], 1, "the context holds 32"),
    (["--prompt", "hello"], 1, "has no tokenizer; give --prompt-ids"),
    (["--prompt-ids", "1", "--kv-type", "f8"], 2, "invalid choice"),
])
def test_bad_input_is_one_line(args: list[str], code: int, message: str, model_file) -> None:
    if "--model" not in args:
        args = ["--model", model_file("a", "q40"), *args]
    r = launch(*args)
    assert r.returncode == code, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "convert"])
def test_help_prints_for_every_command(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """argparse formats help text with %: a stray percent sign breaks --help only when asked."""
    with pytest.raises(SystemExit) as stop:
        parse_args([command, "--help"])
    assert stop.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["serve", "bench"])
def test_no_kv_slots_is_refused(command: str) -> None:
    """serve's --parallel may be left out (as many as fit), but never 0."""
    flag = ["--parallel", "0"] if command == "serve" else ["--clients", "0"]
    r = launch(command, *flag)
    assert r.returncode == 2 and "must be >= 1" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_ctrl_c_stops_cleanly(long_model) -> None:
    """Interrupted once generating (a model without a tokenizer streams its ids): exit 0, the ids so far."""
    proc = subprocess.Popen([sys.executable, "launch.py", "--model", long_model, "--prompt-ids", "1,2",
                             "--steps", "100000", "--max-seq-len", "200000", "--temperature", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    wait_for_output(proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    ids = out.strip().split(",")
    assert 0 < len(ids) < 100000 and all(i.isdigit() for i in ids)
    assert f"generated {len(ids)} tokens" in err


@pytest.mark.parametrize("ranks", [1, 2])
def test_bench_serves_concurrent_streams(ranks: int, text_model, model_file) -> None:
    """launch.py bench --clients: every stream gets all its tokens; a model without a tokenizer is refused."""
    cmd = ["mpirun", "-n", str(ranks), sys.executable, "launch.py"] if ranks > 1 else [sys.executable, "launch.py"]
    r = subprocess.run([*cmd, "bench", "--model", text_model(), "--prompt-len", "12", "--steps", "6", "--clients",
                        "1,3", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for clients in (1, 3):
        served = out[f"serve{clients}"]
        assert served["clients"] == clients and served["generated_tokens"] == clients * 6
        assert served["aggregate_tok_s"] > 0 and served["decode_tok_s"] > 0 and served["ttft_p50_ms"] > 0
        assert 0 < served["itl_p50_ms"] <= served["itl_p99_ms"]
    r = subprocess.run([sys.executable, "launch.py", "bench", "--model", model_file("a", "q40"), "--clients", "2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert r.returncode != 0 and "has no tokenizer" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("ranks", [1, 2])
def test_bench_reports_every_figure(ranks: int, model_file) -> None:
    """launch.py bench as bench_peer.py reads it, run twice so that the second run maps (and preloads) the pack
    cache the first wrote. Per token the root sends, per layer, two all-reduces of the hidden state and the
    router's k ids and weights (float32): the bytes it reports must be that, plus a few bytes of protocol."""
    from dmoe.modelfile import ModelFile

    path = model_file("a", "q40")
    cmd = ["mpirun", "-n", "2", sys.executable, "launch.py"] if ranks > 1 else [sys.executable, "launch.py"]
    for _ in range(2):
        r = subprocess.run([*cmd, "bench", "--model", path, "--prompt-len", "8,16", "--steps", "5", "--depth", "20,40",
                            "--json"], capture_output=True, text=True, cwd=ROOT, timeout=240)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out["ranks"] == ranks and out["generated_tokens"] == 5
        assert all(out[k] > 0 for k in ("prefill8_tok_s", "prefill16_tok_s", "decode_tok_s", "ttft8_s", "load_s",
                                        "decode_at20_tok_s", "decode_at40_tok_s"))
        assert len(out["peak_rss_gb_per_rank"]) == ranks
    with ModelFile(path) as mf:
        cfg = mf.config
    per_token = cfg.num_hidden_layers * 4 * (2 * cfg.hidden_size + 2 * cfg.num_experts_per_tok) / 1024
    if ranks == 1:
        assert out["comm_kb_per_token_per_rank"] == 0
    else:
        assert per_token <= out["comm_kb_per_token_per_rank"] <= per_token * 1.06


def test_a_launcher_of_another_mpi_is_refused() -> None:
    """Ranks started by an mpirun of another MPI than mpi4py's each see a world of one: refused in one line (else
    each would run the whole model alone). Simulated with the variable Open MPI's launcher sets."""
    env = dict(os.environ, OMPI_COMM_WORLD_SIZE="2")
    r = subprocess.run([sys.executable, "launch.py", "--prompt", "hi", "--steps", "2"], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "the launcher started 2 ranks but MPI sees a world of one" in r.stderr
