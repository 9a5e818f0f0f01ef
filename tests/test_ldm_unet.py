"""The plain-torch ldm UNet: exact checkpoint layout (SD1.5, SDXL) and tiny-config forwards."""

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from tolerance import assert_close_rel
from torch import nn

from lib_layerdiffuse.ldm_unet import (
    SD15_CONFIG,
    SDXL_CONFIG,
    BasicTransformerBlock,
    CrossAttention,
    SpatialTransformer,
    UNetModel,
    timestep_embedding,
)

DATA = Path(__file__).parent / "data"
SDXL_MANIFEST = Path(__file__).parent.parent.parent / "shared" / "reference" / "weights" / "base_unet_sdxl_ldm.json"
# Fingerprint of the SDXL manifest (its "key_shape_sha256"), for checkouts without ../shared.
SDXL_FINGERPRINT = ("285af31388e599d7edefae3c959a5e9f4d1974a244d1dc57b922ec6a050aa8f5", 1680, 2567463684)

TINY = dict(
    in_channels=4,
    model_channels=32,
    out_channels=4,
    num_res_blocks=1,
    channel_mult=(1, 2),
    transformer_depth=(1, 1),
    num_heads=2,
    context_dim=32,
)
TINY_XL = dict(
    TINY,
    num_res_blocks=(1, 2),
    transformer_depth=(0, 2),
    num_heads=-1,
    num_head_channels=16,
    use_linear_in_transformer=True,
    adm_in_channels=24,
)


def layout(config) -> dict[str, list[int]]:
    with torch.device("meta"):
        model = UNetModel(**config)
    return {"diffusion_model." + k: list(v.shape) for k, v in model.state_dict().items()}


def fingerprint(shapes: dict[str, list[int]]) -> tuple[str, int, int]:
    digest = hashlib.sha256("".join(f"{k}{v}" for k, v in sorted(shapes.items())).encode()).hexdigest()
    return digest, len(shapes), sum(math.prod(s) for s in shapes.values())


def manifest(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def test_sd15_layout_matches_manifest():
    ref = manifest(DATA / "base_unet_sd15_ldm.json")
    shapes = {k: v["shape"] for k, v in ref["tensors"].items()}
    got = layout(SD15_CONFIG)
    assert got == shapes
    assert fingerprint(got) == (ref["key_shape_sha256"], 686, 859520964)


def test_sd15_layout_from_ldm_attention_resolutions():
    config = {k: v for k, v in SD15_CONFIG.items() if k != "transformer_depth"}
    assert layout(dict(config, attention_resolutions=(4, 2, 1))) == layout(SD15_CONFIG)


def test_sdxl_layout_matches_manifest():
    got = layout(SDXL_CONFIG)
    assert fingerprint(got) == SDXL_FINGERPRINT
    if SDXL_MANIFEST.exists():
        ref = manifest(SDXL_MANIFEST)
        assert got == {k: v["shape"] for k, v in ref["tensors"].items()}
        assert fingerprint(got)[0] == ref["key_shape_sha256"]


def test_timestep_embedding_is_ldm():
    t = torch.tensor([0.0, 10.0, 999.0])
    emb = timestep_embedding(t, 8)
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    args = t[:, None] * freqs
    torch.testing.assert_close(emb, torch.cat([args.cos(), args.sin()], dim=1))
    assert timestep_embedding(t, 7).shape == (3, 7)


@pytest.mark.reference
def test_cross_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = CrossAttention(32, 24, heads=4, dim_head=8).eval()
    x, ctx = torch.randn(2, 10, 32), torch.randn(2, 5, 24)
    assert attn.to_q.bias is None and attn.to_k.bias is None and attn.to_v.bias is None
    assert attn.to_out[0].bias is not None and isinstance(attn.to_out[1], nn.Dropout)

    def heads(t):
        return t.view(2, -1, 4, 8).transpose(1, 2)

    q, k, v = heads(attn.to_q(x)), heads(attn.to_k(ctx)), heads(attn.to_v(ctx))
    w = (q @ k.transpose(-1, -2) / math.sqrt(8)).softmax(-1)
    ref = attn.to_out[0]((w @ v).transpose(1, 2).reshape(2, 10, 32))
    assert_close_rel(attn(x, context=ctx), ref)
    self_attn = CrossAttention(32, None, heads=4, dim_head=8).eval()
    torch.testing.assert_close(self_attn(x), self_attn(x, context=x))


@pytest.mark.reference
def test_conv_and_linear_projections_agree():
    torch.manual_seed(0)
    conv = SpatialTransformer(32, 2, 16, 1, 32, use_linear=False).eval()
    lin = SpatialTransformer(32, 2, 16, 1, 32, use_linear=True).eval()
    lin.load_state_dict(
        {k: v.flatten(1) if k.startswith("proj_") and v.dim() == 4 else v for k, v in conv.state_dict().items()}
    )
    x, ctx = torch.randn(1, 32, 4, 6), torch.randn(1, 3, 32)
    assert_close_rel(conv(x, ctx), lin(x, ctx))


@torch.no_grad()
def test_tiny_sd15_style_forward():
    torch.manual_seed(0)
    model = UNetModel(**TINY).eval()
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([1.0, 500.0]), torch.randn(2, 7, 32)
    out = model(x, t, ctx)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, model(x, torch.tensor([900.0, 20.0]), ctx))  # timesteps matter
    assert not torch.allclose(out, model(x, t, torch.randn(2, 7, 32)))  # context matters
    odd = torch.randn(1, 4, 13, 10)  # odd latent sizes: upsample to the skip's size
    assert model(odd, t[:1], ctx[:1]).shape == odd.shape


