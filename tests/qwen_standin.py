"""Stand-in for Forge Neo's Qwen-Image transformer (``backend.nn.qwen.QwenImageTransformer2DModel``).

Neo cannot be installed in CI, so the tests drive this compact, plain-torch module instead. It keeps
what code outside the module relies on: the constructor arguments, the submodule names and
state-dict keys (the diffusers names), and the call signatures

- ``time_text_embed(timestep, hidden_states)`` -> ``temb`` (the timestep is sigma; it is scaled by 1000 inside);
- ``pe_embedder(ids)``: ids ``[B, N, 3]`` (frame, row, column) -> ``[B, 1, N, head_dim/2, 2, 2]`` rotation
  matrices; the model hands ``pe_embedder(ids).squeeze(1).unsqueeze(2)`` to the blocks, text ids first;
- ``transformer_blocks[i](hidden_states=, encoder_hidden_states=, encoder_hidden_states_mask=, temb=,
  image_rotary_emb=)`` -> ``(encoder_hidden_states, hidden_states)`` (the host ignores the text mask);
- ``norm_out(x, temb)``, ``proj_out(x)``;
- ``forward(x, timesteps, context, ...)``: the plain text-to-image path, ``x`` ``[B, 16, 1, h, w]``.

Checked against numbers computed with diffusers 0.42.1 (tests/data/qwen_transformer_refs.safetensors), and
against Neo's own module on the same weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Timesteps(nn.Module):
    """Sinusoidal embedding of ``1000 * t``: cosines first, then sines (256 channels)."""

    def __init__(self, num_channels: int = 256, scale: float = 1000.0, max_period: int = 10000):
        super().__init__()
        self.num_channels, self.scale, self.max_period = num_channels, scale, max_period

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = self.scale * (t[:, None].float() * freqs[None, :])
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class QwenTimestepProjEmbeddings(nn.Module):
    def __init__(self, embedding_dim: int, pooled_projection_dim: int = 768):
        super().__init__()
        self.time_proj = Timesteps()
        self.timestep_embedder = TimestepEmbedding(256, embedding_dim)

    def forward(self, timestep: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.timestep_embedder(self.time_proj(timestep).to(hidden_states.dtype))


class EmbedND(nn.Module):
    """RoPE rotation matrices per axis, concatenated over the axes (angles in float64, then float32)."""

    def __init__(self, dim: int, theta: int, axes_dim: list[int]):
        super().__init__()
        self.dim, self.theta, self.axes_dim = dim, theta, list(axes_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        parts = []
        for axis, d in enumerate(self.axes_dim):
            exponent = torch.linspace(0, (d - 2) / d, d // 2, dtype=torch.float64, device=ids.device)
            angles = ids[..., axis].to(torch.float32)[..., None] * (1.0 / self.theta**exponent)
            cos, sin = torch.cos(angles), torch.sin(angles)
            # [[cos, -sin], [sin, cos]] per frequency
            parts.append(torch.stack([cos, -sin, sin, cos], dim=-1).reshape(*angles.shape, 2, 2).float())
        return torch.cat(parts, dim=-3).unsqueeze(1)


def apply_rotary_emb(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[2i], x[2i+1]) of ``x`` ``[B, N, H, D]`` by ``rope`` ``[B, N, 1, D/2, 2, 2]``."""
    pairs = x.reshape(*x.shape[:-1], -1, 1, 2)
    return (rope[..., 0] * pairs[..., 0] + rope[..., 1] * pairs[..., 1]).reshape(x.shape)


class Attention(nn.Module):
    """Joint attention over text then image tokens, separate projections per stream, RMS-normed q/k."""

    def __init__(self, query_dim: int, dim_head: int, heads: int, out_dim: int, bias: bool = True, eps: float = 1e-6):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.norm_q = nn.RMSNorm(dim_head, eps=eps)
        self.norm_k = nn.RMSNorm(dim_head, eps=eps)
        self.norm_added_q = nn.RMSNorm(dim_head, eps=eps)
        self.norm_added_k = nn.RMSNorm(dim_head, eps=eps)
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(query_dim, inner, bias=bias)
        self.to_v = nn.Linear(query_dim, inner, bias=bias)
        self.add_q_proj = nn.Linear(query_dim, inner, bias=bias)
        self.add_k_proj = nn.Linear(query_dim, inner, bias=bias)
        self.add_v_proj = nn.Linear(query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, out_dim), nn.Dropout(0.0)])
        self.to_add_out = nn.Linear(inner, query_dim)

    def forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask=None, image_rotary_emb=None):
        def heads(t):
            return t.unflatten(-1, (self.heads, -1))

        n_txt = encoder_hidden_states.shape[1]
        q = torch.cat(
            [
                self.norm_added_q(heads(self.add_q_proj(encoder_hidden_states))),
                self.norm_q(heads(self.to_q(hidden_states))),
            ],
            dim=1,
        )
        k = torch.cat(
            [
                self.norm_added_k(heads(self.add_k_proj(encoder_hidden_states))),
                self.norm_k(heads(self.to_k(hidden_states))),
            ],
            dim=1,
        )
        v = torch.cat([heads(self.add_v_proj(encoder_hidden_states)), heads(self.to_v(hidden_states))], dim=1)
        if image_rotary_emb is not None:
            q, k = apply_rotary_emb(q, image_rotary_emb), apply_rotary_emb(k, image_rotary_emb)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2)
        return self.to_out[1](self.to_out[0](out[:, n_txt:])), self.to_add_out(out[:, :n_txt])


class GELU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GELU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


def _modulate(x: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shift, scale, gate = params.chunk(3, dim=-1)
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None]), gate[:, None]


