"""The one check that the weights a run uses are finite (issue 21 item 6).

Every loader of weights calls :func:`require_finite` on what it read: the ``--checkpoint``
parts, ``--encoder``, ``--decoder``, the stand-in VAE file, the ``--frozen-vae``/``--unet``
hooks' modules and the resume state. A NaN or inf there would train to a NaN loss and
export it; the refusal names the source and the tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .errors import TrainingError


def first_nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """``"<name> has 3 NaN and 1 inf of 864 values"`` for the first tensor with a value that
    is not finite, None where all are (integer tensors are always finite)."""
    for name, t in tensors:
        if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.is_complex()):
            continue
        if bool(torch.isfinite(t.sum())):  # a NaN or inf always reaches the sum; 20x faster than isfinite
            continue
        finite = torch.isfinite(t)  # the sum may have overflowed on finite values: count exactly
        if bool(finite.all()):
            continue
        nan = int(torch.isnan(t).sum())
        parts = [f"{nan} NaN"] if nan else []
        inf = t.numel() - int(finite.sum()) - nan
        parts += [f"{inf} inf"] if inf else []
        return f"tensor {name} has {' and '.join(parts)} of {t.numel()} values"
    return None


def first_nonfinite_fast(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """:func:`first_nonfinite` for a check after every optimizer step (runner.py): one sum per
    tensor and a single device sync for all of them; the tensors are scanned one by one only
    where a sum is not finite (a NaN or inf, or finite values whose sum overflowed)."""
    items = [(n, t) for n, t in tensors if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for _, t in items:
        by_device.setdefault(t.device, []).append(t.detach().sum().abs().float())
    if all(bool(torch.isfinite(torch.stack(sums)).all()) for sums in by_device.values()):
        return None
    return first_nonfinite(items)


def require_finite(weights: Mapping[str, torch.Tensor] | nn.Module, source: str) -> None:
    """:class:`TrainingError` naming ``source`` (the file or option) and the first tensor of
    ``weights`` (a state dict or a module's parameters and buffers) that holds NaN or inf."""
    items = weights.state_dict().items() if isinstance(weights, nn.Module) else weights.items()
    bad = first_nonfinite(items)
    if bad is not None:
        raise TrainingError(f"{source}: {bad}; a damaged file or one saved from a diverged run: "
                            "training on it gives a NaN loss. Use another file")  # fmt: skip