@torch.no_grad()
def test_tiny_sdxl_style_forward_with_y():
    torch.manual_seed(0)
    model = UNetModel(**TINY_XL).eval()
    assert isinstance(model.input_blocks[4][1].proj_in, nn.Linear)
    assert model.input_blocks[4][1].transformer_blocks[0].attn1.heads == 4
    x, t, ctx, y = torch.randn(2, 4, 16, 16), torch.tensor([1.0, 500.0]), torch.randn(2, 7, 32), torch.randn(2, 24)
    out = model(x, t, ctx, y=y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, model(x, t, ctx, y=torch.randn(2, 24)))  # y matters
    with pytest.raises(ValueError):
        model(x, t, ctx)


class Recorder(nn.Module):
    """Stands in for an attention module; returns zeros or the wrapped module's output."""

    def __init__(self, inner=None):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x, context=None, **kwargs):
        self.calls.append((x.clone(), context))
        return torch.zeros_like(x) if self.inner is None else self.inner(x, context=context)


@pytest.mark.reference
@torch.no_grad()
def test_replacing_attention_modules_uses_the_ldm_call_path():
    torch.manual_seed(0)
    model = UNetModel(**TINY).eval()
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([300.0]), torch.randn(1, 7, 32)
    base = model(x, t, ctx)
    block = model.input_blocks[1][1].transformer_blocks[0]
    assert isinstance(block, BasicTransformerBlock) and isinstance(block.attn1, CrossAttention)
    original1, original2 = block.attn1, block.attn2

    block.attn1, block.attn2 = Recorder(original1), Recorder(original2)  # pass-through: same output
    torch.testing.assert_close(model(x, t, ctx), base)
    (h1, c1), (_, c2) = block.attn1.calls[0], block.attn2.calls[0]
    assert c1 is None and c2 is ctx  # attn1 is self-attention, attn2 gets the text context
    assert h1.shape == (1, 64, 32) and torch.allclose(h1.mean(-1), torch.zeros(1, 64), atol=1e-5)  # norm1(x)

    block.attn1, block.attn2 = Recorder(), original2  # a zero delta changes the output
    changed = model(x, t, ctx)
    assert changed.shape == base.shape and not torch.allclose(changed, base)
