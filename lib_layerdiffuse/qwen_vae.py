"""The RGBA VAE of Qwen-Image-Layered on single frames: encode the condition image, decode layers.

The model is the Wan-2.1 causal 3D VAE with 4 image channels (diffusers calls it
AutoencoderKLQwenImage with ``input_channels=4``). Qwen-Image-Layered only ever runs it on one
frame (T=1: the condition image is encoded alone, the layers are decoded on the batch axis), and
on one frame the 3D model reduces exactly to a 2D one:

- a causal 3D convolution pads 2*p frames of zeros *before* the frame, so a kernel of depth 3
  sees ``[0, 0, x]`` and only its last temporal slice touches ``x``: a 2D convolution with
  ``weight[:, :, -1]`` (the same holds for depth 1);
- the temporal down/upsample convolutions (``time_conv``) are skipped on the first chunk of a
  video (its frame is only cached), and with T=1 there is no other chunk: they never run.

So the module below is plain 2D and keeps only those last kernel slices (a third of the
memory); ``time_conv`` tensors are still required and checked, since a file without them is not
this VAE. tests/test_qwen_vae.py compares it with the 3D reference on generated weights.

Two key layouts are accepted: the diffusers one (``encoder.conv_in``, ``down_blocks``,
``quant_conv`` ...) and the Wan-original one used by Comfy and Forge Neo (``encoder.conv1``,
``downsamples``, ``residual.N``, ``head.2``, ``conv1``/``conv2`` ...). Widths, block counts, the
latent size and the image channels are read from the tensor shapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import WeightFileError
from .weights import _problems, check_finite

DEFAULT_SOURCE = "the VAE file"


@dataclass(frozen=True)
class QwenVAEConfig:
    image_channels: int  # 4 for the layered VAE (RGBA)
    base_dim: int
    z_dim: int
    dim_mult: tuple[int, ...]
    num_res_blocks: int
    temporal_downsample: tuple[bool, ...]  # one per encoder downsample; the decoder mirrors it


# ---------------------------------------------------------------------------------------------
# key layouts


def _res_keys(prefix: str, cin: int, cout: int, out: dict) -> None:
    out[f"{prefix}.norm1.gamma"] = [cin, 1, 1, 1]
    out[f"{prefix}.conv1.weight"] = [cout, cin, 3, 3, 3]
    out[f"{prefix}.conv1.bias"] = [cout]
    out[f"{prefix}.norm2.gamma"] = [cout, 1, 1, 1]
    out[f"{prefix}.conv2.weight"] = [cout, cout, 3, 3, 3]
    out[f"{prefix}.conv2.bias"] = [cout]
    if cin != cout:
        out[f"{prefix}.conv_shortcut.weight"] = [cout, cin, 1, 1, 1]
        out[f"{prefix}.conv_shortcut.bias"] = [cout]


def _mid_keys(prefix: str, dim: int, out: dict) -> None:
    _res_keys(f"{prefix}.resnets.0", dim, dim, out)
    out[f"{prefix}.attentions.0.norm.gamma"] = [dim, 1, 1]
    out[f"{prefix}.attentions.0.to_qkv.weight"] = [3 * dim, dim, 1, 1]
    out[f"{prefix}.attentions.0.to_qkv.bias"] = [3 * dim]
    out[f"{prefix}.attentions.0.proj.weight"] = [dim, dim, 1, 1]
    out[f"{prefix}.attentions.0.proj.bias"] = [dim]
    _res_keys(f"{prefix}.resnets.1", dim, dim, out)


def expected_shapes(cfg: QwenVAEConfig) -> dict[str, list[int]]:
    """Every key (diffusers layout) and shape of the full 3D model with this configuration."""
    out: dict[str, list[int]] = {}
    c, z, nrb = cfg.base_dim, cfg.z_dim, cfg.num_res_blocks
    dims = [c * m for m in (1, *cfg.dim_mult)]
    out["encoder.conv_in.weight"] = [dims[0], cfg.image_channels, 3, 3, 3]
    out["encoder.conv_in.bias"] = [dims[0]]
    n = 0
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        for _ in range(nrb):
            _res_keys(f"encoder.down_blocks.{n}", cin, cout, out)
            cin, n = cout, n + 1
        if i != len(cfg.dim_mult) - 1:
            out[f"encoder.down_blocks.{n}.resample.1.weight"] = [cout, cout, 3, 3]
            out[f"encoder.down_blocks.{n}.resample.1.bias"] = [cout]
            if cfg.temporal_downsample[i]:
                out[f"encoder.down_blocks.{n}.time_conv.weight"] = [cout, cout, 3, 1, 1]
                out[f"encoder.down_blocks.{n}.time_conv.bias"] = [cout]
            n += 1
    _mid_keys("encoder.mid_block", dims[-1], out)
    out["encoder.norm_out.gamma"] = [dims[-1], 1, 1, 1]
    out["encoder.conv_out.weight"] = [2 * z, dims[-1], 3, 3, 3]
    out["encoder.conv_out.bias"] = [2 * z]
    out["quant_conv.weight"] = [2 * z, 2 * z, 1, 1, 1]
    out["quant_conv.bias"] = [2 * z]
    out["post_quant_conv.weight"] = [z, z, 1, 1, 1]
    out["post_quant_conv.bias"] = [z]

    up = [c * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
    temporal_up = cfg.temporal_downsample[::-1]
    out["decoder.conv_in.weight"] = [up[0], z, 3, 3, 3]
    out["decoder.conv_in.bias"] = [up[0]]
    _mid_keys("decoder.mid_block", up[0], out)
    for i, (cin, cout) in enumerate(zip(up[:-1], up[1:], strict=True)):
        if i > 0:  # the previous upsampler halved the channels
            cin //= 2
        for j in range(nrb + 1):
            _res_keys(f"decoder.up_blocks.{i}.resnets.{j}", cin, cout, out)
            cin = cout
        if i != len(cfg.dim_mult) - 1:
            p = f"decoder.up_blocks.{i}.upsamplers.0"
            out[f"{p}.resample.1.weight"] = [cout // 2, cout, 3, 3]
            out[f"{p}.resample.1.bias"] = [cout // 2]
            if temporal_up[i]:
                out[f"{p}.time_conv.weight"] = [2 * cout, cout, 3, 1, 1]
                out[f"{p}.time_conv.bias"] = [2 * cout]
    out["decoder.norm_out.gamma"] = [up[-1], 1, 1, 1]
    out["decoder.conv_out.weight"] = [cfg.image_channels, up[-1], 3, 3, 3]
    out["decoder.conv_out.bias"] = [cfg.image_channels]
    return out


# Wan-original names inside a residual block / a head, to diffusers names
_WAN_RES = {"residual.0.": "norm1.", "residual.2.": "conv1.", "residual.3.": "norm2.", "residual.6.": "conv2.",
            "shortcut.": "conv_shortcut."}  # fmt: skip
_WAN_MID = {"middle.0.": "mid_block.resnets.0.", "middle.1.": "mid_block.attentions.0.",
            "middle.2.": "mid_block.resnets.1.", "head.0.": "norm_out.", "head.2.": "conv_out."}  # fmt: skip


def _is_wan(keys) -> bool:
    return "encoder.conv1.weight" in keys or any(".downsamples." in k or ".upsamples." in k for k in keys)


def _sub_prefix(rest: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if rest.startswith(old):
            return new + rest[len(old) :]
    return rest


def wan_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Wan-original (Comfy / Neo) state dict to the diffusers names; tensors are shared.

    The decoder's flat ``upsamples.N`` list is split into up blocks at its resamplers (the
    entries holding ``resample.1``); a name that fits no rule is kept, so the shape check
    reports it as unexpected.
    """
    flat = sorted({int(m.group(1)) for k in state if (m := re.match(r"decoder\.upsamples\.(\d+)\.", k))})
    resamplers = {int(m.group(1)) for k in state if (m := re.match(r"decoder\.upsamples\.(\d+)\.resample\.", k))}
    place, block, j = {}, 0, 0
    for n in flat:
        if n in resamplers:
            place[n] = f"decoder.up_blocks.{block}.upsamplers.0."
            block, j = block + 1, 0
        else:
            place[n] = f"decoder.up_blocks.{block}.resnets.{j}."
            j += 1

    out = {}
    for key, t in state.items():
        new = key
        if key.startswith("conv1."):
            new = "quant_conv." + key[len("conv1.") :]
        elif key.startswith("conv2."):
            new = "post_quant_conv." + key[len("conv2.") :]
        elif key.startswith(("encoder.", "decoder.")):
            side, rest = key.split(".", 1)
            if rest.startswith("conv1."):
                new = f"{side}.conv_in.{rest[len('conv1.') :]}"
            elif m := re.match(r"downsamples\.(\d+)\.(.*)", rest):
                new = f"{side}.down_blocks.{m.group(1)}.{_sub_prefix(m.group(2), _WAN_RES)}"
            elif m := re.match(r"upsamples\.(\d+)\.(.*)", rest):
                new = place[int(m.group(1))] + _sub_prefix(m.group(2), _WAN_RES)
            elif rest.startswith(("middle.", "head.")):
                mid = _sub_prefix(rest, _WAN_MID)
                if mid.startswith("mid_block.resnets."):
                    head, tail = mid[: len("mid_block.resnets.0.")], mid[len("mid_block.resnets.0.") :]
                    mid = head + _sub_prefix(tail, _WAN_RES)
                new = f"{side}.{mid}"
        out[new] = t
    return out


