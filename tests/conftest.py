"""Shared fixtures: random HF checkpoints and their .m conversions, made once per test session."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "converter"))

from hf_models import make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    """hf_checkpoint(name) -> directory of the random checkpoint of tests/hf_models.CONFIGS[name]."""
    made: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in made:
            made[name] = make_checkpoint(name, str(tmp_path_factory.mktemp(f"hf-{name}")))
        return made[name]

    return get


@pytest.fixture(scope="session")
def model_file(hf_checkpoint: Callable[[str], str], tmp_path_factory: pytest.TempPathFactory
               ) -> Callable[[str, str], str]:
    """model_file(name, type) -> path of that checkpoint converted to a .m of that type."""
    from convert_hf import convert

    made: dict[tuple[str, str], str] = {}

    def get(name: str, qtype: str) -> str:
        if (name, qtype) not in made:
            out = str(tmp_path_factory.mktemp(f"m-{name}-{qtype}") / "model.m")
            convert(hf_checkpoint(name), out, qtype, progress=False)
            made[name, qtype] = out
        return made[name, qtype]

    return get
