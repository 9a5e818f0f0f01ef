"""A compact plain-torch UNet with the ldm/sgm ``openaimodel`` layout (SD1.5 and SDXL).

Parameter names are exactly those of the ldm/sgm checkpoints (``input_blocks.N.M.*``,
``middle_block.*``, ``output_blocks.N.M.*``, ``time_embed.*``, ``label_emb.0.*``,
``out.*``), so a base checkpoint's ``model.diffusion_model.*`` tensors load into
:class:`UNetModel` with ``strict=True`` once the prefix is removed, and ``::lora::`` /
``::diff::`` patch keys (``diffusion_model.*``) match its ``state_dict`` one to one.

Layout, per resolution level ``i`` (``ch = model_channels * channel_mult[i]``)::

    input_blocks.0            conv_in (in_channels -> model_channels)
    input_blocks.k            [ResBlock, SpatialTransformer?]   num_res_blocks[i] times
    input_blocks.k            [Downsample]                      after every level but the last
    middle_block              ResBlock, SpatialTransformer, ResBlock
    output_blocks.k           [ResBlock, SpatialTransformer?, Upsample?]  num_res_blocks[i]+1 per level
    out                       GroupNorm, SiLU, conv (model_channels -> out_channels)

The transformers' self- and cross-attention modules (``attn1`` / ``attn2``) are
:class:`CrossAttention` objects, called by :class:`BasicTransformerBlock` as
``x = attn(norm(x), context=...) + x`` so that another module may swap them for units
that return a delta (see ``attention_sharing.py``).

Configs: :data:`SD15_CONFIG`, :data:`SDXL_CONFIG`. Build SDXL on the meta device when only
the layout is needed: ``with torch.device("meta"): UNetModel(**SDXL_CONFIG)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

SD15_CONFIG: dict = {
    "in_channels": 4,
    "model_channels": 320,
    "out_channels": 4,
    "num_res_blocks": 2,
    "channel_mult": (1, 2, 4, 4),
    "transformer_depth": (1, 1, 1, 0),
    "transformer_depth_middle": 1,
    "num_heads": 8,
    "context_dim": 768,
    "use_linear_in_transformer": False,
}

SDXL_CONFIG: dict = {
    "in_channels": 4,
    "model_channels": 320,
    "out_channels": 4,
    "num_res_blocks": 2,
    "channel_mult": (1, 2, 4),
    "transformer_depth": (0, 2, 10),
    "transformer_depth_middle": 10,
    "num_head_channels": 64,
    "context_dim": 2048,
    "use_linear_in_transformer": True,
    "adm_in_channels": 2816,
}


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """ldm sinusoidal embedding ``[N] -> [N, dim]``: cosines first, then sines (zero-padded if dim is odd)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """ldm's GroupNorm: 32 groups, computed in float32 and cast back."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(32, channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


class TimestepBlock(nn.Module):
    """A block whose forward takes the timestep embedding as a second argument."""


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that routes ``emb`` to :class:`TimestepBlock` children and ``context`` to transformers."""

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None = None,
        output_size: Sequence[int] | None = None,
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, output_size)
            else:
                x = layer(x)
        return x


