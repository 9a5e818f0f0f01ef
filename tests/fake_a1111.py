"""Small stand-ins of the AUTOMATIC1111 (1.10) modules the script and its adapter import.

Signatures follow ``docs/hosts.md`` (§1 hooks and call order, §2 A1111's objects). Nothing here is
imported by production code: :func:`install` puts a fake ``modules`` package and a fake
``gradio`` into ``sys.modules`` and :func:`uninstall` removes them, so only the test module
that calls them sees a WebUI.

The driver :func:`process_images` runs one generation the way A1111's
``processing.process_images`` does, with script hooks wrapped like ``ScriptRunner`` (an
exception raised in a hook is only reported), ``p.sample`` called directly (so a script
may replace it to refuse), a tiny sampler calling the real ldm UNet on cond rows then
uncond rows, a fake VAE, saving through ``images.save_image`` (``on_image_saved``
callbacks included) and ``p.close()`` in a ``finally``.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import importlib.machinery
import io
import os
import re
import sys
import types
import zlib
from collections import namedtuple
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from torch import nn

CONTEXT_DIM = 32  # the tiny UNet's cross-attention width
TOKENS = 77


def tiny_unet() -> nn.Module:
    """A runnable ldm UNet with SD1.5's block layout (the 32 attention modules of SD1.5)."""
    from lib_layerdiffuse.ldm_unet import UNetModel

    return UNetModel(in_channels=4, model_channels=32, out_channels=4, num_res_blocks=2, channel_mult=(1, 1, 1, 1),
                     transformer_depth=(1, 1, 1, 0), transformer_depth_middle=1, num_heads=2,
                     context_dim=CONTEXT_DIM, use_linear_in_transformer=False)  # fmt: skip


def sd15_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


# ---------------------------------------------------------------------------------------
# gradio (3.41-like, only what ui() touches)


class Component:
    def __init__(self, *args, **kwargs):
        self.args = args
        self.kwargs = kwargs
        self.value = kwargs.get("value", args[0] if args else None)
        if callable(self.value):  # gradio: a callable value gives the initial value (and runs again on page load)
            self.value = self.value()
        self.events = []

    def change(self, fn, inputs=None, outputs=None, **kwargs):
        self.events.append(("change", fn, inputs, outputs))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _gradio() -> types.ModuleType:
    gr = _module("gradio")
    for name in (
        "Dropdown",
        "Row",
        "Column",
        "Image",
        "Slider",
        "Radio",
        "Checkbox",
        "Textbox",
        "HTML",
        "Accordion",
        "File",
    ):
        setattr(gr, name, type(name, (Component,), {}))
    gr.update = lambda **kwargs: {"__type__": "update", **kwargs}
    return gr


# ---------------------------------------------------------------------------------------
# modules.*


def _module(name: str, package: bool = False) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)  # find_spec() works on it
    if package:
        m.__path__ = []
    return m


class Script:
    """``modules.scripts.Script`` (the parts the runner and the script use)."""

    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    infotext_fields = None
    paste_field_names = None

    def title(self):
        raise NotImplementedError

    def show(self, is_img2img):
        return True

    def elem_id(self, item_id):
        need_tabname = self.show(True) == self.show(False)
        tabname = (("img2img" if self.is_img2img else "txt2img") + "_") if need_tabname else ""
        title = re.sub(r"[^a-z_0-9]", "", re.sub(r"\s", "_", self.title().lower()))
        return f"script_{tabname}{title}_{item_id}"


class PostSampleArgs:
    def __init__(self, samples):
        self.samples = samples


class PostprocessImageArgs:
    def __init__(self, image):
        self.image = image


class ImageSaveParams:
    def __init__(self, image, p, filename, pnginfo):
        self.image = image
        self.p = p
        self.filename = filename
        self.pnginfo = pnginfo


def _script_callbacks() -> types.ModuleType:
    sc = _module("modules.script_callbacks")
    sc.ImageSaveParams = ImageSaveParams
    sc.callbacks_image_saved = []
    sc.callbacks_before_image_saved = []
    sc.callbacks_app_started = []
    sc.callbacks_ui_settings = []
    sc.on_ui_settings = sc.callbacks_ui_settings.append
    sc.callbacks_before_ui = []
    sc.on_before_ui = sc.callbacks_before_ui.append
    sc.on_image_saved = sc.callbacks_image_saved.append
    sc.on_before_image_saved = sc.callbacks_before_image_saved.append
    sc.on_app_started = sc.callbacks_app_started.append
    sc.callbacks_after_component = []  # callback(component, **the component's constructor kwargs)
    sc.on_after_component = lambda callback, *, name=None: sc.callbacks_after_component.append(callback)
    sc.callbacks_infotext_pasted = []  # callback(infotext, params), before the paste fields are applied
    sc.on_infotext_pasted = lambda callback, *, name=None: sc.callbacks_infotext_pasted.append(callback)

    def after_component_callback(component, **kwargs):
        for cb in sc.callbacks_after_component:
            cb(component, **kwargs)

    def infotext_pasted_callback(infotext, params):
        for cb in sc.callbacks_infotext_pasted:
            cb(infotext, params)

    sc.after_component_callback = after_component_callback
    sc.infotext_pasted_callback = infotext_pasted_callback

    def image_saved_callback(params):
        for cb in sc.callbacks_image_saved:
            cb(params)

    def before_image_saved_callback(params):
        for cb in sc.callbacks_before_image_saved:
            cb(params)

    def app_started_callback(demo=None, app=None):
        for cb in sc.callbacks_app_started:
            cb(demo, app)

    def ui_settings_callback():
        for cb in sc.callbacks_ui_settings:
            cb()

    def before_ui_callback():
        for cb in sc.callbacks_before_ui:
            cb()

    sc.ui_settings_callback = ui_settings_callback
    sc.before_ui_callback = before_ui_callback
    sc.image_saved_callback = image_saved_callback
    sc.before_image_saved_callback = before_image_saved_callback
    sc.app_started_callback = app_started_callback
    sc.ImageGridLoopParams = ImageGridLoopParams
    sc.callbacks_image_grid = []
    sc.on_image_grid = lambda callback, *, name=None: sc.callbacks_image_grid.append(callback)

    def image_grid_callback(params):
        for cb in sc.callbacks_image_grid:
            cb(params)

    sc.image_grid_callback = image_grid_callback
    return sc


