"""LayerDiffuse for the WebUI: an always-visible script (txt2img and img2img).

The logic lives in ``lib_layerdiffuse`` (host-independent) and its host adapter; this file
is the UI and the hook glue. API: ``alwayson_scripts: {"LayerDiffuse": {"args": [...]}}``
with the official positional order, or ``[{"enabled": true, "method": "...", ...}]``.
"""

from __future__ import annotations

import dataclasses
import logging

import gradio as gr
import numpy as np
from modules import script_callbacks, scripts

from lib_layerdiffuse import hosts
from lib_layerdiffuse import modes as M
from lib_layerdiffuse.decompose import Decomposition
from lib_layerdiffuse.errors import LayerDiffuseError
from lib_layerdiffuse.hosts import layered
from lib_layerdiffuse.hosts.extras import LayerDiffuseExtrasAlpha  # noqa: F401 - the Extras step the WebUI registers
from lib_layerdiffuse.pipeline import Generation
from lib_layerdiffuse.rgba import checkerboard_preview
from lib_layerdiffuse.settings import (
    ARG_ORDER,
    DECOMPOSE_FIELDS,
    INFOTEXT_KEYS,
    LAYERS_RANGE,
    TRUE_CFG_RANGE,
    Settings,
)

log = logging.getLogger("layerdiffuse")
HOST_ID = hosts.detect()
host = hosts.adapter(HOST_ID)  # the one host contract (lib_layerdiffuse.pipeline.Host), or None

try:
    from modules.ui_components import InputAccordion
except ImportError:  # WebUIs older than 1.6 have no InputAccordion
    InputAccordion = None


def _visibility(label):
    mode = M.resolve(label)
    show = {k: k in mode.inputs for k in ("fg", "bg", "blend")}
    prompts = {k: k in mode.prompts for k in ("fg", "bg", "blend")}
    decompose = mode.apply == "decompose"
    return (
        [gr.update(visible=show[k]) for k in ("fg", "bg", "blend")]
        + [gr.update(visible=mode.uses_resize), gr.update(visible=mode.uses_weight), gr.update(visible=not decompose)]
        + [
            gr.update(visible=prompts[k]) if prompts[k] else gr.update(visible=False, value="")
            for k in ("fg", "bg", "blend")
        ]
        + [gr.update(visible=decompose)]
    )


HELP = {  # shown under each control's label (gradio's info=, in gradio 3.41 and 4)
    "method": "What to generate, for the loaded model's family (SD1.5, SDXL or FLUX; it starts at the family's "
    "'Only Generate Transparent Image'; Qwen-Image-Layered splits the img2img image into layers). 'need batch size "
    "N': the batch size must be a multiple of N.",
    "weight": "How strongly the SDXL / FLUX patches apply: 1 as trained, 0 off.",
    "stop_at": "LayerDiffuse turns off for the rest of sampling at this fraction of the schedule (1 = on to the end).",
    "layers": "How many RGBA layers to split the img2img image into (layer 1 is the back).",
    "resolution": "The model's working size: about 640x640 or 1024x1024 pixels at the image's aspect ratio.",
    "true_cfg": "Guidance by the negative prompt (true CFG); 1 = off, one model pass per step instead of two.",
    "normalize": "Rescale the guided prediction to the prompt's own strength (the reference example's setting).",
}


def _default_method() -> str:
    """The Method a new accordion shows: the default of the selected checkpoint's family (gradio
    calls this when the UI is built and again on every page load)."""
    return M.default_for(hosts.checkpoint_family()).label


def _follow_checkpoint(title, current):
    """The checkpoint selector changed: a family's default Method follows the new model's family;
    a method the user picked stays (modes.follow_family)."""
    label = M.follow_family(current, hosts.checkpoint_family(title) if title else None)
    return gr.update(value=label) if label is not None else gr.update()


# the host's checkpoint selector and our Method dropdowns, in whichever order the host builds them
# (A1111 and Forge build the tabs' scripts before the selector): each pair is wired once
_selectors: list = []
_methods: list = []


def _wire(selector, method) -> None:
    try:
        selector.change(_follow_checkpoint, inputs=[selector, method], outputs=[method], show_progress=False)
    except Exception as e:  # the Method then keeps its page-load default; generation is unaffected
        log.warning("LayerDiffuse: cannot follow the checkpoint selector: %s", e)


