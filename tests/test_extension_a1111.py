"""The A1111 script and adapter end to end, on stand-ins of the WebUI (tests/fake_a1111.py).

Generations run the script's hooks in A1111 1.10's order on a tiny runnable ldm UNet with
SD1.5's block layout; weight files are generated (full SD1.5 decoder/encoder layout, fp16;
attention-sharing files shaped for the tiny UNet). The tiny UNet's context width is not
768, so the model family is injected ("sd15"). Except in ``test_real_decoder_end_to_end``
the transparent decode itself is a fast stand-in (the real decoder is still loaded and
checked from its file); what is checked here is the host glue: which latent, which image,
what reaches disk.
"""

import base64
import copy
import gc
import io
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import fake_a1111 as fa
import numpy as np
import psd_tools
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from unet_tree import same_bits, snapshot
from weightgen import make_state_dict, manifest_shapes

from lib_layerdiffuse import conditioning as C
from lib_layerdiffuse import modes as M
from lib_layerdiffuse import pipeline, psd
from lib_layerdiffuse.attention_sharing import AttentionSharing
from lib_layerdiffuse.hosts.common import TAG
from lib_layerdiffuse.rgba import to_uint8
from lib_layerdiffuse.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "layerdiffuse_script_under_test"
TRANSPARENT = "(SD1.5) Only Generate Transparent Image (Attention Injection)"
FG2BG = "(SD1.5) From Foreground to Background (need batch size 2)"
BG2FG = "(SD1.5) From Background to Foreground (need batch size 2)"
JOINT = "(SD1.5) Generate Everything Together (need batch size 3)"
SDXL_ATTN = "(SDXL) Only Generate Transparent Image (Attention Injection)"
SHARING = {"layer_sd15_transparent_attn": (1, False), "layer_sd15_joint": (3, False),
           "layer_sd15_fg2bg": (2, True), "layer_sd15_bg2fg": (2, True)}  # fmt: skip


def write_weights(folder: Path):
    with torch.device("meta"):
        unet = fa.tiny_unet()
    for i, (name, (frames, control)) in enumerate(SHARING.items()):
        with torch.device("meta"):
            probe = AttentionSharing(unet, frames, control)
        shapes = {k: list(v.shape) for k, v in probe.state_dict().items()}
        save_file(make_state_dict(shapes, seed=20 + i, dtype=torch.float16), str(folder / f"{name}.safetensors"))
    for seed, name in ((30, "layer_sd15_vae_transparent_decoder"), (31, "layer_sd15_vae_transparent_encoder")):
        state = make_state_dict(manifest_shapes(name), seed=seed, dtype=torch.float16)
        save_file(state, str(folder / f"{name}.safetensors"))
        del state


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is much faster on a shared 2-core machine
    root = tmp_path_factory.mktemp("webui")
    models = root / "layer_model"
    models.mkdir()
    write_weights(models)
    try:
        with fa.script_under(models, root, SCRIPT) as (fake, mod):
            assert "layerdiffuse_decode_passes" in fake.shared.opts.data_labels  # at import: API-only servers
            fake.script_callbacks.ui_settings_callback()  # the host builds its settings page at start-up
            yield SimpleNamespace(fake=fake, mod=mod, host=mod.host, root=root, models=models)
    finally:
        torch.set_num_threads(threads)


class DecodeSpy:
    """Stands in for ``pipeline.decode_rgba``: alpha from the latent, RGB from the pixels; records its inputs."""

    def __init__(self):
        self.latents, self.pixels = [], []

    @staticmethod
    def alpha(latent):
        up = torch.nn.functional.interpolate(latent[:, :1].float() * 4, scale_factor=8, mode="nearest")
        return torch.sigmoid(up)

    def __call__(self, decoder, pixel, latent, *args, **kwargs):
        assert decoder.__class__.__name__ == "TransparentVAEDecoder"
        self.latents.append(latent.detach().clone())
        self.pixels.append(pixel.detach().clone())
        return torch.cat([self.alpha(latent), pixel.float()], dim=1).clip(0, 1)


@pytest.fixture
def ctx(env, monkeypatch, request):
    """Per test: options reset, the family injected, the decode spied, a fresh tiny UNet."""
    monkeypatch.setattr(env.fake.shared.opts, "samples_format", "png")
    monkeypatch.setattr(sys.modules["lib_layerdiffuse.hosts.a1111"], "detect_family", lambda unet: "sd15")
    gens = []

    class Recorded(pipeline.Generation):  # the test keeps each generation (p no longer does after close)
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.total_calls = 0
            gens.append(self)

        def end_sampling(self):
            if self.session is not None:
                self.total_calls += self.session.calls
            super().end_sampling()

    monkeypatch.setattr(env.mod, "Generation", Recorded)
    spy = DecodeSpy()
    monkeypatch.setattr(pipeline, "decode_rgba", spy)
    monkeypatch.setattr(env.fake.images, "saved", [])
    monkeypatch.chdir(env.root)  # the WebUI's working directory: relative output folders are under it
    torch.manual_seed(0)
    unet = fa.tiny_unet().eval()
    out = f"outputs/{re.sub(r'[^A-Za-z0-9_]', '_', request.node.name)}"  # relative, as A1111's default
    return SimpleNamespace(env=env, spy=spy, unet=unet, model=fa.FakeSDModel(unet), outpath=out, gens=gens)


def b64_png(image: Image.Image) -> str:
    with io.BytesIO() as f:
        image.save(f, format="PNG")
        return base64.b64encode(f.getvalue()).decode()