class ImageGridLoopParams:
    """``script_callbacks.ImageGridLoopParams``: an ``on_image_grid`` callback may replace ``imgs``."""

    def __init__(self, imgs, cols, rows):
        self.imgs, self.cols, self.rows = imgs, cols, rows


ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])


def xyz_grid_module() -> types.ModuleType:
    """``scripts/xyz_grid.py`` as the host loads it (module name "xyz_grid.py"), in A1111 1.10's terms
    (Forge2 and Neo run the same cell loop): ``AxisOption``, the axis list, the module-level
    ``process_images`` and ``draw_xyz_grid`` the plot calls, and ``Script.run``. What the stand-in keeps
    of the real plot: each axis' values are converted and passed to its ``confirm`` before any cell;
    ``shared.state.xyz_plot_x/y/z`` are set; each cell is a shallow copy of ``p`` with the axes applied,
    and an exception from its ``process_images`` is only reported (the cell is then drawn blank); the
    grid takes each cell's first image (``images.image_grid``); ``run`` returns the grid with the
    cells' infotexts after it, drops the cells unless "Include Sub Images", and saves the grid."""
    from modules import images, processing, shared  # type: ignore

    xyz = types.ModuleType("xyz_grid.py")
    AxisInfo = namedtuple("AxisInfo", ["axis", "values"])

    class AxisOption:
        def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None,
                     prepare=None):  # fmt: skip
            self.label, self.type, self.apply, self.choices = label, type, apply, choices
            self.format_value = format_value or (lambda p, opt, x: f"{opt.label}: {x}")
            self.confirm, self.cost, self.prepare = confirm, cost, prepare

    def process_images(p):
        return processing.process_images(p)

    def draw_xyz_grid(p, xs, ys, zs, x_labels, y_labels, z_labels, cell, draw_legend, include_lone_images,
                      include_sub_grids, first_axes_processed, second_axes_processed, margin_size):  # fmt: skip
        size = len(xs) * len(ys) * len(zs)
        result = None
        for iz, z in enumerate(zs):  # the cell order is the axes' cost order; z, y, x when all cost 0
            for iy, y in enumerate(ys):
                for ix, x in enumerate(xs):
                    processed = cell(x, y, z, ix, iy, iz)
                    if result is None:
                        result = copy.copy(processed)
                        result.images, result.all_prompts = [None] * size, [None] * size
                        result.all_seeds, result.infotexts = [None] * size, [None] * size
                        result.index_of_first_image = 1
                    idx = ix + iy * len(xs) + iz * len(xs) * len(ys)
                    if processed.images:
                        result.images[idx], result.infotexts[idx] = processed.images[0], processed.infotexts[0]
                        result.all_prompts[idx], result.all_seeds[idx] = processed.prompt, processed.seed
                    else:  # a failed cell: blank, the size of the first cell
                        first = result.images[0]
                        result.images[idx] = Image.new(
                            first.mode if first else "P", first.size if first else (result.width, result.height)
                        )
        if result is None or not any(result.images):
            return processing.Processed(p, [])
        for i in range(len(zs)):
            start = i * len(xs) * len(ys) + i
            grid = images.image_grid(result.images[start : start + len(xs) * len(ys)], rows=len(ys))
            result.images.insert(i, grid)
            result.all_prompts.insert(i, result.all_prompts[start])
            result.all_seeds.insert(i, result.all_seeds[start])
            result.infotexts.insert(i, result.infotexts[start])
        result.images.insert(0, images.image_grid(result.images[: len(zs)], rows=1))
        result.infotexts.insert(0, result.infotexts[0])
        return result

    class XYZScript(Script):
        def __init__(self):
            self.current_axis_options = xyz.axis_options

        def title(self):
            return "X/Y/Z plot"

        def run(self, p, x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown, z_type, z_values,
                z_values_dropdown, draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds,
                vary_seeds_x, vary_seeds_y, vary_seeds_z, margin_size, csv_mode):  # fmt: skip
            if not shared.opts.return_grid:
                p.batch_size = 1

            def process_axis(opt, vals, vals_dropdown):
                if opt.label == "Nothing":
                    return [0]
                if opt.choices is not None and not csv_mode:
                    values = list(vals_dropdown)
                else:
                    values = [v.strip() for v in vals.split(",") if v.strip()]
                values = [opt.type(v) for v in values]
                if opt.confirm:
                    opt.confirm(p, values)
                return values

            x_opt, y_opt, z_opt = (self.current_axis_options[t or 0] for t in (x_type, y_type, z_type))
            xs = process_axis(x_opt, x_values, x_values_dropdown)
            ys = process_axis(y_opt, y_values, y_values_dropdown)
            zs = process_axis(z_opt, z_values, z_values_dropdown)
            shared.state.xyz_plot_x, shared.state.xyz_plot_y = AxisInfo(x_opt, xs), AxisInfo(y_opt, ys)
            shared.state.xyz_plot_z = AxisInfo(z_opt, zs)

            def cell(x, y, z, ix, iy, iz):
                if shared.state.interrupted or getattr(shared.state, "stopping_generation", False):
                    return processing.Processed(p, [], p.seed, "")
                pc = copy.copy(p)
                pc.styles = pc.styles[:]
                x_opt.apply(pc, x, xs)
                y_opt.apply(pc, y, ys)
                z_opt.apply(pc, z, zs)
                try:
                    return xyz.process_images(pc)
                except Exception as e:  # errors.display(e, "generating image for xyz plot")
                    xyz.reported.append(e)
                    return processing.Processed(p, [], p.seed, "")

            processed = xyz.draw_xyz_grid(
                p, xs=xs, ys=ys, zs=zs, x_labels=[x_opt.format_value(p, x_opt, x) for x in xs],
                y_labels=[y_opt.format_value(p, y_opt, y) for y in ys],
                z_labels=[z_opt.format_value(p, z_opt, z) for z in zs], cell=cell, draw_legend=draw_legend,
                include_lone_images=include_lone_images, include_sub_grids=include_sub_grids,
                first_axes_processed="z", second_axes_processed="y", margin_size=margin_size,
            )  # fmt: skip
            if not processed.images:
                return processed
            z_count = len(zs)
            if not include_lone_images:
                processed.images = processed.images[: z_count + 1]
            if shared.opts.grid_save:
                images.save_image(processed.images[0], p.outpath_grids, "xyz_grid", info=processed.infotexts[0],
                                  extension=shared.opts.grid_format, prompt=processed.all_prompts[0],
                                  seed=processed.all_seeds[0], grid=True, p=processed)  # fmt: skip
            if not include_sub_grids:
                for _ in range(z_count):
                    del processed.images[1], processed.all_prompts[1], processed.all_seeds[1]
                    del processed.infotexts[1]
            return processed

    XYZScript.__module__ = "xyz_grid.py"
    xyz.AxisOption, xyz.AxisInfo, xyz.Script = AxisOption, AxisInfo, XYZScript
    xyz.process_images, xyz.draw_xyz_grid, xyz.reported = process_images, draw_xyz_grid, []
    xyz.axis_options = [AxisOption("Nothing", str, lambda p, x, xs: None), AxisOption("Seed", int, None)]
    return xyz


