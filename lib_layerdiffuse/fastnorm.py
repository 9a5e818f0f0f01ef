"""GroupNorm whose statistics do not run as one GPU block per (sample, group).

The decoder uses 4 groups, so ``torch.nn.GroupNorm``'s CUDA statistics kernel runs 4
blocks per sample and takes 88% of a batch-1 pass (docs/performance.md). :class:`FastGroupNorm`
is an ``nn.GroupNorm`` (same ``weight`` / ``bias`` parameters, so state-dict keys and
``isinstance`` checks are unchanged) whose forward picks one of three implementations:

- ``"torch"``: ``F.group_norm`` (what ``nn.GroupNorm`` does);
- ``"plain"``: ``var_mean`` over the reshaped groups, a reduction torch spreads over the
  whole GPU, with the statistics in fp32 for half inputs, then one fused multiply-add;
- ``"triton"``: two Triton kernels (chunked partial statistics, then normalise + affine +
  optional SiLU in one pass); used only where triton imports and the tensor is on CUDA.

``"auto"`` (the default) takes triton, else plain, on CUDA, and torch on CPU, where
``F.group_norm`` is already a multi-threaded single pass and measured faster
(benchmarks/decode.py --norms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("auto", "torch", "plain", "triton")
# Above this many elements, half inputs are converted to fp32 one group at a time so the
# temporary fp32 copy stays a quarter of the activation.
_CHUNK_ELEMENTS = 1 << 26

try:  # triton is optional: CPU builds and some hosts lack it
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # noqa: BLE001 - any import failure just disables the kernel
    triton = tl = None
    HAS_TRITON = False


def _is_compiling() -> bool:
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)  # torch >= 2.3
    return bool(fn and fn())


def resolve_mode(mode: str, device: torch.device) -> str:
    if mode not in MODES:
        raise ValueError(f"group-norm mode must be one of {MODES}, got {mode!r}")
    if mode == "triton" and not (HAS_TRITON and device.type == "cuda"):
        mode = "plain"  # asked for, but impossible here: the exact-math fallback
    if mode != "auto":
        return mode
    if device.type == "cuda":
        return "triton" if HAS_TRITON else "plain"
    return "torch"


def _stats_fp32(x: torch.Tensor, groups: int, eps: float):
    """Per (sample, group) mean and 1/std as fp32 ``[B, G]``."""
    b = x.shape[0]
    xg = x.reshape(b, groups, -1)
    if x.dtype == torch.float32 or x.dtype == torch.float64:
        var, mean = torch.var_mean(xg, dim=-1, unbiased=False)
    elif xg.numel() <= _CHUNK_ELEMENTS:
        var, mean = torch.var_mean(xg.float(), dim=-1, unbiased=False)
    else:
        pairs = [torch.var_mean(xg[:, g].float(), dim=-1, unbiased=False) for g in range(groups)]
        var = torch.stack([p[0] for p in pairs], 1)
        mean = torch.stack([p[1] for p in pairs], 1)
    return mean.float(), torch.rsqrt(var.float() + eps)


def _scale_shift(x, groups, mean, rstd, weight, bias):
    """Fold statistics and affine into per-(sample, channel) fp32 scale and shift."""
    b, c = x.shape[:2]
    scale = rstd.repeat_interleave(c // groups, dim=1)  # [B, C]
    if weight is not None:
        scale = scale * weight.float()
    shift = -mean.repeat_interleave(c // groups, dim=1) * scale
    if bias is not None:
        shift = shift + bias.float()
    return scale, shift


def group_norm_plain(x, groups, weight=None, bias=None, eps=1e-5, silu=False):
    """``F.group_norm`` with plain torch ops: fp32 statistics, one fused multiply-add."""
    mean, rstd = _stats_fp32(x, groups, eps)
    view = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
    if x.dtype in (torch.float32, torch.float64):
        scale, shift = _scale_shift(x, groups, mean, rstd, weight, bias)
        y = torch.addcmul(shift.to(x.dtype).view(view), x, scale.to(x.dtype).view(view))
    else:
        # x * scale + shift in half cancels two large terms where |mean| >> std; centre on
        # the half-rounded mean first and fold the rounding residual into the shift
        mean_h = mean.to(x.dtype)
        scale, shift = _scale_shift(x, groups, mean - mean_h.float(), rstd, weight, bias)
        centred = x - mean_h.repeat_interleave(x.shape[1] // groups, dim=1).view(view)
        y = torch.addcmul(shift.to(x.dtype).view(view), centred, scale.to(x.dtype).view(view))
    return F.silu(y) if silu else y


# ---------------------------------------------------------------------------------------
# Triton: written for CUDA; untested on this project's CPU-only machines (see tests).

if HAS_TRITON:

    @triton.jit
    def _gn_partial_stats(x_ptr, mean_ptr, m2_ptr, row_len, chunks, BLOCK: tl.constexpr):
        # one program per (row = sample * group, chunk): Welford pieces, merged in torch
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < row_len
        x = tl.load(x_ptr + row.to(tl.int64) * row_len + offs, mask=mask, other=0.0).to(tl.float32)
        n = tl.minimum(row_len - chunk * BLOCK, BLOCK).to(tl.float32)
        mean = tl.sum(x, axis=0) / n
        d = tl.where(mask, x - mean, 0.0)
        tl.store(mean_ptr + row * chunks + chunk, mean)
        tl.store(m2_ptr + row * chunks + chunk, tl.sum(d * d, axis=0))

    @triton.jit
    def _gn_apply(x_ptr, y_ptr, scale_ptr, shift_ptr, hw, total, SILU: tl.constexpr, BLOCK: tl.constexpr):
        # y = x * scale[b, c] + shift[b, c] (then SiLU), fp32 math, stored in x's dtype
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        bc = offs // hw
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(scale_ptr + bc, mask=mask, other=0.0)
        t = tl.load(shift_ptr + bc, mask=mask, other=0.0)
        y = x * s + t
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def group_norm_triton(x, groups, weight=None, bias=None, eps=1e-5, silu=False, block=4096):
    """Two kernels: many programs per group for the statistics, one pass for the output."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not importable")
    x = x.contiguous()
    b, c = x.shape[:2]
    rows = b * groups
    row_len = x.numel() // rows
    chunks = triton.cdiv(row_len, block)
    part_mean = torch.empty(rows, chunks, device=x.device, dtype=torch.float32)
    part_m2 = torch.empty_like(part_mean)
    _gn_partial_stats[(rows, chunks)](x, part_mean, part_m2, row_len, chunks, BLOCK=block)
    # Chan's merge of equal-size chunks (the last one shorter): exact, no cancellation
    counts = torch.full((chunks,), float(block), device=x.device)
    counts[-1] = row_len - block * (chunks - 1)
    mean = (part_mean * counts).sum(1) / row_len
    m2 = part_m2.sum(1) + ((part_mean - mean[:, None]) ** 2 * counts).sum(1)
    rstd = torch.rsqrt(m2 / row_len + eps)
    scale, shift = _scale_shift(x, groups, mean.view(b, groups), rstd.view(b, groups), weight, bias)
    y = torch.empty_like(x)
    total = x.numel()
    _gn_apply[(triton.cdiv(total, 1024),)](
        x, y, scale.contiguous(), shift.contiguous(), row_len * groups // c, total, SILU=silu, BLOCK=1024
    )
    return y


class FastGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` with a selectable implementation (``mode``, see the module doc).

    ``forward(x, silu=False)``: ``silu=True`` applies SiLU to the output (fused in the
    Triton kernel) so callers can skip one pass over the activation.
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, mode: str = "auto", **kw):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, **kw)
        resolve_mode(mode, torch.device("cpu"))  # validate now
        self.mode = mode

    def forward(self, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
        mode = resolve_mode(self.mode, x.device)
        if mode == "triton" and (_is_compiling() or (torch.is_grad_enabled() and self._needs_grad(x))):
            mode = "plain"  # the kernels have no backward; under compile inductor fuses plain ops itself
        if mode == "triton":
            y = group_norm_triton(x, self.num_groups, self.weight, self.bias, self.eps, silu)
            return y
        if mode == "plain":
            return group_norm_plain(x, self.num_groups, self.weight, self.bias, self.eps, silu)
        y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.silu(y) if silu else y

    def _needs_grad(self, x):
        return x.requires_grad or any(p is not None and p.requires_grad for p in (self.weight, self.bias))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mode={self.mode}"


def set_group_norm_mode(module: nn.Module, mode: str) -> nn.Module:
    """Set ``mode`` on every :class:`FastGroupNorm` under ``module``; returns ``module``."""
    resolve_mode(mode, torch.device("cpu"))
    for m in module.modules():
        if isinstance(m, FastGroupNorm):
            m.mode = mode
    return module
