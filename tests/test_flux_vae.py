"""Flux transparent VAE: the 16-channel layouts, and flux.decode_rgba / flux.encode_offset against
the Flux reference.

tests/data/flux_reference.safetensors holds numbers the Flux reference implementation produced on
the weights built below (weightgen seeds 21 and 22, fp32, CPU): the decoder's raw output and its
8-view TTA on a 64x64 image whose pixel overshoots [0, 1], and the img2img encode of a 64x128
RGBA image (the encoder's raw output, the VAE input, the init latent from given posterior moments).
"""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tolerance import assert_close_rel
from weightgen import DATA, make_state_dict, manifest_shapes

from lib_layerdiffuse import flux
from lib_layerdiffuse import rgba as R
from lib_layerdiffuse import vae as V
from lib_layerdiffuse.tiling import decode_tiled


def shapes(module):
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def flux_decoder_state():
    state = make_state_dict(manifest_shapes("flux_transparent_vae_decoder"), seed=21)
    state["conv_out.weight"] *= 0.25  # most outputs inside [0, 1]: the clip does not hide errors
    state["conv_out.bias"] += 0.5
    return state


@pytest.fixture(scope="module")
def ref():
    return load_file(str(DATA / "flux_reference.safetensors"))


@pytest.fixture(scope="module")
def decoder16():
    m = V.TransparentVAEDecoder(latent_channels=16)
    m.load_state_dict(flux_decoder_state(), strict=True)
    return m.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def encoder16():
    m = V.TransparentVAEEncoder(latent_channels=16)
    m.load_state_dict(make_state_dict(manifest_shapes("flux_transparent_vae_encoder"), seed=22), strict=True)
    return m.eval().requires_grad_(False)


# --- layouts ------------------------------------------------------------------------------


def test_layouts_equal_the_flux_manifests():
    with torch.device("meta"):
        dec = V.TransparentVAEDecoder(latent_channels=16)
    assert shapes(dec) == manifest_shapes("flux_transparent_vae_decoder")
    assert sum(p.numel() for p in dec.parameters()) == 104_105_572
    enc = V.TransparentVAEEncoder(latent_channels=16)
    assert shapes(enc) == manifest_shapes("flux_transparent_vae_encoder")
    assert sum(p.numel() for p in enc.parameters()) == 1_209_424
    enc.load_state_dict(make_state_dict(manifest_shapes("flux_transparent_vae_encoder")), strict=True)
    with torch.device("meta"):  # the defaults stay the SD layouts
        assert shapes(V.TransparentVAEDecoder()) == manifest_shapes("vae_transparent_decoder")
    assert shapes(V.TransparentVAEEncoder()) == manifest_shapes("vae_transparent_encoder")


def test_manifests_are_the_pth_entries():
    """The .pth manifest's encoder./decoder. groups are the two module manifests (538 + 18)."""
    pth = manifest_shapes("flux_transparent_vae_pth")
    for prefix, name, n in (
        ("decoder.", "flux_transparent_vae_decoder", 538),
        ("encoder.", "flux_transparent_vae_encoder", 18),
    ):
        group = {k[len(prefix) :]: v for k, v in pth.items() if k.startswith(prefix)}
        assert group == manifest_shapes(name) and len(group) == n
    assert sum(k.startswith("sd_vae.") for k in pth) == 244 and len(pth) == 800


# --- decode against the reference -----------------------------------------------------------


@pytest.mark.reference
def test_decoder_forward_matches_reference(decoder16, ref):
    with torch.no_grad():
        out = decoder16(flux.to_pixel(ref["pixel_raw"]), ref["latent"])
    assert_close_rel(out, ref["decoder_raw"])


@pytest.mark.reference
def test_decode_rgba_matches_reference_tta(decoder16, ref):
    pixel = flux.to_pixel(ref["pixel_raw"])
    assert pixel.max() > 1 and pixel.min() < 0  # the overshoot reaches the decoder as it is
    out = flux.decode_rgba(decoder16, pixel, ref["latent"])
    assert out.shape == (1, 4, 64, 64) and out.dtype == torch.float32
    # the reference writes R, G, B, alpha; ours is alpha first
    assert_close_rel(out, ref["decode_tta"][:, [3, 0, 1, 2]])


