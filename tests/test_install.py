"""A real install: the wheel `pip install .` builds carries the demo model, the chat template and the chat page,
and gives a `dmoe` command that runs, alone and under mpirun, without the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_installs_a_working_dmoe_command(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w",
                        str(wheels)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True)  # the dependencies come from this environment
    bin_dir = env_dir / "bin"
    wheel = next(wheels.glob("dmoe-*.whl"))
    r = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--no-deps", str(wheel)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"  # not the checkout: nothing may come from it
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PATH": f"{bin_dir}:{os.environ['PATH']}"}

    def run(*cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(cmd), capture_output=True, text=True, cwd=elsewhere, env=env, timeout=600)

    where = run(str(bin_dir / "python"), "-c", "import dmoe, dmoe.qwen_tokenizer as q, importlib.resources as r; "
                "print(dmoe.__file__); print(len(q.qwen3_chat_template())); "
                "print(len(r.files('dmoe').joinpath('chat_page.html').read_bytes()))")
    assert where.returncode == 0, where.stderr
    path, template, page = where.stdout.split()
    assert path.startswith(str(env_dir)) and int(template) > 1000 and int(page) > 1000
    for launch in ([], ["mpirun", "-n", "2"]):
        r = run(*launch, str(bin_dir / "dmoe"), "--prompt", "A dictionary is", "--steps", "6", "--temperature", "0",
                "--pack-cache", "off")
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip() and "generated" in r.stderr
    assert run(str(bin_dir / "dmoe"), "convert", "--help").returncode == 0