def diffusers_to_wan_key(key: str, num_res_blocks: int) -> str:
    """The Wan-original name of a diffusers key (for messages about a Wan-layout file)."""
    if key.startswith("quant_conv."):
        return "conv1." + key[len("quant_conv.") :]
    if key.startswith("post_quant_conv."):
        return "conv2." + key[len("post_quant_conv.") :]
    side, rest = key.split(".", 1)
    res = {v: k for k, v in _WAN_RES.items()}
    mid = {v: k for k, v in _WAN_MID.items()}
    if rest.startswith("conv_in."):
        return f"{side}.conv1.{rest[len('conv_in.') :]}"
    if m := re.match(r"down_blocks\.(\d+)\.(.*)", rest):
        return f"{side}.downsamples.{m.group(1)}.{_sub_prefix(m.group(2), res)}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)", rest):
        j = int(m.group(3)) if m.group(3) is not None else num_res_blocks + 1
        n = int(m.group(1)) * (num_res_blocks + 2) + j
        return f"{side}.upsamples.{n}.{_sub_prefix(m.group(4), res)}"
    if m := re.match(r"(mid_block\.resnets\.\d\.)(.*)", rest):
        return f"{side}.{_sub_prefix(m.group(1), mid)}{_sub_prefix(m.group(2), res)}"
    return f"{side}.{_sub_prefix(rest, mid)}"


