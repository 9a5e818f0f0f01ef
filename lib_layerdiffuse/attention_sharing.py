"""SD1.5 attention sharing (paper §3.3, Eq. 8-9 at inference): the 32 units that replace
every attn1/attn2 of an SD1.5 UNet, with per-frame LoRAs, cross-frame attention, the
control encoder of the fg2bg/bg2fg files and per-layer prompts.

Keys are the official ones (``hookers.layers.{0..31}.*``, ``kwargs_encoder.*``), so the
four ``layer_sd15_*`` files load with ``strict=True``.

Calling a unit directly::

    unit = AttentionSharingUnit(attn_module, frames=F, use_control=False)  # attn_module: ldm CrossAttention
    unit.load_state_dict({k.removeprefix(f"hookers.layers.{i}."): v
                          for k, v in state.items() if k.startswith(f"hookers.layers.{i}.")})
    delta = unit(h, context, transformer_options={"cond_mark": mark, "cond_overwrite": [ow_0, None, ...]})

* ``h``: ``[B*F, tokens, C]``, the block's normalised hidden state (``norm1(x)`` for attn1,
  ``norm2(x)`` for attn2). Rows are groups of F consecutive frames (fg, bg, blend order
  of the mode).
* ``context``: None for attn1 (self-attention stays within each frame), the text context
  ``[B*F, n, 768]`` for attn2.
* ``cond_mark``: ``[B*F]`` floats, 0 for cond rows, 1 for uncond rows (Forge's
  ``transformer_options["cond_mark"]``; also accepted as the ``cond_mark=`` keyword or from
  the shared :class:`SharingState`). Needed only with prompt overrides.
* ``cond_overwrite``: per frame a ``[1, n, 768]`` context or None; it replaces the text
  context of the cond rows of that frame (attn2 only).
* Control (fg2bg / bg2fg): ``unit.set_control_signals(encoder(image * 2 - 1))``, a dict
  keyed by token count; :meth:`AttentionSharing.set_control` does it for all units.
* Returns ``h'' - h`` (the per-frame attention output plus the cross-frame term); the
  block adds it to its residual, exactly as the official unit.

Speed, against the official unit: the four LoRA deltas are merged into the original
weights once per dtype/device (not per call), the frames' projections run as one batched
matmul, the control features are computed once per generation on the UNet's device, and
the cross-frame attention over 1-3 frames is written out with its input Linear folded into
q/k/v (for one frame the whole branch is one fused Linear: a softmax over one element is 1).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LayerDiffuseError

BLOCKS_SD15 = (
    [f"input_blocks.{i}.1" for i in (1, 2, 4, 5, 7, 8)]
    + [f"output_blocks.{i}.1" for i in range(3, 12)]
    + ["middle_block.1"]
)
# hooker index -> attention module, as the official module_mapping_sd15
MODULE_MAP_SD15 = [f"{b}.transformer_blocks.0.{a}" for b in BLOCKS_SD15 for a in ("attn1", "attn2")]
RANK = 256  # the LoRA rank of the official files; other files carry theirs in their shapes (file_rank)
_LORA_KEY = re.compile(r"^hookers\.layers\.\d+\.to_(?:q|k|v|out)_lora\.\d+\.(down|up)\.weight$")


def file_rank(state: Mapping[str, torch.Tensor | Sequence[int]]) -> int:
    """The LoRA rank of an SD1.5 attention-sharing file, read from its shapes (``down [r, in]``,
    ``up [out, r]``; values are tensors or shapes): 256 for the official files, another for
    a trained one (``python -m lib_layerdiffuse.training layers --rank R``). Every LoRA of
    every unit must have the one rank, else a :class:`LayerDiffuseError` names two that differ.
    A state without LoRA keys gives :data:`RANK` (the layout check then names what is missing)."""
    seen: dict[int, str] = {}
    for key, value in state.items():
        m = _LORA_KEY.match(key)
        if m is None:
            continue
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)
        seen.setdefault(int(shape[0] if m.group(1) == "down" else shape[-1]), key)
    if not seen:
        return RANK
    if len(seen) > 1:
        (r1, k1), (r2, k2) = sorted(seen.items())[:2]
        raise LayerDiffuseError(f"this attention-sharing file mixes LoRA ranks {sorted(seen)} ({k1} has rank {r1}, "
                                f"{k2} rank {r2}); every unit's LoRAs must have one rank")  # fmt: skip
    rank = next(iter(seen))
    if rank < 1:
        raise LayerDiffuseError(f"this attention-sharing file has LoRAs of rank {rank} ({seen[rank]})")
    return rank


@dataclass
class SharingState:
    """What the host sets before each UNet call, shared by all units."""

    cond_mark: torch.Tensor | None = None  # [rows], 0 = cond, 1 = uncond
    cond_overwrite: list = field(default_factory=list)  # per frame: [1, n, C] or None
    enabled: bool = True  # cleared by Stop At: units then run the original attention
    calls: int = 0  # unit calls that really shared attention (the silent-failure guard)


class LoRALinear(nn.Module):
    """Parameters of one official ``LoRALinearLayer``: ``down [r, in]``, ``up [out, r]``, no alpha."""

    def __init__(self, cin: int, cout: int, rank: int = RANK):
        super().__init__()
        self.down = nn.Linear(cin, rank, bias=False)
        self.up = nn.Linear(rank, cout, bias=False)


def _conv_stack(widths, strides) -> nn.Sequential:
    layers: list[nn.Module] = []
    for (cin, cout), s in zip(widths, strides, strict=True):
        layers += [nn.Conv2d(cin, cout, 3, padding=1, stride=s), nn.SiLU()]
    return nn.Sequential(*layers)


class ControlEncoder(nn.Module):
    """The official ``AdditionalAttentionCondsEncoder``: image -> features at 1/8 .. 1/64 size.

    ``forward(image)`` with image ``[1, 3, H, W]`` in [-1, 1] returns ``{h*w: [1, 256, h, w]}``.
    """

    def __init__(self):
        super().__init__()
        w0 = [(3, 32), (32, 32), (32, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256)]
        self.blocks_0 = _conv_stack(w0, [1, 1, 2, 1, 2, 1, 2, 1])
        self.blocks_1 = _conv_stack([(256, 256)] * 2, [2, 1])
        self.blocks_2 = _conv_stack([(256, 256)] * 2, [2, 1])
        self.blocks_3 = _conv_stack([(256, 256)] * 2, [2, 1])

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        out = {}
        for block in (self.blocks_0, self.blocks_1, self.blocks_2, self.blocks_3):
            x = block(x)
            out[x.shape[2] * x.shape[3]] = x
        return out


class AttentionSharingUnit(nn.Module):
    """Replaces one attention module; see the module docstring for how to call it."""

    def __init__(self, module: nn.Module, frames: int = 2, use_control: bool = True, rank: int = RANK,
                 state: SharingState | None = None):  # fmt: skip
        super().__init__()
        self.heads = module.heads
        self.frames = frames
        self.original_module = [module]  # a list, so it is not registered as a submodule
        self.state = state if state is not None else SharingState()
        lin = {n: getattr(module, n) for n in ("to_q", "to_k", "to_v")}
        lin["to_out"] = module.to_out[0]
        for name, layer in lin.items():
            loras = [LoRALinear(layer.in_features, layer.out_features, rank) for _ in range(frames)]
            setattr(self, f"{name}_lora", nn.ModuleList(loras))
        c = module.to_k.out_features
        self.temporal_i = nn.Linear(c, c)
        self.temporal_n = nn.LayerNorm(c, elementwise_affine=True, eps=1e-6)
        self.temporal_q = nn.Linear(c, c)
        self.temporal_k = nn.Linear(c, c)
        self.temporal_v = nn.Linear(c, c)
        self.temporal_o = nn.Linear(c, c)
        self.control_convs = None
        if use_control:
            self.control_convs = nn.ModuleList(
                [
                    nn.Sequential(nn.Conv2d(256, 256, 3, padding=1), nn.SiLU(), nn.Conv2d(256, c, 1))
                    for _ in range(frames)
                ]
            )
        self.control_signals: dict[int, torch.Tensor] | None = None
        self._merged: dict = {}
        self._control_cache: dict = {}

    # -- cached derived tensors -------------------------------------------------------

    def set_control_signals(self, signals: dict[int, torch.Tensor] | None):
        self.control_signals = signals
        self._control_cache.clear()

    def _merged_weights(self, name: str, dtype, device):
        """Per-frame ``W_org + up @ down`` stacked ``[F, out, in]`` (fp32 math), and the bias."""
        org = self.original_module[0].to_out[0] if name == "to_out" else getattr(self.original_module[0], name)
        loras = getattr(self, f"{name}_lora")
        # invalidate when anything the merge reads changes (e.g. A1111's LoRA merged into org)
        stamp = (dtype, device, org.weight.data_ptr(), _version(org.weight))
        stamp += tuple((_version(m.up.weight), _version(m.down.weight), m.up.weight.data_ptr()) for m in loras)
        hit = self._merged.get(name)
        if hit is not None and hit[0] == stamp:
            return hit[1], hit[2]
        with torch.no_grad():
            base = org.weight.to(device, torch.float32)
            w = torch.stack(
                [base + m.up.weight.to(device, torch.float32) @ m.down.weight.to(device, torch.float32) for m in loras]
            )
            w = w.transpose(1, 2).to(dtype).contiguous()  # [F, in, out] for x @ w
            b = None if org.bias is None else org.bias.to(device, dtype)
        self._merged[name] = (stamp, w, b)
        return w, b

    def _control(self, tokens: int, dtype, device) -> torch.Tensor:
        """Per-frame control features ``[F, 1, tokens, C]``, computed once per generation."""
        key = (tokens, dtype, device)
        if key not in self._control_cache:
            if self.control_signals is None or tokens not in self.control_signals:
                have = sorted(self.control_signals) if self.control_signals else []
                raise LayerDiffuseError(f"no control signal for {tokens} tokens (have {have}); call set_control first")
            sig = self.control_signals[tokens]
            with torch.no_grad():
                conv_dtype = self.temporal_i.weight.dtype
                sig = sig.to(device, conv_dtype)
                outs = [conv(sig).flatten(2).transpose(1, 2) for conv in self.control_convs]
                self._control_cache[key] = torch.stack(outs).to(dtype)
        return self._control_cache[key]

    # -- forward ----------------------------------------------------------------------

    def _project(self, name, x, dtype, device):
        """x ``[F, B, n, in]`` through each frame's merged Linear -> ``[F, B, n, out]``."""
        w, b = self._merged_weights(name, dtype, device)
        f, bsz, n, cin = x.shape
        y = torch.bmm(x.reshape(f, bsz * n, cin), w)
        if b is not None:
            y = y + b
        return y.view(f, bsz, n, -1)

    def forward(self, h, context=None, value=None, mask=None, transformer_options=None, *,
                cond_mark=None, cond_overwrite=None, **kwargs):  # fmt: skip
        state = self.state
        if not state.enabled:  # Stop At: the unpatched attention
            return self.original_module[0](h, context=context, mask=mask, **kwargs)
        opts = transformer_options or {}
        fr = self.frames
        rows, tokens, ch = h.shape
        if rows % fr:
            raise LayerDiffuseError(
                f"this mode shares attention across groups of {fr} images, "
                f"but the UNet got {rows} rows; the batch size must be a multiple of {fr}"
            )
        dtype, device = h.dtype, h.device
        bsz = rows // fr
        hs = h.view(bsz, fr, tokens, ch).transpose(0, 1)  # [F, B, d, C]
        if self.control_convs is not None:
            hs = hs + self._control(tokens, dtype, device)

        if context is None:
            ctx = hs
        else:
            ctx = context.view(bsz, fr, context.shape[1], context.shape[2]).transpose(0, 1)
            overwrite = (
                cond_overwrite if cond_overwrite is not None else opts.get("cond_overwrite", state.cond_overwrite)
            )
            if overwrite and any(o is not None for o in overwrite[:fr]):
                mark = cond_mark if cond_mark is not None else opts.get("cond_mark", state.cond_mark)
                if mark is None:
                    raise LayerDiffuseError("per-layer prompts need the cond/uncond marks of the batch rows")
                mark = mark.to(device, dtype).view(bsz, fr).transpose(0, 1)[..., None, None]  # [F, B, 1, 1]
                frames = []
                for f in range(fr):
                    ow = overwrite[f] if f < len(overwrite) else None
                    if ow is None:
                        frames.append(ctx[f])
                    else:
                        ow, cf = _match_tokens(ow.to(device, dtype), ctx[f])
                        frames.append(ow * (1.0 - mark[f]) + cf * mark[f])
                if len({t.shape[1] for t in frames}) > 1:  # frames with and without a longer override
                    n = max(t.shape[1] for t in frames)
                    frames = [_match_tokens(t, torch.empty(1, n, 1))[0] for t in frames]
                ctx = torch.stack(frames)

        q = self._project("to_q", hs, dtype, device)
        k = self._project("to_k", ctx, dtype, device)
        v = self._project("to_v", ctx, dtype, device)
        o = _heads_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), self.heads)
        o = self._project("to_out", o.view(fr, bsz, tokens, -1), dtype, device)
        o = self.original_module[0].to_out[1](o)
        hs = (hs + o).transpose(0, 1).reshape(rows, tokens, ch)  # back to (b f) d c

        y = self.temporal_n(hs).reshape(rows * tokens, ch)
        if torch.is_grad_enabled() and self.temporal_i.weight.requires_grad:
            # training: the plain chain, so every temporal Linear gets its gradient
            x = self.temporal_i(y)
            q, k, v = self.temporal_q(x), self.temporal_k(x), self.temporal_v(x)
            qkv = torch.cat([q, k, v], dim=-1).view(bsz, fr, tokens, 3 * ch).transpose(1, 2)
            x = self.temporal_o(self._cross_frame(*qkv.reshape(bsz * tokens, fr, 3 * ch).chunk(3, dim=-1)))
            x = x.view(bsz, tokens, fr, ch).transpose(1, 2).reshape(rows, tokens, ch)
            state.calls += 1
            return hs + x - h
        w, b = self._temporal_weights(dtype, device)
        if fr == 1:  # softmax over one key is 1: temporal_o(temporal_v(temporal_i(y))), one fused matmul
            x = torch.addmm(b, y, w).view(rows, tokens, ch)
        else:  # temporal_i folded into q, k and v: one matmul for all three
            qkv = torch.addmm(b, y, w).view(bsz, fr, tokens, 3 * ch).transpose(1, 2).reshape(bsz * tokens, fr, 3 * ch)
            x = self.temporal_o(self._cross_frame(*qkv.chunk(3, dim=-1)))
            x = x.view(bsz, tokens, fr, ch).transpose(1, 2).reshape(rows, tokens, ch)
        state.calls += 1
        return hs + x - h

    def _temporal_weights(self, dtype, device):
        """The temporal Linears folded together (exact algebra, fp32 math), cached like the LoRA merge.

        One frame: ``W_o W_v W_i`` and its bias. Several: ``[W_q; W_k; W_v] W_i`` with biases.
        Returned transposed (``[in, out]``) for ``addmm``.
        """
        layers = [self.temporal_i, self.temporal_q, self.temporal_k, self.temporal_v, self.temporal_o]
        stamp = (dtype, device) + tuple((_version(m.weight), m.weight.data_ptr(), _version(m.bias)) for m in layers)
        hit = self._merged.get("temporal")
        if hit is not None and hit[0] == stamp:
            return hit[1], hit[2]
        with torch.no_grad():
            wi, bi = self.temporal_i.weight.to(device, torch.float32), self.temporal_i.bias.to(device, torch.float32)

            def fold(m):  # m(temporal_i(y)) = (W_m W_i) y + (W_m b_i + b_m)
                wm, bm = m.weight.to(device, torch.float32), m.bias.to(device, torch.float32)
                return wm @ wi, wm @ bi + bm

            if self.frames == 1:
                wv, bv = fold(self.temporal_v)
                wo, bo = (
                    self.temporal_o.weight.to(device, torch.float32),
                    self.temporal_o.bias.to(device, torch.float32),
                )
                w, b = wo @ wv, wo @ bv + bo
            else:
                parts = [fold(m) for m in (self.temporal_q, self.temporal_k, self.temporal_v)]
                w, b = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            w, b = w.t().contiguous().to(dtype), b.to(dtype)
        self._merged["temporal"] = (stamp, w, b)
        return w, b

    def _cross_frame(self, q, k, v):
        """Multi-head attention across the F frames at each token (F <= 3: written out)."""
        n, f, c = q.shape
        if f == 1:  # a softmax over one key is 1
            return v
        dh = c // self.heads
        q, k, v = (t.reshape(n, f, self.heads, dh) for t in (q, k, v))
        scores = torch.einsum("nfhd,nghd->nhfg", q, k) * (1.0 / math.sqrt(dh))
        out = torch.einsum("nhfg,nghd->nfhd", scores.softmax(dim=-1), v)
        return out.reshape(n, f, c)


