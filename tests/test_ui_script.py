"""The script's UI side on the A1111 stand-ins (tests/fake_a1111.py): how a refusal reads in the UI
and the API, the Method default per model family (UI, checkpoint change, API), the batch size a
pasted infotext needs, the progress text after a decode, the previews' infotexts, help texts.

The host functions mirrored here (the UI's error text, the API's error body) are read from
A1111 1.10, Forge2 and Neo: all three build them the same way (docs in each test).
"""

from __future__ import annotations

import html
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import fake_a1111 as fa
import pytest
import test_extension_a1111 as base
import torch
from PIL import Image
from safetensors.torch import save_file

from lib_layerdiffuse import hosts, pipeline
from lib_layerdiffuse import modes as M
from lib_layerdiffuse.hosts import forge

env, ctx = base.env, base.ctx  # the fixtures of the A1111 stand-ins (a WebUI with weight files; per test)
generate, named, positional = base.generate, base.named, base.positional
ROOT = Path(__file__).resolve().parent.parent
SD15 = "(SD1.5) Only Generate Transparent Image (Attention Injection)"
FG2BG = "(SD1.5) From Foreground to Background (need batch size 2)"
JOINT = "(SD1.5) Generate Everything Together (need batch size 3)"
SDXL_ATTN = "(SDXL) Only Generate Transparent Image (Attention Injection)"
FLUX = "(FLUX) Only Generate Transparent Image"


def ui_error_text(e: BaseException) -> str:
    """What the WebUI shows under the gallery when a generation raises: every host's
    ``call_queue.wrap_gradio_call_no_job`` puts ``f"{type(e).__name__}: {e}"`` html-escaped into
    ``<div class='error'>`` of the tab's ``html-log`` (Forge2 and Neo first take the exception from
    ``main_thread.last_exception``)."""
    return f"<div class='error'>{html.escape(f'{type(e).__name__}: {e}')}</div>"


def api_error_body(e: BaseException) -> dict:
    """The JSON body of the API's HTTP 500 (``api.api_middleware.handle_exception``, all hosts)."""
    return {"error": type(e).__name__, "detail": vars(e).get("detail", ""), "body": vars(e).get("body", ""),
            "errors": str(e)}  # fmt: skip


# ---------------------------------------------------------------------------------------
# item 10: a refusal reads as an error message


def test_refusal_reads_as_an_error_in_the_ui_and_the_api(ctx):
    p = fa.Txt2Img(ctx.model, ctx.outpath, batch_size=1)
    with pytest.raises(RuntimeError) as info:
        fa.process_images(p, ctx.env.mod.LayerDiffuseScript(), positional(JOINT))  # batch 1
    e = info.value
    shown = ui_error_text(e)
    assert shown.startswith("<div class='error'>Error: LayerDiffuse: "), shown  # no class name of ours
    assert "Refusal" not in shown and "LayerDiffuseError" not in shown
    body = api_error_body(e)
    assert body["errors"].startswith("LayerDiffuse: ") and "batch size" in body["errors"]
    # the hosts have no style for div.error (grey text): the extension's style.css, which every host
    # loads from an extension's root, makes it look like an error in the tabs' html logs
    css = (ROOT / "style.css").read_text()
    assert ".html-log div.error" in css and "--error-" in css


# ---------------------------------------------------------------------------------------
# item 12: the default Method follows the model family


def test_default_method_per_family():
    assert M.default_for("sd15").label == SD15
    assert M.default_for("sdxl").label == SDXL_ATTN == M.DEFAULT.label  # the official default
    assert M.default_for("flux").label == FLUX
    for other in (None, "sd2", "FLUX.1-schnell", "Chroma"):
        assert M.default_for(other) is M.DEFAULT
    assert all(M.default_for(m.family).family == m.family for m in M.MODES)


def write_checkpoint(path: Path, shapes: dict) -> Path:
    save_file({k: torch.zeros(v, dtype=torch.float16) for k, v in shapes.items()}, str(path))
    return path


CHECKPOINTS = {
    "sd15": {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, 768],
             "cond_stage_model.transformer.text_model.final_layer_norm.weight": [768]},
    "sdxl": {"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": [640, 2048],
             "model.diffusion_model.label_emb.0.0.weight": [1280, 2816]},
    "sd2": {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, 1024]},
    "flux": {"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": [128],
             "model.diffusion_model.guidance_in.in_layer.weight": [8, 4]},
    "FLUX.1-schnell": {"double_blocks.0.img_attn.norm.key_norm.scale": [128]},
    None: {"first_stage_model.decoder.conv_in.weight": [4, 4, 3, 3]},
}  # fmt: skip