def rgba_image(seed=0, size=64) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size, size, 4), dtype=np.uint8)
    arr[: size // 2, :, 3] = 0  # a transparent half
    return Image.fromarray(arr, "RGBA")


def positional(method, weight=1.0, stop_at=1.0, fg=None, bg=None, blend=None, prompts=("", "", "")):
    return [True, method, weight, stop_at, fg, bg, blend, "Crop and Resize", False, *prompts]


def named(**values):
    """The named API form: one dict; A1111 fills the other positions with the UI defaults."""
    defaults = [False, M.DEFAULT.label, 1.0, 1.0, None, None, None, M.DEFAULT_RESIZE, False, "", "", ""]
    return [{"enabled": True, **values}, *defaults[1:]]


def generate(ctx, args, kind="txt2img", **kwargs):
    cls = fa.Txt2Img if kind == "txt2img" else fa.Img2Img
    p = cls(ctx.model, ctx.outpath, **kwargs)
    script = ctx.env.mod.LayerDiffuseScript()
    script.is_img2img = kind == "img2img"
    processed = fa.process_images(p, script, args)
    return p, processed


def saved_files(ctx, suffix=".png"):
    return [Path(f) for f in ctx.env.fake.images.saved if f.endswith(suffix)]


def read(path):
    with Image.open(path) as im:
        im.load()
        return im.mode, np.array(im), im.info.get("parameters")


def unet_state(unet):
    return snapshot(unet), dict(unet.named_modules()), dict(unet.named_parameters())


def assert_unet_as_before(unet, before):
    tensors, modules, params = before
    assert same_bits(snapshot(unet), tensors)
    now = dict(unet.named_modules())
    assert now.keys() == modules.keys() and all(now[k] is modules[k] for k in now)
    assert all(v is params[k] for k, v in unet.named_parameters())
    for name, m in unet.named_modules():
        hooks = (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks)
        assert not any(hooks), f"hook left on {name or 'the UNet'}"


def check_decoded(ctx, p, processed, decoded: list[int], total: int):
    """Frames in ``decoded`` are RGBA PNGs on disk (alpha of their final latent, infotext); others RGB."""
    scale = p.sd_model.scale_factor
    files = saved_files(ctx)
    mains = [f for f in files if "-checkerboard" not in f.name]
    assert len(mains) == total
    assert len(ctx.spy.latents) == len(decoded)
    for k, index in enumerate(decoded):
        it, i = divmod(index, p.batch_size)
        final = p.sampled[it][i : i + 1] / scale
        assert torch.allclose(ctx.spy.latents[k], final), "decoded from another latent than the final one"
    for index, path in enumerate(mains):
        mode, arr, text = read(path)
        assert text and "layerdiffusion_enabled: True" in text and "layerdiffusion_method: " in text
        assert mode == ("RGBA" if index in decoded else "RGB"), (index, mode)
        if index in decoded:
            it, i = divmod(index, p.batch_size)
            want = DecodeSpy.alpha(p.sampled[it][i : i + 1] / scale)[0, 0].numpy()
            assert np.abs(arr[..., 3].astype(np.float32) / 255 - want).max() <= 1 / 255 + 1e-6
            assert np.array_equal(arr[..., 3], getattr(processed.images[index], TAG))
    # previews: appended after the main images, with infotexts, and saved
    assert len(processed.images) == total + len(decoded) == len(processed.infotexts)
    assert all(im.mode == "RGB" for im in processed.images[total:])
    assert len([f for f in files if "-checkerboard" in f.name]) == len(decoded)


# ---------------------------------------------------------------------------------------
# txt2img, every SD1.5 mode


@pytest.mark.parametrize("batch", [1, 2])
def test_transparent(ctx, batch):
    before = unet_state(ctx.unet)
    p, processed = generate(ctx, positional(TRANSPARENT), batch_size=batch)
    assert p.scripts.errors == []
    assert [r for r, _ in p.unet_rows] == [2 * batch] * p.steps  # cond rows, then uncond rows
    check_decoded(ctx, p, processed, list(range(batch)), batch)
    assert p.closed == 1
    assert_unet_as_before(ctx.unet, before)


def test_joint_batch3_layer_prompts(ctx):
    before = unet_state(ctx.unet)
    p, processed = generate(ctx, positional(JOINT, prompts=("fgp", "bgp", "blp")), batch_size=3)
    assert p.scripts.errors == []
    check_decoded(ctx, p, processed, [0], 3)
    assert [t.split("\n")[0] for t in processed.infotexts[:3]] == ["fgp, a cat", "bgp, a cat", "blp, a cat"]
    assert "layerdiffusion_fg_additional_prompt: fgp" in processed.infotexts[0]
    assert_unet_as_before(ctx.unet, before)


def test_fg2bg_positional_base64(ctx):
    fg = b64_png(rgba_image(1, size=80))
    p, processed = generate(ctx, positional(FG2BG, fg=fg), batch_size=2)
    assert p.scripts.errors == []
    check_decoded(ctx, p, processed, [], 2)  # fg2bg decodes nothing: background and blended are RGB
    assert "layerdiffusion_fg_image: True" in processed.infotexts[0]
    assert ctx.gens[-1].total_calls > 0


def test_bg2fg_named_form(ctx):
    bg = "data:image/png;base64," + b64_png(rgba_image(2))
    p, processed = generate(ctx, named(method=BG2FG, bg_image=bg, stop_at=None), batch_size=2)
    assert p.scripts.errors == []
    check_decoded(ctx, p, processed, [0], 2)


@pytest.mark.parametrize(
    "method,batch,n_iter,decoded",
    [(BG2FG, 4, 1, [0, 2]), (JOINT, 6, 1, [0, 3]), (TRANSPARENT, 1, 2, [0, 1])],
    ids=["bg2fg-2N", "joint-3N", "transparent-n_iter2"],
)
def test_batch_multiples(ctx, method, batch, n_iter, decoded):
    bg = b64_png(rgba_image(3)) if method == BG2FG else None
    p, processed = generate(ctx, positional(method, bg=bg), batch_size=batch, n_iter=n_iter)
    assert p.scripts.errors == []
    check_decoded(ctx, p, processed, decoded, batch * n_iter)


def test_hires_decodes_from_the_hires_latent(ctx):
    before = unet_state(ctx.unet)
    calls = []
    orig = ctx.env.mod.LayerDiffuseScript.process_before_every_sampling

    def spy(self, p, *args, **kwargs):
        calls.append(tuple(kwargs["x"].shape))
        return orig(self, p, *args, **kwargs)

    ctx.env.mod.LayerDiffuseScript.process_before_every_sampling = spy
    try:
        p, processed = generate(ctx, positional(TRANSPARENT), batch_size=1, enable_hr=True)
    finally:
        ctx.env.mod.LayerDiffuseScript.process_before_every_sampling = orig
    assert calls == [(1, 4, 8, 8), (1, 4, 16, 16)]
    assert len(p.unet_rows) == 2 * p.steps
    assert tuple(ctx.spy.latents[0].shape) == (1, 4, 16, 16)
    check_decoded(ctx, p, processed, [0], 1)
    assert processed.images[0].size == (128, 128)
    assert_unet_as_before(ctx.unet, before)


# ---------------------------------------------------------------------------------------
# refusals: each one really stops sampling, with a clear message


REFUSALS = {
    "batch": (dict(args=positional(JOINT), batch_size=2), r"batch size must be a multiple of 3, but it is 2"),
    "missing-image": (dict(args=positional(FG2BG), batch_size=2), r"needs a Foreground image"),
    "unknown-method": (dict(args=positional("Make It Transparent"), batch_size=1), r"Unknown LayerDiffuse method"),
    "bad-weight": (dict(args=positional(TRANSPARENT, weight=5), batch_size=1), r"weight must be between 0.0 and 2.0"),
    "and-prompt": (dict(args=positional(JOINT), batch_size=3, prompt="a cat AND a dog"), r"composable prompts \(AND\)"),
    "and-newline": (dict(args=positional(JOINT), batch_size=3, prompt="a cat\nAND a dog"), r"composable prompts"),
    "and-layer-prompt": (dict(args=positional(JOINT, prompts=("x AND y", "", "")), batch_size=3), r"composable prompts"),
    "and-hires-prompt": (dict(args=positional(JOINT), batch_size=3, enable_hr=True, hr_prompt="a AND b"), r"composable"),
    "stop-at-0": (dict(args=positional(TRANSPARENT, stop_at=0), batch_size=1), r"Stop At\) must be at least 0.001"),
    "enabled-text": (dict(args=[{"enabled": "true", "method": "nope"}], batch_size=1), r"a JSON boolean"),
    "misspelt-key": (dict(args=[{"enable": True}], batch_size=1), r"did you mean 'enabled'"),
    "sdxl-on-sd15": (dict(args=positional(SDXL_ATTN), batch_size=1), r"needs an SDXL checkpoint.*SD1\.5"),
    "named-unknown-key": (dict(args=named(method=TRANSPARENT, colour="red"), batch_size=1), r"unknown setting 'colour'"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusal_stops_sampling(ctx, case, capsys):
    kwargs, message = REFUSALS[case]
    kwargs = dict(kwargs)
    args = kwargs.pop("args")
    before = unet_state(ctx.unet)
    p = fa.Txt2Img(ctx.model, ctx.outpath, **kwargs)
    script = ctx.env.mod.LayerDiffuseScript()
    with pytest.raises(RuntimeError, match=r"^LayerDiffuse: .*" + message) as info:
        fa.process_images(p, script, args)
    assert "LayerDiffuse: " not in str(info.value)[len("LayerDiffuse: ") :]  # no doubled prefix
    assert p.unet_rows == [] and p.sampled == []  # the sampler never ran
    assert ctx.env.fake.images.saved == []
    assert p.closed == 1
    assert p.scripts.errors == []
    assert re.search(message, capsys.readouterr().out)  # printed to the console too
    assert_unet_as_before(ctx.unet, before)


def test_disabled_does_nothing(ctx):
    before = unet_state(ctx.unet)
    args = positional(JOINT)
    args[0] = False
    p, processed = generate(ctx, args, batch_size=2)  # would be refused if enabled
    assert not hasattr(p, "_layerdiffuse") and p.extra_generation_params == {}
    assert [read(f)[0] for f in saved_files(ctx)] == ["RGB", "RGB"]
    assert_unet_as_before(ctx.unet, before)


# ---------------------------------------------------------------------------------------
# restore after failure, Stop At


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("method,batch", [(TRANSPARENT, 1), (FG2BG, 2)])
def test_restore_after_unet_exception(ctx, method, batch):
    before = unet_state(ctx.unet)
    seen = []

    def boom(module, args, output):
        seen.append(1)
        if len(seen) == 2:  # the second UNet call, mid-sampling
            raise Boom("injected")

    handle = ctx.unet.output_blocks[4].register_forward_hook(boom)
    fg = b64_png(rgba_image(4)) if method == FG2BG else None
    p = fa.Txt2Img(ctx.model, ctx.outpath, batch_size=batch, steps=3)
    try:
        with pytest.raises(Boom):
            fa.process_images(p, ctx.env.mod.LayerDiffuseScript(), positional(method, fg=fg))
    finally:
        handle.remove()
    assert len(p.unet_rows) == 2 and p.closed == 1
    assert ctx.gens[-1].total_calls > 0  # the units were installed and ran before the failure
    assert ctx.env.fake.images.saved == []
    assert_unet_as_before(ctx.unet, before)


def test_missing_weights_offline_aborts_sampling(ctx, tmp_path, monkeypatch):
    """A failure inside process_before_every_sampling (A1111 only logs it) must not let sampling
    run unpatched: the first UNet call raises the message, and p.close removes that hook."""
    empty = tmp_path / "no_weights"
    monkeypatch.setattr(ctx.env.fake.shared.cmd_opts, "layerdiffuse_models_dir", str(empty))
    monkeypatch.setattr(ctx.env.fake.modelloader, "calls", [])
    before = unet_state(ctx.unet)
    p = fa.Txt2Img(ctx.model, ctx.outpath, batch_size=1)
    with pytest.raises(RuntimeError, match="LayerDiffuse needs layer_sd15_transparent_attn.safetensors") as info:
        fa.process_images(p, ctx.env.mod.LayerDiffuseScript(), positional(TRANSPARENT))
    text = str(info.value)
    assert "https://huggingface.co/LayerDiffusion/layerdiffusion-v1/resolve/" in text and str(empty) in text
    assert [c[2] for c in ctx.env.fake.modelloader.calls] == ["layer_sd15_transparent_attn.safetensors.part"]
    assert list(empty.iterdir()) == []  # no partial file left
    assert len(p.unet_rows) == 1 and p.sampled == [] and p.closed == 1
    assert ctx.env.fake.images.saved == []
    assert_unet_as_before(ctx.unet, before)


def test_stop_at_switches_units_off_mid_sampling(ctx):
    before = unet_state(ctx.unet)
    record = []
    p = fa.Txt2Img(ctx.model, ctx.outpath, batch_size=1, steps=4)

    def after(module, args, output):
        state = ctx.gens[-1].session.sharing.state
        record.append((float(args[1][0]), state.enabled, state.calls))

    handle = ctx.unet.register_forward_hook(after)
    try:
        processed = fa.process_images(p, ctx.env.mod.LayerDiffuseScript(), positional(TRANSPARENT, stop_at=0.5))
    finally:
        handle.remove()
    assert [t for t, _, _ in record] == [999.0, 666.0, 333.0, 0.0]
    assert [e for _, e, _ in record] == [True, True, False, False]
    calls = [c for _, _, c in record]
    assert calls[0] > 0 and calls[1] > calls[0] and calls[3] == calls[2]  # no sharing after the switch
    assert "layerdiffusion_ending_step: 0.5" in processed.infotexts[0]
    assert_unet_as_before(ctx.unet, before)


# ---------------------------------------------------------------------------------------
# saving, API


def test_jpg_format_gets_a_png_copy(ctx):
    ctx.env.fake.shared.opts.samples_format = "jpg"
    p, processed = generate(ctx, positional(TRANSPARENT), batch_size=1)
    jpgs = [f for f in saved_files(ctx, ".jpg") if "-checkerboard" not in f.name]
    assert len(jpgs) == 1 and read(jpgs[0])[0] == "RGB"  # A1111's jpg drops alpha
    png = jpgs[0].with_suffix(".png")
    mode, arr, text = read(png)
    assert mode == "RGBA"
    assert np.array_equal(arr[..., 3], getattr(processed.images[0], TAG))
    assert arr[..., 3].min() < 255  # a real alpha, not an opaque copy
    assert text and "layerdiffusion_method: " in text


def test_destroyed_alpha_warns(ctx, caplog):
    def wipe(params):  # Forge's stealth infotext: putalpha(255) in place, before saving
        if params.image.mode == "RGBA":
            params.image.putalpha(255)

    callbacks = ctx.env.fake.script_callbacks.callbacks_before_image_saved
    callbacks.append(wipe)
    try:
        with caplog.at_level(logging.WARNING, logger="layerdiffuse"):
            generate(ctx, positional(TRANSPARENT), batch_size=1)
    finally:
        callbacks.remove(wipe)
    assert "lost the transparency" in caplog.text
    assert "save as PNG" in caplog.text


def test_intact_png_does_not_warn(ctx, caplog):
    with caplog.at_level(logging.WARNING, logger="layerdiffuse"):
        generate(ctx, positional(TRANSPARENT), batch_size=1)
    assert "lost the transparency" not in caplog.text


def test_api_png_encoder(env, monkeypatch):
    api = env.fake.api_api
    monkeypatch.setattr(api, "encode_pil_to_base64", api.encode_pil_to_base64)  # undone after the test
    monkeypatch.setattr(env.fake.shared.opts, "samples_format", "jpg")
    env.fake.script_callbacks.app_started_callback(None, None)
    env.fake.script_callbacks.app_started_callback(None, None)  # a second start does not wrap twice
    assert getattr(api.encode_pil_to_base64, "_layerdiffuse", False)
    rgba = np.random.default_rng(0).random((16, 16, 4)).astype(np.float32)
    ours = env.host.to_pil_rgba(rgba)
    ours.info["parameters"] = "a cat\nlayerdiffusion_enabled: True"
    with Image.open(io.BytesIO(base64.b64decode(api.encode_pil_to_base64(ours)))) as im:
        assert im.format == "PNG" and im.mode == "RGBA"
        assert np.array_equal(np.array(im)[..., 3], getattr(ours, TAG))
        assert im.info.get("parameters") == ours.info["parameters"]
    plain = Image.new("RGBA", (16, 16), (1, 2, 3, 4))  # not ours: the host's format as before
    with Image.open(io.BytesIO(base64.b64decode(api.encode_pil_to_base64(plain)))) as im:
        assert im.format == "JPEG" and im.mode == "RGB"


# ---------------------------------------------------------------------------------------
# img2img


def test_img2img_offsets_every_init_image(ctx):
    from lib_layerdiffuse.rgba import flatten_on_grey
    from lib_layerdiffuse.vae import apply_offset, encode_offset

    inits = [rgba_image(5), rgba_image(6)]
    before = unet_state(ctx.unet)
    p, processed = generate(ctx, positional(TRANSPARENT), kind="img2img", init_images=inits, batch_size=2)
    assert p.scripts.errors == []
    host = ctx.env.host
    # A1111 got grey-flattened copies (its own flatten is white)
    flat = np.asarray(p.init_images[0], dtype=np.float32)
    assert np.allclose(flat[0, 0], flatten_on_grey(np.asarray(inits[0], np.float32)[:1, :1] / 255)[0, 0] * 255, atol=1)
    adjusted, plain = p.sampled_init_latent, p.plain_init_latent
    assert adjusted.shape == plain.shape == (2, 4, 8, 8)
    encoder = pipeline.cached_model("encoder", host.weight_path("layer_sd15_vae_transparent_encoder"), "cpu",
                                    torch.float32)  # fmt: skip
    for i, im in enumerate(inits):
        assert not torch.allclose(adjusted[i], plain[i]), f"init image {i} got no offset"
        rgba = np.asarray(im, dtype=np.float32) / 255
        mean, std = host.vae_moments(p, torch.from_numpy(flatten_on_grey(rgba)).permute(2, 0, 1)[None])
        want = apply_offset(mean, std, encode_offset(encoder, [rgba])) * p.sd_model.scale_factor
        assert torch.allclose(adjusted[i], want[0], atol=1e-5), f"init image {i} has another image's offset"
    check_decoded(ctx, p, processed, [0, 1], 2)
    assert_unet_as_before(ctx.unet, before)


def test_oversized_init_image_is_refused_in_process(ctx, monkeypatch):
    from lib_layerdiffuse import settings

    monkeypatch.setattr(settings, "MAX_IMAGE_PIXELS", 64 * 64)
    before = unet_state(ctx.unet)
    big = Image.new("RGBA", (65, 64))
    p = fa.Img2Img(ctx.model, ctx.outpath, init_images=[rgba_image(5), big], batch_size=2)
    with pytest.raises(RuntimeError, match=r"^LayerDiffuse: init image 2 is 65x64 .* above the limit"):
        fa.process_images(p, ctx.env.mod.LayerDiffuseScript(), positional(TRANSPARENT))
    assert p.unet_rows == [] and ctx.env.fake.images.saved == [] and p.closed == 1
    assert p.init_images[1] is big  # the host's images as they were
    assert_unet_as_before(ctx.unet, before)


# ---------------------------------------------------------------------------------------
# UI, infotext paste, the real decoder


def test_ui_builds_without_gradio(env):
    script = env.mod.LayerDiffuseScript()
    components = script.ui(False)
    assert len(components) == 16
    assert type(components[0]).__name__ == "InputAccordion"
    assert components[0].kwargs["elem_id"] == "script_txt2img_layerdiffuse_enabled"
    method = components[1]
    assert method.value == M.DEFAULT.label and method.kwargs["choices"] == M.LABELS
    (_, fn, inputs, outputs), *_ = method.events
    updates = fn(FG2BG)
    # fg/bg/blend columns, resize mode, weight, stop at, 3 prompts, the decompose row
    assert len(updates) == len(outputs) == 10
    assert [u["visible"] for u in updates[:6]] == [True, False, False, True, False, True]
    assert updates[-1]["visible"] is False
    decompose = fn("(Qwen-Image-Layered) Decompose Into Layers")
    assert [u["visible"] for u in decompose[:6]] == [False, False, False, False, False, False]
    assert decompose[-1]["visible"] is True
    assert [k for _, k in script.infotext_fields if isinstance(k, str)] == script.paste_field_names


def test_infotext_paste_legacy_sdxl_label(env):
    params = {
        "layerdiffusion_enabled": "True",
        "layerdiffusion_method": "Only Generate Transparent Image (Attention Injection)",  # before March 2024
        "layerdiffusion_weight": "0.8",
        "layerdiffusion_ending_step": "0.6",
        "layerdiffusion_resize_mode": "Crop and Resize",
        "layerdiffusion_fg_image": "False",
    }
    s = Settings.from_infotext(params)
    assert s.enabled and s.method == SDXL_ATTN and s.weight == 0.8 and s.stop_at == 0.6
    assert env.mod._paste_method(params) == SDXL_ATTN
    assert Settings.from_infotext(Settings(enabled=True, method=JOINT, bg_additional_prompt="x").infotext()) == (
        Settings(enabled=True, method=JOINT, bg_additional_prompt="x")
    )


class RecordingState:
    """``shared.state`` that keeps every progress text shown, and interrupts on request."""

    def __init__(self, shown, interrupt_at=None):
        self.shown, self.interrupt_at, self.interrupted = shown, interrupt_at, False

    @property
    def textinfo(self):
        return self.shown[-1] if self.shown else None

    @textinfo.setter
    def textinfo(self, text):
        self.shown.append(text)
        if text is not None and text == self.interrupt_at:
            self.interrupted = True  # the user pressed Interrupt while this was shown


def test_real_decoder_end_to_end(ctx, monkeypatch):
    """One generation through the real transparent decoder (the official 8-view decode)."""
    from lib_layerdiffuse import vae

    monkeypatch.setattr(pipeline, "decode_rgba", vae.decode_rgba)
    shown = []
    monkeypatch.setattr(ctx.env.fake.shared, "state", RecordingState(shown))
    p, processed = generate(ctx, positional(TRANSPARENT), batch_size=2)
    assert p.scripts.errors == [] and not p.comments
    head = "LayerDiffuse: transparent decode, image"
    want = [f"{head} {i} of 2{s}" for i in (1, 2) for s in ["", *(f", pass {k} of 8" for k in range(1, 9))]]
    assert shown == [*want, None]  # then the decode is over: the host's text from before (none) is back
    assert not ctx.env.host.interrupted()
    main = [f for f in saved_files(ctx) if "-checkerboard" not in f.name]
    mode, arr, text = read(main[0])
    assert mode == "RGBA" and "layerdiffusion_enabled: True" in text
    assert np.array_equal(arr[..., 3], getattr(processed.images[0], TAG))


# ---------------------------------------------------------------------------------------
# nothing a generation created outlives it


LIFETIME_TYPES = ("Generation", "Recorded", "UNetSession", "ModuleBackend", "A1111Backend", "AttentionSharing",
                  "AttentionSharingUnit", "ModulePatcher", "SharingState",
                  "Layered", "LayerGroups")  # the layered PSD's state holds the group's images  # fmt: skip


def live_objects() -> dict[str, int]:
    """Our per-generation objects still in memory (also those only held by reference cycles)."""
    counts: dict[str, int] = {}
    for obj in gc.get_objects():
        name = type(obj).__name__
        if name in LIFETIME_TYPES and type(obj).__module__.startswith(("lib_layerdiffuse", "test_extension")):
            counts[name] = counts.get(name, 0) + 1
    return counts


def test_nothing_outlives_a_generation(ctx, monkeypatch):
    """Generations of every kind (ok, hires, img2img, refused, failing mid-sampling) with the
    garbage collector off: reference counting alone must free everything each one created."""
    monkeypatch.setattr(ctx.env.mod, "Generation", pipeline.Generation)
    fg = b64_png(rgba_image(1))
    runs = [
        dict(args=positional(TRANSPARENT), batch_size=1),
        dict(args=positional(JOINT, prompts=("a", "b", "")), batch_size=3),
        dict(args=positional(FG2BG, fg=fg), batch_size=2),
        dict(args=positional(TRANSPARENT, stop_at=0.5), batch_size=1, enable_hr=True),
        dict(args=positional(JOINT), batch_size=2),  # refused in process()
        dict(args=positional(TRANSPARENT), batch_size=1, kind="img2img", init_images=[rgba_image(7)]),
    ]
    before = unet_state(ctx.unet)
    gc.collect()
    baseline = live_objects()
    gc.disable()
    try:
        for run in runs * 2:
            run = dict(run)
            args, kind = run.pop("args"), run.pop("kind", "txt2img")
            try:
                generate(ctx, args, kind=kind, **run)
            except RuntimeError as e:
                assert "batch size must be a multiple of 3" in str(e)
                e = None  # the traceback holds frames of the generation
            assert live_objects() == baseline, run
        # a failure in the middle of sampling
        handle = ctx.unet.output_blocks[4].register_forward_hook(lambda m, a, o: (_ for _ in ()).throw(Boom("x")))
        try:
            with pytest.raises(Boom):
                generate(ctx, positional(JOINT), batch_size=3)
        finally:
            handle.remove()
        assert live_objects() == baseline
    finally:
        gc.enable()
    assert_unet_as_before(ctx.unet, before)
    assert pipeline._MODELS  # the decoder and encoder stay cached (one of each) until released
    assert len({k[0] for k in pipeline._MODELS}) == len(pipeline._MODELS) <= 2
    pipeline.release_models()
    assert not pipeline._MODELS


# ---------------------------------------------------------------------------------------
# paste round trip


def parse_infotext(text: str) -> tuple[str, dict]:
    """A1111's ``parse_generation_parameters`` in small: the prompt line and the ``key: value`` pairs."""
    lines = text.split("\n")
    params = {}
    for k, v in re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', lines[-1]):
        params[k] = v[1:-1].replace('\\"', '"').replace("\\\\", "\\") if v.startswith('"') else v
    return lines[0], params


@pytest.mark.parametrize("frame", [0, 1, 2])
def test_pasted_infotext_generates_the_same_frame_prompts(ctx, frame):
    """PNG Info -> Send to txt2img -> Generate: each frame gets the prompt it had, not the layer prompt twice."""
    first, processed = generate(ctx, positional(JOINT, prompts=("a red glass", "a wooden table", "")),
                                batch_size=3, prompt="a glass bottle")  # fmt: skip
    assert first.all_prompts == ["a red glass, a glass bottle", "a wooden table, a glass bottle", "a glass bottle"]
    prompt, params = parse_infotext(processed.infotexts[frame])
    assert prompt == first.all_prompts[frame]
    pasted = Settings.from_infotext(params)
    args = [True, pasted.method, pasted.weight, pasted.stop_at, None, None, None, pasted.resize_mode, False,
            pasted.fg_additional_prompt, pasted.bg_additional_prompt, pasted.blend_additional_prompt]  # fmt: skip
    again, _ = generate(ctx, args, batch_size=3, prompt=prompt)
    assert again.all_prompts == first.all_prompts
    # an infotext written before this change has the same form, so it pastes the same way
    assert (
        Settings.from_infotext(
            {
                "layerdiffusion_enabled": "True",
                "layerdiffusion_method": JOINT,
                "layerdiffusion_fg_additional_prompt": "x",
            }
        ).fg_additional_prompt
        == "x"
    )


def test_previews_in_the_gallery_are_the_saved_files(ctx):
    """The gallery serves a saved file (``already_saved_as``) instead of writing to the host's temporary folder."""
    p, processed = generate(ctx, positional(TRANSPARENT), batch_size=1)
    preview = processed.images[1]
    assert Path(preview.already_saved_as).name.endswith("-checkerboard.png")
    assert (Path(ctx.env.root) / preview.already_saved_as).is_file() or Path(preview.already_saved_as).is_file()


def test_a_replaced_decoder_file_is_read_again(ctx, tmp_path, monkeypatch):
    """The cached decoder belongs to one version of its file: replaced under the same name (a new
    download, a trained export; seen with a swapped Flux file on a real Neo), it is loaded and
    checked again instead of the old one being used."""
    import os
    import shutil

    folder = tmp_path / "models"
    shutil.copytree(ctx.env.models, folder)
    monkeypatch.setattr(ctx.env.fake.shared.cmd_opts, "layerdiffuse_models_dir", str(folder))
    p = fa.Txt2Img(ctx.model, ctx.outpath, batch_size=1)
    fa.process_images(p, ctx.env.mod.LayerDiffuseScript(), positional(TRANSPARENT))  # the decoder is cached
    decoder = folder / "layer_sd15_vae_transparent_decoder.safetensors"
    st = decoder.stat()
    decoder.write_bytes(decoder.read_bytes()[: st.st_size // 2])
    os.utime(decoder, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime: the size differs
    p = fa.Txt2Img(ctx.model, ctx.outpath, batch_size=1)
    with pytest.raises(RuntimeError, match="LayerDiffuse: .*layer_sd15_vae_transparent_decoder.*truncated"):
        fa.process_images(p, ctx.env.mod.LayerDiffuseScript(), positional(TRANSPARENT))
    assert p.sampled == []


def test_damaged_decoder_is_refused_before_sampling(ctx, tmp_path, monkeypatch):
    """A truncated decoder is found when sampling starts (not after it): nothing is sampled or saved."""
    import shutil

    folder = tmp_path / "models"
    shutil.copytree(ctx.env.models, folder)
    decoder = folder / "layer_sd15_vae_transparent_decoder.safetensors"
    decoder.write_bytes(decoder.read_bytes()[: decoder.stat().st_size // 2])
    monkeypatch.setattr(ctx.env.fake.shared.cmd_opts, "layerdiffuse_models_dir", str(folder))
    pipeline.release_models()
    before = unet_state(ctx.unet)
    p = fa.Txt2Img(ctx.model, ctx.outpath, batch_size=1)
    with pytest.raises(RuntimeError, match="LayerDiffuse: .*layer_sd15_vae_transparent_decoder.*truncated"):
        fa.process_images(p, ctx.env.mod.LayerDiffuseScript(), positional(TRANSPARENT))
    assert len(p.unet_rows) == 1 and p.sampled == [] and ctx.env.fake.images.saved == []
    assert_unet_as_before(ctx.unet, before)


def test_nan_in_the_unet_file_is_refused_before_sampling(ctx, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "models"
    shutil.copytree(ctx.env.models, folder)
    path = folder / "layer_sd15_transparent_attn.safetensors"
    state = load_file(str(path))
    key = sorted(state)[5]
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    save_file(state, str(path))
    monkeypatch.setattr(ctx.env.fake.shared.cmd_opts, "layerdiffuse_models_dir", str(folder))
    p = fa.Txt2Img(ctx.model, ctx.outpath, batch_size=1)
    with pytest.raises(RuntimeError, match=f"LayerDiffuse: .*holds non-finite values: {re.escape(key)} has 1 NaN"):
        fa.process_images(p, ctx.env.mod.LayerDiffuseScript(), positional(TRANSPARENT))
    assert len(p.unet_rows) == 1 and ctx.env.fake.images.saved == []


def test_start_up_removes_stale_partial_downloads(env, monkeypatch):
    api = env.fake.api_api
    monkeypatch.setattr(api, "encode_pil_to_base64", api.encode_pil_to_base64)
    stale = env.models / "layer_sd15_joint.safetensors.part"
    stale.write_bytes(b"half a file")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    env.fake.script_callbacks.app_started_callback(None, None)
    assert not stale.exists()
    assert (env.models / "layer_sd15_joint.safetensors").is_file()


# ---------------------------------------------------------------------------------------
# a failure after sampling is still a failure (the decode runs inside p.sample)


def assert_refused_after_sampling(ctx, p, info, message, before):
    assert re.search(r"^LayerDiffuse: .*" + message, str(info.value)), str(info.value)
    assert p.unet_rows, "sampling ran"
    assert ctx.env.fake.images.saved == []  # nothing saved as if it were the transparent result
    assert p.closed == 1 and p.scripts.errors == []
    assert_unet_as_before(ctx.unet, before)


@pytest.mark.parametrize("where", ["first", "second"])
def test_decode_failure_fails_the_request(ctx, monkeypatch, where):
    calls = []

    def failing(decoder, pixel, latent, *args, **kwargs):
        calls.append(1)
        if where == "first" or len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 24.00 GiB")
        return ctx.spy(decoder, pixel, latent)

    monkeypatch.setattr(pipeline, "decode_rgba", failing)
    before = unet_state(ctx.unet)
    p = fa.Txt2Img(ctx.model, ctx.outpath, batch_size=2)
    with pytest.raises(RuntimeError) as info:
        fa.process_images(p, ctx.env.mod.LayerDiffuseScript(), positional(TRANSPARENT))
    assert_refused_after_sampling(ctx, p, info, r"transparent decode failed \(OutOfMemoryError: CUDA out of", before)
    assert "no transparent image is returned" in str(info.value)


@pytest.mark.parametrize("at", ["image 1 of 2", "image 2 of 2, pass 3 of 8"])
def test_interrupt_during_the_decode_returns_no_image(ctx, monkeypatch, at):
    from lib_layerdiffuse import vae

    monkeypatch.setattr(pipeline, "decode_rgba", vae.decode_rgba)
    shown = []
    monkeypatch.setattr(ctx.env.fake.shared, "state", RecordingState(shown, f"LayerDiffuse: transparent decode, {at}"))
    before = unet_state(ctx.unet)
    p = fa.Txt2Img(ctx.model, ctx.outpath, batch_size=2)
    with pytest.raises(RuntimeError) as info:
        fa.process_images(p, ctx.env.mod.LayerDiffuseScript(), positional(TRANSPARENT))
    assert_refused_after_sampling(ctx, p, info, r"interrupted before the transparent decode finished", before)
    assert shown[-2].endswith(at) and shown[-1] is None  # stopped right there, then the host's text is back


def test_nan_latent_is_refused_by_the_hosts_check(ctx, monkeypatch):
    original = fa.Sampler.sample

    def nan_sample(self, p, x, *args, **kwargs):
        out = original(self, p, x, *args, **kwargs)
        out[0, 0, 0, 0] = float("nan")
        return out

    monkeypatch.setattr(fa.Sampler, "sample", nan_sample)
    before = unet_state(ctx.unet)
    p = fa.Txt2Img(ctx.model, ctx.outpath, batch_size=1)
    with pytest.raises(RuntimeError) as info:
        fa.process_images(p, ctx.env.mod.LayerDiffuseScript(), positional(TRANSPARENT))
    # the host's own NaN check ran on the host's decode path, and its message reaches the user
    assert_refused_after_sampling(ctx, p, info, r"NansException: A tensor with NaNs was produced in unet", before)
    assert ctx.spy.latents == []


def test_the_host_decodes_each_batch_once(ctx, monkeypatch):
    decodes = []
    original = ctx.model.decode_first_stage

    def counting(z):
        decodes.append(z.shape[0])
        return original(z)

    monkeypatch.setattr(ctx.model, "decode_first_stage", counting)
    p, processed = generate(ctx, positional(TRANSPARENT), batch_size=2, n_iter=2)
    assert decodes == [1, 1, 1, 1]  # image by image (decode_latent_batch), never twice
    check_decoded(ctx, p, processed, [0, 1, 2, 3], 4)
    # the decoder saw the host's 8-bit pixels of the final latent, as on every host
    for k, index in enumerate(range(4)):
        it, i = divmod(index, 2)
        x = ((original(p.sampled[it][i : i + 1]) + 1) / 2).clamp(0, 1)
        assert torch.equal(ctx.spy.pixels[k], torch.floor(x * 255) / 255)


def test_inpaint_only_masked_blends_the_region_by_the_mask(ctx):
    """The decoded crop goes back where the host pastes its colours, through the host's overlay
    mask: outside the mask the original RGBA stays, and the preview shows the full image."""
    host = ctx.env.host
    init = rgba_image(3, 64)
    settings = pipeline.Settings.from_dict({"enabled": True, "method": TRANSPARENT})
    gen = pipeline.Generation(host, settings, "sd15", 1, 32, 32, ["p"])
    gen.init_rgba = [init]
    p = type("P", (), {})()
    p.paste_to, p.batch_index, p.iteration, p.batch_size = (16, 8, 32, 32), 0, 0, 1
    mask = np.zeros((64, 64), np.uint8)
    mask[12:36, 20:44] = 255  # the mask lies inside the pasted rectangle
    p.mask_for_overlay = Image.fromarray(mask)
    p._layerdiffuse = gen
    region = np.zeros((16, 16, 4), np.float32)
    region[..., 0] = region[..., 3] = 1.0  # opaque red (HxWx4, alpha last, as decoded)
    host_image = Image.new("RGB", (64, 64))
    host_image.info["parameters"] = "text"
    out = host.rgba_image(p, region, host_image)
    arr = np.asarray(out)
    assert out.size == (64, 64) and out.mode == "RGBA" and out.info["parameters"] == "text"
    assert (arr[12:36, 20:44] == (255, 0, 0, 255)).all()  # the masked area is the decode's
    outside = mask == 0
    assert np.abs(arr[outside].astype(int) - np.asarray(init)[outside]).max() <= 1  # the original elsewhere
    assert np.array_equal(getattr(out, TAG), arr[..., 3])
    assert gen.previews[0].shape == (64, 64, 4)  # the preview at the full size


# ---------------------------------------------------------------------------------------
# Settings > LayerDiffuse


@pytest.fixture
def opts(ctx, monkeypatch):
    """Set LayerDiffuse options for one test (as Settings or the API's override_settings do)."""
    from lib_layerdiffuse.options import OPTIONS

    o = ctx.env.fake.shared.opts
    for option in OPTIONS:
        monkeypatch.setattr(o, option.key, option.default)
    return lambda **values: [monkeypatch.setattr(o, f"layerdiffuse_{k}", v) for k, v in values.items()]


def test_settings_section_is_registered(ctx):
    from lib_layerdiffuse.options import OPTIONS

    labels = ctx.env.fake.shared.opts.data_labels
    assert [k for k in labels if k.startswith("layerdiffuse_")] == [o.key for o in OPTIONS]
    assert {info.section for k, info in labels.items() if k.startswith("layerdiffuse_")} == {
        ("layerdiffuse", "LayerDiffuse")
    }
    assert labels["layerdiffuse_decode_passes"].component.__name__ == "Radio"
    assert labels["layerdiffuse_decode_passes"].component_args == {"choices": [8, 4, 2, 1]}
    assert labels["layerdiffuse_decode_passes"].infotext == "layerdiffusion_passes"
    assert labels["layerdiffuse_tiling"].component_args == {"choices": ["auto", "always", "never"]}
    assert ctx.env.fake.shared.opts.layerdiffuse_tiling == "auto"  # defaults in place


def test_pass_count_reaches_the_decode_and_the_infotext(ctx, opts, monkeypatch):
    from lib_layerdiffuse import vae

    seen = []

    def spy(decoder, pixel, latent, **kwargs):
        seen.append(kwargs)
        return vae.decode_rgba(decoder, pixel, latent, **kwargs)

    monkeypatch.setattr(pipeline, "decode_rgba", spy)  # the real decoder, its arguments recorded
    opts(decode_passes=2)
    p, processed = generate(ctx, positional(TRANSPARENT), batch_size=1)
    assert p.scripts.errors == []
    assert seen[0]["passes"] == 2 and seen[0]["tile_size"] is None and seen[0]["extra_memory_gb"] == 2.0
    text = read([f for f in saved_files(ctx) if "-checkerboard" not in f.name][0])[2]
    assert "layerdiffusion_passes: 2" in text and "layerdiffusion_tile_size" not in text


def test_official_decode_writes_no_decode_keys(ctx, opts):
    p, processed = generate(ctx, positional(TRANSPARENT), batch_size=1)
    text = processed.infotexts[0]
    assert "layerdiffusion_passes" not in text and "layerdiffusion_tiling" not in text


@pytest.mark.parametrize(
    "values,message",
    [
        (dict(decode_passes=3), r"layerdiffuse_decode_passes must be one of 8, 4, 2, 1, got 3"),
        (dict(tiling="sometimes"), r"layerdiffuse_tiling must be one of auto, always, never"),
        (dict(tile_size=500), r"layerdiffuse_tile_size must be a multiple of 64"),
        (dict(tile_size="big"), r"layerdiffuse_tile_size must be a number"),
        (dict(extra_memory_gb=-1), r"layerdiffuse_extra_memory_gb must be between 0 and 64"),
        (dict(compile="yes"), r"layerdiffuse_compile must be true or false"),
    ],
)
def test_bad_override_settings_are_refused_before_sampling(ctx, opts, values, message):
    opts(**values)
    before = unet_state(ctx.unet)
    p = fa.Txt2Img(ctx.model, ctx.outpath, batch_size=1)
    with pytest.raises(RuntimeError, match=r"^LayerDiffuse: " + message):
        fa.process_images(p, ctx.env.mod.LayerDiffuseScript(), positional(TRANSPARENT))
    assert p.unet_rows == [] and ctx.env.fake.images.saved == []
    assert_unet_as_before(ctx.unet, before)


def test_auto_tiling_with_little_free_memory(ctx, opts, monkeypatch):
    """A CPU decode told it may use little memory tiles, and the infotext records the tiles."""
    seen = []

    def spy(decoder, pixel, latent, **kwargs):
        seen.append(kwargs["tile_size"])
        return ctx.spy(decoder, pixel, latent)

    monkeypatch.setattr(pipeline, "decode_rgba", spy)
    opts(tile_size=256)
    item = torch.empty((), dtype=torch.float32).element_size()
    monkeypatch.setattr(ctx.env.host, "free_memory", lambda device: None)  # CPU: memory is not the limit
    p, processed = generate(ctx, positional(TRANSPARENT), batch_size=1, width=512, height=512)
    assert seen == [None] and "layerdiffusion_tile_size" not in processed.infotexts[0]
    from lib_layerdiffuse.vae import FIRST_VIEW_ELEMENTS

    room = int(FIRST_VIEW_ELEMENTS * item * 200 * 200 / 0.9)  # a one-view pass of ~200x200 pixels fits
    monkeypatch.setattr(ctx.env.host, "free_memory", lambda device: room)
    ctx.env.fake.images.saved.clear()
    seen.clear()
    p, processed = generate(ctx, positional(TRANSPARENT), batch_size=1, width=512, height=512)
    assert seen == [192]  # the largest multiple of 64 that fits, below the 256 setting
    text = processed.infotexts[0]
    assert "layerdiffusion_tiling: always" in text and "layerdiffusion_tile_size: 192" in text


def test_auto_tiling_decodes_a_large_image_in_tiles(ctx, opts, monkeypatch):
    """The real decoder: with an injected small memory figure a 512x512 decode runs in tiles
    whose passes the progress counts, and gives an RGBA image."""
    from lib_layerdiffuse import vae

    monkeypatch.setattr(pipeline, "decode_rgba", vae.decode_rgba)
    shown = []
    monkeypatch.setattr(ctx.env.fake.shared, "state", RecordingState(shown))
    item = torch.empty((), dtype=torch.float32).element_size()
    monkeypatch.setattr(ctx.env.host, "free_memory", lambda device: int(vae.FIRST_VIEW_ELEMENTS * item * 300**2))
    opts(decode_passes=1)
    p, processed = generate(ctx, positional(TRANSPARENT), batch_size=1, width=512, height=512)
    assert p.scripts.errors == []
    assert "layerdiffusion_tile_size: 256" in processed.infotexts[0]
    assert shown[-2:] == ["LayerDiffuse: transparent decode, image 1 of 1, pass 9 of 9", None]  # 3x3 tiles, 1 pass
    assert processed.images[0].mode == "RGBA" and processed.images[0].size == (512, 512)


def test_previews_off_and_models_released(ctx, opts, monkeypatch):
    opts(previews=False, keep_models=False)
    p, processed = generate(ctx, positional(TRANSPARENT), batch_size=2)
    assert len(processed.images) == 2 and all(im.mode == "RGBA" for im in processed.images)
    assert not [f for f in saved_files(ctx) if "-checkerboard" in f.name]
    assert pipeline._MODELS == {}  # released with the generation
    opts(keep_models=True)
    generate(ctx, positional(TRANSPARENT), batch_size=1)
    assert [k[0] for k in pipeline._MODELS] == ["decoder"]


def test_low_vram_keeps_the_decoder_on_the_cpu(ctx, opts, monkeypatch):
    """In the host's low-VRAM modes the decoder is cached on the CPU and is on the GPU only to decode."""
    moves = []
    host = ctx.env.host
    monkeypatch.setattr(host, "low_vram", lambda: True)
    monkeypatch.setattr(host, "device_dtype", lambda p: (torch.device("meta"), torch.float32))
    monkeypatch.setattr(pipeline, "cached_model", lambda kind, path, device, dtype: Mover(moves, device))
    monkeypatch.setattr(pipeline, "decode_rgba", lambda decoder, pixel, latent, **kw: (
        moves.append(("decode", decoder.device)), torch.zeros(1, 4, *pixel.shape[-2:]))[1])  # fmt: skip
    settings = pipeline.Settings.from_dict({"enabled": True, "method": TRANSPARENT})
    gen = pipeline.Generation(host, settings, "sd15", 1, 64, 64, ["p"])
    p = SimpleNamespace(sd_model=ctx.model)
    gen.decode_batch(p, 0, torch.zeros(1, 4, 8, 8), torch.zeros(1, 3, 64, 64))
    assert moves == [("loaded", "cpu"), ("to", "meta"), ("decode", "meta"), ("to", "cpu")]
    monkeypatch.setattr(host, "low_vram", lambda: False)
    moves.clear()
    gen.decode_batch(p, 0, torch.zeros(1, 4, 8, 8), torch.zeros(1, 3, 64, 64))
    assert moves == [("loaded", "meta"), ("decode", "meta")]  # otherwise it stays where it runs


class Mover(torch.nn.Module):
    def __init__(self, moves, device):
        super().__init__()
        self.moves, self.device = moves, str(device)
        self.w = torch.nn.Parameter(torch.zeros(1))
        moves.append(("loaded", self.device))

    def to(self, device):
        self.device = str(torch.device(device))
        self.moves.append(("to", self.device))
        return self


# ---------------------------------------------------------------------------------------
# X/Y/Z plot axes


@pytest.fixture
def xyz(ctx, monkeypatch):
    xyz = fa.xyz_grid_module()
    data = fa.ScriptClassData(xyz.Script, "scripts/xyz_grid.py", "", xyz)
    monkeypatch.setattr(ctx.env.fake.scripts, "scripts_data", [data])
    ctx.env.fake.script_callbacks.before_ui_callback()
    ctx.env.fake.script_callbacks.app_started_callback(None, None)  # both register: once only
    return {o.label: o for o in xyz.axis_options}


@pytest.fixture
def plot(ctx, xyz):
    """The X/Y/Z plot module (its axes registered by the script) and a runner of it."""
    module = ctx.env.fake.scripts.scripts_data[0].module

    def run(args, batch_size=1, **axes):
        p = fa.Txt2Img(ctx.model, ctx.outpath, batch_size=batch_size)
        processed = fa.run_xyz(p, ctx.env.mod.LayerDiffuseScript(), args, module, **axes)
        return p, processed

    return SimpleNamespace(module=module, run=run)


@pytest.mark.parametrize(
    "axis, values, batch, message",
    [
        ("Weight", "0.5, 3", 1, r"\[LayerDiffuse\] Weight = 3.0: weight must be between 0.0 and 2.0"),
        ("Weight", "-1", 1, r"\[LayerDiffuse\] Weight = -1.0: weight must be between"),
        ("Stop At", "1, 0", 1, r"\[LayerDiffuse\] Stop At = 0.0: stop_at \(Stop At\) must be at least 0.001"),
        ("Method", f"{TRANSPARENT}, {SDXL_ATTN}", 1, r"Method = \(SDXL\).*needs an SDXL checkpoint.*SD1.5"),
        ("Method", JOINT, 1, r"Method = \(SD1.5\) Generate Everything.*batch size must be a multiple of 3"),
        ("Method", "Make It Transparent", 1, r"Method = Make It Transparent: Unknown LayerDiffuse method"),
        ("Method", FG2BG, 2, r"Method = \(SD1.5\) From Foreground.*needs a Foreground image"),
    ],
)
def test_xyz_invalid_cells_refuse_the_plot_before_any_cell(ctx, plot, axis, values, batch, message):
    with pytest.raises(RuntimeError, match=rf"^LayerDiffuse: X/Y/Z plot, .*{message}.*The plot was not started"):
        plot.run(positional(TRANSPARENT), batch_size=batch, x=(f"[LayerDiffuse] {axis}", values))
    assert ctx.gens == [] and plot.module.reported == [] and ctx.env.fake.images.saved == []


def test_xyz_axes_with_layerdiffuse_off_refuse_the_plot(ctx, plot):
    args = positional(TRANSPARENT)
    args[0] = False
    with pytest.raises(RuntimeError, match=r"apply only when LayerDiffuse is enabled"):
        plot.run(args, x=("[LayerDiffuse] Weight", "0.5, 1"))
    assert ctx.env.fake.images.saved == []


def test_xyz_cell_refused_while_generating_fails_the_plot(ctx, plot, monkeypatch):
    """What cannot be checked up front (here the decode of the second cell fails) still fails the
    request with the reason: the plot stops there and saves no grid."""
    spy = ctx.spy

    def decode(*args, **kwargs):
        if len(spy.latents) == 1:
            raise MemoryError("out of memory")
        return spy(*args, **kwargs)

    monkeypatch.setattr(pipeline, "decode_rgba", decode)
    with pytest.raises(RuntimeError, match=r"^LayerDiffuse: X/Y/Z plot, \[LayerDiffuse\] Stop At = 0.5: the transparent "
                       r"decode failed \(MemoryError.*The plot was stopped; no grid is saved"):  # fmt: skip
        plot.run(positional(TRANSPARENT), x=("[LayerDiffuse] Stop At", "1, 0.5, 0.8"))
    assert len(ctx.gens) == 2  # the third cell did not run
    assert not [f for f in ctx.env.fake.images.saved if "xyz_grid" in f]


def test_xyz_with_a_checkpoint_axis_checks_the_family_per_cell(ctx, plot):
    """A plot that loads another checkpoint per cell is not refused for the model loaded now; a cell
    whose model does not fit is refused when it runs, and that fails the plot with the reason."""
    plot.module.axis_options.append(plot.module.AxisOption("Checkpoint name", str, lambda p, x, xs: None))
    with pytest.raises(RuntimeError, match=r"^LayerDiffuse: X/Y/Z plot, Checkpoint name = sd15.safetensors, "
                       r"\[LayerDiffuse\] Method = \(SDXL\).*needs an SDXL checkpoint.*The plot was stopped"):  # fmt: skip
        plot.run(positional(TRANSPARENT), x=("Checkpoint name", "sd15.safetensors"),
                 y=("[LayerDiffuse] Method", f"{TRANSPARENT}, {SDXL_ATTN}"))  # fmt: skip
    assert len(ctx.gens) == 1  # the first cell ran


def test_xyz_before_the_model_is_known_leaves_the_family_to_each_cell(ctx, plot, monkeypatch):
    """Forge2/Neo load the checkpoint in the first generation (hosts/forge.py: family() is then the
    selected file's, or None when unreadable): None is no reason to refuse the plot up front."""
    monkeypatch.setattr(ctx.env.host, "family", lambda p: None)
    with pytest.raises(RuntimeError, match=r"Weight = 3.*The plot was not started"):  # values still checked
        plot.run(positional(SDXL_ATTN), x=("[LayerDiffuse] Weight", "0.5, 3"))
    assert ctx.gens == []
    monkeypatch.setattr(sys.modules["lib_layerdiffuse.hosts.a1111"], "detect_family", lambda unet: "sd15")
    monkeypatch.setattr(ctx.env.host, "family", lambda p: None if not hasattr(p, "iteration") else "sd15")
    p, processed = plot.run(positional(TRANSPARENT), x=("[LayerDiffuse] Stop At", "0.5, 1"))
    assert len(ctx.gens) == 2  # not refused up front; both cells ran


@pytest.mark.parametrize("lone", [False, True])
def test_xyz_returns_the_transparent_cells_and_draws_them_on_the_checkerboard(ctx, plot, lone):
    from lib_layerdiffuse.rgba import checkerboard_preview

    p, processed = plot.run(positional(TRANSPARENT), x=("[LayerDiffuse] Stop At", "0.5, 1"), include_lone_images=lone)
    grid, cells = processed.images[0], processed.images[1:]
    assert grid.mode == "RGB" and [im.mode for im in cells] == ["RGBA", "RGBA"]
    assert all(getattr(im, TAG, None) is not None for im in cells)  # the API encodes them as PNG
    assert len(processed.infotexts) == len(processed.images)
    assert "layerdiffusion_ending_step: 0.5" in processed.infotexts[1]
    assert "layerdiffusion_ending_step: 1.0" in processed.infotexts[2]
    for i, cell in enumerate(cells):  # the grid shows each cell on the checkerboard
        want = to_uint8(checkerboard_preview(np.asarray(cell, dtype=np.float32) / 255.0))
        got = np.asarray(grid)[:, i * p.width : (i + 1) * p.width]
        assert np.array_equal(got, want)
    saved = [read(f)[0] for f in ctx.env.fake.images.saved if "xyz_grid" not in f and "-checkerboard" not in f]
    assert saved == ["RGBA", "RGBA"]  # the cells are saved as the host saves samples
    assert len([f for f in ctx.env.fake.images.saved if "xyz_grid" in f]) == 1


def test_xyz_axes_are_listed_once(xyz):
    ours = [label for label in xyz if label.startswith("[LayerDiffuse]")]
    assert ours == ["[LayerDiffuse] Method", "[LayerDiffuse] Weight", "[LayerDiffuse] Stop At"]
    assert xyz["[LayerDiffuse] Method"].choices() == M.LABELS
    assert xyz["[LayerDiffuse] Weight"].type is float and xyz["[LayerDiffuse] Stop At"].type is float


def test_xyz_cells_generate_with_their_values(ctx, xyz):
    seen = []
    base = fa.Txt2Img(ctx.model, ctx.outpath, batch_size=1)
    for weight, stop_at in ((0.5, 1.0), (1.5, 0.5)):
        p = copy.copy(base)  # as the plot makes each cell
        xyz["[LayerDiffuse] Weight"].apply(p, weight, [0.5, 1.5])
        xyz["[LayerDiffuse] Stop At"].apply(p, stop_at, [1.0, 0.5])
        processed = fa.process_images(p, ctx.env.mod.LayerDiffuseScript(), positional(TRANSPARENT))
        seen.append(processed.infotexts[0])
        assert "_layerdiffuse_xyz" not in vars(p)  # taken off p with the generation
    assert "layerdiffusion_weight: 0.5" in seen[0] and "layerdiffusion_ending_step: 1.0" in seen[0]
    assert "layerdiffusion_weight: 1.5" in seen[1] and "layerdiffusion_ending_step: 0.5" in seen[1]
    assert "_layerdiffuse_xyz" not in vars(base)  # cells do not share their values


def test_xyz_bad_value_is_refused(ctx, xyz):
    p = fa.Txt2Img(ctx.model, ctx.outpath, batch_size=1)
    xyz["[LayerDiffuse] Method"].apply(p, "Make It Transparent", [])
    with pytest.raises(RuntimeError, match=r"^LayerDiffuse: Unknown LayerDiffuse method"):
        fa.process_images(p, ctx.env.mod.LayerDiffuseScript(), positional(TRANSPARENT))
    assert ctx.env.fake.images.saved == []


def test_xyz_values_do_not_enable_a_disabled_script(ctx, xyz):
    p = fa.Txt2Img(ctx.model, ctx.outpath, batch_size=1)
    xyz["[LayerDiffuse] Method"].apply(p, TRANSPARENT, [])
    args = positional(TRANSPARENT)
    args[0] = False
    processed = fa.process_images(p, ctx.env.mod.LayerDiffuseScript(), args)
    assert processed.images[0].mode == "RGB" and "layerdiffusion" not in processed.infotexts[0]


def test_interrupt_before_the_first_step_says_so(ctx, monkeypatch):
    shown = []
    state = RecordingState(shown)
    state.interrupted = True  # Interrupt pressed as the job started: the sampler returns at once
    monkeypatch.setattr(ctx.env.fake.shared, "state", state)
    monkeypatch.setattr(fa.Sampler, "sample", lambda self, p, x, *a, **k: x)  # no UNet call
    p = fa.Txt2Img(ctx.model, ctx.outpath, batch_size=1)
    with pytest.raises(RuntimeError, match=r"^LayerDiffuse: the generation was interrupted"):
        fa.process_images(p, ctx.env.mod.LayerDiffuseScript(), positional(TRANSPARENT))
    assert ctx.env.fake.images.saved == []


# ---------------------------------------------------------------------------------------
# SDXL methods back to back; Stop At before the first step; Skip


SDXL_KEYS = [m.key for m in M.MODES if m.family == "sdxl"]


@pytest.fixture
def sdxl_files(ctx, monkeypatch):
    """Patch files of the six SDXL methods shaped for the tiny UNet (the family injected as SDXL),
    and the SDXL transparent decoder / encoder files."""
    monkeypatch.setattr(sys.modules["lib_layerdiffuse.hosts.a1111"], "detect_family", lambda unet: "sdxl")
    models = ctx.env.models
    for seed, name in ((40, "vae_transparent_decoder"), (41, "vae_transparent_encoder")):
        if not (models / f"{name}.safetensors").exists():
            save_file(make_state_dict(manifest_shapes(name), seed=seed, dtype=torch.float16),
                      str(models / f"{name}.safetensors"))  # fmt: skip
    linears = [n for n, m in ctx.unet.named_modules() if isinstance(m, torch.nn.Linear)]
    for i, key in enumerate(SDXL_KEYS):
        mode = M.resolve(key)
        g = torch.Generator().manual_seed(50 + i)
        state = {}
        for name in linears:
            w = ctx.unet.get_submodule(name).weight
            if mode.apply == "lora":
                state[f"diffusion_model.{name}.weight::lora::0"] = torch.randn(w.shape[0], 2, generator=g) * 0.05
                state[f"diffusion_model.{name}.weight::lora::1"] = torch.randn(2, w.shape[1], generator=g) * 0.05
            else:
                state[f"diffusion_model.{name}.weight::diff::0"] = torch.randn(*w.shape, generator=g) * 0.01
        if mode.apply == "diff":
            conv = ctx.unet.input_blocks[0][0].weight
            state["diffusion_model.input_blocks.0.0.weight::diff::0"] = (
                torch.randn(conv.shape[0], 4 + mode.concat_channels, 3, 3, generator=g) * 0.01
            )
        save_file(state, str(models / f"{mode.unet_file}.safetensors"))


def sdxl_args(key):
    mode = M.resolve(key)
    images = {k: rgba_image(seed=3) for k in mode.inputs}
    return positional(mode.label, **images)


def test_every_ordered_pair_of_sdxl_methods_back_to_back(ctx, sdxl_files):
    before = unet_state(ctx.unet)
    for first in SDXL_KEYS:
        for second in SDXL_KEYS:
            if first == second:
                continue
            for key in (first, second):
                _, processed = generate(ctx, sdxl_args(key))
                want = "RGBA" if M.resolve(key).decode else "RGB"
                assert processed.images[0].mode == want, (first, second, key)
                assert_unet_as_before(ctx.unet, before)


def test_stop_at_that_ends_before_the_first_step_is_refused(ctx):
    """txt2img's first step is at the schedule's top sigma; a Stop At under one of the model's 1000
    timesteps (0.001) would end LayerDiffuse before any step completes (or after one, by rounding)."""
    with pytest.raises(RuntimeError, match=r"^LayerDiffuse: .*stop_at.*0\.001"):
        generate(ctx, positional(TRANSPARENT, stop_at=1e-9))
    assert ctx.env.fake.images.saved == []
    _, processed = generate(ctx, positional(TRANSPARENT, stop_at=0.001))  # the smallest value that runs
    assert processed.images[0].mode == "RGBA"


def test_skip_before_the_first_step_names_the_skip(ctx, monkeypatch):
    state = RecordingState([])
    state.skipped = True  # Skip pressed as the job started: the sampler returns at once
    monkeypatch.setattr(ctx.env.fake.shared, "state", state)
    monkeypatch.setattr(fa.Sampler, "sample", lambda self, p, x, *a, **k: x)  # no UNet call
    p = fa.Txt2Img(ctx.model, ctx.outpath, batch_size=1)
    with pytest.raises(RuntimeError, match=r"^LayerDiffuse: .*skipped") as e:
        fa.process_images(p, ctx.env.mod.LayerDiffuseScript(), positional(TRANSPARENT))
    assert "another extension" not in str(e.value)
    assert ctx.env.fake.images.saved == []


# ---------------------------------------------------------------------------------------
# layered PSD files of the multi-layer methods (lib_layerdiffuse/hosts/layered.py): one
# ``-layers.psd`` per group beside the group's first saved image, read back with psd-tools


SD15_CASES = {  # label -> (batch size, layer inputs)
    FG2BG: (2, ("fg",)),
    BG2FG: (2, ("bg",)),
    JOINT: (3, ()),
}
SDXL_LAYER_KEYS = [m.key for m in M.MODES if m.family == "sdxl" and m.inputs]
LAYER_OF_FRAME = {"foreground": "Foreground", "background": "Background", "blended": "Blended"}
LAYER_OF_INPUT = {"fg": "Foreground", "bg": "Background", "blend": "Blended"}


def mains(ctx):
    return [f for f in saved_files(ctx) if "-checkerboard" not in f.name]


def psd_files(ctx):
    root = Path(ctx.env.root) / ctx.outpath
    return sorted(root.glob("*.psd")) if root.is_dir() else []


def pixels(path):
    with Image.open(path) as im:
        return np.array(im)


def rounded(x):
    return np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8)


def check_group_psd(path, mode, frames: list[Path], inputs: dict, size=(64, 64)):
    """The PSD of one group: names, order, visibility, offsets; generated layers equal to their
    PNGs (alpha included), inputs as the method used them, merged image = the visible composite."""
    doc = psd_tools.PSDImage.open(path)
    names = {LAYER_OF_FRAME[f] for f in mode.frames} | {LAYER_OF_INPUT[k] for k in inputs}
    expected = [n for n in psd.ORDER if n in names]
    assert [layer.name for layer in doc] == expected
    assert [layer.visible for layer in doc] == [n != "Blended" for n in expected]
    assert all(layer.bbox == (0, 0, *size) for layer in doc)
    by_name = {layer.name: np.asarray(layer.topil().convert("RGBA")) for layer in doc}
    for frame, png in zip(mode.frames, frames, strict=True):
        saved = pixels(png)
        layer = by_name[LAYER_OF_FRAME[frame]]
        if saved.shape[-1] == 4:
            assert np.array_equal(layer, saved), frame  # the Foreground: colour and alpha as in the PNG
        else:
            assert np.array_equal(layer[..., :3], saved) and (layer[..., 3] == 255).all(), frame
    for which, image in inputs.items():
        layer = by_name[LAYER_OF_INPUT[which]]
        if which == "fg":
            want = rounded(C.resize_image(C.as_rgba_float(image), "Crop and Resize", size[1], size[0]))
            assert np.array_equal(layer, want)
        else:
            want = rounded(C.prepare_layer_image(image, "Crop and Resize", size[1], size[0]))
            assert np.array_equal(layer[..., :3], want) and (layer[..., 3] == 255).all()
    visible = [psd.Layer(n, by_name[n]) for n in expected if n != "Blended"]
    composite = psd.composite(visible)
    merged = np.asarray(doc.topil().convert("RGBA"), dtype=np.float64) / 255.0
    premult = np.concatenate([merged[..., :3] * merged[..., 3:], merged[..., 3:]], axis=-1)
    want = np.concatenate([composite[..., :3] * composite[..., 3:], composite[..., 3:]], axis=-1)
    assert np.abs(premult - want).max() <= 1 / 255 + 1e-6
    text = psd.read_description(path)
    assert text is not None and "layerdiffusion_method: " in text
    assert text == Image.open(frames[0]).info.get("parameters")  # the group's first image's infotext


@pytest.mark.parametrize("label", list(SD15_CASES))
@pytest.mark.parametrize("n_iter", [1, 2])
def test_sd15_methods_write_one_psd_per_group(ctx, label, n_iter):
    batch, inputs = SD15_CASES[label]
    mode = M.resolve(label)
    images = {k: rgba_image(seed=5 + i, size=80) for i, k in enumerate(inputs)}
    p, processed = generate(ctx, positional(label, **images), batch_size=2 * batch, n_iter=n_iter)
    assert p.scripts.errors == []
    files, psds = mains(ctx), psd_files(ctx)
    groups = [files[i : i + batch] for i in range(0, len(files), batch)]
    assert len(groups) == 2 * n_iter
    assert [f.name for f in psds] == sorted(g[0].with_suffix("").name + "-layers.psd" for g in groups)
    for group in groups:
        path = group[0].with_name(group[0].with_suffix("").name + "-layers.psd")
        check_group_psd(path, mode, group, images)
        assert f"LayerDiffuse: layered PSD {path}" in processed.comments
    assert not [f for f in os.listdir(psds[0].parent) if f.endswith(".tmp")]


@pytest.mark.parametrize("key", SDXL_LAYER_KEYS)
def test_sdxl_layer_methods_write_the_layers_they_have(ctx, sdxl_files, key):
    mode = M.resolve(key)
    args = sdxl_args(key)
    images = {k: args[4 + ("fg", "bg", "blend").index(k)] for k in mode.inputs}
    p, processed = generate(ctx, args, batch_size=2)
    assert p.scripts.errors == []
    files = mains(ctx)
    assert len(files) == 2 and len(psd_files(ctx)) == 2
    for f in files:
        check_group_psd(f.with_name(f.with_suffix("").name + "-layers.psd"), mode, [f], images)


def test_single_image_methods_write_no_psd(ctx):
    generate(ctx, positional(TRANSPARENT), batch_size=2)
    assert mains(ctx) and psd_files(ctx) == []


def test_the_psd_lies_beside_a_file_saved_relative_to_the_current_directory(ctx, monkeypatch, tmp_path):
    """The hosts write a relative output folder under the current directory (not the WebUI
    folder): the PSD and the alpha check follow the file where it was written."""
    monkeypatch.chdir(tmp_path)
    images = {"fg": rgba_image(seed=5, size=80)}
    p, processed = generate(ctx, positional(FG2BG, **images), batch_size=2)
    files = mains(ctx)
    assert len(files) == 2 and all(f.parent == tmp_path / ctx.outpath for f in files)
    path = files[0].with_name(files[0].stem + "-layers.psd")
    check_group_psd(path, M.resolve(FG2BG), files, images)
    assert not (Path(ctx.env.root) / ctx.outpath).exists()


@pytest.mark.parametrize("neo", [False, True], ids=["a1111", "neo"])
def test_the_psd_is_named_after_the_numbered_file_and_overwrites_none(ctx, monkeypatch, neo):
    """ "Add number suffix when the file exists": the host writes ``<name>-1.png`` but hands
    ``<name>.png`` over (Neo names the real file in ``already_saved_as``, A1111 nowhere); the PSD
    is named after the file written, and an existing PSD is never replaced."""
    opts, images_module = ctx.env.fake.shared.opts, ctx.env.fake.images
    monkeypatch.setattr(opts, "save_images_replace_action", "Add number suffix when the file exists")
    monkeypatch.setattr(images_module, "neo_names", neo)
    mode, images = M.resolve(FG2BG), {"fg": rgba_image(seed=5, size=80)}
    counter = images_module.counter
    generate(ctx, positional(FG2BG, **images), batch_size=2)
    first_files, first_psds = mains(ctx), psd_files(ctx)
    assert len(first_psds) == 1
    kept = first_psds[0].read_bytes()
    monkeypatch.setattr(images_module, "counter", counter)  # the same names again: the files get "-1"
    images_module.saved.clear()
    other = {"fg": rgba_image(seed=6, size=80)}
    p, processed = generate(ctx, positional(FG2BG, **other), batch_size=2)
    files = mains(ctx)
    assert [f.name for f in files] == [f.stem + "-1.png" for f in first_files]
    path = files[0].with_name(files[0].stem + "-layers.psd")
    check_group_psd(path, mode, files, other)
    assert first_psds[0].read_bytes() == kept
    # a PSD already at the target (another run's) is kept; ours gets the next free number
    stray = first_files[0].with_name(first_files[0].stem + "-2-layers.psd")
    stray.write_bytes(b"another run's PSD")
    monkeypatch.setattr(images_module, "counter", counter)
    images_module.saved.clear()
    p, processed = generate(ctx, positional(FG2BG, **images), batch_size=2)
    files = mains(ctx)
    assert [f.name for f in files] == [f.stem + "-2.png" for f in first_files]
    assert stray.read_bytes() == b"another run's PSD" and first_psds[0].read_bytes() == kept
    path = files[0].with_name(files[0].stem + "-layers-1.psd")
    check_group_psd(path, mode, files, images)
    assert f"LayerDiffuse: layered PSD {path}" in processed.comments


def test_setting_off_writes_no_psd(ctx, monkeypatch):
    monkeypatch.setattr(ctx.env.fake.shared.opts, "layerdiffuse_save_psd", False, raising=False)
    _, processed = generate(ctx, positional(JOINT), batch_size=3)
    assert len(mains(ctx)) == 3 and psd_files(ctx) == []
    assert "layered PSD" not in processed.comments


def test_a_failed_write_leaves_no_partial_psd_and_keeps_the_pngs(ctx, monkeypatch):
    real = Path.write_bytes

    def broken(self, data):
        real(self, data[:4])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", broken)
    p, processed = generate(ctx, positional(JOINT), batch_size=3)
    assert p.scripts.errors == [] and len(mains(ctx)) == 3
    folder = mains(ctx)[0].parent
    assert not [f for f in os.listdir(folder) if f.endswith((".psd", ".tmp"))]
    assert "could not be written" in processed.comments and "No space left" in processed.comments


def test_api_request_without_saving_gets_the_psd_in_info(ctx, monkeypatch, tmp_path):
    monkeypatch.setattr(ctx.env.fake.shared.opts, "temp_dir", str(tmp_path / "tmp"), raising=False)
    fg = rgba_image(seed=9, size=64)

    class ApiTxt2Img(fa.Txt2Img):
        is_api = True

    p = ApiTxt2Img(ctx.model, ctx.outpath, batch_size=2, do_not_save_samples=True)
    script = ctx.env.mod.LayerDiffuseScript()
    script.is_img2img = False
    processed = fa.process_images(p, script, positional(FG2BG, fg=fg))
    assert ctx.env.fake.images.saved == []  # the API's default: nothing saved
    entries = json.loads(processed.js())["layerdiffuse_psd"]
    assert len(entries) == 1 and entries[0]["name"].endswith("-layers.psd")
    doc = psd_tools.PSDImage.open(io.BytesIO(base64.b64decode(entries[0]["data"])))
    assert [(layer.name, layer.visible) for layer in doc] == [
        ("Background", True),
        ("Foreground", True),
        ("Blended", False),
    ]
    assert np.array_equal(np.asarray(doc[0].topil().convert("RGB")), np.asarray(processed.images[0]))
    assert entries[0]["path"] is None and not (tmp_path / "tmp").exists()  # rendered in memory: nothing left
    assert ctx.env.mod.layered.last("txt2img") == []  # API requests do not fill the UI's box


def test_ui_without_saving_offers_the_psd_and_deletes_it_when_replaced(ctx, monkeypatch, tmp_path):
    monkeypatch.setattr(ctx.env.fake.shared.opts, "temp_dir", str(tmp_path / "tmp"), raising=False)
    _, first = generate(ctx, positional(JOINT), batch_size=3, do_not_save_samples=True)
    offered = ctx.env.mod.layered.last("txt2img")
    assert len(offered) == 1 and Path(offered[0]).parent == tmp_path / "tmp" and Path(offered[0]).is_file()
    _, second = generate(ctx, positional(JOINT), batch_size=3, do_not_save_samples=True)
    now = ctx.env.mod.layered.last("txt2img")
    assert len(now) == 1 and now != offered and not Path(offered[0]).exists()  # the old unsaved PSD is gone
    generate(ctx, positional(TRANSPARENT), batch_size=1)  # a generation without layers
    assert ctx.env.mod.layered.last("txt2img") == [] and not Path(now[0]).exists()


def test_xyz_cells_do_not_inherit_each_others_infotext_keys(ctx):
    """An X/Y/Z cell is a shallow copy of the plot's p, sharing its extra_generation_params."""
    p = fa.Txt2Img(ctx.model, ctx.outpath)
    p.extra_generation_params.update({"layerdiffusion_alpha": "opaque", "layerdiffusion_tiling": "always", "Other": 1})
    script = ctx.env.mod.LayerDiffuseScript()
    script.is_img2img = False
    processed = fa.process_images(p, script, positional(TRANSPARENT))
    text = processed.infotexts[0]
    assert "layerdiffusion_alpha" not in text and "layerdiffusion_tiling" not in text and "Other: 1" in text


def test_img2img_batch_tab_runs_process_once_per_file_on_one_p(ctx):
    """A1111's and Neo's img2img Batch tab: one p, process_images per file, p.close once at the end."""
    p = fa.Img2Img(ctx.model, ctx.outpath, init_images=[rgba_image(3)])
    script = ctx.env.mod.LayerDiffuseScript()
    script.is_img2img = True
    p.scripts = fa.Runner(script, positional(TRANSPARENT))
    p.script_args = positional(TRANSPARENT)
    modes = []
    try:
        for seed in (3, 4, 5):
            p.init_images = [rgba_image(seed)]
            with torch.no_grad():
                processed = fa._process_images_inner(p)
            assert p.scripts.errors == []
            modes.append(processed.images[0].mode)
    finally:
        p.close()
    assert modes == ["RGBA"] * 3
    assert "_layerdiffuse" not in p.__dict__ and "sample" not in p.__dict__ and "close" not in p.__dict__


def test_without_psd_tools_the_pngs_are_saved_and_the_reason_said_once(ctx, monkeypatch):
    from lib_layerdiffuse.hosts import layered

    monkeypatch.setattr(psd, "available", lambda: "the psd-tools package could not be imported (test)")
    monkeypatch.setattr(layered, "_said_unavailable", False)
    _, first = generate(ctx, positional(JOINT), batch_size=3)
    _, second = generate(ctx, positional(JOINT), batch_size=3)
    assert len(mains(ctx)) == 6 and psd_files(ctx) == []
    assert "no layered PSD file: the psd-tools package could not be imported" in first.comments
    assert "psd-tools" not in second.comments


@pytest.mark.parametrize("gallery_has_change", [True, False])
def test_the_tabs_output_refreshes_the_accordions_psd_box(env, monkeypatch, gallery_has_change):
    """Gradio 4 (Forge2, Neo): the gallery's change event; A1111's gradio 3.41 Gallery has none
    (seen on a real A1111: "'Gallery' object has no attribute 'change'"): the infotext's."""
    from lib_layerdiffuse.hosts import layered

    monkeypatch.setattr(layered, "_boxes", {})
    monkeypatch.setattr(layered, "_triggers", {})
    events = []

    class Output:
        def __init__(self, name):
            self.name = name

    gallery, info = Output("gallery"), Output("info")
    if gallery_has_change:
        gallery.change = lambda fn, inputs=None, outputs=None, **kw: events.append(("gallery", fn, outputs))
    info.change = lambda fn, inputs=None, outputs=None, **kw: events.append(("info", fn, outputs))
    layered.add_box("txt2img")
    layered.after_component(gallery, "txt2img_gallery")  # the hosts build the gallery first
    layered.after_component(info, "html_info_txt2img")
    ((which, fn, outputs),) = events
    assert which == ("gallery" if gallery_has_change else "info")
    assert outputs == [layered._boxes["txt2img"]]
    layered.remember("txt2img", [])
    assert fn()["visible"] is False


# ---------------------------------------------------------------------------------------
# the checkpoints people run today (#23): degenerate alpha, v-prediction, zero terminal SNR, the hint


def forced_alpha(values):
    """A decode whose alpha is ``values[k]`` everywhere for its k-th image (RGB from the pixels)."""
    calls = []

    def decode(decoder, pixel, latent, *args, **kwargs):
        value = values[len(calls) % len(values)]
        calls.append(value)
        return torch.cat([torch.full_like(pixel[:, :1].float(), value), pixel.float()], dim=1)

    return decode


@pytest.mark.parametrize("value,word,what", [(1.0, "opaque", "opaque everywhere"),
                                             (0.0, "empty", "transparent everywhere")])  # fmt: skip
def test_degenerate_alpha_is_named_in_the_infotext_and_warned_once(ctx, monkeypatch, value, word, what):
    monkeypatch.setattr(pipeline, "decode_rgba", forced_alpha([value]))
    p, processed = generate(ctx, positional(TRANSPARENT), batch_size=2, n_iter=2)
    assert p.scripts.errors == []  # the generation succeeds
    mains = [f for f in saved_files(ctx) if "-checkerboard" not in f.name]
    assert len(mains) == 4
    for index, path in enumerate(mains):
        mode, arr, text = read(path)
        assert mode == "RGBA" and parse_infotext(text)[1]["layerdiffusion_alpha"] == word
        assert parse_infotext(processed.infotexts[index])[1]["layerdiffusion_alpha"] == word
    assert all(f"layerdiffusion_alpha: {word}" in t for t in json.loads(processed.js())["infotexts"])  # the API's
    warnings = [line for line in processed.comments.splitlines() if line.startswith("LayerDiffuse:")]
    assert len(warnings) == 1
    assert f"{what} in images 1, 2, 3, 4" in warnings[0]
    assert json.loads(processed.js())["layerdiffuse_warnings"] == warnings  # API clients see it too
    assert "simple grey background" in warnings[0] and "lower Weight" in warnings[0]
    assert "Adapt LayerDiffuse to your checkpoint" in warnings[0]


def test_only_the_degenerate_image_is_named(ctx, monkeypatch):
    """Per image, across batches: the infotext callable maps the batch loop's index to the image."""
    monkeypatch.setattr(pipeline, "decode_rgba", forced_alpha([0.5, 0.5, 1.0, 0.5]))
    p, processed = generate(ctx, positional(TRANSPARENT), batch_size=2, n_iter=2)
    keys = [parse_infotext(t)[1].get("layerdiffusion_alpha") for t in processed.infotexts[:4]]
    assert keys == [None, None, "opaque", None]
    previews = [parse_infotext(t)[1].get("layerdiffusion_alpha") for t in processed.infotexts[4:]]
    assert previews == keys  # the previews' infotexts (Processed.infotext, global index) agree
    assert "opaque everywhere in image 3 " in processed.comments


def test_only_the_degenerate_image_is_named_with_neo_prompt_comments(ctx, monkeypatch):
    """Neo's "save prompt comments" hands the batch loop's infotext a new slice of the job's
    prompts (not ``p.prompts``) with the index in the batch; the note still names the right image."""
    monkeypatch.setattr(ctx.env.fake.shared.opts, "save_prompt_comments", True)
    monkeypatch.setattr(pipeline, "decode_rgba", forced_alpha([0.5, 0.5, 1.0, 0.5]))
    p, processed = generate(ctx, positional(TRANSPARENT), batch_size=2, n_iter=2)
    keys = [parse_infotext(t)[1].get("layerdiffusion_alpha") for t in processed.infotexts[:4]]
    assert keys == [None, None, "opaque", None]
    saved = [parse_infotext(read(f)[2])[1].get("layerdiffusion_alpha") for f in mains(ctx)]
    assert saved == keys


def test_a_normal_alpha_writes_no_key_and_no_warning(ctx):
    p, processed = generate(ctx, positional(TRANSPARENT), batch_size=2)
    assert p.scripts.errors == [] and len(ctx.spy.latents) == 2
    assert not any("layerdiffusion_alpha" in t for t in processed.infotexts)
    assert "LayerDiffuse:" not in processed.comments


@pytest.mark.parametrize("parameterization,written", [("v", "v"), ("eps", None)])
def test_the_prediction_type_reaches_the_infotext(ctx, monkeypatch, parameterization, written):
    monkeypatch.setattr(ctx.model, "parameterization", parameterization, raising=False)
    for method, batch in ((TRANSPARENT, 1), (FG2BG, 2)):  # a decoding method and one that decodes nothing
        p, processed = generate(ctx, positional(method, fg=b64_png(rgba_image()) if method == FG2BG else None),
                                batch_size=batch)  # fmt: skip
        assert p.scripts.errors == []
        assert [parse_infotext(t)[1].get("layerdiffusion_prediction") for t in processed.infotexts[:batch]] == [
            written
        ] * batch


def test_zero_terminal_snr_schedule_keeps_layerdiffuse_on_from_the_first_step(ctx, monkeypatch):
    """A schedule ending at alphas_cumprod 0 (sigma inf at timestep 999, the first txt2img step) must
    neither stop LayerDiffuse at that step nor refuse the image."""
    from lib_layerdiffuse.schedules import rescale_zero_terminal_snr

    monkeypatch.setattr(ctx.model, "alphas_cumprod", rescale_zero_terminal_snr(ctx.model.alphas_cumprod, 0.0))
    p, processed = generate(ctx, positional(TRANSPARENT, stop_at=0.5), batch_size=1)
    assert p.scripts.errors == [] and len(ctx.spy.latents) == 1
    gen = ctx.gens[-1]
    assert gen.zero_snr and gen.total_calls == 1  # 2 steps at t 999 and 0: on at the first, off at the last


def test_background_hint_once_in_the_decoded_prompts_and_pastes_back(ctx, opts):
    opts(background_hint=True)
    p, processed = generate(ctx, positional(TRANSPARENT), batch_size=1, prompt="a glass bottle")
    assert p.scripts.errors == []
    assert p.all_prompts == ["a glass bottle, simple grey background"]
    prompt, params = parse_infotext(processed.infotexts[0])
    assert prompt == "a glass bottle, simple grey background"
    assert params["layerdiffusion_background_hint"] == "True"
    info = ctx.env.fake.shared.opts.data_labels["layerdiffuse_background_hint"]
    assert info.infotext == "layerdiffusion_background_hint"
    assert type(info.default)(params["layerdiffusion_background_hint"]) is True  # the host's cast_value on paste
    again, processed = generate(ctx, positional(TRANSPARENT), batch_size=1, prompt=prompt)  # pasted: not twice
    assert again.all_prompts == p.all_prompts
    opts(background_hint=False)
    off, processed = generate(ctx, positional(TRANSPARENT), batch_size=1, prompt="a glass bottle")
    assert off.all_prompts == ["a glass bottle"] and "layerdiffusion_background_hint" not in processed.infotexts[0]


def test_background_hint_only_on_the_foreground_frame_and_the_hires_prompts(ctx, opts):
    opts(background_hint=True)
    first, processed = generate(ctx, positional(JOINT, prompts=("a red glass", "a wooden table", "")),
                                batch_size=3, prompt="a glass bottle")  # fmt: skip
    hint = ", simple grey background"
    assert first.all_prompts == ["a red glass, a glass bottle" + hint, "a wooden table, a glass bottle",
                                 "a glass bottle"]  # fmt: skip
    for frame in range(3):  # each frame's pasted prompt gives every frame its prompt again
        prompt, _ = parse_infotext(processed.infotexts[frame])
        again, _ = generate(ctx, positional(JOINT, prompts=("a red glass", "a wooden table", "")), batch_size=3,
                            prompt=prompt)  # fmt: skip
        assert again.all_prompts == first.all_prompts
    p, _ = generate(ctx, positional(TRANSPARENT), batch_size=1, prompt="a cat", enable_hr=True)
    assert p.all_prompts == p.all_hr_prompts == ["a cat" + hint]
    p, _ = generate(ctx, positional(TRANSPARENT), batch_size=1, prompt="a cat", enable_hr=True, hr_prompt="a dog")
    assert p.all_hr_prompts == ["a dog" + hint]
    p, processed = generate(ctx, positional(FG2BG, fg=b64_png(rgba_image())), batch_size=2, prompt="a cat")
    assert p.all_prompts == ["a cat", "a cat"]  # nothing decoded: no hint, no key
    assert "layerdiffusion_background_hint" not in processed.infotexts[0]