# --- decode logic on a narrow instance of the same class ----------------------------------------


@pytest.fixture(scope="module")
def narrow16():
    """TransparentVAEDecoder(latent_channels=16) at 1/4 width: the same code, a fast forward."""
    mp = pytest.MonkeyPatch()
    mp.setattr(V, "CHANNELS", (8, 8, 16, 16, 16, 16, 16))
    try:
        torch.manual_seed(3)
        m = V.TransparentVAEDecoder(latent_channels=16)
    finally:
        mp.undo()
    with torch.no_grad():  # outputs partly outside [0, 1], so the per-view clip matters
        m.conv_out.weight.mul_(8.0)
        m.conv_out.bias.fill_(0.5)
    return m.eval().requires_grad_(False)


def reference_tta(decoder, pixel, latent):
    """The Flux reference's TTA restated: per image, 8 views (flip W x rot90 k over H, W), each
    clipped to [0, 1] and mapped back, the lower median; channels R, G, B, alpha as they come."""
    out = []
    for i in range(pixel.shape[0]):
        views = []
        for flip in (False, True):
            for k in range(4):
                p, lat = pixel[i : i + 1], latent[i : i + 1]
                if flip:
                    p, lat = p.flip(3), lat.flip(3)
                y = decoder(p.rot90(k, dims=(2, 3)), lat.rot90(k, dims=(2, 3))).clip(0, 1)
                y = y.rot90(-k, dims=(2, 3))
                views.append(y.flip(3) if flip else y)
        out.append(torch.stack(views).median(dim=0).values)
    return torch.cat(out)


def raw_scale(decoder, pixel, latent):
    """The largest raw output before the clip to [0, 1], the size the rounding noise follows."""
    with torch.no_grad():
        return float(decoder(pixel, latent).abs().max())