def _is_checkpoint_selector(kwargs) -> bool:
    """A1111's quicksettings and Neo's selector have this elem_id; Forge2's own has none, only its
    label and class (modules_forge/main_entry.py)."""
    if kwargs.get("elem_id") == "setting_sd_model_checkpoint":
        return True
    classes = kwargs.get("elem_classes") or []
    return kwargs.get("label") == "Checkpoint" and "model_selection" in classes


def _after_component(component, **kwargs) -> None:
    layered.after_component(component, kwargs.get("elem_id"))
    if not _is_checkpoint_selector(kwargs):
        return
    _selectors.append(component)
    for method in _methods:
        _wire(component, method)


def _infotext_pasted(infotext, params) -> None:
    """PNG Info -> Send to, and the infotext paste box: the infotext says the method, and the host's
    infotexts do not always carry the batch size (Neo's never do; A1111's only above 1), so the
    batch size becomes a multiple of the method's group (kept where it already is one). Runs
    before the host applies the pasted fields."""
    if str(params.get(INFOTEXT_KEYS["enabled"], "")).strip().lower() != "true":
        return
    try:
        group = M.resolve(params.get(INFOTEXT_KEYS["method"])).group
        batch = int(float(params.get("Batch size", 1)))
    except (TypeError, ValueError):
        return
    if group > 1 and (batch < 1 or batch % group):
        params["Batch size"] = str(max(1, -(-batch // group)) * group)


def _names_method(args, overrides) -> bool:
    """Whether the request chose a Method: the UI always sends one; an API request may leave it
    out (the named form without "method", or null in either form) and then gets the loaded
    model's family default."""
    if overrides and overrides.get("method") is not None:
        return True
    if args and isinstance(args[0], dict):
        return any(args[0].get(key) is not None for key in ("method", "method_label"))
    return len(args) > 1 and args[1] is not None


def _tab(is_img2img) -> str:
    return "img2img" if is_img2img else "txt2img"


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
            if host is None:
                gr.HTML(f"<p>{hosts.unsupported_message(HOST_ID)}</p>")
            method = gr.Dropdown(label="Method", choices=M.LABELS, value=_default_method, info=HELP["method"],
                                 elem_id=self.elem_id("method"))  # fmt: skip
            _methods.append(method)
            for selector in _selectors:
                _wire(selector, method)
            with gr.Row():
                columns, layer_images = [], []
                for which in ("fg", "bg", "blend"):
                    with gr.Column(visible=False) as col:
                        img = gr.Image(label=M.INPUT_NAMES[which], type="numpy", image_mode="RGBA", height=300,
                                       elem_id=self.elem_id(f"{which}_image"))  # fmt: skip
                    columns.append(col)
                    layer_images.append(img)
            with gr.Row():
                weight = gr.Slider(label="Weight", minimum=0.0, maximum=2.0, step=0.001, value=1.0,
                                   info=HELP["weight"], elem_id=self.elem_id("weight"))  # fmt: skip
                stop_at = gr.Slider(label="Stop At", minimum=0.0, maximum=1.0, step=0.01, value=1.0,
                                    info=HELP["stop_at"], elem_id=self.elem_id("stop_at"))  # fmt: skip
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
            with gr.Row(visible=False) as decompose_row:  # '(Qwen-Image-Layered) Decompose Into Layers' only
                layers = gr.Slider(label="Layers", minimum=LAYERS_RANGE[0], maximum=LAYERS_RANGE[1], step=1, value=4,
                                   info=HELP["layers"], elem_id=self.elem_id("layers"))  # fmt: skip
                resolution = gr.Radio(label="Resolution", choices=[640, 1024], value=640, info=HELP["resolution"],
                                      elem_id=self.elem_id("resolution"))  # fmt: skip
                true_cfg = gr.Slider(label="True CFG scale", minimum=TRUE_CFG_RANGE[0], maximum=TRUE_CFG_RANGE[1],
                                     step=0.5, value=4.0, info=HELP["true_cfg"], elem_id=self.elem_id("true_cfg"))  # fmt: skip
                normalize = gr.Checkbox(label="Normalise CFG", value=True, info=HELP["normalize"],
                                        elem_id=self.elem_id("normalize"))  # fmt: skip
            layered.add_box(_tab(is_img2img))  # not an argument: filled when the tab's gallery changes
        method.change(
            _visibility,
            inputs=[method],
            outputs=columns + [resize_mode, weight, stop_at] + prompts + [decompose_row],
            show_progress=False,
        )
        components = [enabled, method, weight, stop_at, *layer_images, resize_mode, output_origin, *prompts,
                      layers, resolution, true_cfg, normalize]  # fmt: skip
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
            *[
                (box, INFOTEXT_KEYS[name])
                for box, name in zip((layers, resolution, true_cfg, normalize), DECOMPOSE_FIELDS, strict=True)
            ],  # fmt: skip
        ]
        self.paste_field_names = [k for _, k in self.infotext_fields if isinstance(k, str)]
        return components

    # -- hooks ------------------------------------------------------------------------

    def process(self, p, *args):
        # an X/Y/Z cell is a shallow copy of the plot's p: its infotext dict is the previous cell's
        p.extra_generation_params = {
            k: v for k, v in p.extra_generation_params.items() if not str(k).startswith("layerdiffusion_")
        }
        layered.new_generation(p, _tab(self.is_img2img))
        try:
            settings = Settings.from_args(args, host.xyz_overrides(p) if host is not None else None)
        except LayerDiffuseError as e:  # a bad key or enabled, or a bad value while enabled
            hosts.refuse(p, str(e))
            return
        if not settings.enabled:
            return
        if host is None:
            hosts.refuse(p, hosts.unsupported_message(HOST_ID))
            return
        overrides = host.xyz_overrides(p)
        try:
            if not _names_method(args, overrides):
                settings = dataclasses.replace(settings, method=M.default_for(host.family(p)).label)
            if settings.mode.apply == "decompose":
                gen = Decomposition(host, settings, host.family(p), p.batch_size, p.width, p.height, p.all_prompts,
                                    img2img=self.is_img2img, masked=getattr(p, "image_mask", None) is not None)  # fmt: skip
                init_images = gen.prepare_init(getattr(p, "init_images", None) or [])
                p.width, p.height = gen.size  # the bucket: the host's infotext and saved size say it
            else:
                gen = Generation(host, settings, host.family(p), p.batch_size, p.width, p.height, p.all_prompts)
                init_images = gen.prepare_init(p.init_images) if getattr(p, "init_images", None) else None
            prompts = gen.layer_prompts(p.all_prompts)
            hr_prompts = gen.layer_prompts(p.all_hr_prompts) if getattr(p, "all_hr_prompts", None) else None
        except LayerDiffuseError as e:
            hosts.refuse(p, str(e))
            return
        p.extra_generation_params.update(gen.infotext())
        p.all_prompts = prompts
        if hr_prompts is not None:
            p.all_hr_prompts = hr_prompts
        if init_images is not None:
            p.init_images = init_images
        host.attach(p, gen)
        layered.start(p, gen, settings)

    def process_before_every_sampling(self, p, *args, **kwargs):
        gen = host.generation(p) if host is not None else None
        if gen is not None:
            gen.begin_sampling(p, kwargs["x"])

    def postprocess_image_after_composite(self, p, pp, *args):
        gen = host.generation(p) if host is not None else None
        if gen is None:
            return
        # decoded right after sampling (hosts/common.py: attach), where a failure fails the request
        rgba = gen.take(p.iteration * p.batch_size + p.batch_index)
        if rgba is not None:
            pp.image = host.rgba_image(p, rgba, pp.image)
        layered.frame(gen, p.iteration * p.batch_size + p.batch_index, pp.image)

    def postprocess(self, p, processed, *args):
        gen = host.generation(p) if host is not None else None
        if gen is None:
            return
        warning = gen.alpha_warning()  # once per generation, naming the images
        if warning:
            host.warn(processed, warning)
        previews = [(i, checkerboard_preview(rgba)) for i, rgba in sorted(gen.previews.items())]
        gen.previews.clear()
        for index in sorted(getattr(gen, "outputs", {})):  # the decompose method's layers
            layers = gen.take_layers(index)
            host.publish_layers(p, processed, index, layers)
            if gen.options.previews:
                previews += [(index, checkerboard_preview(x / np.float32(255)), f"-layer-{k}-checkerboard")
                             for k, x in enumerate(layers, start=1)]  # fmt: skip
        host.publish_previews(p, processed, previews)
        layered.finish(p, gen, processed, _tab(self.is_img2img))


if host is not None:
    host.register_callbacks()
    script_callbacks.on_after_component(_after_component)
    script_callbacks.on_before_ui(layered.reset_ui)
    script_callbacks.on_image_saved(lambda params: layered.image_saved(host, params))
    script_callbacks.on_infotext_pasted(_infotext_pasted)