@pytest.fixture
def checkpoints(env, tmp_path, monkeypatch):
    """``modules.sd_models`` with one checkpoint file per family; ``opts.sd_model_checkpoint`` selects one."""
    files = {f"{family}.safetensors": write_checkpoint(tmp_path / f"{family}.safetensors", shapes)
             for family, shapes in CHECKPOINTS.items()}  # fmt: skip
    sd_models = types.ModuleType("modules.sd_models")

    def get_closet_checkpoint_match(title):
        name = str(title).split(" [")[0]  # titles carry a short hash: "name.safetensors [abcdef1234]"
        return SimpleNamespace(filename=str(files[name]), title=title) if name in files else None

    sd_models.get_closet_checkpoint_match = get_closet_checkpoint_match
    monkeypatch.setitem(sys.modules, "modules.sd_models", sd_models)
    monkeypatch.setattr(sys.modules["modules"], "sd_models", sd_models, raising=False)
    monkeypatch.setattr(env.fake.shared.opts, "sd_model_checkpoint", "sdxl.safetensors [0123456789]", raising=False)
    return env.fake.shared.opts


def test_checkpoint_family_from_its_header(checkpoints):
    for family in CHECKPOINTS:
        assert hosts.checkpoint_family(f"{family}.safetensors [abc]") == family
    assert hosts.checkpoint_family("missing.safetensors") is None
    checkpoints.sd_model_checkpoint = "sd15.safetensors"
    assert hosts.checkpoint_family() == "sd15"  # the selected checkpoint


def test_ui_method_default_follows_the_selected_checkpoint(env, checkpoints):
    checkpoints.sd_model_checkpoint = "sd15.safetensors [0123456789]"
    method = env.mod.LayerDiffuseScript().ui(False)[1]
    assert method.value == SD15
    checkpoints.sd_model_checkpoint = "flux.safetensors"
    assert method.kwargs["value"]() == FLUX  # evaluated again on every page load
    checkpoints.sd_model_checkpoint = "sd2.safetensors"
    assert method.kwargs["value"]() == M.DEFAULT.label  # no LayerDiffuse method: the official default


def follow_event(component, method):
    found = [(fn, inputs, outputs) for kind, fn, inputs, outputs in component.events if method in outputs]
    assert len(found) == 1, component.events
    fn, inputs, outputs = found[0]
    assert inputs == [component, method] and outputs == [method]
    return fn


@pytest.mark.parametrize("selector", [
    {"elem_id": "setting_sd_model_checkpoint", "label": "Stable Diffusion checkpoint"},  # A1111 quicksettings, Neo
    {"label": "Checkpoint", "elem_classes": ["model_selection"]},  # Forge2's own selector (no elem_id)
])  # fmt: skip
@pytest.mark.parametrize("ui_first", [True, False])
def test_checkpoint_change_moves_an_untouched_method(env, checkpoints, selector, ui_first):
    gr = sys.modules["gradio"]
    script = env.mod.LayerDiffuseScript()
    selector_component = None
    if not ui_first:
        selector_component = gr.Dropdown(**selector)
        env.fake.script_callbacks.after_component_callback(selector_component, **selector)
    method = script.ui(False)[1]
    if ui_first:
        selector_component = gr.Dropdown(**selector)
        env.fake.script_callbacks.after_component_callback(selector_component, **selector)
    follow = follow_event(selector_component, method)
    assert follow("sd15.safetensors [0123456789]", SDXL_ATTN)["value"] == SD15
    assert follow("sdxl.safetensors", SD15)["value"] == SDXL_ATTN
    assert follow("flux.safetensors", SDXL_ATTN)["value"] == FLUX
    assert "value" not in follow("sdxl.safetensors", FG2BG)  # a method the user picked stays
    assert "value" not in follow("sd2.safetensors", SD15)  # nothing to follow: no change
    assert "value" not in follow("missing.safetensors", SD15)
    # another dropdown is left alone
    other = gr.Dropdown(elem_id="txt2img_sampling", label="Sampling method")
    env.fake.script_callbacks.after_component_callback(other, elem_id="txt2img_sampling", label="Sampling method")
    assert other.events == []


def test_api_without_method_follows_the_loaded_family(ctx):
    p, processed = generate(ctx, [{"enabled": True}])  # the named form without "method"
    assert p.scripts.errors == [] and ctx.gens[-1].mode.label == SD15
    assert "layerdiffusion_method: (SD1.5) Only Generate Transparent Image" in processed.infotexts[0]
    p, processed = generate(ctx, [{"enabled": True, "method": None}])  # null = missing
    assert ctx.gens[-1].mode.label == SD15
    with pytest.raises(RuntimeError, match=r"^LayerDiffuse: .*needs an SDXL checkpoint"):
        generate(ctx, named(method=SDXL_ATTN))  # a method the request names is never changed


# ---------------------------------------------------------------------------------------
# item 13: a pasted infotext brings the batch size its method needs


