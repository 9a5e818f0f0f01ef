"""Stop At thresholds, family detection and the layer-image preparation."""

import numpy as np
import pytest
import torch
from tolerance import assert_close_rel
from unet_tree import build_tree

from lib_layerdiffuse import conditioning as C
from lib_layerdiffuse import modes as M
from lib_layerdiffuse.session import UNetBackend, UNetSession
from lib_layerdiffuse.unet import detect_family, percent_to_sigma, sigmas_from_alphas_cumprod, timestep_to_sigma


def sd_alphas_cumprod():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def test_percent_to_sigma_matches_forge_rule():
    acp = sd_alphas_cumprod()
    sig = sigmas_from_alphas_cumprod(acp)
    assert percent_to_sigma(acp, 1.0) == 0.0 and percent_to_sigma(acp, 1.5) == 0.0
    assert percent_to_sigma(acp, 0.0) == pytest.approx(999999999.9) and percent_to_sigma(acp, -1) > 1e8
    # p = 0.5 -> t = 499.5: log-linear between sigma[499] and sigma[500]
    expected = float(torch.exp((sig[499].log() + sig[500].log()) / 2))
    assert percent_to_sigma(acp, 0.5) == pytest.approx(expected, rel=1e-6)
    assert percent_to_sigma(acp, 1e-9) == pytest.approx(float(sig[-1]), rel=1e-5)
    # monotone: a later stop means a smaller sigma
    values = [percent_to_sigma(acp, p) for p in np.linspace(0.05, 0.95, 10)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))


class CountingBackend(UNetBackend):
    unet = None

    def __init__(self):
        self.disabled = 0

    def disable(self, session):
        self.disabled += 1


def test_stop_at_switches_once():
    """One rule for every backend: active while sigma >= percent_to_sigma(stop_at), off once below."""
    acp = sd_alphas_cumprod()
    mode = M.resolve("FG_ONLY_ATTN")  # a patch mode with one small patch
    state = {"diffusion_model.x.weight::diff::0": torch.zeros(1)}

    def session(stop_at):
        backend = CountingBackend()
        return UNetSession(
            backend, mode, state, sigma_end=0.0 if stop_at >= 1 else percent_to_sigma(acp, stop_at)
        ), backend

    half, backend = session(0.5)
    end = half.sigma_end
    sigmas = torch.tensor([14.6, 5.0, 2.0, end * 1.01, end * 0.99, 0.5, 0.1])
    active = [half.step(s) for s in sigmas]
    assert active == [True, True, True, True, False, False, False]
    assert backend.disabled == 1 and half.calls == 4 and half.stopped_calls == 3
    assert half.step(14.6) is False  # stays off for the pass
    never, backend = session(0.0)
    assert not never.step(torch.tensor([14.6])) and backend.disabled == 1 and not never.ran
    always, backend = session(1.0)
    assert all(always.step(s) for s in sigmas) and backend.disabled == 0 and always.ran


def test_timestep_to_sigma_inverts_the_schedule():
    acp = sd_alphas_cumprod()
    sig = sigmas_from_alphas_cumprod(acp)
    sigma_of = timestep_to_sigma(acp)
    assert sigma_of(torch.tensor([999.0])) == pytest.approx(float(sig[-1]), rel=1e-5)
    assert sigma_of(torch.tensor([0.0, 0.0])) == pytest.approx(float(sig[0]), rel=1e-5)
    mid = sigma_of(torch.tensor([10.5]))
    assert float(sig[10]) < mid < float(sig[11])
    # the Stop At threshold at p is the sigma of timestep (1 - p) * 999
    assert sigma_of(torch.tensor([0.25 * 999])) == pytest.approx(percent_to_sigma(acp, 0.75), rel=1e-5)


def test_detect_family():
    with torch.device("meta"):
        assert detect_family(build_tree("sd15", tiny=False)) == "sd15"
        assert detect_family(build_tree("sdxl", tiny=False)) == "sdxl"
    assert detect_family(torch.nn.Linear(3, 3)) is None


def test_resize_modes():
    img = np.random.default_rng(0).random((30, 60, 3), dtype=np.float32)
    assert C.resize_image(img, "Just Resize", 16, 16).shape == (16, 16, 3)
    crop = C.resize_image(img, "Crop and Resize", 32, 32)  # scale 32/30, centre crop of the width
    assert crop.shape == (32, 32, 3)
    img[0], img[-1], img[:, 0], img[:, -1] = 0.25, 0.25, 0.25, 0.25
    fill = C.resize_image(img, "Resize and Fill", 32, 32)  # scale 32/60: 16 rows of image, rest border median
    assert fill.shape == (32, 32, 3)
    assert np.allclose(fill[:8], 0.25) and np.allclose(fill[-8:], 0.25)
    same = C.resize_image(img, "Crop and Resize", 30, 60)
    assert np.array_equal(same, img)
    with pytest.raises(ValueError, match="Unknown resize mode 'Stretch'"):
        C.resize_image(img, "Stretch", 8, 8)