def inputs(b=2, h=64, w=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixel = torch.randn(b, 3, h, w, generator=g) * 0.4 + 0.5  # about [-0.7, 1.7]: not clipped
    return pixel, torch.randn(b, 16, h // 8, w // 8, generator=g)


@pytest.mark.reference
@torch.no_grad()
def test_decode_rgba_is_the_reference_tta_alpha_first(narrow16):
    pixel, latent = inputs(b=1)  # 64x128: odd k swap H and W
    want = reference_tta(narrow16, pixel, latent)
    assert ((want == 0) | (want == 1)).any()  # the clip is exercised
    # 3 views per forward (views with odd k batch apart from the others)
    out = flux.decode_rgba(narrow16, pixel, latent, views_per_batch=3)
    # channels-last against contiguous convolutions: the noise follows the raw outputs (up to ~12), not the clip
    assert_close_rel(out, want[:, [3, 0, 1, 2]], scale=raw_scale(narrow16, pixel, latent))


@pytest.mark.reference
@torch.no_grad()
def test_speed_knobs(narrow16):
    pixel, latent = inputs(b=1)

    def one_pass(p, lat):
        return narrow16(p, lat).clip(0, 1)[:, [3, 0, 1, 2]]

    raw = one_pass(pixel, latent)
    scale = raw_scale(narrow16, pixel, latent)
    assert_close_rel(flux.decode_rgba(narrow16, pixel, latent, passes=1), raw, scale=scale)
    assert_close_rel(flux.decode_rgba(narrow16, pixel, latent, augment=False), raw, scale=scale)
    calls = []
    tiled = flux.decode_rgba(
        narrow16, pixel, latent, passes=1, tile_size=64, tile_overlap=16, callback=lambda d, t: calls.append((d, t))
    )
    assert_close_rel(tiled, decode_tiled(one_pass, pixel, latent, 64, 16), scale=scale)
    assert calls == [(1, 3), (2, 3), (3, 3)]  # 3 tiles of 64 over 128 px with 16 px overlap
    assert flux.decode_rgba(narrow16, pixel, latent, passes=1, tile_size="auto").shape == (1, 4, 64, 128)
    # any multiple of 8, as for SD: replicate-padded and cropped back
    assert flux.decode_rgba(narrow16, pixel[..., :40, :72], latent[..., :5, :9], passes=1).shape == (1, 4, 40, 72)


class Spy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.latent_channels = 16
        self.w = torch.nn.Parameter(torch.ones(1))
        self.seen = []

    def forward(self, pixel, latent):
        self.seen.append(pixel.clone())
        return torch.cat([pixel, latent.mean(1, keepdim=True).repeat_interleave(8, 2).repeat_interleave(8, 3)], 1)


@torch.no_grad()
def test_pixel_reaches_the_decoder_unclipped_and_alpha_comes_first():
    spy = Spy()
    pixel, latent = inputs(b=1)
    out = flux.decode_rgba(spy, pixel, latent, passes=1)
    torch.testing.assert_close(spy.seen[0], pixel, atol=0, rtol=0)
    assert spy.seen[0].max() > 1 and spy.seen[0].min() < 0
    # output channel 3 of the network (alpha) is channel 0 of the result
    torch.testing.assert_close(out[:, 1:], pixel.clip(0, 1), atol=0, rtol=0)
    raw = torch.tensor([[-0.5, 0.25, 1.5]])
    torch.testing.assert_close(flux.to_pixel(raw), torch.tensor([[0.25, 0.625, 1.25]]))


def test_decode_rgba_refuses_an_sd_decoder_and_bad_latents(narrow16):
    class SD(Spy):
        latent_channels = 4

    sd = SD()
    sd.latent_channels = 4
    with pytest.raises(ValueError, match="16 latent channels"):
        flux.decode_rgba(sd, torch.rand(1, 3, 64, 64), torch.rand(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"latent must be \[1, 16, 8, 8\]"):
        flux.decode_rgba(narrow16, torch.rand(1, 3, 64, 64), torch.rand(1, 4, 8, 8))
    compiled = object.__new__(V.CompiledDecoder)  # its attributes only; no torch.compile here
    compiled.decoder = narrow16
    assert compiled.latent_channels == 16 and flux.AlphaFirst(compiled).latent_channels == 16


# --- encode against the reference ---------------------------------------------------------------


def hwc(ref):
    return ref["rgba"][0].permute(1, 2, 0).contiguous().numpy()


@pytest.mark.reference
@torch.no_grad()
def test_encoder_module_matches_reference(encoder16, ref):
    img = hwc(ref)
    feed = np.concatenate([R.pad_rgb(img), img[..., 3:]], axis=2)  # alpha last
    out = encoder16(torch.from_numpy(feed).permute(2, 0, 1)[None])
    assert_close_rel(out, ref["encoder_raw"])


@pytest.mark.reference
def test_encode_offset_matches_reference(encoder16, ref):
    img = hwc(ref)
    want = ref["encoder_raw"] * 300.0
    for given in (img, [img], ref["rgba"]):
        out = flux.encode_offset(encoder16, given)
        assert out.shape == (1, 16, 8, 16)
        # x300: values near 45, and 300 times the absolute rounding noise of the raw output
        assert_close_rel(out, want)
    two = flux.encode_offset(encoder16, [img, img[::-1].copy()])
    assert two.shape == (2, 16, 8, 16)
    assert_close_rel(two[:1], want)  # batch 2 takes other kernels: the same rule


def test_vae_input_matches_reference_and_is_per_image(ref):
    img = hwc(ref)
    torch.testing.assert_close(flux.vae_input(img), ref["vae_input"], atol=1e-6, rtol=0)
    other = img.copy()
    other[..., 3] = 1.0 - other[..., 3]
    both = flux.vae_input([img, other])
    torch.testing.assert_close(both[:1], ref["vae_input"], atol=1e-6, rtol=0)
    want = (torch.from_numpy(other[..., :3]).permute(2, 0, 1) * 2 - 1) * torch.from_numpy(other[..., 3])
    torch.testing.assert_close(both[1], want, atol=1e-6, rtol=0)


@pytest.mark.reference
def test_apply_offset_gives_the_reference_init_latent(encoder16, ref):
    mean, logvar = ref["moments"].chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    z = flux.apply_offset(mean, std, flux.encode_offset(encoder16, hwc(ref)))
    assert_close_rel(z, ref["init_latent"])
    torch.testing.assert_close(flux.unscale_latent(flux.scale_latent(mean)), mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(flux.scale_latent(torch.tensor(1.1159)), torch.tensor(0.3611))
