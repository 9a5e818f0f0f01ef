"""LayerDiffuse for the WebUI: an always-visible script (txt2img and img2img).

The logic lives in ``lib_layerdiffuse`` (host-independent) and its host adapter; this file
is the UI and the hook glue. API: ``alwayson_scripts: {"LayerDiffuse": {"args": [...]}}``
with the official positional order, or ``[{"enabled": true, "method": "...", ...}]``.
"""

from __future__ import annotations

import logging

import gradio as gr
import numpy as np
from modules import script_callbacks, scripts

from lib_layerdiffuse import hosts
from lib_layerdiffuse import modes as M
from lib_layerdiffuse.settings import ARG_ORDER, INFOTEXT_KEYS, Settings

log = logging.getLogger("layerdiffuse")
HOST = hosts.detect()
if HOST in hosts.SUPPORTED:
    if HOST == "a1111":
        from lib_layerdiffuse.hosts import a1111 as host
    else:  # forge2, neo: one adapter, per-host differences inside
        from lib_layerdiffuse.hosts import forge as host
    from lib_layerdiffuse.pipeline import Generation, LayerDiffuseError
    from lib_layerdiffuse.rgba import checkerboard_preview
else:
    host = None

try:
    from modules.ui_components import InputAccordion
except ImportError:  # A1111 < 1.6
    InputAccordion = None


def refuse(p, message: str):
    """Stop the generation with a visible error: A1111 only logs exceptions raised in hooks,
    so the error is raised from ``p.sample``, which the host calls directly."""
    print(f"LayerDiffuse: {message}")

    def sample(*args, **kwargs):
        raise RuntimeError(f"LayerDiffuse: {message}")

    p.sample = sample


def _visibility(label):
    mode = M.resolve(label)
    show = {k: k in mode.inputs for k in ("fg", "bg", "blend")}
    prompts = {k: k in mode.prompts for k in ("fg", "bg", "blend")}
    return (
        [gr.update(visible=show[k]) for k in ("fg", "bg", "blend")]
        + [gr.update(visible=mode.uses_resize), gr.update(visible=mode.uses_weight)]
        + [
            gr.update(visible=prompts[k]) if prompts[k] else gr.update(visible=False, value="")
            for k in ("fg", "bg", "blend")
        ]
    )


def _paste_method(params):
    value = params.get(INFOTEXT_KEYS["method"])
    if value is None:
        return gr.update()
    try:
        return M.resolve(value).label  # legacy labels without "(SDXL) " still paste
    except ValueError:
        return gr.update()


