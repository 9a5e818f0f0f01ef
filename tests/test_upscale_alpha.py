"""Upscaling with alpha: the core (lib_layerdiffuse/upscale.py) and the Extras step (hosts/extras.py).

The step runs here inside a small fake of the hosts' Extras: ``PostprocessedImage``,
``ScriptPostprocessing`` and the runner's order and two passes as in
``modules/scripts_postprocessing.py``, the mode handling of ``modules/postprocessing.py``'s
``run_postprocessing``, and an Upscale step with ``Upscaler.upscale``'s rounding and "Crop to fit"
(``scripts/postprocessing_upscale.py``, ``modules/upscaler.py``), the same on A1111, Forge2 and Neo.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import types
from collections import namedtuple
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from PIL import Image

from lib_layerdiffuse import upscale as U

COLOUR = (200, 120, 40)


def lanczos(image, size):
    return image.resize(size, Image.LANCZOS)


def sample(size=64, under=(0, 0, 0)) -> Image.Image:
    """Left half opaque, right half transparent with ``under`` as its hidden colour, and a
    soft-edged circle on the boundary."""
    a = np.zeros((size, size, 4), np.uint8)
    a[..., :3] = COLOUR
    a[:, size // 2 :, :3] = under
    a[:, : size // 2, 3] = 255
    yy, xx = np.mgrid[:size, :size]
    circle = np.clip((size * 0.2 - np.hypot(xx - size * 0.55, yy - size * 0.5)) / 4, 0, 1)
    soft = circle > 0
    a[soft, :3] = COLOUR
    a[..., 3] = np.maximum(a[..., 3], (circle * 255).astype(np.uint8))
    return Image.fromarray(a, "RGBA")


def flat_mask(alpha: np.ndarray, scale: int, margin: int = 2) -> np.ndarray:
    """Output pixels whose source pixel sits in a flat 0 / 255 area at least ``margin`` pixels wide."""
    k = np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)
    flat = (cv2.erode(alpha, k) == cv2.dilate(alpha, k)) & ((alpha == 0) | (alpha == 255))
    return np.kron(flat, np.ones((scale, scale), bool))


# -- core --------------------------------------------------------------------------------


def test_alpha_exact_in_flat_areas_after_lanczos_2x():
    img = sample()
    src = np.asarray(img)[..., 3]
    out = U.upscale_rgba(img, (128, 128), lanczos)
    assert out.mode == "RGBA" and out.size == (128, 128)
    alpha = np.asarray(out)[..., 3]
    mask = flat_mask(src, 2)
    assert mask.mean() > 0.6
    np.testing.assert_array_equal(alpha[mask], np.kron(src, np.ones((2, 2), np.uint8))[mask])
    # plain Lanczos rings there (faint alpha beside the cut-out, dents inside): the clamp is what keeps it exact
    plain = np.asarray(Image.fromarray(src, "L").resize((128, 128), Image.LANCZOS))
    assert (plain[mask] != np.kron(src, np.ones((2, 2), np.uint8))[mask]).sum() > 50
    # the soft edge is still interpolated, not thresholded
    assert len(np.unique(alpha)) > 50


@pytest.mark.parametrize("under", [(0, 0, 0), (255, 255, 255)])
def test_no_halo_where_the_naive_upscale_has_one(under):
    img = sample(under=under)
    ours = np.asarray(U.upscale_rgba(img, (128, 128), lanczos)).astype(int)
    naive = np.asarray(lanczos(img.convert("RGB"), (128, 128))).astype(int)  # what an RGB-only upscaler gets
    visible = ours[..., 3] > 0
    edge = visible & (ours[..., 3] < 255)  # the pixels a halo shows on
    assert edge.sum() > 100
    ours_err = np.abs(ours[..., :3] - COLOUR).max(axis=-1)
    naive_err = np.abs(naive - COLOUR).max(axis=-1)
    assert ours_err[visible].max() <= 3
    assert naive_err[edge].mean() > 30 and naive_err[edge].max() > 100


def test_images_without_transparency_are_not_touched():
    rgb = Image.fromarray(np.full((8, 8, 3), 90, np.uint8), "RGB")
    opaque = rgb.convert("RGBA")
    assert U.split(rgb) is None and U.split(opaque) is None
    seen = []
    out = U.upscale_rgba(opaque, (16, 16), lambda im, size: seen.append(im) or lanczos(im, size))
    assert seen == [opaque] and out.mode == "RGBA"


def test_split_pads_only_fully_transparent_pixels_and_reads_other_alpha_modes():
    img = sample()
    parts = U.split(img)
    src = np.asarray(img)
    rgb = np.asarray(parts.rgb)
    visible = src[..., 3] > 0
    np.testing.assert_array_equal(rgb[visible], src[..., :3][visible])
    assert np.abs(rgb[~visible].astype(int) - COLOUR).max() <= 2  # pushed out, not the hidden black
    la = Image.fromarray(np.stack([np.full((4, 4), 50, np.uint8), np.eye(4, dtype=np.uint8) * 255], -1), "LA")
    np.testing.assert_array_equal(U.split(la).alpha, np.eye(4, dtype=np.uint8) * 255)
    keyed = Image.fromarray(np.zeros((4, 4, 3), np.uint8), "RGB")
    keyed.info["transparency"] = (0, 0, 0)  # a PNG tRNS colour key
    assert U.split(keyed).alpha.max() == 0


def test_place_alpha_crop_and_stretch():
    alpha = np.full((64, 64), 255, np.uint8)
    out = U.place_alpha(alpha, (100, 80), inner=(96, 96))  # 96x96 centred: 2 px uncovered left and right
    assert out.shape == (80, 100)
    assert (out[:, :2] == 0).all() and (out[:, 98:] == 0).all() and (out[:, 2:98] == 255).all()
    assert U.is_stretch((64, 64), (128, 128)) and U.is_stretch((65, 33), (128, 64), slack=8)
    assert not U.is_stretch((64, 64), (128, 96), slack=8)


def test_combine_checks_sizes():
    with pytest.raises(ValueError):
        U.combine(Image.new("RGB", (4, 4)), np.zeros((5, 4), np.uint8))


# -- a small fake of the hosts' Extras -------------------------------------------------------


def _fake_host():
    shared = types.ModuleType("modules.shared")
    shared.opts = SimpleNamespace(postprocessing_operation_order=[], postprocessing_disable_in_extras=[])
    shared.state = SimpleNamespace(skipped=False, job="")

    spp = types.ModuleType("modules.scripts_postprocessing")

    @dataclasses.dataclass
    class PostprocessedImageSharedInfo:
        target_width: int = None
        target_height: int = None

    class PostprocessedImage:
        def __init__(self, image):
            self.image = image
            self.info = {}
            self.shared = PostprocessedImageSharedInfo()
            self.extra_images = []
            self.nametags = []
            self.disable_processing = False
            self.caption = None

        def create_copy(self, new_image, *, nametags=None, disable_processing=False):
            pp = PostprocessedImage(new_image)
            pp.shared, pp.nametags, pp.info = self.shared, self.nametags.copy(), self.info.copy()
            pp.disable_processing = disable_processing
            return pp

    class ScriptPostprocessing:
        filename = controls = args_from = args_to = None
        extra_only = main_ui_only = None
        order = 1000
        name = None

        def ui(self):
            pass

        def process(self, pp, **args):
            pass

        def process_firstpass(self, pp, **args):
            pass

        def image_changed(self):
            pass

    def run(steps, pp, args):
        """ScriptPostprocessingRunner.scripts_in_preferred_order + run (args: name -> kwargs)."""
        order = shared.opts.postprocessing_operation_order
        steps = [s for s in steps if s.name not in shared.opts.postprocessing_disable_in_extras]

        def score(s):
            return (order.index(s.name) if s.name in order else len(steps), s.order, s.name)

        steps = sorted(steps, key=score)
        for s in steps:
            s.process_firstpass(pp, **args.get(s.name, {}))
        for s in steps:
            s.process(pp, **args.get(s.name, {}))

    spp.PostprocessedImageSharedInfo = PostprocessedImageSharedInfo
    spp.PostprocessedImage = PostprocessedImage
    spp.ScriptPostprocessing = ScriptPostprocessing

    scripts = types.ModuleType("modules.scripts")
    scripts.ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
    scripts.postprocessing_scripts_data = []

    modules = types.ModuleType("modules")
    modules.__path__ = []
    modules.shared, modules.scripts_postprocessing, modules.scripts = shared, spp, scripts
    return SimpleNamespace(modules=modules, shared=shared, spp=spp, scripts=scripts, run=run)


class Lanczos:  # modules/upscaler.py: UpscalerLanczos (keeps the mode)
    def do_upscale(self, img):
        return img.resize((int(img.width * self.scale), int(img.height * self.scale)), Image.LANCZOS)

    def upscale(self, img, scale, selected_model=None):  # Upscaler.upscale
        self.scale = scale
        dest_w, dest_h = int((img.width * scale) // 8 * 8), int((img.height * scale) // 8 * 8)
        img = self.do_upscale(img)
        if img.size != (dest_w, dest_h):
            img = img.resize((dest_w, dest_h), Image.LANCZOS)
        return img


class ModelX4(Lanczos):  # an ESRGAN-like model: RGB in, 4x out (upscaler_utils.pil_image_to_torch_bgr)
    def do_upscale(self, img):
        return img.convert("RGB").resize((img.width * 4, img.height * 4), Image.BICUBIC)


def _upscale_step(base):
    class Upscale(base):  # scripts/postprocessing_upscale.py, the parts that shape the image
        name, order = "Upscale", 1000

        def process(self, pp, upscaler=None, mode=0, by=2.0, to=(0, 0), crop=False):
            image = pp.image
            if mode == 1:
                by = max(to[0] / image.width, to[1] / image.height)
                pp.info["Postprocess upscale to"] = f"{to[0]}x{to[1]}"
            else:
                pp.info["Postprocess upscale by"] = by
            image = upscaler.upscale(image, by)
            if mode == 1 and crop:
                cropped = Image.new("RGB", to)
                cropped.paste(image, box=(to[0] // 2 - image.width // 2, to[1] // 2 - image.height // 2))
                image = cropped
                pp.info["Postprocess crop to"] = f"{image.width}x{image.height}"
            pp.info["Postprocess upscaler"] = type(upscaler).__name__
            pp.image = image

    return Upscale


@pytest.fixture(scope="module")
def host():
    fake = _fake_host()
    fakes = {"modules": fake.modules, "modules.shared": fake.shared, "modules.scripts": fake.scripts,
             "modules.scripts_postprocessing": fake.spp}  # fmt: skip
    saved = {n: sys.modules.get(n) for n in (*fakes, "lib_layerdiffuse.hosts.extras")}
    sys.modules.update(fakes)
    sys.modules.pop("lib_layerdiffuse.hosts.extras", None)
    try:
        fake.extras = importlib.import_module("lib_layerdiffuse.hosts.extras")
        fake.Upscale = _upscale_step(fake.spp.ScriptPostprocessing)
        yield fake
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


@pytest.fixture
def extras(host):
    """``run(image, **upscale_args, steps=...)``: one image through Extras as run_postprocessing does."""
    host.shared.opts = SimpleNamespace(postprocessing_operation_order=[], postprocessing_disable_in_extras=[])
    host.scripts.postprocessing_scripts_data.clear()

    def run(image, steps=None, **upscale):
        image = image if image.mode in ("RGBA", "RGB") else image.convert("RGB")
        pp = host.spp.PostprocessedImage(image)
        steps = steps if steps is not None else [host.extras.LayerDiffuseExtrasAlpha(), host.Upscale()]
        host.run(steps, pp, {"Upscale": {"upscaler": Lanczos(), **upscale}})
        return pp

    return run


def test_step_keeps_alpha_through_an_rgb_only_upscaler(host, extras):
    from lib_layerdiffuse.hosts.common import TAG

    img = sample()
    src = np.asarray(img)[..., 3]
    without = extras(img, steps=[host.Upscale()], upscaler=ModelX4(), by=2.0)
    assert without.image.mode == "RGB"  # what the host alone gives
    pp = extras(img, upscaler=ModelX4(), by=2.0)
    out = np.asarray(pp.image)
    assert pp.image.mode == "RGBA" and pp.image.size == (128, 128)
    mask = flat_mask(src, 2)
    np.testing.assert_array_equal(out[..., 3][mask], np.kron(src, np.ones((2, 2), np.uint8))[mask])
    assert np.abs(out[..., :3][out[..., 3] > 0].astype(int) - COLOUR).max() <= 3  # no halo
    np.testing.assert_array_equal(getattr(pp.image, TAG), out[..., 3])  # for common.py's save and API checks
    assert pp.info["LayerDiffuse alpha"] == "kept" and pp.info["Postprocess upscaler"] == "ModelX4"


@pytest.mark.parametrize("size,to", [((64, 64), (100, 80)), ((64, 48), (72, 120)), ((50, 30), (128, 128))])
def test_step_places_alpha_as_the_host_placed_the_colour(host, extras, size, to):
    """Scale to + Crop to fit: the alpha lands where the colour went. The reference is the alpha
    sent through the host alone as a grey image (the same resize, crop and black border)."""
    rng = np.random.default_rng(0)
    alpha = cv2.resize(rng.integers(0, 2, (size[1] // 8, size[0] // 8), dtype=np.uint8) * 255, size,
                       interpolation=cv2.INTER_NEAREST)  # fmt: skip
    rgba = np.dstack([rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), alpha])
    grey = extras(Image.fromarray(alpha, "L").convert("RGB"), steps=[host.Upscale()], mode=1, to=to, crop=True)
    pp = extras(Image.fromarray(rgba, "RGBA"), mode=1, to=to, crop=True)
    assert pp.image.mode == "RGBA" and pp.image.size == to
    ours, ref = np.asarray(pp.image)[..., 3].astype(int), np.asarray(grey.image)[..., 0].astype(int)
    # the host resamples twice (the upscaler's own size, then its rounding), ours once: small
    # differences at edges; one pixel off would be far larger
    err = {(dx, dy): np.abs(np.roll(ours, (dy, dx), (0, 1)) - ref)[4:-4, 4:-4].mean()
           for dx in (-1, 0, 1) for dy in (-1, 0, 1)}  # fmt: skip
    assert err[0, 0] < 3 and all(err[0, 0] * 2 < e for k, e in err.items() if k != (0, 0))
    assert (ours[ref == 0] <= 8).mean() > 0.98 and (ours[ref == 255] >= 247).mean() > 0.98


def test_step_leaves_images_without_alpha_to_the_host(host, extras):
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8), "RGB")
    for image in (rgb, rgb.convert("RGBA")):  # the UI's gr.Image(image_mode="RGBA") makes RGB uploads opaque RGBA
        host_only = extras(image, steps=[host.Upscale()], by=2.0)
        pp = extras(image, by=2.0)
        assert pp.image.mode == host_only.image.mode == image.mode
        np.testing.assert_array_equal(np.asarray(pp.image), np.asarray(host_only.image))
        assert "LayerDiffuse alpha" not in pp.info


def test_step_off_by_setting_or_order(host, extras):
    img = sample()
    host.shared.opts.layerdiffuse_extras_alpha = False
    assert extras(img, upscaler=ModelX4(), by=2.0).image.mode == "RGB"
    host.shared.opts.layerdiffuse_extras_alpha = True
    # put before Upscale by the user: hands the image back unchanged for Upscale, as without the step
    host.shared.opts.postprocessing_operation_order = ["LayerDiffuse alpha", "Upscale"]
    pp = extras(img, by=1.0)
    assert pp.image.mode == "RGBA" and "LayerDiffuse alpha" not in pp.info


def test_step_with_nothing_else_returns_the_image(host, extras):
    img = sample()
    pp = extras(img, steps=[host.extras.LayerDiffuseExtrasAlpha()])
    assert pp.image is img


def test_step_leaves_geometry_it_cannot_follow(host, extras, capsys):
    class Squash(host.spp.ScriptPostprocessing):  # another extension's step that changes the aspect
        name, order = "Squash", 2000

        def process(self, pp, **args):
            pp.image = pp.image.resize((pp.image.width, pp.image.height // 2))

    pp = extras(sample(), steps=[host.extras.LayerDiffuseExtrasAlpha(), host.Upscale(), Squash()], by=2.0)
    assert pp.image.mode == "RGB" and "cannot follow" in capsys.readouterr().out


def test_neo_color_correction_target_follows_the_padded_colour(host, extras):
    cache = {"cc": "target of the RGBA image"}
    module = SimpleNamespace(upscale_cache=cache, setup_color_correction=lambda image: np.asarray(image).copy())
    host.scripts.postprocessing_scripts_data.append(host.scripts.ScriptClassData(host.Upscale, "", "", module))
    extras(sample(), by=2.0)
    target = cache["cc"]
    assert target.shape == (64, 64, 3) and np.abs(target.astype(int) - COLOUR).max() <= 2  # no hidden black
