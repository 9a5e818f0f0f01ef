"""Helpers shared by the training tests (test_training_vae, _stages, _dist)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    # the test machine is shared: one thread per process is faster than two contended ones
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def read_trace(folder: Path, rank: int = 0) -> list[dict]:
    """The step records rank ``rank`` wrote under ``--trace-dir folder``."""
    return [json.loads(line) for line in (Path(folder) / f"rank{rank}.jsonl").read_text().splitlines()]