def _shape(state, key: str, source: str, wan: bool) -> list[int]:
    if key not in state:
        name = diffusers_to_wan_key(key, 0) if wan else key  # none of these keys is in the decoder's list
        raise WeightFileError(
            f"{source} is not a complete Qwen-Image-Layered (Wan-2.1) VAE: the key {name} is missing. "
            "Use the layered VAE file (qwen_image_layered_vae.safetensors, or the vae folder of Qwen/Qwen-Image-Layered)."
        )
    return list(state[key].shape)


def read_config(state: dict[str, torch.Tensor], source: str = DEFAULT_SOURCE, wan: bool = False) -> QwenVAEConfig:
    """Widths, block counts and sizes from the shapes of a diffusers-layout state dict (``wan``:
    converted from Wan-original names, which the messages then use)."""
    conv_in = _shape(state, "encoder.conv_in.weight", source, wan)
    z = _shape(state, "post_quant_conv.weight", source, wan)[0]
    if len(conv_in) != 5:
        name = "encoder.conv1.weight" if wan else "encoder.conv_in.weight"
        raise WeightFileError(f"{source}: {name} has shape {conv_in}, expected a 3D convolution [out, in, 3, 3, 3].")
    base, channels = conv_in[0], conv_in[1]
    # the encoder's flat list: residual blocks, with a resampler closing every stage but the last
    entries = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
    stages: list[list[int]] = [[]]
    for n in entries:
        if f"encoder.down_blocks.{n}.resample.1.weight" in state:
            stages.append([])
        else:
            stages[-1].append(_shape(state, f"encoder.down_blocks.{n}.conv1.weight", source, wan)[0])
    counts = {len(s) for s in stages}
    if len(counts) != 1 or 0 in counts or any(w % base for s in stages for w in s):
        raise WeightFileError(
            f"{source}: the encoder blocks do not form a Wan-2.1 VAE (residual blocks per stage "
            f"{[len(s) for s in stages]}, widths {stages}, base width {base})."
        )
    mult = tuple(s[-1] // base for s in stages)
    # Wan-2.1 keeps the time axis in the first downsample and halves it in the others; fixed here
    # rather than read, so that a file missing a time_conv is reported, not taken for another model
    temporal = tuple(i > 0 for i in range(len(stages) - 1))
    return QwenVAEConfig(channels, base, z, mult, counts.pop(), temporal)


# ---------------------------------------------------------------------------------------------
# the single-frame model


class _RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1))

    def forward(self, x):
        return F.normalize(x, dim=1) * self.scale * self.gamma


