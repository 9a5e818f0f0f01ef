"""SD1.5 attention sharing: official layouts, parity with the official units, install / restore."""

import pytest
import torch
from tolerance import assert_close_rel
from unet_tree import Attention, build_tree, same_bits, snapshot
from weightgen import make_state_dict, manifest_shapes

from lib_layerdiffuse.attention_sharing import (
    MODULE_MAP_SD15,
    AttentionSharing,
    AttentionSharingUnit,
    ControlEncoder,
)
from lib_layerdiffuse.errors import LayerDiffuseError

CONFIGS = [("layer_sd15_transparent_attn", 1, False), ("layer_sd15_joint", 3, False), ("layer_sd15_fg2bg", 2, True)]


def sub(manifest, prefix, seed):
    return make_state_dict(
        {k[len(prefix) :]: s for k, s in manifest_shapes(manifest).items() if k.startswith(prefix)}, seed
    )


@pytest.fixture(scope="module")
def ref():
    from safetensors.torch import load_file
    from weightgen import DATA

    return {k: v.float() for k, v in load_file(str(DATA / "official_attention_reference.safetensors")).items()}


@pytest.mark.parametrize("manifest,frames,control", CONFIGS + [("layer_sd15_bg2fg", 2, True)])
def test_layout_equals_official_manifest(manifest, frames, control):
    with torch.device("meta"):
        unet = build_tree("sd15", tiny=False)
        sharing = AttentionSharing(unet, frames, control)
    got = {k: list(v.shape) for k, v in sharing.state_dict().items()}
    assert got == manifest_shapes(manifest)


@pytest.mark.reference
def test_control_encoder_matches_official(ref):
    enc = ControlEncoder()
    enc.load_state_dict(sub("layer_sd15_fg2bg", "kwargs_encoder.", 99))
    with torch.no_grad():
        out = enc(ref["ctrl_img"] * 2 - 1)
    assert sorted(out) == [1, 4, 16, 64]
    for tokens in (64, 16, 4, 1):
        assert_close_rel(out[tokens], ref[f"ctrl_{tokens}"])


@pytest.mark.reference
@pytest.mark.parametrize("manifest,frames,control", CONFIGS)
@pytest.mark.parametrize("hooker", [0, 1, 30, 31])
def test_unit_matches_official(ref, manifest, frames, control, hooker):
    block, attn = MODULE_MAP_SD15[hooker].split(".transformer_blocks.0.")
    width = 320 if hooker < 2 else 1280
    orig = Attention(width, width if attn == "attn1" else 768, width, 8)
    orig.load_state_dict(sub("base_unet_sd15_ldm", f"diffusion_model.{block}.transformer_blocks.0.{attn}.", 5))
    unit = AttentionSharingUnit(orig, frames, control)
    unit.load_state_dict(sub(manifest, f"hookers.layers.{hooker}.", 10 + hooker))
    if control:
        enc = ControlEncoder()
        enc.load_state_dict(sub("layer_sd15_fg2bg", "kwargs_encoder.", 99))
        with torch.no_grad():
            unit.set_control_signals(enc(ref["ctrl_img"] * 2 - 1))
    p = f"{manifest}.{hooker}."
    h, mark, context = ref[p + "h"], ref[p + "cond_mark"], ref.get(p + "context")
    with torch.no_grad():
        out = unit(h, context, transformer_options={"cond_mark": mark})
        assert_close_rel(out, ref[p + "out"])
        if context is not None:
            ow = [ref[p + "ow0"], None, ref[p + "ow2"]] if frames == 3 else [ref[p + "ow0"], None][:frames]
            out = unit(h, context, transformer_options={"cond_mark": mark, "cond_overwrite": ow})
            assert_close_rel(out, ref[p + "out_overwrite"])
            # the same call through keywords and through the shared state: the same ops, bit for bit
            torch.testing.assert_close(unit(h, context, cond_mark=mark, cond_overwrite=ow), out, atol=0, rtol=0)
            unit.state.cond_mark, unit.state.cond_overwrite = mark, ow
            torch.testing.assert_close(unit(h, context), out, atol=0, rtol=0)


def tiny_sharing(frames, control, seed=0):
    torch.manual_seed(seed)
    unet = build_tree("sd15")
    sharing = AttentionSharing(unet, frames, control)
    with torch.device("meta"):
        shapes = {k: list(v.shape) for k, v in sharing.state_dict().items()}
    sharing.load_state_dict(make_state_dict(shapes, seed=seed))
    return unet, sharing


