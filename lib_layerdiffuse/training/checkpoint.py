"""Checkpoints: official-layout exports and a pickle-free resume state, written atomically.

Every file is safetensors (no pickle anywhere, as in the core), written to a temporary
file in the same folder and renamed over the target (``os.replace``), so a crash leaves
either the previous complete file or the new one, never half of one. Only rank 0 calls
these writers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..fileio import atomic_write
from .errors import TrainingError
from .finite import require_finite

ENCODER_FILE = "transparent_encoder.safetensors"
DECODER_FILE = "transparent_decoder.safetensors"
STATE_FILE = "train_state.safetensors"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def atomic_save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)

    return atomic_write(path, write)


def encoder_export_state(encoder: nn.Module, lambda_offset: float, dtype=torch.float16) -> dict[str, torch.Tensor]:
    """The encoder's tensors in the official layout with lambda_offset folded into the last conv.

    Training follows the paper: ``x_eps = lambda_offset * std * E(I_c, I_alpha)``. The
    extension applies a published encoder as ``mean + std * offset`` (core
    ``vae.apply_offset``) with no lambda, so the exported last conv (``blocks.16``, linear
    in its weight and bias) is scaled by lambda_offset: the exported encoder outputs
    ``lambda_offset * E(...)`` and the extension reproduces the trained ``x_eps`` exactly.
    """
    state = {k: v.detach().float().clone() for k, v in encoder.state_dict().items()}
    last = f"blocks.{len(encoder.blocks) - 1}"
    state[f"{last}.weight"] *= lambda_offset
    state[f"{last}.bias"] *= lambda_offset
    return {k: v.to(dtype) for k, v in state.items()}


def export(encoder: nn.Module, decoder: nn.Module, out_dir, lambda_offset: float, dtype: str = "fp16",
           metadata: dict[str, str] | None = None) -> tuple[Path, Path]:  # fmt: skip
    """Write the encoder and decoder files the extension loads (``weights.load_encoder/decoder``)."""
    out_dir = Path(out_dir)
    dt = DTYPES[dtype]
    meta = dict(metadata or {})
    enc = atomic_save(
        encoder_export_state(encoder, lambda_offset, dt),
        out_dir / ENCODER_FILE,
        {**meta, "role": "encoder", "lambda_offset_folded": repr(lambda_offset)},
    )
    dec_state = {k: v.detach().to(dt) for k, v in decoder.state_dict().items()}
    dec = atomic_save(dec_state, out_dir / DECODER_FILE, {**meta, "role": "decoder"})
    return enc, dec


# ---------------------------------------------------------------------------------------
# Resume state


def save_state(path, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer], step: int,
               metadata: dict[str, str] | None = None) -> Path:  # fmt: skip
    """Modules (fp32), optimizer moments, step and torch RNG in one safetensors file."""
    tensors: dict[str, torch.Tensor] = {}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    meta["step"] = str(step)
    for name, m in modules.items():
        for k, v in m.state_dict().items():
            tensors[f"model.{name}.{k}"] = v
    groups = {}
    for name, opt in optimizers.items():
        sd = opt.state_dict()
        for pid, st in sd["state"].items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"optim.{name}.{pid}.{k}"] = v
                else:  # plain scalars go to the metadata
                    groups.setdefault(f"{name}.scalars", {}).setdefault(str(pid), {})[k] = v
        groups[f"{name}.param_groups"] = sd["param_groups"]
    meta["optim"] = json.dumps(groups)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return atomic_save(tensors, path, meta)


def read_metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def read_state_metadata(path) -> dict[str, str]:
    """A resume state's metadata; an unreadable file is a :class:`TrainingError` saying how to start over."""
    try:
        return read_metadata(path)
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
        raise TrainingError(f"{path} cannot be resumed: not a readable safetensors file ({type(e).__name__}: "
                            f"{str(e)[:200]}); rerun with --no-resume to start over (it overwrites that file), "
                            "or give another --out") from None  # fmt: skip


def load_state(path, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> int:
    """Load what :func:`save_state` wrote (strict), torch RNG included; returns the step to continue from."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    require_finite(tensors, str(path))  # weights and optimizer moments alike
    for name, m in modules.items():
        prefix = f"model.{name}."
        m.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    groups = json.loads(meta.get("optim", "{}"))
    for name, opt in optimizers.items():
        state: dict[int, dict] = {}
        prefix = f"optim.{name}."
        for k, v in tensors.items():
            if k.startswith(prefix):
                pid, key = k[len(prefix) :].split(".", 1)
                state.setdefault(int(pid), {})[key] = v
        for pid, scalars in groups.get(f"{name}.scalars", {}).items():
            state.setdefault(int(pid), {}).update(scalars)
        pgs = groups[f"{name}.param_groups"]
        for g in pgs:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        opt.load_state_dict({"state": state, "param_groups": pgs})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return int(meta["step"])


def resume(path, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer], steps: int,
           lrs: dict[str, float], label: str) -> tuple[int, list[str]]:  # fmt: skip
    """Load a resume state for a run to ``steps``; returns (the step to continue from, lines to print).

    The learning rates of this run (``lrs``: optimizer name -> lr, from ``--lr``) replace the
    saved ones, and the lines say so when they differ. A file that cannot be read or does
    not fit the modules, or a state already at or past ``steps`` (nothing would be trained
    or exported), is a :class:`TrainingError` that says how to go on.
    """
    start_over = f"rerun with --no-resume to start over (it overwrites {path}), or give another --out"
    try:
        start = load_state(path, modules, optimizers)
    except Exception as e:  # noqa: BLE001  (any failure here means the file cannot be resumed)
        reason = " ".join(str(e).split())  # torch's message spans lines: keep it on one
        raise TrainingError(f"{path} cannot be resumed ({type(e).__name__}: {reason[:400]}); {start_over}") from None
    if start >= steps:
        raise TrainingError(f"{path} is at step {start} and --steps is {steps}: nothing left to train or export; "
                            f"raise --steps above {start} to continue, or {start_over}")  # fmt: skip
    lines = [f"[{label}] resuming from {path} at step {start}"]
    for name, lr in lrs.items():
        opt = optimizers[name]
        saved = {g["lr"] for g in opt.param_groups}
        for g in opt.param_groups:
            g["lr"] = lr
        if saved != {lr}:
            old = ", ".join(f"{v:g}" for v in sorted(saved))
            lines.append(f"[{label}] learning rate of {name!r}: {old} (saved) -> {lr:g} (this run's --lr)")
    return start, lines
