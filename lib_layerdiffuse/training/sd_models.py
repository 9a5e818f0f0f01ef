"""The frozen parts of an SD1.5 / SDXL checkpoint in plain torch, with the checkpoint's names.

* :class:`LDMAutoencoderKL`: the ldm ``AutoencoderKL`` (``encoder.down.N.block.M``,
  ``mid.attn_1``, ``quant_conv`` ...; the ``first_stage_model.`` keys of a single-file
  checkpoint), meeting the trainer's frozen-VAE contract: ``encode(rgb01) -> (mean, std)``
  of the unscaled posterior, ``decode(latent) -> rgb01``.
* :class:`CLIPTextModel`: the CLIP ViT-L/14 text tower with Hugging Face ``text_model.*``
  names (SD1.5 ``cond_stage_model.transformer.``, SDXL ``conditioner.embedders.0.transformer.``).
* :class:`OpenCLIPTextModel`: the OpenCLIP ViT-bigG/14 text tower with open_clip names
  (SDXL ``conditioner.embedders.1.model.``).

Widths are parameters so that tests build tiny models with the real key names; the full
sizes are the ``*_FULL`` configs (their layouts are checked against the reference manifests
on the meta device in ``tests/test_training_checkpoint.py``). No buffers: every tensor of
the state dict is a checkpoint key, so models built on the meta device load with
``assign=True``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------
# VAE


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    groups: int = 32


VAE_FULL = VAEConfig()


def _norm(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, c, eps=1e-6)


class _VAEResnet(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class _VAEAttention(nn.Module):
    """Single-head self-attention over pixels with 1x1-conv projections (ldm ``AttnBlock``)."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = _norm(c, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (m(n).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))  # [B, HW, C]
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class _Down(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # ldm pads right/bottom only


class _Up(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.block_1 = _VAEResnet(c, c, groups)
        self.attn_1 = _VAEAttention(c, groups)
        self.block_2 = _VAEResnet(c, c, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class _Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = cfg.ch
        for i, cout in enumerate(chans):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(_VAEResnet(cin, cout, cfg.groups))
                cin = cout
            if i != len(chans) - 1:
                level.downsample = _Down(cout)
            self.down.append(level)
        self.mid = _Mid(cin, cfg.groups)
        self.norm_out = _norm(cin, cfg.groups)
        self.conv_out = nn.Conv2d(cin, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class _Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult]
        c = chans[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _Mid(c, cfg.groups)
        ups: list[nn.Module] = []
        for i in reversed(range(len(chans))):  # built from the lowest resolution; stored by level
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(_VAEResnet(c, chans[i], cfg.groups))
                c = chans[i]
            if i != 0:
                level.upsample = _Up(c)
            ups.insert(0, level)
        self.up = nn.ModuleList(ups)
        self.norm_out = _norm(c, cfg.groups)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class LDMAutoencoderKL(nn.Module):
    """ldm ``AutoencoderKL``; the trainer's frozen-VAE contract on [0, 1] images, unscaled latents."""

    def __init__(self, cfg: VAEConfig = VAE_FULL):
        super().__init__()
        self.encoder = _Encoder(cfg)
        self.decoder = _Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def encode(self, rgb01: torch.Tensor):
        moments = self.quant_conv(self.encoder((rgb01 * 2 - 1).to(self.dtype))).float()
        mean, logvar = moments.chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # ldm DiagonalGaussianDistribution

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        out = self.decoder(self.post_quant_conv(z.to(self.dtype)))
        return (out.float() + 1) / 2


# ---------------------------------------------------------------------------------------
# Text encoders


@dataclass(frozen=True)
class TextConfig:
    vocab: int = 49408
    tokens: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp: int = 3072
    projection: int = 0  # OpenCLIP text_projection width (0: none)


CLIP_L_FULL = TextConfig()
OPENCLIP_BIGG_FULL = TextConfig(width=1280, layers=32, heads=20, mlp=5120, projection=1280)


def _embedding(n: int, dim: int) -> nn.Embedding:
    """An embedding without random init: the checkpoint fills it (and ``normal_`` on the meta
    device takes seconds for CLIP's 49408 x 768 table)."""
    return nn.Embedding(n, dim, _weight=torch.zeros(n, dim))


def _causal_attention(q, k, v, heads: int) -> torch.Tensor:
    b, n, c = q.shape
    q, k, v = (t.view(b, n, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.transpose(1, 2).reshape(b, n, c)


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)  # the activation OpenAI's CLIP-L was trained with


class _HFAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x):
        return self.out_proj(_causal_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class _HFMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(_quick_gelu(self.fc1(x)))


class _HFLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = _HFAttention(cfg.width, cfg.heads)
        self.layer_norm1 = nn.LayerNorm(cfg.width)
        self.mlp = _HFMLP(cfg.width, cfg.mlp)
        self.layer_norm2 = nn.LayerNorm(cfg.width)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _HFEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = _embedding(cfg.vocab, cfg.width)
        self.position_embedding = _embedding(cfg.tokens, cfg.width)

    def forward(self, ids):
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class CLIPTextModel(nn.Module):
    """CLIP text tower with Hugging Face names (``text_model.*``).

    ``forward(ids, layer)``: ``layer = "last"`` gives ``final_layer_norm`` of the last layer
    (SD1.5), ``"penultimate"`` the output of the second-to-last layer without the final
    norm (SDXL's CLIP-L). ``[B, tokens, width]``.
    """

    def __init__(self, cfg: TextConfig = CLIP_L_FULL):
        super().__init__()
        self.text_model = nn.Module()
        self.text_model.embeddings = _HFEmbeddings(cfg)
        self.text_model.encoder = nn.Module()
        self.text_model.encoder.layers = nn.ModuleList([_HFLayer(cfg) for _ in range(cfg.layers)])
        self.text_model.final_layer_norm = nn.LayerNorm(cfg.width)

    def forward(self, ids: torch.Tensor, layer: str = "last") -> torch.Tensor:
        tm = self.text_model
        x = tm.embeddings(ids)
        layers = tm.encoder.layers
        stop = len(layers) - 1 if layer == "penultimate" else len(layers)
        for block in layers[:stop]:
            x = block(x)
        return tm.final_layer_norm(x) if layer == "last" else x


class _OpenCLIPAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameter names (fused ``in_proj``), causal."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(_causal_attention(q, k, v, self.heads))


class _OpenCLIPBlock(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.attn = _OpenCLIPAttention(cfg.width, cfg.heads)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(cfg.width, cfg.mlp)
        self.mlp.c_proj = nn.Linear(cfg.mlp, cfg.width)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x))))


class OpenCLIPTextModel(nn.Module):
    """OpenCLIP text tower with open_clip names; ``forward(ids)`` -> (penultimate layer
    ``[B, tokens, width]`` without ``ln_final``, pooled ``[B, projection]`` =
    ``ln_final(last)[eot] @ text_projection``, as SDXL's second text encoder)."""

    def __init__(self, cfg: TextConfig = OPENCLIP_BIGG_FULL):
        super().__init__()
        self.token_embedding = _embedding(cfg.vocab, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.tokens, cfg.width))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([_OpenCLIPBlock(cfg) for _ in range(cfg.layers)])
        self.ln_final = nn.LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.projection or cfg.width))

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        blocks = self.transformer.resblocks
        for block in blocks[:-1]:
            x = block(x)
        penultimate = x
        last = self.ln_final(blocks[-1](x))
        eot = ids.argmax(dim=-1)  # the end-of-text token has the largest id
        pooled = last[torch.arange(ids.shape[0], device=ids.device), eot] @ self.text_projection
        return penultimate, pooled