def test_install_and_restore_module_objects():
    unet, sharing = tiny_sharing(2, True)
    before = snapshot(unet)
    originals = [unet.get_submodule(n) for n in MODULE_MAP_SD15]
    sharing.install()
    assert all(isinstance(unet.get_submodule(n), AttentionSharingUnit) for n in MODULE_MAP_SD15)
    with pytest.raises(LayerDiffuseError, match="already patched"):
        AttentionSharing(unet, 2, True)
    sharing.restore()
    assert [unet.get_submodule(n) for n in MODULE_MAP_SD15] == originals
    assert same_bits(snapshot(unet), before)


def test_batch_not_multiple_of_frames():
    unet, sharing = tiny_sharing(3, False)
    unit = sharing.units[0]
    with pytest.raises(
        LayerDiffuseError, match="groups of 3 images.*got 4 rows; the batch size must be a multiple of 3"
    ):
        unit(torch.randn(4, 16, 8))


@pytest.mark.reference
def test_stop_at_runs_the_original_attention():
    unet, sharing = tiny_sharing(2, False)
    unit = sharing.units[1]
    h, ctx = torch.randn(4, 16, 8), torch.randn(4, 5, 8)
    with torch.no_grad():
        shared = unit(h, ctx)
        assert sharing.state.calls == 1
        sharing.state.enabled = False
        plain = unit(h, ctx)
    torch.testing.assert_close(plain, unit.original_module[0](h, ctx), atol=0, rtol=0)
    assert not torch.allclose(shared, plain) and sharing.state.calls == 1


def test_control_signal_missing_is_clear():
    unet, sharing = tiny_sharing(2, True)
    with pytest.raises(LayerDiffuseError, match="no control signal for 16 tokens"):
        sharing.units[0](torch.randn(2, 16, 8))
    sharing.set_control(torch.rand(1, 3, 32, 32))  # 1/8 size = 4x4 = 16 tokens
    assert sharing.units[0](torch.randn(2, 16, 8)).shape == (2, 16, 8)


def test_prompt_override_longer_than_the_context():
    """A per-layer prompt of 154 tokens with a 77-token main prompt: no broadcast error, cond rows only."""
    unet, sharing = tiny_sharing(2, False)
    unit = sharing.units[1]
    h, ctx = torch.randn(4, 16, 8), torch.randn(4, 77, 8)
    mark = torch.tensor([0.0, 0.0, 1.0, 1.0])  # group 0 cond, group 1 uncond
    long = torch.randn(1, 154, 8)
    with torch.no_grad():
        out = unit(h, ctx, cond_mark=mark, cond_overwrite=[long, None])
        plain = unit(h, ctx, cond_mark=mark)
    assert out.shape == plain.shape
    assert not torch.allclose(out[0], plain[0])  # cond row of frame 0 changed
    # frame 1 of group 0 sees frame 0 only through the cross-frame term; the uncond group differs the same way
    with torch.no_grad():
        short = unit(h, ctx, cond_mark=mark, cond_overwrite=[torch.randn(1, 77, 8), None])
    assert short.shape == plain.shape


def test_merged_weights_follow_changes_of_the_original():
    """A1111's LoRA may merge into the original weights between calls: the cache must notice."""
    unet, sharing = tiny_sharing(1, False)
    unit = sharing.units[0]
    h = torch.randn(1, 16, 8)
    with torch.no_grad():
        a = unit(h)
        unit.original_module[0].to_q.weight += 0.5
        b = unit(h)
    assert not torch.allclose(a, b)


@pytest.mark.reference
@pytest.mark.parametrize("frames", [1, 3])
def test_fused_temporal_path_equals_the_trainable_chain(frames):
    """Inference folds the temporal Linears together; with gradients on, the plain chain runs."""
    unet, sharing = tiny_sharing(frames, False, seed=3)
    unit = sharing.units[0]
    h = torch.randn(2 * frames, 16, 8)
    with torch.no_grad():
        fused = unit(h)
    unit.requires_grad_(True)
    plain = unit(h)
    assert_close_rel(plain.detach(), fused)
    plain.square().sum().backward()
    assert unit.temporal_i.weight.grad is not None and unit.temporal_i.weight.grad.abs().sum() > 0
    with torch.no_grad():
        unit.temporal_v.weight.add_(0.5)  # the fused cache notices changed weights
        assert not torch.allclose(unit(h), fused)