def _version(t: torch.Tensor) -> int:
    """In-place version counter; Forge's weights are inference tensors, which have none (-1)."""
    return -1 if t.is_inference() else t._version


def _heads_attention(q, k, v, heads):
    b, n, inner = q.shape
    dh = inner // heads
    q, k, v = (t.reshape(b, -1, heads, dh).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, inner)


def _match_tokens(a: torch.Tensor, b: torch.Tensor):
    """Bring two contexts to one token count by repeating the shorter one's last 77-token chunk.

    A per-layer prompt can be longer or shorter than the main prompt (75-token chunks, as
    A1111 pads prompts of different lengths); the official code fails on the broadcast.
    """
    na, nb = a.shape[1], b.shape[1]
    if na == nb:
        return a, b

    def grow(t, n):
        chunk = t[:, -77:] if t.shape[1] >= 77 else t[:, -1:]
        reps = -(-(n - t.shape[1]) // chunk.shape[1])
        return torch.cat([t] + [chunk] * reps, dim=1)[:, :n]

    return (grow(a, nb), b) if na < nb else (a, grow(b, na))


class AttentionSharing(nn.Module):
    """All units of one SD1.5 file around a UNet, with the official state-dict layout.

    ``AttentionSharing(unet, frames, use_control, rank)`` builds the 32 units around the UNet's
    attention modules (``unet`` is the ldm ``diffusion_model``) without touching it, with
    LoRAs of ``rank`` (:data:`RANK` for the official files; ``file_rank(state)`` reads a file's);
    ``load_state_dict(file_state, strict=True)`` loads a ``layer_sd15_*`` file;
    :meth:`install` swaps the units in, :meth:`restore` puts the original modules back
    (use it in ``finally``). The shared :attr:`state` carries the cond marks, per-frame
    prompts and the Stop At switch.
    """

    def __init__(self, unet: nn.Module, frames: int, use_control: bool, rank: int = RANK):
        super().__init__()
        self.unet = [unet]
        self.state = SharingState()
        self.frames = frames
        missing = [n for n in MODULE_MAP_SD15 if not _has_submodule(unet, n)]
        if missing:
            raise ValueError(
                f"This UNet lacks {len(missing)} of the 32 SD1.5 attention modules (e.g. {missing[0]}): "
                "the SD1.5 attention-sharing modes need an SD1.5 checkpoint."
            )
        self.originals = [unet.get_submodule(n) for n in MODULE_MAP_SD15]
        for n, m in zip(MODULE_MAP_SD15, self.originals, strict=True):
            if isinstance(m, AttentionSharingUnit):
                raise LayerDiffuseError(f"{n} is already patched; a previous generation was not restored")
        with torch.device("meta"):  # parameters come from the file; skip the random init
            units = [AttentionSharingUnit(m, frames, use_control, rank, self.state) for m in self.originals]
            self.kwargs_encoder = ControlEncoder() if use_control else None
        self.hookers = nn.Module()
        self.hookers.layers = nn.ModuleList(units)
        self._installed = False

    @property
    def units(self) -> list[AttentionSharingUnit]:
        return list(self.hookers.layers)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = True):
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def set_control(self, image: torch.Tensor):
        """Control image ``[1, 3, H, W]`` in [0, 1] (fg or bg, flattened on grey, resized)."""
        param = next(self.kwargs_encoder.parameters())
        with torch.no_grad():
            signals = self.kwargs_encoder(image.to(param.device, param.dtype) * 2.0 - 1.0)
        for unit in self.units:
            unit.set_control_signals(signals)

    def clear_caches(self):
        """Drop the merged weights and control features of every unit (recomputed on the next call).

        Needed per sampling pass on hosts whose weights are inference tensors (no version
        counter to notice a change), and to release memory when a generation ends.
        """
        for unit in self.units:
            unit._merged.clear()
            unit.set_control_signals(None)

    def install(self):
        unet = self.unet[0]
        try:
            for name, unit in zip(MODULE_MAP_SD15, self.units, strict=True):
                parent, _, attr = name.rpartition(".")
                setattr(unet.get_submodule(parent), attr, unit)
            self._installed = True
        except BaseException:
            self.restore()
            raise

    def restore(self):
        """Put the original attention modules back. Idempotent."""
        unet = self.unet[0]
        for name, original in zip(MODULE_MAP_SD15, self.originals, strict=True):
            parent, _, attr = name.rpartition(".")
            setattr(unet.get_submodule(parent), attr, original)
        self._installed = False


def _has_submodule(root: nn.Module, name: str) -> bool:
    try:
        root.get_submodule(name)
        return True
    except AttributeError:
        return False