class QwenImageTransformerBlock(nn.Module):
    """Double-stream block: adaLN-modulated joint attention, then a gated MLP, for image and text each."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, eps: float = 1e-6):
        super().__init__()
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim)))
            setattr(self, f"{stream}_norm1", nn.LayerNorm(dim, elementwise_affine=False, eps=eps))
            setattr(self, f"{stream}_norm2", nn.LayerNorm(dim, elementwise_affine=False, eps=eps))
            setattr(self, f"{stream}_mlp", FeedForward(dim))
        self.attn = Attention(dim, attention_head_dim, num_attention_heads, out_dim=dim, eps=eps)

    def forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb, image_rotary_emb=None):
        img_mod1, img_mod2 = self.img_mod(temb).chunk(2, dim=-1)
        txt_mod1, txt_mod2 = self.txt_mod(temb).chunk(2, dim=-1)
        img_in, img_gate1 = _modulate(self.img_norm1(hidden_states), img_mod1)
        txt_in, txt_gate1 = _modulate(self.txt_norm1(encoder_hidden_states), txt_mod1)
        img_attn, txt_attn = self.attn(img_in, txt_in, encoder_hidden_states_mask, image_rotary_emb)
        hidden_states = hidden_states + img_gate1 * img_attn
        encoder_hidden_states = encoder_hidden_states + txt_gate1 * txt_attn
        img_in, img_gate2 = _modulate(self.img_norm2(hidden_states), img_mod2)
        hidden_states = torch.addcmul(hidden_states, img_gate2, self.img_mlp(img_in))
        txt_in, txt_gate2 = _modulate(self.txt_norm2(encoder_hidden_states), txt_mod2)
        encoder_hidden_states = torch.addcmul(encoder_hidden_states, txt_gate2, self.txt_mlp(txt_in))
        return encoder_hidden_states, hidden_states


class LastLayer(nn.Module):
    def __init__(self, dim: int, conditioning_dim: int, eps: float = 1e-6):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(conditioning_dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps, elementwise_affine=False)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(self.silu(temb)).chunk(2, dim=1)
        return torch.addcmul(shift[:, None], self.norm(x), 1 + scale[:, None])


class QwenImageTransformer2DModel(nn.Module):
    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 64,
        out_channels: int | None = 16,
        num_layers: int = 60,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 3584,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        image_model=None,
        final_layer: bool = True,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.inner_dim = num_attention_heads * attention_head_dim
        self.pe_embedder = EmbedND(dim=attention_head_dim, theta=10000, axes_dim=list(axes_dims_rope))
        self.time_text_embed = QwenTimestepProjEmbeddings(self.inner_dim, pooled_projection_dim)
        self.txt_norm = nn.RMSNorm(joint_attention_dim, eps=1e-6)
        self.img_in = nn.Linear(in_channels, self.inner_dim)
        self.txt_in = nn.Linear(joint_attention_dim, self.inner_dim)
        self.transformer_blocks = nn.ModuleList(
            QwenImageTransformerBlock(self.inner_dim, num_attention_heads, attention_head_dim)
            for _ in range(num_layers)
        )
        if final_layer:
            self.norm_out = LastLayer(self.inner_dim, self.inner_dim)
            self.proj_out = nn.Linear(self.inner_dim, patch_size * patch_size * self.out_channels)

    def process_img(self, x: torch.Tensor, index: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
        """``[B, C, 1, h, w]`` -> tokens ``[B, rows*cols, C*4]`` (channel c*4 + dy*2 + dx), ids, padded shape.

        The host's ids: (index, row - rows//2, col - cols//2); note the centring differs from diffusers'
        ``-(n - n//2) .. n//2 - 1`` when a side has an odd number of patches.
        """
        p = self.patch_size
        x = F.pad(x, (0, -x.shape[-1] % p, 0, -x.shape[-2] % p, 0, 0), mode="circular")
        b, c, _, h, w = x.shape
        rows, cols = h // p, w // p
        tokens = x.reshape(b, c, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5).reshape(b, rows * cols, c * p * p)
        r = (torch.arange(rows, device=x.device) - rows // 2)[:, None].expand(rows, cols)
        q = (torch.arange(cols, device=x.device) - cols // 2)[None, :].expand(rows, cols)
        ids = torch.stack([torch.full_like(r, index), r, q], dim=-1).reshape(1, rows * cols, 3).float()
        return tokens, ids.expand(b, -1, -1), x.shape

    def forward(
        self,
        x,
        timesteps,
        context,
        attention_mask=None,
        guidance=None,
        ref_latents=None,
        transformer_options=None,
        control=None,
        **kwargs,
    ):
        if guidance is not None or ref_latents is not None or control is not None:
            raise NotImplementedError("the stand-in covers the plain text-to-image path only")
        hidden_states, img_ids, padded = self.process_img(x)
        b, c, _, h, w = padded
        p = self.patch_size
        start = max(h // p // 2, w // p // 2)
        txt_ids = torch.arange(start, start + context.shape[1], device=x.device, dtype=torch.float32)
        ids = torch.cat([txt_ids[None, :, None].expand(b, -1, 3), img_ids], dim=1)
        rope = self.pe_embedder(ids).squeeze(1).unsqueeze(2).to(x.dtype)

        hidden_states = self.img_in(hidden_states)
        encoder_hidden_states = self.txt_in(self.txt_norm(context))
        temb = self.time_text_embed(timesteps, hidden_states)
        for block in self.transformer_blocks:
            encoder_hidden_states, hidden_states = block(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                encoder_hidden_states_mask=attention_mask,
                temb=temb,
                image_rotary_emb=rope,
            )
        out = self.proj_out(self.norm_out(hidden_states, temb))
        out = out.reshape(b, h // p, w // p, -1, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, -1, 1, h, w)
        return out[..., : x.shape[-2], : x.shape[-1]]