class _Res(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = _RMSNorm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _RMSNorm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.conv_shortcut(x)


class _Attention(nn.Module):
    """Single-head self-attention over the pixels of each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = _RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b, 1, 3 * c, h * w).transpose(-1, -2)
        q, k, v = qkv.chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)  # [b, 1, hw, c]
        return self.proj(y.squeeze(1).transpose(1, 2).reshape(b, c, h, w)) + x


class _Mid(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.resnets = nn.ModuleList([_Res(dim, dim), _Res(dim, dim)])
        self.attentions = nn.ModuleList([_Attention(dim)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class _Down(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))

    def forward(self, x):
        return self.resample(x)


class _Up(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=2.0, mode="nearest-exact"), nn.Conv2d(dim, dim // 2, 3, padding=1)
        )

    def forward(self, x):
        return self.resample(x)


class _UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, count: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([_Res(cin if j == 0 else cout, cout) for j in range(count)])
        self.upsamplers = nn.ModuleList([_Up(cout)]) if upsample else None

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class _Encoder(nn.Module):
    def __init__(self, cfg: QwenVAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = nn.Conv2d(cfg.image_channels, dims[0], 3, padding=1)
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(cfg.num_res_blocks):
                blocks.append(_Res(cin, cout))
                cin = cout
            if i != len(cfg.dim_mult) - 1:
                blocks.append(_Down(cout))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = _Mid(dims[-1])
        self.norm_out = _RMSNorm(dims[-1])
        self.conv_out = nn.Conv2d(dims[-1], 2 * cfg.z_dim, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(self.mid_block(x))))


class _Decoder(nn.Module):
    def __init__(self, cfg: QwenVAEConfig):
        super().__init__()
        up = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        self.conv_in = nn.Conv2d(cfg.z_dim, up[0], 3, padding=1)
        self.mid_block = _Mid(up[0])
        last = len(cfg.dim_mult) - 1
        self.up_blocks = nn.ModuleList(
            _UpBlock(cin // 2 if i > 0 else cin, cout, cfg.num_res_blocks + 1, i != last)
            for i, (cin, cout) in enumerate(zip(up[:-1], up[1:], strict=True))
        )
        self.norm_out = _RMSNorm(up[-1])
        self.conv_out = nn.Conv2d(up[-1], cfg.image_channels, 3, padding=1)

    def forward(self, x):
        x = self.mid_block(self.conv_in(x))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class QwenLayeredVAE(nn.Module):
    """The RGBA VAE on single frames. ``encode_mean``: ``[B,C,H,W]`` in [-1,1] -> the raw posterior
    mean ``[B,z,H/8,W/8]`` (before the latents mean/std normalisation); ``decode``: raw
    ``[B,z,h,w]`` -> ``[B,C,8h,8w]`` clamped to [-1,1]."""

    def __init__(self, cfg: QwenVAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = _Encoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = _Decoder(cfg)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.config.dim_mult) - 1)

    def _check(self, x: torch.Tensor, channels: int, what: str) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{what} must be [B,{channels},H,W], got {list(x.shape)}")

    def encode_mean(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x, self.config.image_channels, "the image to encode")
        f = self.downscale
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"the image to encode must have sides divisible by {f}, got {list(x.shape[-2:])}")
        x = x.to(self.quant_conv.weight.dtype)
        return self.quant_conv(self.encoder(x))[:, : self.config.z_dim]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self._check(z, self.config.z_dim, "the latent to decode")
        z = z.to(self.post_quant_conv.weight.dtype)
        return self.decoder(self.post_quant_conv(z)).clamp(-1.0, 1.0)


def load_vae(
    state_dict: dict[str, torch.Tensor], source: str = DEFAULT_SOURCE, dtype: torch.dtype = torch.float32
) -> QwenLayeredVAE:
    """Check ``state_dict`` (diffusers or Wan-original names) and build the single-frame VAE.

    Raises :class:`WeightFileError` naming ``source`` on missing or unexpected keys, wrong
    shapes, non-floating or non-finite tensors.
    """
    if not isinstance(state_dict, dict) or not state_dict:
        raise WeightFileError(f"{source} holds no tensors.")
    wan = _is_wan(state_dict)
    state = wan_to_diffusers(state_dict) if wan else dict(state_dict)
    layout = "Wan-original (Comfy)" if wan else "diffusers"
    bad = sorted(k for k, t in state_dict.items() if not (torch.is_tensor(t) and t.is_floating_point()))
    if bad:
        raise WeightFileError(
            f"{source} holds non-floating-point entries ({', '.join(bad[:3])}): not a VAE weight file."
        )
    cfg = read_config(state, source, wan)
    expected = expected_shapes(cfg)
    if wan:  # name the keys as the file does
        found = {k: list(t.shape) for k, t in state_dict.items()}
        expected = {diffusers_to_wan_key(k, cfg.num_res_blocks): v for k, v in expected.items()}
    else:
        found = {k: list(t.shape) for k, t in state.items()}
    problems = _problems(found, expected)
    if problems:
        raise WeightFileError(
            f"{source} does not match the Qwen-Image-Layered RGBA VAE ({layout} names; read as {cfg.image_channels} "
            f"image channels, base width {cfg.base_dim}, widths x{list(cfg.dim_mult)}, {cfg.num_res_blocks} "
            f"residual blocks per stage, z {cfg.z_dim}): " + "; ".join(problems) + "."
        )
    check_finite(state_dict, source)

    with torch.device("meta"):
        model = QwenLayeredVAE(cfg)
    wanted = model.state_dict()
    # a causal 3D kernel on one frame sees zeros before it: only its last temporal slice counts
    flat = {k: (state[k][:, :, -1] if state[k].ndim == 5 else state[k]).to(dtype) for k in wanted}
    flat = {k: (t.reshape(wanted[k].shape) if "gamma" in k else t).contiguous() for k, t in flat.items()}
    model.load_state_dict(flat, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_vae_file(path, device="cpu", dtype: torch.dtype = torch.float32) -> QwenLayeredVAE:
    """The Qwen-Image-Layered RGBA VAE from a ``.safetensors`` file (either layout), checked as
    :func:`load_vae` does, and refused when it is a 3-channel (plain Qwen-Image / Wan) VAE."""
    from pathlib import Path

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    name = Path(str(path)).name
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError, ValueError, RuntimeError) as e:
        detail = f" ({type(e).__name__}: {e})" if str(e) else ""
        raise WeightFileError(
            f"{name} could not be read as a safetensors file{detail}: it is damaged or incomplete. Delete it (Forge "
            f"Neo may already have renamed it to {name}.corrupted) and let LayerDiffuse download it again, or put a "
            "good copy there."
        ) from None
    vae = load_vae(state, source=name, dtype=dtype)
    if vae.config.image_channels != 4:
        raise WeightFileError(
            f"{name} is a {vae.config.image_channels}-channel VAE (plain Qwen-Image / Wan 2.1), not the "
            "Qwen-Image-Layered RGBA VAE with 4 image channels (qwen_image_layered_vae.safetensors)."
        )
    return vae.to(device)