@pytest.mark.parametrize("mode", M.RESIZE_MODES)
@pytest.mark.parametrize("shape", [(1, 4000), (4000, 1), (2, 9000), (1, 1)])
def test_extreme_aspect_ratios_resize_correctly(mode, shape):
    """A 1x4000 strip (and the like) to 64x64 gave a bare OpenCV assertion ("Resize and Fill":
    a side scaled to 0 px) or a 256000x64 intermediate ("Crop and Resize"); now a correct result."""
    h, w = shape
    along = np.linspace(0.0, 1.0, max(h, w), dtype=np.float32)  # a ramp along the long side
    ramp = np.ascontiguousarray(np.broadcast_to(along[None] if w >= h else along[:, None], (h, w)))
    img = np.stack([ramp, 1.0 - ramp, np.full_like(ramp, 0.25)], axis=-1)
    out = C.resize_image(img, mode, 64, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.float32 and np.isfinite(out).all()
    if h * w == 1:
        assert_close_rel(out, np.broadcast_to(img[0, 0], out.shape))  # interpolation weights: fp32 sums
    elif mode == "Crop and Resize":  # the centre of the strip, covering the whole target
        np.testing.assert_allclose(out[..., 0], 0.5, atol=2.0 / max(h, w) + 1e-3)
    elif mode == "Resize and Fill":  # the strip shrunk to one row / column, the rest the border median
        line = out[31] if w > h else out[:, 31]  # centred: (64 - 1) // 2
        np.testing.assert_allclose(line[..., 0], np.linspace(0, 1, 64), atol=0.03)
        assert_close_rel(line[..., 2], np.full(64, 0.25, np.float32))  # a sum of ~60 weighted 0.25s
    layer = C.prepare_layer_image((np.concatenate([img, np.ones_like(img[..., :1])], -1) * 255).astype(np.uint8),
                                  mode, 64, 64)  # fmt: skip
    assert layer.shape == (64, 64, 3)


def test_crop_first_matches_the_official_cover_and_crop(monkeypatch):
    """Above _CROP_FIRST_RATIO the crop is taken from the source; the result stays close to
    the official scale-then-crop (the same centre region, resampled once)."""
    img = np.random.default_rng(1).random((40, 400, 3), dtype=np.float32)
    img = cv2_blur(img)
    fast = C.resize_image(img, "Crop and Resize", 32, 32)  # 10:1, above the ratio
    monkeypatch.setattr(C, "_CROP_FIRST_RATIO", 10**9)
    official = C.resize_image(img, "Crop and Resize", 32, 32)
    assert fast.shape == official.shape == (32, 32, 3)
    assert np.abs(fast - official).mean() < 0.02


def cv2_blur(img):
    import cv2

    return cv2.GaussianBlur(img, (0, 0), 3)


def test_resize_failure_is_a_settings_error(monkeypatch):
    import cv2

    def broken(*args, **kwargs):
        raise cv2.error("OpenCV(5.0.0) resize.cpp:4220: error: (-215:Assertion failed) inv_scale_x > 0")

    monkeypatch.setattr(cv2, "resize", broken)
    with pytest.raises(ValueError, match=r"A 3x2 image could not be resized to 8x8 .*inv_scale_x > 0") as info:
        C.resize_image(np.zeros((2, 3, 3), np.float32), "Just Resize", 8, 8)
    assert isinstance(info.value, C.SettingsError)


def test_prepare_layer_image_flattens_before_resizing():
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, :8, 3] = 255  # left half opaque red, right half transparent
    out = C.prepare_layer_image(rgba, "Just Resize", 16, 16)
    assert out.dtype == np.float32 and out.shape == (16, 16, 3)
    np.testing.assert_allclose(out[0, 0], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(out[0, -1], [0.5, 0.5, 0.5])
    assert C.as_rgba_float(np.zeros((4, 4, 3), np.uint8))[..., 3].min() == 1.0
    with pytest.raises(ValueError, match="HxWx3 or HxWx4"):
        C.as_rgba_float(np.zeros((4, 4), np.uint8))
    t = C.to_tensor(out)
    assert t.shape == (1, 3, 16, 16)


def test_layer_prompt_and_condition_latent():
    assert C.layer_prompt("", "a cat") is None and C.layer_prompt("  ", "a cat") is None
    assert C.layer_prompt("glass", "a cat") == "glass, a cat"
    a, b = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)
    c = C.condition_latent([a, b])
    assert c.shape == (1, 8, 3, 3) and torch.equal(c[:, :4], a) and torch.equal(c[:, 4:], b)