def run_xyz(p, script, args, xyz, x=("Nothing", ""), y=("Nothing", ""), z=("Nothing", ""), include_lone_images=False,
            csv_mode=True):  # fmt: skip
    """``modules.txt2img``: the selected script (the X/Y/Z plot) runs with ``p`` and the always-on
    scripts' arguments in ``p.script_args``; ``x``, ``y``, ``z``: (axis label, values as typed)."""
    p.scripts = Runner(script, args)
    p.script_args = list(args)
    labels = [o.label for o in xyz.axis_options]
    axes = [(labels.index(label), values, values if isinstance(values, list) else []) for label, values in (x, y, z)]
    return xyz.Script().run(p, *axes[0], *axes[1], *axes[2], False, include_lone_images, False, False, False, False,
                            False, 0, csv_mode)  # fmt: skip


class OptionInfo:
    """``modules.options.OptionInfo`` (A1111 1.10's signature)."""

    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before="", comment_after="", infotext=None, restrict_api=False,
                 category_id=None):  # fmt: skip
        self.default, self.label, self.component, self.component_args = default, label, component, component_args
        self.section, self.infotext, self.comment_after = section, infotext, comment_after
        self.onchange, self.restrict_api, self.do_not_save = onchange, restrict_api, False

    def info(self, info):
        self.comment_after += f"<span class='info'>({info})</span>"
        return self


class Options(SimpleNamespace):
    """``shared.opts``: values as attributes; ``add_option`` registers a setting with its default."""

    def __init__(self, **values):
        super().__init__(**values)
        self.data_labels = {}

    def add_option(self, key, info):
        self.data_labels[key] = info
        if not hasattr(self, key):
            setattr(self, key, info.default)

    def set(self, key, value, is_api=False, run_callbacks=True):
        """A1111 1.10's ``Options.set``: what ``/sdapi/v1/options``, ``override_settings`` (with
        ``run_callbacks=False``) and the settings page call; an onchange error is only reported and
        the old value put back. Forge2 and Neo have the same method (their ``sysinfo.set_config``)."""
        oldval = getattr(self, key, None)
        if oldval == value:
            return False
        option = self.data_labels[key]
        if option.do_not_save or (is_api and option.restrict_api):
            return False
        try:
            setattr(self, key, value)
        except RuntimeError:
            return False
        if run_callbacks and option.onchange is not None:
            try:
                option.onchange()
            except Exception as e:  # errors.display(e, ...)
                print(f"changing setting {key} to {value}: {e}")
                setattr(self, key, oldval)
                return False
        return True


