"""RGBA toolkit: official numbers, preview, and a PNG that keeps alpha and infotext."""

import os

import numpy as np
import pytest
from PIL import Image
from tolerance import assert_close_rel

from lib_layerdiffuse import rgba as R


@pytest.mark.reference
@pytest.mark.parametrize(
    "src,out",
    [("rgba_u8", "pad_rgb_out"), ("transparent_u8", "pad_rgb_transparent_out"), ("opaque_u8", "pad_rgb_opaque_out")],
)
def test_pad_rgb_matches_official(reference, src, out):
    img = reference[src].numpy().astype(np.float32) / 255.0
    got = R.pad_rgb(img)
    assert got.dtype == np.float32 and got.shape == img.shape[:2] + (3,)
    assert_close_rel(got, reference[out].numpy())


def test_pad_rgb_keeps_visible_and_fills_transparent():
    img = np.zeros((40, 40, 4), np.float32)
    img[:, :20, :3] = [1.0, 0.2, 0.1]
    img[:, :20, 3] = 1.0
    img[:, 20:, :3] = 0.9  # garbage colour under alpha 0 must not survive
    out = R.pad_rgb(img)
    np.testing.assert_allclose(out[:, :20], img[:, :20, :3], atol=1e-6)
    # the fill extrapolates the visible colour, not the hidden garbage
    assert np.abs(out[:, 30:] - [1.0, 0.2, 0.1]).max() < 0.05


@pytest.mark.reference
@pytest.mark.parametrize("size", ["128x192", "100x130"])
def test_checkerboard_matches_official(reference, size):
    got = R.checkerboard_preview(reference[f"cb_rgba_{size}"].numpy())
    assert_close_rel(got, reference[f"cb_out_{size}"].numpy())


def test_checkerboard_cells_and_small_images():
    cb = R.checkerboard(128, 192)[..., 0]
    np.testing.assert_allclose(np.unique(cb), [0.45, 0.55], atol=1e-6)
    assert cb[0, 0] == pytest.approx(0.45) and cb[0, 64] == pytest.approx(0.55) and cb[64, 64] == pytest.approx(0.45)
    assert (cb[:64, :64] == cb[0, 0]).all()
    # below 64 px the official breaks; we give one plain cell
    small = R.checkerboard(40, 24)
    assert small.shape == (40, 24, 1) and np.allclose(small, 0.45)
    prev = R.checkerboard_preview(np.zeros((8, 8, 4), np.float32))
    assert np.allclose(prev, 0.45)


def test_flatten_on_grey():
    rgba = np.random.default_rng(0).random((5, 6, 4), dtype=np.float32)
    out = R.flatten_on_grey(rgba)
    np.testing.assert_allclose(out, 0.5 + (rgba[..., :3] - 0.5) * rgba[..., 3:], atol=1e-7)
    rgba[..., 3] = 0
    assert np.allclose(R.flatten_on_grey(rgba), 0.5)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="HxWx4"):
        R.pad_rgb(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="HxWx4"):
        R.checkerboard_preview(np.zeros((4, 4), np.float32))


def test_png_round_trip_keeps_alpha_and_text(tmp_path):
    rgba = np.random.default_rng(1).random((33, 47, 4), dtype=np.float32)
    rgba[:5, :, 3] = 0.0
    text = "a cat\nSteps: 20, layerdiffusion_enabled: True, layerdiffusion_method: (SD1.5) Only Generate"
    path = R.write_png(tmp_path / "out.png", rgba, parameters=text)
    with Image.open(path) as im:
        assert im.mode == "RGBA" and im.format == "PNG"
        assert im.info["parameters"] == text
    pixels, params = R.read_png(path)
    assert params == text
    np.testing.assert_array_equal(pixels, R.to_uint8(rgba))  # straight alpha, truncated
    assert (pixels[:5, :, 3] == 0).all()
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no temporary left behind


def test_png_writer_accepts_uint8_and_pil(tmp_path):
    arr = np.random.default_rng(2).integers(0, 256, (9, 9, 4), dtype=np.uint8)
    R.write_png(tmp_path / "a.png", arr)
    R.write_png(tmp_path / "b.png", Image.fromarray(arr))
    assert (R.read_png(tmp_path / "a.png")[0] == arr).all()
    assert (R.read_png(tmp_path / "b.png")[0] == arr).all()
    assert R.read_png(tmp_path / "a.png")[1] is None