@pytest.mark.parametrize("method, batch, want", [
    (JOINT, None, "3"), (JOINT, "6", "6"), (JOINT, "4", "6"), (FG2BG, None, "2"), (FG2BG, "2", "2"),
    (FG2BG, "3", "4"), (SD15, None, None), (SD15, "3", "3"), ("not a method", None, None),
])  # fmt: skip
def test_pasted_infotext_sets_the_batch_size_of_its_method(env, method, batch, want):
    params = {"Prompt": "a cat", "layerdiffusion_enabled": "True", "layerdiffusion_method": method}
    if batch is not None:
        params["Batch size"] = batch
    env.fake.script_callbacks.infotext_pasted_callback("a cat\nSteps: 20", params)
    assert params.get("Batch size") == want


def test_pasted_infotext_without_layerdiffuse_keeps_the_batch_size(env):
    for params in ({"Prompt": "a"}, {"layerdiffusion_enabled": "False", "layerdiffusion_method": JOINT}):
        before = dict(params)
        env.fake.script_callbacks.infotext_pasted_callback("a", params)
        assert params == before


# ---------------------------------------------------------------------------------------
# item 14: progress text, previews' infotexts, help texts


@pytest.mark.parametrize("fails", [False, True])
def test_decode_progress_text_ends_with_the_decode(ctx, monkeypatch, fails):
    state = ctx.env.fake.shared.state
    monkeypatch.setattr(state, "textinfo", "Batch 1 out of 1")  # what the host showed before the decode
    shown = []

    class Recording(SimpleNamespace):
        def __setattr__(self, name, value):
            if name == "textinfo":
                shown.append(value)
            super().__setattr__(name, value)

    recording = Recording(**vars(state))
    monkeypatch.setattr(ctx.env.fake.shared, "state", recording)
    spy = ctx.spy

    def decode(decoder, pixel, latent, *args, callback=None, **kwargs):
        for done in (1, 2):
            callback(done, 2)
        if fails:
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        return spy(decoder, pixel, latent)

    monkeypatch.setattr(pipeline, "decode_rgba", decode)
    if fails:
        with pytest.raises(RuntimeError, match="transparent decode failed"):
            generate(ctx, positional(SD15), batch_size=2)
    else:
        generate(ctx, positional(SD15), batch_size=2)
    assert any("transparent decode, image 2 of 2, pass 2 of 2" in str(t) for t in shown) or fails
    assert recording.textinfo == "Batch 1 out of 1"  # ours is gone, the host's text is back


def test_preview_infotexts_match_their_images_a1111(ctx):
    p, processed = generate(ctx, positional(SD15), batch_size=2, n_iter=2)
    assert len(processed.images) == len(processed.infotexts) == 8
    for k in range(4):  # the previews follow the 4 images, each with the infotext of its image
        assert processed.infotexts[4 + k] == processed.infotexts[k]
        assert processed.images[4 + k].info["parameters"] == processed.infotexts[k]
    assert len({processed.infotexts[k] for k in range(4)}) == 4  # seeds differ: a wrong index shows


def test_preview_infotext_lands_at_its_gallery_index_a1111(env):
    # another extension added an image without an infotext: ours still lines up with its image
    processed = SimpleNamespace(images=["grid", "a", "b", "other"], infotexts=["g", "ia", "ib"], info="ia")
    env.host.show_preview(processed, "preview", "ipa")
    assert processed.images.index("preview") == 4 and processed.infotexts[4] == "ipa"


def test_preview_infotext_lands_at_its_gallery_index_forge():
    """Forge2 and Neo show ``processed.images + processed.extra_images`` and look a gallery index
    up in ``processed.infotexts`` (an index past its end keeps the infotext shown before)."""
    image = Image.new("RGB", (8, 8))
    processed = SimpleNamespace(images=["grid", "a", "b"], infotexts=["g", "ia", "ib"], extra_images=[], info="ia")
    forge.HOST.show_preview(processed, image, "ipa")
    forge.HOST.show_preview(processed, image, "ipb")
    gallery = processed.images + processed.extra_images
    assert len(gallery) == 5 and processed.infotexts[3:] == ["ipa", "ipb"]
    # another extension's extra image before ours (e.g. a control map): ours still lines up
    processed = SimpleNamespace(images=["a"], infotexts=["ia"], extra_images=["map"], info="ia")
    forge.HOST.show_preview(processed, image, "ipa")
    assert processed.infotexts[2] == "ipa" and len(processed.infotexts) == 3


def test_method_weight_stop_at_have_help_text(env):
    components = env.mod.LayerDiffuseScript().ui(False)
    for component in (components[1], components[2], components[3]):  # Method, Weight, Stop At
        info = component.kwargs.get("info")
        assert isinstance(info, str) and len(info) > 20, component.kwargs.get("label")