class Downsample(nn.Module):
    """Stride-2 3x3 conv (``op``)."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest 2x upsampling (or to ``output_size``, for odd skip sizes) followed by a 3x3 conv (``conv``)."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor, output_size: Sequence[int] | None = None) -> torch.Tensor:
        if output_size is None:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(output_size), mode="nearest")
        return self.conv(x)


class ResBlock(TimestepBlock):
    """``in_layers`` -> + ``emb_layers(emb)`` -> ``out_layers``, plus a skip (1x1 conv when widths differ)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention; self-attention when ``context`` is None. ``to_out = [Linear, Dropout]``."""

    def __init__(
        self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64, dropout: float = 0.0
    ):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(dropout)])

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.view(b, -1, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        if mask is not None:
            # ldm convention: mask [B, tokens_k] (True = keep), broadcast over heads and queries
            mask = mask.view(b, 1, 1, -1) if mask.dim() == 2 else mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)
        for layer in self.to_out:
            out = layer(out)
        return out


class GEGLU(nn.Module):
    """``proj`` to 2x width; first half times gelu(second half)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """``net = [GEGLU, Dropout, Linear]`` with a 4x inner width."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention, feed-forward; pre-norm, each added to the residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), context=None) + x
        x = self.attn2(self.norm2(x), context=context) + x
        x = self.ff(self.norm3(x)) + x
        return x


class SpatialTransformer(nn.Module):
    """GroupNorm, ``proj_in`` (1x1 conv, or Linear with ``use_linear``), ``depth`` blocks, ``proj_out``, residual."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, use_linear: bool):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(channels, inner)
            self.proj_out = nn.Linear(inner, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context=context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


def _per_level(value, levels: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * levels
    value = list(value)
    if len(value) != levels:
        raise ValueError(f"{name} needs one value per level ({levels}), got {value}")
    return value


class UNetModel(nn.Module):
    """ldm/sgm ``openaimodel.UNetModel`` (spatial-transformer variant) with ldm parameter names.

    Args:
        in_channels, model_channels, out_channels: latent in/out widths and the base width.
        num_res_blocks: ResBlocks per level (int or one per level).
        channel_mult: width multiplier per level; each level but the last ends with a Downsample.
        transformer_depth: transformer blocks after each ResBlock of a level (int or one per level;
            0 = no SpatialTransformer at that level). The decoder uses the same depth per level.
        attention_resolutions: alternative to ``transformer_depth`` (ldm style): downsampling
            factors (1, 2, 4, ...) whose levels get a depth-1 transformer. Ignored when
            ``transformer_depth`` is given.
        transformer_depth_middle: depth of the middle transformer (default: last level's depth, at least 1).
        num_heads / num_head_channels: give one; with ``num_head_channels`` the head count is width // it.
        context_dim: width of the cross-attention context (text embeddings).
        use_linear_in_transformer: Linear ``proj_in``/``proj_out`` (SDXL) instead of 1x1 convs (SD1.5).
        adm_in_channels: width of the ``y`` vector (SDXL: 2816); adds ``label_emb``.
    """

    def __init__(
        self,
        in_channels: int = 4,
        model_channels: int = 320,
        out_channels: int = 4,
        num_res_blocks: int | Sequence[int] = 2,
        channel_mult: Sequence[int] = (1, 2, 4, 4),
        transformer_depth: int | Sequence[int] | None = None,
        attention_resolutions: Sequence[int] | None = None,
        transformer_depth_middle: int | None = None,
        num_heads: int = -1,
        num_head_channels: int = -1,
        context_dim: int = 768,
        use_linear_in_transformer: bool = False,
        adm_in_channels: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        if (num_heads == -1) == (num_head_channels == -1):
            raise ValueError("give exactly one of num_heads and num_head_channels")
        levels = len(channel_mult)
        num_res_blocks = _per_level(num_res_blocks, levels, "num_res_blocks")
        if transformer_depth is None:
            attn_res = set(attention_resolutions or ())
            transformer_depth = [int(2**i in attn_res) for i in range(levels)]
        depths = _per_level(transformer_depth, levels, "transformer_depth")
        if transformer_depth_middle is None:
            transformer_depth_middle = max(depths[-1], 1)

        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.adm_in_channels = adm_in_channels
        emb_dim = model_channels * 4

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            if num_head_channels == -1:
                heads, dim_head = num_heads, ch // num_heads
            else:
                heads, dim_head = ch // num_head_channels, num_head_channels
            return SpatialTransformer(ch, heads, dim_head, depth, context_dim, use_linear_in_transformer)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if adm_in_channels is not None:
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            )

        # encoder
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        skip_widths = [model_channels]
        ch = model_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks[level]):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, model_channels * mult, dropout)]
                ch = model_channels * mult
                if depths[level] > 0:
                    layers.append(transformer(ch, depths[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_widths.append(ch)
            if level != levels - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_widths.append(ch)

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch, dropout),
            transformer(ch, transformer_depth_middle),
            ResBlock(ch, emb_dim, ch, dropout),
        )

        # decoder: one more ResBlock per level than the encoder, each eating one skip
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            out_ch = model_channels * channel_mult[level]
            for i in range(num_res_blocks[level] + 1):
                layers = [ResBlock(ch + skip_widths.pop(), emb_dim, out_ch, dropout)]
                ch = out_ch
                if depths[level] > 0:
                    layers.append(transformer(ch, depths[level]))
                if level and i == num_res_blocks[level]:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x [B, in, H, W]``, ``timesteps [B]``, ``context [B, n, context_dim]``, ``y [B, adm]`` -> eps ``[B, out, H, W]``."""
        if (y is not None) != (self.adm_in_channels is not None):
            raise ValueError("y must be given exactly when the model has adm_in_channels")
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        t_emb = timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype)
        emb = self.time_embed(t_emb)
        if y is not None:
            emb = emb + self.label_emb(y.to(emb.dtype))

        h = x.to(self.time_embed[0].weight.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            # an Upsample ends the level: match the next skip's size (odd latent sizes round up on the way down)
            h = block(h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h).type(x.dtype)