def _images(shared, paths, script_callbacks) -> types.ModuleType:
    images = _module("modules.images")
    images.counter = 0
    images.neo_names = False  # True: Neo's save_image, which names the file written in already_saved_as

    def save_image_with_geninfo(image, geninfo, filename, extension=None, pnginfo_section_name="parameters"):
        """A1111's: PNG keeps the mode (RGBA stays RGBA) with a tEXt chunk; jpg/webp drop alpha."""
        extension = (extension or os.path.splitext(filename)[1]).lower()
        fmt = Image.registered_extensions()[extension]
        if extension == ".png":
            info = PngImagePlugin.PngInfo()
            if shared.opts.enable_pnginfo and geninfo is not None:
                info.add_text(pnginfo_section_name, geninfo)
            image.save(filename, format=fmt, pnginfo=info)
        elif extension in (".jpg", ".jpeg", ".webp"):
            if image.mode == "RGBA":
                image = image.convert("RGB")
            image.save(filename, format=fmt, quality=95)
        else:
            image.save(filename, format=fmt)

    def save_image(image, path, basename, seed=None, prompt=None, extension="png", info=None, short_filename=False,
                   no_prompt=False, grid=False, pnginfo_section_name="parameters", p=None, existing_info=None,
                   forced_filename=None, suffix="", save_to_dirs=None):  # fmt: skip
        """``modules.images.save_image``: the path is used as given, so a relative one is relative to
        the current directory (the hosts' output folders are relative to it). "Add number suffix when
        the file exists" writes ``<name>-1.png`` but leaves ``params.filename`` and
        ``already_saved_as`` at ``<name>.png`` (A1111 1.10); Neo names the written file in
        ``already_saved_as`` (``images.neo_names``)."""
        images.counter += 1
        name = forced_filename or f"{images.counter:05}-{seed}{'-' + basename if basename else ''}{suffix}"
        fullfn = os.path.join(path, f"{name}.{extension}")
        params = ImageSaveParams(image, p, fullfn, {pnginfo_section_name: info})
        script_callbacks.before_image_saved_callback(params)
        image, fullfn = params.image, params.filename
        os.makedirs(os.path.dirname(fullfn) or ".", exist_ok=True)
        stem, ext = os.path.splitext(fullfn)
        tmp = stem + ".tmp"
        save_image_with_geninfo(image, params.pnginfo.get(pnginfo_section_name), tmp, ext)
        written = fullfn
        if shared.opts.save_images_replace_action != "Replace":
            n = 0
            while os.path.exists(written):
                n += 1
                written = f"{stem}-{n}{ext}"
        os.replace(tmp, written)
        image.already_saved_as = written if images.neo_names else fullfn
        images.saved.append(os.path.abspath(written))
        script_callbacks.image_saved_callback(params)
        return fullfn, None

    def resize_image(resize_mode, im, width, height, upscaler_name=None):
        """0 = just resize, 1 = crop and resize, 2 = resize and fill (fill simplified)."""
        if resize_mode == 0:
            return im.resize((width, height), Image.LANCZOS)
        ratio, src_ratio = width / height, im.width / im.height
        if (resize_mode == 1) == (ratio > src_ratio):
            w, h = width, max(1, round(width * im.height / im.width))
        else:
            w, h = max(1, round(height * im.width / im.height)), height
        resized = im.resize((w, h), Image.LANCZOS)
        out = Image.new(im.mode, (width, height))
        out.paste(resized, ((width - w) // 2, (height - h) // 2))
        return out

    def flatten(img, bgcolor):
        if img.mode == "RGBA":
            background = Image.new("RGBA", img.size, bgcolor)
            background.paste(img, mask=img)
            img = background
        return img.convert("RGB")

    images.saved = []
    images.save_image = save_image
    images.save_image_with_geninfo = save_image_with_geninfo
    images.resize_image = resize_image
    images.flatten = flatten

    def image_grid(imgs, batch_size=1, rows=None):
        """A1111 1.10's: ``on_image_grid`` callbacks, then the images pasted onto an RGB canvas."""
        rows = min(rows or 1, len(imgs))
        cols = -(-len(imgs) // rows)
        params = script_callbacks.ImageGridLoopParams(imgs, cols, rows)
        script_callbacks.image_grid_callback(params)
        w, h = (max(s) for s in zip(*(im.size for im in imgs), strict=True))
        grid = Image.new("RGB", (params.cols * w, params.rows * h), shared.opts.grid_background_color)
        for i, im in enumerate(params.imgs):
            grid.paste(im, box=(i % params.cols * w, i // params.cols * h))
        return grid

    images.image_grid = image_grid
    return images


def _api(shared) -> tuple[types.ModuleType, types.ModuleType]:
    pkg = _module("modules.api", package=True)
    api = _module("modules.api.api")

    def encode_pil_to_base64(image):
        """A1111's: the API image follows opts.samples_format; jpg/webp drop alpha."""
        with io.BytesIO() as out:
            if isinstance(image, str):
                return image
            fmt = shared.opts.samples_format.lower()
            if fmt == "png":
                image.save(out, format="PNG")
            else:
                if image.mode == "RGBA":
                    image = image.convert("RGB")
                image.save(out, format="JPEG" if fmt in ("jpg", "jpeg") else "WEBP", quality=90)
            data = out.getvalue()
        return base64.b64encode(data)

    api.encode_pil_to_base64 = encode_pil_to_base64
    api.HTTPException, api.Api = HTTPException, Api
    pkg.api = api
    return pkg, api


NAMES = ("modules", "modules.scripts", "modules.script_callbacks", "modules.shared", "modules.paths",
         "modules.devices", "modules.images", "modules.modelloader", "modules.ui_components",
         "modules.processing", "modules.api", "modules.api.api", "modules.scripts_postprocessing",
         "gradio")  # fmt: skip


def install(models_dir, data_path) -> SimpleNamespace:
    """Put the fake ``modules`` and ``gradio`` into ``sys.modules``; returns them (and what they replaced)."""
    saved = {n: sys.modules[n] for n in NAMES if n in sys.modules}
    root = _module("modules", package=True)
    scripts = _module("modules.scripts")
    scripts.Script = Script
    scripts.AlwaysVisible = object()
    scripts.PostSampleArgs = PostSampleArgs
    scripts.PostprocessImageArgs = PostprocessImageArgs
    scripts.ScriptClassData = ScriptClassData
    scripts.scripts_data = []  # what the host loaded: the X/Y/Z plot is found there
    script_callbacks = _script_callbacks()
    shared = _module("modules.shared")
    shared.cmd_opts = SimpleNamespace(layerdiffuse_models_dir=str(models_dir))
    shared.state = SimpleNamespace(
        textinfo=None, interrupted=False, skipped=False, stopping_generation=False
    )  # the progress shown in the UI; Interrupt, Skip
    shared.OptionInfo = OptionInfo
    shared.opts = Options(samples_format="png", enable_pnginfo=True, samples_save=True,
                          img2img_background_color="#ffffff", jpeg_quality=95, return_grid=True, grid_save=True,
                          grid_format="png", grid_background_color="#ffffff", save_images_replace_action="Replace",
                          save_prompt_comments=False)  # fmt: skip
    paths = _module("modules.paths")
    paths.models_path = os.path.join(str(data_path), "models")
    paths.data_path = str(data_path)
    devices = _module("modules.devices")
    devices.device = torch.device("cpu")
    devices.dtype = torch.float32
    devices.cpu = torch.device("cpu")

    class NansException(Exception):
        pass

    def test_for_nans(x, where):
        if not torch.isfinite(x).all():
            raise NansException(f"A tensor with NaNs was produced in {where}.")

    devices.NansException, devices.test_for_nans = NansException, test_for_nans
    images = _images(shared, paths, script_callbacks)
    modelloader = _module("modules.modelloader")
    modelloader.calls = []

    def load_file_from_url(url, *, model_dir, progress=True, file_name=None, hash_prefix=None):
        modelloader.calls.append((url, model_dir, file_name))
        raise OSError("offline (fake modelloader)")

    modelloader.load_file_from_url = load_file_from_url
    ui_components = _module("modules.ui_components")
    ui_components.InputAccordion = type("InputAccordion", (Component,), {})
    processing = _module("modules.processing")
    processing.StableDiffusionProcessingTxt2Img = Txt2Img
    processing.StableDiffusionProcessingImg2Img = Img2Img
    processing.Processed = Processed
    processing.process_images = process_images
    processing.DecodedSamples = DecodedSamples
    processing.decode_latent_batch = decode_latent_batch
    processing.create_infotext = create_infotext
    api_pkg, api = _api(shared)
    spp = _module("modules.scripts_postprocessing")  # the Extras steps' base class (tests/test_upscale_alpha.py
    spp.ScriptPostprocessing = type("ScriptPostprocessing", (), {"order": 1000})  # drives Extras itself)
    gradio = _gradio()
    new = dict(zip(NAMES, (root, scripts, script_callbacks, shared, paths, devices, images, modelloader,
                           ui_components, processing, api_pkg, api, spp, gradio), strict=True))  # fmt: skip
    for name, mod in new.items():
        if "." in name:
            parent, _, attr = name.rpartition(".")
            setattr(new[parent], attr, mod)
    sys.modules.update(new)
    return SimpleNamespace(saved=saved, **{n.replace("modules.", "").replace(".", "_"): m for n, m in new.items()})


def uninstall(fake: SimpleNamespace, extra=()):
    """Remove the fakes (and ``extra`` module names that imported them); put back what was there."""
    for name in (*NAMES, *extra):
        sys.modules.pop(name, None)
    sys.modules.update(fake.saved)


@contextlib.contextmanager
def script_under(models_dir, data_path, name: str):
    """The fakes installed and ``scripts/layerdiffuse.py`` imported under ``name`` (as the WebUI
    loads it); yields ``(fake, module)``; everything is taken out again afterwards."""
    import importlib.util
    from pathlib import Path

    import lib_layerdiffuse.hosts

    fake = install(models_dir, data_path)
    try:
        path = Path(__file__).resolve().parent.parent / "scripts" / "layerdiffuse.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        assert mod.HOST_ID == "a1111" and mod.host is not None
        yield fake, mod
    finally:
        uninstall(fake, extra=(name, "lib_layerdiffuse.hosts.a1111", "lib_layerdiffuse.hosts.extras"))
        lib_layerdiffuse.hosts.__dict__.pop("a1111", None)
        lib_layerdiffuse.hosts.__dict__.pop("extras", None)


# ---------------------------------------------------------------------------------------
# model, processing objects, the generation driver


class FakeVAE(nn.Module):
    """``first_stage_model``: ``encoder`` (8x down to 8 moment channels) and ``quant_conv``."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.encoder = nn.Sequential(nn.AvgPool2d(8), nn.Conv2d(3, 8, 1))
        self.quant_conv = nn.Conv2d(8, 8, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def encode_scaled(self, rgb01: torch.Tensor, scale: float) -> torch.Tensor:
        """The deterministic 'get_first_stage_encoding' (posterior mean, scaled)."""
        with torch.no_grad():
            mean, _ = self.quant_conv(self.encoder(rgb01 * 2 - 1)).chunk(2, dim=1)
        return mean * scale


class FakeSDModel:
    def __init__(self, unet: nn.Module):
        self.model = SimpleNamespace(diffusion_model=unet)
        self.scale_factor = 0.18215
        self.alphas_cumprod = sd15_alphas_cumprod()
        self.first_stage_model = FakeVAE()
        self.is_sd1 = True

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest 8x upsample of the latent's first 3 channels, in [-1, 1]."""
        return torch.nn.functional.interpolate(z[:, :3].float() / self.scale_factor, scale_factor=8).tanh()

    def get_learned_conditioning(self, prompts: list[str]) -> torch.Tensor:
        """A deterministic context per prompt text ``[len, 77, 32]``."""
        out = []
        for text in prompts:
            g = torch.Generator().manual_seed(zlib.crc32(text.encode()))
            out.append(torch.randn(TOKENS, CONTEXT_DIM, generator=g))
        return torch.stack(out)


class Runner:
    """``ScriptRunner`` for one always-on script: exceptions in hooks are only reported."""

    def __init__(self, script, args):
        self.script = script
        self.args = list(args)
        self.alwayson_scripts = [script]  # its arguments are p.script_args[args_from:args_to]
        script.args_from, script.args_to = 0, len(self.args)
        self.errors: list[tuple[str, BaseException]] = []
        self.called: list[str] = []

    def _call(self, name, p, *extra, **kwargs):
        self.called.append(name)
        fn = getattr(self.script, name, None)
        if fn is None:
            return
        try:
            fn(p, *extra, *self.args, **kwargs)
        except Exception as e:  # errors.report(...)
            self.errors.append((name, e))

    def __getattr__(self, name):
        return lambda p, *extra, **kwargs: self._call(name, p, *extra, **kwargs)


class Processing:
    """Common part of ``StableDiffusionProcessingTxt2Img`` / ``Img2Img``."""

    def __init__(self, sd_model, outpath_samples, prompt="a cat", negative_prompt="", width=64, height=64,
                 batch_size=1, n_iter=1, seed=100, steps=2, cfg_scale=7.0, do_not_save_samples=False):  # fmt: skip
        self.sd_model = sd_model
        self.outpath_samples = outpath_samples
        self.prompt, self.negative_prompt = prompt, negative_prompt
        self.width, self.height = width, height
        self.batch_size, self.n_iter = batch_size, n_iter
        self.seed, self.steps, self.cfg_scale = seed, steps, cfg_scale
        self.subseed_strength = 0.0
        self.do_not_save_samples = do_not_save_samples
        self.extra_generation_params: dict = {}
        self.comments: dict = {}
        self.closed = 0
        self.unet_rows: list[tuple[int, float]] = []  # (rows, timestep) of each UNet call
        self.sampler_outputs: list[torch.Tensor] = []  # the latent each sampler run returned
        self.sampled: list[torch.Tensor] = []  # the final latent batch of each iteration
        self.iteration = 0
        self.batch_index = 0
        self.styles: list[str] = []
        self.outpath_grids = outpath_samples

    def save_samples(self):
        from modules import shared  # type: ignore

        return shared.opts.samples_save and not self.do_not_save_samples

    def comment(self, text):
        self.comments[text] = 1

    def close(self):
        self.closed += 1
        self.sampler = None
        self.c = None
        self.uc = None

    def setup_prompts(self):
        n = self.batch_size * self.n_iter
        self.all_prompts = self.prompt if isinstance(self.prompt, list) else [self.prompt] * n
        self.all_negative_prompts = [self.negative_prompt] * n
        self.all_seeds = [self.seed + i for i in range(n)]
        self.all_subseeds = [self.seed + i for i in range(n)]
        self.main_prompt = self.all_prompts[0]

    def noise(self, shape, seeds):
        rows = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
        return torch.stack(rows)

    def run_sampler(self, x, c, uc, t_start=999):
        """A few Euler-like steps; each UNet call has the cond rows, then the uncond rows."""
        unet = self.sd_model.model.diffusion_model
        for t in np.linspace(t_start, 0, self.steps):
            rows = torch.cat([x, x])
            ts = torch.full((rows.shape[0],), float(t))
            self.unet_rows.append((rows.shape[0], float(t)))
            eps = unet(rows, ts, context=torch.cat([c, uc]))
            e_c, e_u = eps.chunk(2)
            x = x - 0.1 * (e_u + self.cfg_scale * (e_c - e_u))
        self.sampler_outputs.append(x.clone())
        return x


class Sampler:
    """``sd_samplers.create_sampler(...)``: a new one per pass (A1111 sets ``p.sampler`` before the hook)."""

    def __init__(self, p):
        self.p = p

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        return p.run_sampler(x, conditioning, unconditional_conditioning)

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None,
                       image_conditioning=None):  # fmt: skip
        return p.run_sampler(x + 0.1 * noise, conditioning, unconditional_conditioning,
                             t_start=int(p.denoising_strength * 999))  # fmt: skip


class DecodedSamples(list):
    """What A1111 1.10's hires pass returns: images already decoded ([-1, 1], one tensor per image)."""

    already_decoded = True


def decode_latent_batch(model, batch, target_device=None, check_for_nans=False):
    """A1111 1.10's signature: the batch decoded image by image, as ``DecodedSamples``."""
    from modules import devices  # type: ignore

    samples = DecodedSamples()
    for i in range(batch.shape[0]):
        sample = model.decode_first_stage(batch[i : i + 1])[0]
        if check_for_nans:
            devices.test_for_nans(sample, "vae")
        samples.append(sample.to(target_device))
    return samples


class Txt2Img(Processing):
    def __init__(self, *args, enable_hr=False, hr_scale=2.0, denoising_strength=0.5, hr_prompt="", **kwargs):
        super().__init__(*args, **kwargs)
        self.enable_hr, self.hr_scale, self.denoising_strength = enable_hr, hr_scale, denoising_strength
        self.hr_prompt = hr_prompt  # "" = the main prompt, as A1111
        self.is_hr_pass = False

    def setup_prompts(self):
        super().setup_prompts()
        if self.enable_hr:
            n = len(self.all_prompts)
            self.all_hr_prompts = [self.hr_prompt] * n if self.hr_prompt else list(self.all_prompts)

    def init(self, all_prompts, all_seeds, all_subseeds):
        pass

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        self.sampler = Sampler(self)
        x = self.noise((4, self.height // 8, self.width // 8), seeds)
        self.scripts.process_before_every_sampling(self, x=x, noise=x, c=conditioning, uc=unconditional_conditioning)
        samples = self.sampler.sample(self, x, conditioning, unconditional_conditioning)
        if not self.enable_hr:
            return samples
        return self.sample_hr_pass(samples, conditioning, unconditional_conditioning, seeds)

    def sample_hr_pass(self, samples, c, uc, seeds):
        """Latent upscale, a new sampler, the hook again, img2img sampling, then decoded images (1.10)."""
        self.is_hr_pass = True
        samples = torch.nn.functional.interpolate(samples, scale_factor=self.hr_scale, mode="nearest")
        noise = self.noise(tuple(samples.shape[1:]), [s + 1000 for s in seeds])
        self.sampler = Sampler(self)
        self.scripts.before_hr(self)
        self.scripts.process_before_every_sampling(self, x=samples, noise=noise, c=c, uc=uc)
        samples = self.sampler.sample_img2img(self, samples, noise, c, uc)
        self.sampler = None
        decoded = DecodedSamples(self.sd_model.decode_first_stage(samples))
        self.is_hr_pass = False
        return decoded


class Img2Img(Processing):
    def __init__(self, *args, init_images=(), denoising_strength=0.75, resize_mode=0, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_images = list(init_images)
        self.denoising_strength = denoising_strength
        self.resize_mode = resize_mode
        self.mask = None
        self.paste_to = None
        self.init_latent = None

    def init(self, all_prompts, all_seeds, all_subseeds):
        """Flatten on ``img2img_background_color`` (white), resize, VAE-encode into ``init_latent``."""
        from modules import images, shared  # type: ignore

        self.sampler = Sampler(self)  # img2img creates its sampler in init()
        imgs = []
        for img in self.init_images:
            img = images.flatten(img, shared.opts.img2img_background_color)
            img = images.resize_image(self.resize_mode, img, self.width, self.height)
            imgs.append(np.asarray(img, dtype=np.float32) / 255.0)
        if len(imgs) == 1:
            batch = np.repeat(imgs[0][None], self.batch_size, axis=0)
        elif len(imgs) <= self.batch_size:
            self.batch_size = len(imgs)
            batch = np.stack(imgs)
        else:
            raise RuntimeError(f"bad number of images passed: {len(imgs)}; expecting {self.batch_size} or less")
        rgb = torch.from_numpy(batch).permute(0, 3, 1, 2)
        self.init_latent = self.sd_model.first_stage_model.encode_scaled(rgb, self.sd_model.scale_factor)
        self.plain_init_latent = self.init_latent.clone()

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        x = self.noise(tuple(self.init_latent.shape[1:]), seeds)
        self.scripts.process_before_every_sampling(
            self, x=self.init_latent, noise=x, c=conditioning, uc=unconditional_conditioning
        )
        self.sampled_init_latent = self.init_latent.clone()  # what the sampler starts from
        return self.sampler.sample_img2img(self, self.init_latent, x, conditioning, unconditional_conditioning)


def _quote(text):
    text = str(text)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def create_infotext(
    p,
    all_prompts,
    all_seeds,
    all_subseeds,
    comments=None,
    iteration=0,
    position_in_batch=0,
    use_main_prompt=False,
    index=None,
    all_negative_prompts=None,
) -> str:
    """A1111 1.10's signature and its handling of ``extra_generation_params`` values: a list is
    indexed by ``index``, a callable is called with the function's locals (``p``, ``index``, ...),
    None drops the key. The batch loop passes the batch's own lists with the index in the batch;
    ``Processed.infotext`` passes the whole job's lists with the global index."""
    if use_main_prompt:
        index = 0
    elif index is None:
        index = position_in_batch + iteration * p.batch_size
    if all_negative_prompts is None:
        all_negative_prompts = p.all_negative_prompts
    prompt_text = p.main_prompt if use_main_prompt else all_prompts[index]
    negative_prompt = all_negative_prompts[index]
    params = {"Steps": p.steps, "Seed": p.all_seeds[0] if use_main_prompt else all_seeds[index],
              "Size": f"{p.width}x{p.height}", **p.extra_generation_params}  # fmt: skip
    for key, value in params.items():
        try:
            if isinstance(value, list):
                params[key] = value[index]
            elif callable(value):
                params[key] = value(**locals())
        except Exception:  # errors.report(...)
            params[key] = None
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in params.items() if v is not None)
    return f"{prompt_text}\n" + (f"Negative prompt: {negative_prompt}\n" if negative_prompt else "") + line


class Processed:
    """``modules.processing.Processed`` (A1111 1.10's signature, the fields the X/Y/Z plot reads)."""

    def __init__(self, p, images_list, seed=-1, info="", subseed=None, all_prompts=None, all_negative_prompts=None,
                 all_seeds=None, all_subseeds=None, index_of_first_image=0, infotexts=None, comments=""):  # fmt: skip
        self.images = images_list
        self.prompt, self.seed, self.info = p.prompt, seed, info
        self.width, self.height = p.width, p.height
        self.all_prompts = all_prompts or getattr(p, "all_prompts", None) or [p.prompt]
        self.all_seeds = all_seeds or getattr(p, "all_seeds", None) or [seed]
        self.index_of_first_image = index_of_first_image
        self.infotexts = infotexts or [info] * len(images_list)
        self.comments = "".join(f"{comment}\n" for comment in p.comments)  # p.comment() texts, as A1111

    def infotext(self, p, index):
        return create_infotext(p, self.all_prompts, self.all_seeds, self.all_seeds, comments=[],
                               position_in_batch=index % p.batch_size, iteration=index // p.batch_size)  # fmt: skip

    def js(self):
        """The JSON the API returns as ``info`` (A1111's has more fields; ``default`` as A1111's)."""
        import json

        obj = {"seed": self.seed, "all_seeds": self.all_seeds, "infotexts": self.infotexts,
               "index_of_first_image": self.index_of_first_image}  # fmt: skip
        return json.dumps(obj, default=lambda o: None)


def process_images(p: Processing, script=None, args=None) -> Processed:
    """One generation in A1111 1.10's order; ``p.close()`` always runs (``with closing(p)``).
    Without ``script``: ``p`` already carries its scripts (an X/Y/Z cell, a copy of the plot's ``p``)."""
    if script is not None:
        p.scripts = Runner(script, args)
        p.script_args = list(args)
    try:
        with torch.no_grad():
            return _process_images_inner(p)
    finally:
        p.close()


def _process_images_inner(p: Processing) -> Processed:
    from modules import devices, images, shared  # type: ignore
    from modules.scripts import PostprocessImageArgs, PostSampleArgs  # type: ignore

    p.scripts.before_process(p)
    p.setup_prompts()
    if shared.opts.save_prompt_comments:  # Neo keeps the prompts with their comments beside all_prompts
        p._all_prompts_c = list(p.all_prompts)
    p.scripts.process(p)
    p.init(p.all_prompts, p.all_seeds, p.all_subseeds)
    output_images, infotexts = [], []
    for n in range(p.n_iter):
        p.iteration = n
        b = p.batch_size
        p.prompts = p.all_prompts[n * b : (n + 1) * b]
        p.negative_prompts = p.all_negative_prompts[n * b : (n + 1) * b]
        p.seeds = p.all_seeds[n * b : (n + 1) * b]
        p.subseeds = p.all_subseeds[n * b : (n + 1) * b]
        p.scripts.before_process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)
        p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)
        p.c = p.sd_model.get_learned_conditioning(p.prompts)
        p.uc = p.sd_model.get_learned_conditioning(p.negative_prompts)
        samples = p.sample(conditioning=p.c, unconditional_conditioning=p.uc, seeds=p.seeds, subseeds=p.subseeds,
                           subseed_strength=p.subseed_strength, prompts=p.prompts)  # fmt: skip
        p.sampled.append(p.sampler_outputs[-1])
        ps = PostSampleArgs(samples)
        p.scripts.post_sample(p, ps)
        samples = ps.samples
        if getattr(samples, "already_decoded", False):
            x = torch.stack(list(samples)).float()
        else:
            devices.test_for_nans(samples, "unet")
            x = torch.stack(decode_latent_batch(p.sd_model, samples, target_device=devices.cpu, check_for_nans=True))
        x = ((x + 1) / 2).clamp(0, 1)
        p.scripts.postprocess_batch(p, images=x, batch_number=n)
        for i, xi in enumerate(x):
            p.batch_index = i
            arr = (255.0 * xi.permute(1, 2, 0).numpy()).astype(np.uint8)  # truncated, as the hosts do
            pp = PostprocessImageArgs(Image.fromarray(arr))
            p.scripts.postprocess_image(p, pp)
            pp = PostprocessImageArgs(pp.image)
            p.scripts.postprocess_image_after_composite(p, pp)
            image = pp.image
            if shared.opts.save_prompt_comments and hasattr(p, "_all_prompts_c"):  # Neo: a new slice of the job's
                text = create_infotext(p, p._all_prompts_c[n * b : (n + 1) * b], p.seeds, p.subseeds, index=i,
                                       all_negative_prompts=p.negative_prompts)  # fmt: skip
            else:
                text = create_infotext(
                    p, p.prompts, p.seeds, p.subseeds, index=i, all_negative_prompts=p.negative_prompts
                )  # the batch's lists, as A1111
            if p.save_samples():
                images.save_image(image, p.outpath_samples, "", p.seeds[i], p.prompts[i], shared.opts.samples_format,
                                  info=text, p=p)  # fmt: skip
            image.info["parameters"] = text
            output_images.append(image)
            infotexts.append(text)
    res = Processed(p, output_images, p.all_seeds[0], infotexts=infotexts)
    p.scripts.postprocess(p, res)
    return res


# ---------------------------------------------------------------------------------------
# the API's handling of script arguments and options (modules/api/api.py, the same on A1111 1.10,
# Forge2 and Neo for what is used here)


class HTTPException(Exception):
    """``fastapi.HTTPException`` as ``modules.api.api`` imports it: the API answers ``status_code``."""

    def __init__(self, status_code, detail=None):
        super().__init__(f"{status_code}: {detail}")
        self.status_code, self.detail = status_code, detail


class Api:
    """``modules.api.api.Api``: how a request's ``alwayson_scripts`` become the script's positional
    arguments, and ``/sdapi/v1/options`` (POST)."""

    def __init__(self, shared):
        self.shared = shared

    def init_script_args(self, request, default_script_args, selectable_scripts, selectable_idx, script_runner, *,
                         input_script_args=None):  # fmt: skip
        """The hosts' loop: each of the request's args is copied over the UI defaults, up to the
        script's own count (``min``): more are dropped, and a string is taken character by character."""
        script_args = list(default_script_args)
        for index, value in (input_script_args or {}).items():
            script_args[index] = value
        for name, entry in (request.alwayson_scripts or {}).items():
            script = next((s for s in script_runner.scripts if s.title().lower() == name.lower()), None)
            if script is None:
                raise HTTPException(status_code=422, detail=f"always on script {name} not found")
            if "args" in entry:
                for idx in range(0, min(script.args_to - script.args_from, len(entry["args"]))):
                    script_args[script.args_from + idx] = entry["args"][idx]
        return script_args

    def set_config(self, req: dict):
        """A1111 1.10: ``shared.opts.set(k, v, is_api=True)`` for each key (Forge2/Neo: the same
        call through ``sysinfo.set_config``, with ``is_api=False``)."""
        for k, v in req.items():
            self.shared.opts.set(k, v, is_api=True)


def run_settings(opts, values: dict) -> list:
    """The settings page's "Apply settings" (A1111 1.10 ``ui_settings.run_settings``; Neo's is the
    same loop): ``opts.set(key, value)`` for every setting, then the options are saved; a setting
    whose ``opts.set`` returns False counts as unchanged. Returns the changed keys."""
    return [key for key, value in values.items() if opts.set(key, value)]


class Route:
    """A FastAPI ``APIRoute`` as far as used: the host's ``Api.__init__`` registers bound methods
    (``self.set_config``) before ``app_started``; a request calls ``dependant.call``."""

    def __init__(self, path, endpoint, methods):
        self.path, self.endpoint, self.methods = path, endpoint, set(methods)
        self.dependant = SimpleNamespace(call=endpoint)


_HOST_SET_CONFIG = Api.set_config  # the host's own, as the routes bind it at start-up


def app_with_api(shared):
    """The FastAPI app as ``app_started`` gets it: the API and its routes made before (``create_api``
    runs before ``app_started_callback``), bound to the host's own ``set_config``."""
    api = Api(shared)
    return SimpleNamespace(routes=[Route("/sdapi/v1/options", types.MethodType(_HOST_SET_CONFIG, api), ["POST"])])


def api_script_args(api, script, args_list_or_value, defaults):
    """What a txt2img request with ``alwayson_scripts: {script title: {"args": value}}`` hands the
    script: the API's ``init_script_args`` over the script's UI defaults (one script at positions 1..)."""
    script.args_from, script.args_to = 1, 1 + len(defaults)
    request = SimpleNamespace(alwayson_scripts={script.title(): {"args": args_list_or_value}})
    runner = SimpleNamespace(scripts=[script])
    return api.init_script_args(request, [0, *defaults], None, None, runner)[script.args_from : script.args_to]


class override_settings:
    """``process_images``' ``override_settings``: set with ``opts.set(..., is_api=True,
    run_callbacks=False)`` before the generation, put back after it."""

    def __init__(self, opts, values: dict):
        self.opts, self.values = opts, values

    def __enter__(self):
        self.stored = {k: getattr(self.opts, k) for k in self.values}
        try:
            for k, v in self.values.items():
                self.opts.set(k, v, is_api=True, run_callbacks=False)
        except BaseException:  # the host's finally puts them back
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for k, v in self.stored.items():
            setattr(self.opts, k, v)
        return False