class LayerDiffuseScript(scripts.Script):
    sorting_priority = 15

    def title(self):
        return "LayerDiffuse"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        if InputAccordion is not None:
            accordion = InputAccordion(False, label="LayerDiffuse", elem_id=self.elem_id("enabled"))
            enabled = accordion
        else:
            accordion = gr.Accordion("LayerDiffuse", open=False)
        with accordion:
            if InputAccordion is None:
                enabled = gr.Checkbox(label="Enabled", value=False)
            if HOST not in hosts.SUPPORTED:
                gr.HTML(f"<p>{hosts.unsupported_message(HOST)}</p>")
            method = gr.Dropdown(
                label="Method", choices=M.LABELS, value=M.DEFAULT.label, elem_id=self.elem_id("method")
            )
            with gr.Row():
                columns, layer_images = [], []
                for which in ("fg", "bg", "blend"):
                    with gr.Column(visible=False) as col:
                        img = gr.Image(label=M.INPUT_NAMES[which], type="numpy", image_mode="RGBA", height=300,
                                       elem_id=self.elem_id(f"{which}_image"))  # fmt: skip
                    columns.append(col)
                    layer_images.append(img)
            with gr.Row():
                weight = gr.Slider(
                    label="Weight", minimum=0.0, maximum=2.0, step=0.001, value=1.0, elem_id=self.elem_id("weight")
                )
                stop_at = gr.Slider(
                    label="Stop At", minimum=0.0, maximum=1.0, step=0.01, value=1.0, elem_id=self.elem_id("stop_at")
                )
            resize_mode = gr.Radio(label="Resize Mode", choices=list(M.RESIZE_MODES), value=M.DEFAULT_RESIZE, visible=False,
                                   elem_id=self.elem_id("resize_mode"))  # fmt: skip
            output_origin = gr.Checkbox(value=False, visible=False)  # kept for the official positional API order
            prompts = [
                gr.Textbox(
                    label=f"{name} Additional Prompt",
                    placeholder=f"Additional prompt for {name.lower()}.",
                    visible=False,
                    lines=2,
                    elem_id=self.elem_id(f"{which}_prompt"),
                )  # fmt: skip
                for which, name in (("fg", "Foreground"), ("bg", "Background"), ("blend", "Blended"))
            ]
        method.change(
            _visibility, inputs=[method], outputs=columns + [resize_mode, weight] + prompts, show_progress=False
        )
        components = [enabled, method, weight, stop_at, *layer_images, resize_mode, output_origin, *prompts]
        assert len(components) == len(ARG_ORDER)
        self.infotext_fields = [
            (enabled, INFOTEXT_KEYS["enabled"]),
            (method, _paste_method),
            (weight, INFOTEXT_KEYS["weight"]),
            (stop_at, INFOTEXT_KEYS["stop_at"]),
            (resize_mode, INFOTEXT_KEYS["resize_mode"]),
            *[
                (box, INFOTEXT_KEYS[f"{w}_additional_prompt"])
                for box, w in zip(prompts, ("fg", "bg", "blend"), strict=True)
            ],
        ]
        self.paste_field_names = [k for _, k in self.infotext_fields if isinstance(k, str)]
        return components

    # -- hooks ------------------------------------------------------------------------

    def process(self, p, *args):
        try:
            settings = Settings.from_args(args)
        except ValueError as e:
            if args and (args[0] is True or (isinstance(args[0], dict) and args[0].get("enabled"))):
                refuse(p, str(e).removeprefix("LayerDiffuse: "))
            return
        if not settings.enabled:
            return
        if host is None:
            refuse(p, hosts.unsupported_message(HOST))
            return
        try:
            family = host.family(p)
            gen = Generation(host.ops(p), settings, p.batch_size, p.width, p.height, p.all_prompts, family=family)
        except (ValueError, RuntimeError) as e:
            refuse(p, str(e).removeprefix("LayerDiffuse: "))
            return
        p._layerdiffuse = gen
        p.extra_generation_params.update(settings.infotext())
        p.all_prompts = gen.layer_prompts(p.all_prompts)
        if getattr(p, "all_hr_prompts", None):
            p.all_hr_prompts = gen.layer_prompts(p.all_hr_prompts)
        self._wrap_close(p, gen)
        if hasattr(host, "prepare"):  # Forge: the never-silent check after sampling
            host.prepare(p, gen)
        if getattr(p, "init_images", None) and gen.mode.encoder_file is not None:
            self._prepare_init(p, gen)

    @staticmethod
    def _wrap_close(p, gen):
        """``p.close`` runs on every path (success, error, interrupt): the UNet is restored there."""
        original = p.close

        def close():
            try:
                gen.close()
            finally:
                original()

        p.close = close

    @staticmethod
    def _prepare_init(p, gen):
        """img2img: keep each RGBA init image, give A1111 grey-flattened copies (its flatten is white)."""
        from PIL import Image

        from lib_layerdiffuse.rgba import flatten_on_grey, to_uint8

        gen.init_rgba = []
        flat = []
        for im in p.init_images:
            rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
            gen.init_rgba.append(im.convert("RGBA"))
            flat.append(Image.fromarray(to_uint8(flatten_on_grey(rgba))))
        p.init_images = flat

    def process_before_every_sampling(self, p, *args, **kwargs):
        gen = getattr(p, "_layerdiffuse", None)
        if gen is not None:
            host.begin_sampling(p, gen, kwargs["x"])

    def post_sample(self, p, ps, *args):
        gen = getattr(p, "_layerdiffuse", None)
        if gen is None:
            return
        latents = host.final_latents(p, gen, ps.samples)
        if latents is not None:
            gen.keep_latents(p.iteration, latents)

    def postprocess_image_after_composite(self, p, pp, *args):
        gen = getattr(p, "_layerdiffuse", None)
        if gen is None:
            return
        index = p.iteration * p.batch_size + p.batch_index
        try:
            ran = host.patches_ran(gen) if hasattr(host, "patches_ran") else gen.mode.apply == "diff" or gen.calls > 0
            if gen.mode.is_decoded(index) and not ran:
                raise LayerDiffuseError("the LayerDiffuse patches did not run during sampling; no transparent decode")
            rgba = gen.decode(index, np.asarray(pp.image.convert("RGB")), host.latent_scale(p))
        except Exception as e:
            log.exception("LayerDiffuse: transparent decode failed")
            _comment(p, f"LayerDiffuse: transparent decode failed: {e}")
            return
        if rgba is None:
            return
        image = host.to_pil_rgba(rgba)
        image.info.update(pp.image.info)
        pp.image = image
        gen.previews = getattr(gen, "previews", {})
        gen.previews[index] = checkerboard_preview(rgba)
        if hasattr(host, "add_preview"):  # Forge shows and returns p.extra_result_images
            host.add_preview(p, index, gen.previews[index])

    def postprocess(self, p, processed, *args):
        gen = getattr(p, "_layerdiffuse", None)
        if gen is None:
            return
        gen.close()
        from PIL import Image

        from lib_layerdiffuse.rgba import to_uint8

        for index, prev in sorted(getattr(gen, "previews", {}).items()):
            image = Image.fromarray(to_uint8(prev))
            info = processed.infotext(p, index) if hasattr(processed, "infotext") else ""
            if not hasattr(host, "add_preview"):  # A1111: the gallery and API show processed.images
                processed.images.append(image)
                processed.infotexts.append(info)
            try:
                host.save_extra(p, image, index, "-checkerboard", info)
            except Exception as e:
                log.warning("LayerDiffuse: could not save the preview: %s", e)


def _comment(p, text):
    try:
        p.comment(text)
    except Exception:
        print(text)


if host is not None:
    script_callbacks.on_image_saved(host.check_saved)
    if hasattr(host, "before_image_saved"):  # Forge2's stealth infotext overwrites alpha before saving
        script_callbacks.on_before_image_saved(host.before_image_saved)
    script_callbacks.on_app_started(lambda *a, **k: host.install_api_png())
