"""Deterministic weight files built from the official key -> shape manifests.

Real weights cannot be downloaded here, so tests (and the reference numbers in
``tests/data/official_reference.safetensors``) use tensors generated from a seed.
Changing this generator invalidates the reference file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"


def manifest_shapes(name: str) -> dict[str, list[int]]:
    """Key -> shape of one manifest in tests/data (name without .json)."""
    with open(DATA / f"{name}.json", encoding="utf-8") as f:
        return {k: v["shape"] for k, v in json.load(f)["tensors"].items()}


def make_state_dict(shapes: dict[str, list[int]], seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random-but-stable tensors with sane magnitudes (fan-in scaled weights)."""
    out = {}
    for i, key in enumerate(sorted(shapes)):
        shape = shapes[key]
        g = torch.Generator().manual_seed(seed * 100003 + i)
        t = torch.randn(shape, generator=g, dtype=torch.float32)
        if "norm" in key and key.endswith(".weight"):
            t = 1.0 + 0.1 * t
        elif key.endswith(".bias"):
            t = 0.05 * t
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            t = t / math.sqrt(fan_in)
        out[key] = t.to(dtype)
    return out