def test_png_writer_refuses_rgb_and_leaves_nothing(tmp_path):
    target = tmp_path / "x.png"
    with pytest.raises(ValueError, match="RGBA"):
        R.write_png(target, Image.new("RGB", (4, 4)))
    assert not target.exists()


def test_png_writer_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "x.png"
    R.write_png(target, np.ones((4, 4, 4), np.float32), parameters="old")

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        R.write_png(target, np.zeros((4, 4, 4), np.float32), parameters="new")
    monkeypatch.undo()
    assert R.read_png(target)[1] == "old"  # the previous file is intact
    assert sorted(os.listdir(tmp_path)) == ["x.png"]


def test_read_png_reports_lost_alpha(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match=r"has no alpha channel \(mode RGB.*Save the transparent image as an RGBA PNG"):
        R.read_png(tmp_path / "rgb.png")


def _alpha_images():
    """(name, image saved as PNG, expected alpha) for every way a PNG can carry transparency."""
    alpha = np.array([[0, 255], [128, 255]], np.uint8)
    la = Image.fromarray(np.stack([np.full((2, 2), 200, np.uint8), alpha], axis=-1), "LA")
    pal = Image.new("P", (2, 2))
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putdata([0, 1, 1, 0])
    grey = Image.fromarray(np.array([[7, 9], [9, 7]], np.uint8), "L")
    rgb = Image.fromarray(np.array([[[1, 2, 3], [4, 5, 6]], [[4, 5, 6], [1, 2, 3]]], np.uint8), "RGB")
    deep = Image.fromarray(np.array([[0, 65535], [32896, 0]], np.uint16))  # PNG I;16
    return [
        ("LA", la, {}, alpha),
        ("P", pal, {"transparency": 0}, np.array([[0, 255], [255, 0]], np.uint8)),
        ("L+tRNS", grey, {"transparency": 7}, np.array([[0, 255], [255, 0]], np.uint8)),
        ("RGB+tRNS", rgb, {"transparency": (1, 2, 3)}, np.array([[0, 255], [255, 0]], np.uint8)),
        ("I;16+tRNS", deep, {"transparency": 0}, np.array([[0, 255], [255, 0]], np.uint8)),
    ]


@pytest.mark.parametrize("case", _alpha_images(), ids=lambda c: c[0])
def test_read_png_keeps_alpha_of_la_palette_and_trns(tmp_path, case):
    """LA, P with a transparent entry and tRNS greys / RGB are read as RGBA with their alpha,
    not refused as "alpha channel was lost"."""
    name, image, save_args, expected = case
    path = tmp_path / "x.png"
    image.save(path, **save_args)
    pixels, _ = R.read_png(path)
    assert pixels.dtype == np.uint8 and pixels.shape == (2, 2, 4)
    np.testing.assert_array_equal(pixels[..., 3], expected)
    with Image.open(path) as im:
        np.testing.assert_array_equal(R.pil_to_rgba(im)[..., 3], expected)


def test_pil_to_rgba_scales_16_bit_grey():
    deep = Image.fromarray(np.array([[0, 65535], [32896, 257]], np.uint16))
    out = R.pil_to_rgba(deep)
    np.testing.assert_array_equal(out[..., 0], [[0, 255], [128, 1]])
    assert (out[..., 3] == 255).all() and (out[..., 0] == out[..., 2]).all()


def test_from_decoder_orders_channels():
    y = np.stack([np.full((2, 3), v, np.float32) for v in (0.25, 0.1, 0.2, 1.5)])
    out = R.from_decoder(y)
    assert out.shape == (2, 3, 4)
    np.testing.assert_allclose(out[0, 0], [0.1, 0.2, 1.0, 0.25])


def test_png_writer_refuses_rgb_arrays_and_sets_usual_permissions(tmp_path):
    with pytest.raises(ValueError, match="HxWx4"):
        R.write_png(tmp_path / "rgb.png", np.zeros((4, 4, 3), np.uint8))
    assert not (tmp_path / "rgb.png").exists()
    path = R.write_png(tmp_path / "ok.png", np.zeros((4, 4, 4), np.uint8))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
