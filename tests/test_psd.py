"""Layered PSD writer (lib_layerdiffuse/psd.py), read back with psd-tools and PIL."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import psd_tools
import pytest

from lib_layerdiffuse import pipeline, psd


def _images(h=40, w=56, seed=0):
    rng = np.random.default_rng(seed)
    bg = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    fg = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    fg[:5, :, 3] = 0  # fully transparent rows (their colour must survive too: straight alpha)
    fg[5:10, :, 3] = 255
    blend = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return bg, fg, blend


def _premultiplied(rgba: np.ndarray) -> np.ndarray:
    x = rgba.astype(np.float64) / 255.0 if rgba.dtype == np.uint8 else rgba.astype(np.float64)
    return np.concatenate([x[..., :3] * x[..., 3:], x[..., 3:]], axis=-1)


def test_layers_names_order_visibility_and_pixels(tmp_path):
    bg, fg, blend = _images()
    layers = psd.mode_layers(
        {"foreground": fg, "blended": blend}, {"bg": np.dstack([bg, np.full(bg.shape[:2], 255, np.uint8)])}
    )
    path = psd.write_psd(tmp_path / "x-layers.psd", layers, "a cat\nSteps: 3, Seed: 1")
    doc = psd_tools.PSDImage.open(path)
    assert [(layer.name, layer.visible, layer.bbox) for layer in doc] == [
        ("Background", True, (0, 0, 56, 40)),
        ("Foreground", True, (0, 0, 56, 40)),
        ("Blended", False, (0, 0, 56, 40)),
    ]
    assert np.array_equal(np.asarray(doc[1].topil()), fg)  # straight alpha, colour under alpha 0 included
    assert np.array_equal(np.asarray(doc[0].topil().convert("RGB")), bg)
    assert np.array_equal(np.asarray(doc[2].topil().convert("RGB")), blend)
    merged = np.asarray(doc.topil().convert("RGBA"), dtype=np.float64) / 255.0
    expected = psd.composite(layers)
    assert expected[..., 3].min() == 1.0  # an opaque background: the merged image is opaque
    assert np.abs(merged - expected).max() <= 1 / 255


def test_merged_image_keeps_transparency_without_a_background(tmp_path):
    _, fg, blend = _images(seed=1)
    layers = psd.mode_layers({"blended": blend}, {"fg": fg})
    assert [(layer.name, layer.visible) for layer in layers] == [("Foreground", True), ("Blended", False)]
    path = psd.write_psd(tmp_path / "y.psd", layers)
    from PIL import Image

    # the format stores a transparent merged image matted on white (as Photoshop does); PIL shows
    # it as stored, psd-tools takes the white back out
    with Image.open(path) as im:
        stored = np.asarray(im.convert("RGBA"), dtype=np.float64) / 255.0
    over_white = _premultiplied(fg)[..., :3] + (1.0 - fg[..., 3:] / 255.0)
    seen = fg[..., 3] > 0  # where alpha is 0 the stored colour is left as it is
    assert np.abs(stored[..., :3] - over_white)[seen].max() <= 1 / 255
    assert np.array_equal(stored[..., 3], fg[..., 3] / 255.0)
    merged = np.asarray(psd_tools.PSDImage.open(path).topil().convert("RGBA"))
    assert np.abs(_premultiplied(merged) - _premultiplied(fg)).max() <= 1 / 255


def test_composite_is_over_on_straight_alpha():
    bottom = np.array([[[0, 0, 255, 255]]], np.uint8)
    top = np.array([[[255, 0, 0, 51]]], np.uint8)  # 20% red
    hidden = np.array([[[0, 255, 0, 255]]], np.uint8)
    out = psd.composite([psd.Layer("a", bottom), psd.Layer("b", top), psd.Layer("c", hidden, visible=False)])
    np.testing.assert_allclose(out[0, 0], [0.2, 0.0, 0.8, 1.0], atol=1e-6)


def test_description_round_trips_through_xmp(tmp_path):
    text = 'a "cat" <lora:x:0.5> & dog\nNegative prompt: ugly\nSteps: 3, layerdiffusion_method: "(SD1.5) x"\x01'
    _, fg, _ = _images(8, 8)
    path = psd.write_psd(tmp_path / "z.psd", [psd.Layer("Foreground", fg)], text)
    assert psd.read_description(path) == text.replace("\x01", "\ufffd")
    doc = psd_tools.PSDImage.open(path)
    assert b"<dc:description>" in doc.image_resources.get_data(psd.XMP_RESOURCE)
    assert psd.read_description(psd.write_psd(tmp_path / "n.psd", [psd.Layer("Foreground", fg)])) is None


def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    _, fg, _ = _images(8, 8)
    target = tmp_path / "g-layers.psd"
    real = Path.write_bytes

    def broken(self, data):
        real(self, data[:10])  # part of the file is on disk when the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", broken)
    with pytest.raises(OSError, match="No space"):
        psd.write_psd(target, [psd.Layer("Foreground", fg)])
    assert os.listdir(tmp_path) == []


def test_layers_of_unequal_size_are_refused(tmp_path):
    a = np.zeros((8, 8, 4), np.uint8)
    b = np.zeros((8, 16, 4), np.uint8)
    with pytest.raises(ValueError, match="'b'"):
        psd.write_psd(tmp_path / "u.psd", [psd.Layer("a", a), psd.Layer("b", b)])
    assert os.listdir(tmp_path) == []


def test_available_names_the_package_when_it_cannot_import(monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == "psd_tools":
            raise ImportError("No module named 'psd_tools'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(psd, "_checked", [])
    assert psd.available() is None
    monkeypatch.setattr(psd, "_checked", [])
    monkeypatch.setattr(builtins, "__import__", fake)
    assert "psd-tools package could not be imported" in psd.available()


def test_available_says_when_psd_tools_cannot_write(monkeypatch):
    """A1111 1.10 pins Pillow 9.5: psd-tools is installed there without its dependencies, and a
    write that fails must be a reason, not an error in the middle of a generation."""
    from psd_tools.psd import PSD

    def broken(self, f, **kwargs):
        raise AttributeError("module 'PIL.ImageMath' has no attribute 'lambda_eval'")

    monkeypatch.setattr(psd, "_checked", [])
    monkeypatch.setattr(PSD, "write", broken)
    assert "could not write a PSD here (AttributeError" in psd.available()
    assert "could not write" in psd.available()  # decided once per process


@pytest.mark.parametrize("resize_mode", ["Just Resize", "Crop and Resize", "Resize and Fill"])
def test_groups_build_the_layers_of_each_whole_group(resize_mode):
    from lib_layerdiffuse import conditioning as C

    rng = np.random.default_rng(3)
    bg_in = rng.integers(0, 256, (30, 50, 4), dtype=np.uint8)  # a background upload with some alpha
    groups = pipeline.LayerGroups(("foreground", "blended"), {"bg": bg_in, "fg": None}, resize_mode)
    fg0, bl0, fg1, bl1 = (rng.integers(0, 256, (40, 56, c), dtype=np.uint8) for c in (4, 3, 4, 3))
    assert groups.add(0, fg0) is None
    assert groups.add(2, fg1) is None  # the next group's first frame
    layers = groups.add(1, bl0)
    assert [(layer.name, layer.visible) for layer in layers] == [
        ("Background", True),
        ("Foreground", True),
        ("Blended", False),
    ]
    expected_bg = np.rint(np.clip(C.prepare_layer_image(bg_in, resize_mode, 40, 56), 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(layers[0].rgba[..., :3], expected_bg) and (layers[0].rgba[..., 3] == 255).all()
    assert np.array_equal(layers[1].rgba, fg0)
    assert np.array_equal(layers[2].rgba[..., :3], bl0)
    assert [layer.name for layer in groups.add(3, bl1)] == ["Background", "Foreground", "Blended"]
    assert groups.pending == {}


def test_a_user_foreground_keeps_its_alpha():
    fg = np.zeros((16, 16, 4), np.uint8)
    fg[4:12, 4:12] = (255, 0, 0, 255)
    layer = pipeline.input_layer("fg", fg, "Just Resize", 32, 32)
    assert layer.shape == (32, 32, 4)
    assert layer[0, 0, 3] == 0 and layer[16, 16, 3] >= 254  # 8-bit as the official: x * 255 truncated
    assert layer[16, 16, 0] >= 254 and layer[16, 16, 1] == 0


def test_an_input_at_the_generation_size_keeps_its_pixel_values():
    """Found on the real hosts: (30, 30, 200) became (29, 29, 200) (grey flattening in float32 gave
    29.99998, then truncated)."""
    bg = np.zeros((16, 24, 4), np.uint8)
    bg[...] = (30, 30, 200, 255)
    bg[:8, :, :3] = np.arange(24, dtype=np.uint8)[None, :, None] * 10
    for mode in ("Just Resize", "Crop and Resize", "Resize and Fill"):
        layer = pipeline.input_layer("bg", bg, mode, 16, 24)
        assert np.array_equal(layer[..., :3], bg[..., :3]) and (layer[..., 3] == 255).all(), mode
        assert np.array_equal(pipeline.input_layer("fg", bg, mode, 16, 24), bg), mode
