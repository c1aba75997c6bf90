"""Shared session fixtures: tiny random Qwen2 and the planted refusal-cliff model, written once."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # so tests can `import planted`


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """The test models are tiny: extra intra-op threads only spin (much slower on a loaded 2-core box)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A random-weight 2-layer Qwen2 checkpoint (4 heads, 2 KV heads, d_model 64) with tokenizer."""
    from interp.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from interp.models import load_model

    return load_model(str(tiny_dir), device="cpu")


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """`PlantedSpec` of the hand-built refusal-suppression model (see tests/planted.py)."""
    from planted import write_planted_checkpoint

    return write_planted_checkpoint(tmp_path_factory.mktemp("planted"))


@pytest.fixture(scope="session")
def planted_model(planted):
    from interp.models import load_model

    return load_model(str(planted.path), device="cpu")
