"""Helpers for tests that drive launch.py as a process."""

from __future__ import annotations

import select
import subprocess


def wait_for_output(proc: subprocess.Popen, seconds: float = 300) -> None:
    """Block until proc has written to stdout (its first generated token), however long loading and
    compiling take; the output stays unread for communicate()."""
    ready, _, _ = select.select([proc.stdout], [], [], seconds)
    if not ready:
        proc.kill()
        raise AssertionError(f"no token within {seconds} s: {proc.stderr.read()}")
