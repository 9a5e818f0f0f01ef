"""'(Qwen-Image-Layered) Decompose Into Layers' end to end: the script and the Forge adapter, standing in for Neo.

The request runs as on the hosts (tests/fake_a1111.py's ``process_images`` with an img2img ``p``: the script's
``process``, the host's ``p.init``, ``p.sample``, the saving loop, ``postprocess``), with
``lib_layerdiffuse.hosts.forge.ForgeHost`` as the script's host, its ``decomposes`` on as on Forge Neo. Only what
Neo provides is stood in for:

- ``p.sd_model``: an engine of class ``QwenImage`` whose ``sd_checkpoint_info.filename`` is a .safetensors file of
  the tiny transformer of tests/data/qwen_transformer_refs.safetensors, with the Layered
  ``time_text_embed.addition_t_embedding.weight`` (or without it: plain Qwen-Image);
  ``forge_objects.unet.model.diffusion_model`` is tests/qwen_standin.py's transformer with those weights loaded
  less the addition embedding (Neo drops it at load), ``computation_dtype`` float32;
- ``backend.sampling.sampling_function.sampling_prepare`` / ``sampling_cleanup`` (recorded) and
  ``backend.memory_management.get_torch_device`` (the CPU);
- the text conditioning in Neo's shapes: the prompt's ``MulticondLearnedConditioning``
  (``.batch[image][AND part].schedules[step].cond``, ``[T, 48]``) and the negative prompt's
  ``[image][step].cond``.

The RGBA VAE is tests/data/qwen_vae_refs.safetensors' tiny one, written where ``weight_path`` looks (no download).
A 64x64 input becomes 640x640 (its bucket): the generations here are 1-2 steps of 2-3 layers.
"""

from __future__ import annotations

import functools
import gc
import re
import sys
import types
import weakref
import zlib
from pathlib import Path
from types import SimpleNamespace

import fake_a1111 as fa
import numpy as np
import psd_tools
import pytest
import torch
from PIL import Image
from qwen_standin import QwenImageTransformer2DModel
from safetensors.torch import load_file, save_file

from lib_layerdiffuse import decompose as D
from lib_layerdiffuse import hosts, pipeline, psd
from lib_layerdiffuse import qwen_layered as ql
from lib_layerdiffuse.hosts import forge
from lib_layerdiffuse.qwen_vae import load_vae_file, read_config
from lib_layerdiffuse.settings import ARG_ORDER
from lib_layerdiffuse.weights import FILES, QWEN_VAE_FILE, read_header

DATA = Path(__file__).parent / "data"
SCRIPT = "layerdiffuse_qwen_host_under_test"
LABEL = "(Qwen-Image-Layered) Decompose Into Layers"
SD15 = "(SD1.5) Only Generate Transparent Image (Attention Injection)"
SDXL = "(SDXL) Only Generate Transparent Image (Attention Injection)"
TINY = dict(
    num_layers=2, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=48, axes_dims_rope=(8, 12, 12)
)
TEXT_TOKENS = 6
COMFY = "model.diffusion_model."
VAE_NAME = FILES[QWEN_VAE_FILE].filename


# -- files ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster on a shared 2-core machine
    root = tmp_path_factory.mktemp("neo")
    refs = load_file(str(DATA / "qwen_transformer_refs.safetensors"))
    weights = {k[len("weight.") :]: v for k, v in refs.items() if k.startswith("weight.")}
    assert ql.ADDITION_KEY in weights
    files = SimpleNamespace(
        layered=root / "qwen_image_layered_tiny.safetensors",
        plain=root / "qwen_image_tiny.safetensors",
        comfy=root / "qwen_image_layered_comfy.safetensors",
        comfy_plain=root / "qwen_image_comfy.safetensors",
        vae=root / "vae_diffusers.safetensors",
        vae_wan=root / "vae_wan.safetensors",
        vae3=root / "vae_3ch.safetensors",
    )
    save_file(weights, str(files.layered))
    plain = {k: v for k, v in weights.items() if k != ql.ADDITION_KEY}
    save_file(plain, str(files.plain))
    save_file({COMFY + k: v for k, v in weights.items()}, str(files.comfy))
    save_file({COMFY + k: v for k, v in plain.items()}, str(files.comfy_plain))
    vw = load_file(str(DATA / "qwen_vae_refs.safetensors"))
    vae = {k[len("weight.") :]: v.contiguous() for k, v in vw.items() if k.startswith("weight.")}
    save_file(vae, str(files.vae))
    save_file(three_channel(vae), str(files.vae3))
    save_file(wan_layout(vae), str(files.vae_wan))
    try:
        with fa.script_under(root / "unused", root, SCRIPT) as (fake, mod):
            fake.script_callbacks.ui_settings_callback()
            yield SimpleNamespace(fake=fake, mod=mod, a1111=mod.host, root=root, files=files, weights=weights)
    finally:
        torch.set_num_threads(threads)


def three_channel(state: dict) -> dict:
    """The same VAE with 3 image channels (plain Qwen-Image / Wan 2.1): RGB in, RGB out."""
    out = dict(state)
    for key in ("encoder.conv_in.weight",):
        out[key] = state[key][:, :3].contiguous()
    for key in ("decoder.conv_out.weight", "decoder.conv_out.bias"):
        out[key] = state[key][:3].contiguous()
    return out


def wan_layout(state: dict) -> dict:
    """The diffusers-layout VAE under its Wan-original (Comfy / Neo) names."""
    blocks = read_config(state).num_res_blocks
    from lib_layerdiffuse.qwen_vae import diffusers_to_wan_key

    return {diffusers_to_wan_key(k, blocks): v for k, v in state.items()}


# -- Neo's objects ------------------------------------------------------------------------------------


def transformer(env) -> torch.nn.Module:
    """Neo's Qwen-Image transformer as it loads the checkpoint: the addition embedding is dropped."""
    weights = {k: v.float() for k, v in env.weights.items() if k != ql.ADDITION_KEY}
    model = QwenImageTransformer2DModel(**TINY).eval().requires_grad_(False)
    model.load_state_dict(weights, strict=True)
    return model


def text_states(text: str) -> torch.Tensor:
    """The text encoder's states of a prompt: deterministic per text, ``[T, 48]``."""
    g = torch.Generator().manual_seed(zlib.crc32(text.encode()))
    return torch.randn(TEXT_TOKENS, TINY["joint_attention_dim"], generator=g)


def multicond(prompts, steps):
    """Neo's ``MulticondLearnedConditioning``: ``.batch[image]`` lists the AND parts, each with its schedules."""
    batch = []
    for prompt in prompts:
        parts = [part.strip() for part in prompt.split(" AND ")]
        batch.append(
            [
                SimpleNamespace(weight=1.0, schedules=[SimpleNamespace(end_at_step=steps, cond=text_states(part))])
                for part in parts
            ]
        )
    return SimpleNamespace(batch=batch, shape=(len(prompts),))


class QwenImage:
    """Forge Neo's engine (``backend.diffusion_engine.qwen.QwenImage``) as far as the adapter and the host read it.

    ``get_learned_conditioning``: tests/fake_a1111.py's driver asks for the prompts' conditioning, then the
    negative prompts' (A1111's and Neo's order); Neo builds the first as a ``MulticondLearnedConditioning`` and
    the second as lists of schedules. ``negative`` replaces the negative conditioning (an invalid one: never read)."""

    def __init__(self, checkpoint, model, negative=None):
        self.sd_checkpoint_info = SimpleNamespace(filename=str(checkpoint))
        unet = SimpleNamespace(model=SimpleNamespace(diffusion_model=model, computation_dtype=torch.float32))
        self.forge_objects = SimpleNamespace(unet=unet, vae=None)
        self.first_stage_model = fa.FakeVAE()  # the host's own img2img encode (its result is not used)
        self.scale_factor = 0.18215
        self.negative = negative
        self.calls = 0
        self.steps = 1

    def get_learned_conditioning(self, prompts):
        self.calls += 1
        if self.calls % 2:
            return multicond(prompts, self.steps)
        if self.negative is not None:
            return self.negative
        return [[SimpleNamespace(end_at_step=self.steps, cond=text_states(text))] for text in prompts]


class NeoImg2Img(fa.Img2Img):
    """img2img on Neo: the host's sampler never runs for this method."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sampler_outputs = [None]  # the fake driver keeps the last sampler output; there is none here
        self.init_sizes = []

    def init(self, all_prompts, all_seeds, all_subseeds):
        self.init_sizes.append((self.width, self.height))
        super().init(all_prompts, all_seeds, all_subseeds)


class NeoTxt2Img(fa.Txt2Img):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sampler_outputs = [None]


class NeoHost(forge.ForgeHost):
    """The Forge adapter as it is on Forge Neo (tests run where ``forge.NEO`` is False)."""

    name = "Forge Neo"
    decomposes = True


class Forge2Host(forge.ForgeHost):
    name = "Forge2"
    decomposes = False


@pytest.fixture
def backend(monkeypatch):
    """Neo's ``backend.sampling.sampling_function`` and ``backend.memory_management``; records the calls."""
    calls = []
    names = ("backend", "backend.sampling", "backend.sampling.sampling_function", "backend.memory_management")
    mods = {n: types.ModuleType(n) for n in names}
    mods["backend.sampling.sampling_function"].sampling_prepare = lambda unet, x: calls.append(("prepare", unet, x))
    mods["backend.sampling.sampling_function"].sampling_cleanup = lambda unet: calls.append(("cleanup", unet))
    mods["backend.memory_management"].get_torch_device = lambda: torch.device("cpu")
    mods["backend.memory_management"].free_memory = lambda required, device, keep_loaded=(): calls.append(
        ("free", required, device)
    )
    mods["backend"].sampling, mods["backend"].memory_management = mods["backend.sampling"], mods[names[3]]
    mods["backend.sampling"].sampling_function = mods["backend.sampling.sampling_function"]
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


@pytest.fixture
def ctx(env, backend, monkeypatch, tmp_path, request):
    """Per test: the Neo host as the script's host, the RGBA VAE in a fresh models folder, options reset."""
    from lib_layerdiffuse.options import OPTIONS

    opts = env.fake.shared.opts
    for option in OPTIONS:
        monkeypatch.setattr(opts, option.key, option.default, raising=False)
    models = tmp_path / "layer_model"
    models.mkdir()
    (models / VAE_NAME).write_bytes(env.files.vae.read_bytes())
    monkeypatch.setattr(env.fake.shared.cmd_opts, "layerdiffuse_models_dir", str(models))
    monkeypatch.setattr(env.fake.shared, "state", SimpleNamespace(textinfo=None, interrupted=False, skipped=False,
                                                                  stopping_generation=False))  # fmt: skip
    monkeypatch.setattr(env.fake.images, "saved", [])
    monkeypatch.setattr(env.fake.modelloader, "calls", [])
    monkeypatch.setattr(forge, "_family", forge.family_neo)
    host = NeoHost()
    monkeypatch.setattr(env.mod, "host", host)
    monkeypatch.chdir(tmp_path)
    pipeline.release_models()
    yield SimpleNamespace(env=env, host=host, models=models, backend=backend, out="outputs", tmp=tmp_path,
                          opts=opts)  # fmt: skip
    pipeline.release_models()


def args(layers=3, resolution=640, true_cfg=4.0, normalize=True, method=LABEL):
    """The script's 16 positional arguments (the official twelve, then ours)."""
    values = [True, method, 1.0, 1.0, None, None, None, "Crop and Resize", False, "", "", "",
              layers, resolution, true_cfg, normalize]  # fmt: skip
    assert len(values) == len(ARG_ORDER)
    return values


def input_image(width=96, height=64, seed=0) -> Image.Image:
    """RGBA with alpha varying over the image (a transparent band, a gradient, an opaque band)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    arr[..., 3] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    arr[: height // 4, :, 3] = 0
    arr[-height // 4 :, :, 3] = 255
    return Image.fromarray(arr, "RGBA")


def engine(ctx, checkpoint="layered", negative=None, model=None):
    return QwenImage(getattr(ctx.env.files, checkpoint), model or transformer(ctx.env), negative)


def generate(ctx, sd_model, script_args, *, kind="img2img", image=None, steps=2, **kwargs):
    sd_model.steps = steps
    if kind == "img2img":
        p = NeoImg2Img(sd_model, ctx.out, init_images=[image or input_image()], steps=steps, **kwargs)
    else:
        p = NeoTxt2Img(sd_model, ctx.out, steps=steps, **kwargs)
    script = ctx.env.mod.LayerDiffuseScript()
    script.is_img2img = kind == "img2img"
    processed = fa.process_images(p, script, script_args)
    return p, processed


def saved(ctx, pattern: str) -> list[Path]:
    return sorted(Path(f) for f in ctx.env.fake.images.saved if re.search(pattern, Path(f).name))


def read_png(path):
    with Image.open(path) as im:
        im.load()
        return im.mode, np.array(im), im.info.get("parameters")


def direct(ctx, model, image: Image.Image, *, prompt, negative, layers, steps, seed, true_cfg, normalize,
           resolution=640) -> tuple[np.ndarray, list[np.ndarray]]:  # fmt: skip
    """``qwen_layered.decompose`` called directly with the request's inputs: (the bucket image, the layers)."""
    size = ql.bucket_size(*image.size, resolution)
    bucket = np.asarray(image.convert("RGBA").resize(size, Image.LANCZOS), dtype=np.uint8)
    addition = ql.addition_row(ctx.env.weights[ql.ADDITION_KEY].float(), model.inner_dim)

    def branch(text):
        return {
            "context": text_states(text)[None],
            "addition": addition,
            "rope": lambda ids: model.pe_embedder(ids).squeeze(1).unsqueeze(2),
        }

    layers_out = ql.decompose(
        bucket,
        vae=load_vae_file(ctx.env.files.vae),
        transformer=functools.partial(ql.layered_forward, model),
        cond=branch(prompt),
        uncond=branch(negative) if true_cfg > 1 else None,
        layers=layers,
        steps=steps,
        seed=seed,
        true_cfg_scale=true_cfg,
        normalize=normalize,
    )
    return bucket, layers_out


def model_state(model):
    """Everything a request could change on the transformer: tensors (bits), modules, attributes, hooks."""
    tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    attributes = {name: set(vars(m)) for name, m in model.named_modules()}
    return tensors, dict(model.named_modules()), attributes


def assert_model_as_before(model, before):
    tensors, modules, attributes = before
    now = model.state_dict(keep_vars=True)
    assert now.keys() == tensors.keys()
    for k, v in now.items():
        assert v.dtype == tensors[k].dtype and v.device == tensors[k].device and v.requires_grad is False, k
        assert torch.equal(v.detach().view(torch.uint8), tensors[k].view(torch.uint8)), k
    assert dict(model.named_modules()) == modules
    assert {name: set(vars(m)) for name, m in model.named_modules()} == attributes
    for name, m in model.named_modules():
        hooks = (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._forward_hooks_with_kwargs)
        assert not any(hooks), f"hook left on {name or 'the transformer'}"


# -- 1. the happy path --------------------------------------------------------------------------------


def test_decompose_request_end_to_end(ctx):
    model = transformer(ctx.env)
    before = model_state(model)
    sd_model = engine(ctx, model=model)
    image = input_image(96, 64)
    p, processed = generate(ctx, sd_model, args(layers=3, true_cfg=4.0, normalize=True), image=image, steps=2,
                            prompt="a red apple on a table", negative_prompt="blurry", seed=1234)  # fmt: skip
    assert p.scripts.errors == [] and p.closed == 1
    bucket, expected = direct(ctx, model, image, prompt="a red apple on a table", negative="blurry", layers=3,
                              steps=2, seed=p.seeds[0], true_cfg=4.0, normalize=True)  # fmt: skip
    assert p.seeds[0] == 1234

    # the WebUI's size is the bucket, and the host's own img2img setup ran at it
    assert (p.width, p.height) == (768, 512) == (bucket.shape[1], bucket.shape[0])
    assert p.init_sizes == [(768, 512)]
    assert p.unet_rows == []  # the host's sampler never ran

    # Neo's memory management loaded the transformer once and let it go once, around the sampling
    unet = sd_model.forge_objects.unet
    assert [c[0] for c in ctx.backend] == ["prepare", "cleanup"]
    assert ctx.backend[0][1] is unet and ctx.backend[1][1] is unet
    assert tuple(ctx.backend[0][2].shape) == (1, 16, 3 + 2, 64, 96)
    assert_model_as_before(model, before)

    # the saved layers: RGBA PNGs -layer-1..-layer-3, equal to a direct decompose of the same inputs
    layer_files = [saved(ctx, rf"-layer-{k}\.png$") for k in (1, 2, 3)]
    assert all(len(f) == 1 for f in layer_files) and not saved(ctx, r"-layer-4")
    layers = []
    for k, (path,) in enumerate(layer_files):
        mode, arr, text = read_png(path)
        assert mode == "RGBA" and arr.shape == (512, 768, 4)
        assert np.array_equal(arr, expected[k]), f"layer {k + 1} differs from decompose()"
        assert "layerdiffusion_method: " + LABEL in text
        layers.append(arr)
    assert not np.array_equal(layers[0], layers[-1])
    assert len({int(layer[..., 3].min()) for layer in layers} | {int(layer[..., 3].max()) for layer in layers}) > 1

    # the host's image is the layers recomposed, RGBA
    composite = psd.composite([psd.Layer(f"Layer {k + 1}", x) for k, x in enumerate(expected)])
    (main,) = [f for f in saved(ctx, r"\.png$") if "-layer-" not in f.name and "-checkerboard" not in f.name]
    mode, arr, text = read_png(main)
    assert mode == "RGBA" and arr.shape == (512, 768, 4)
    assert np.abs(arr.astype(np.float32) / 255 - composite).max() <= 1 / 255 + 1e-6
    assert processed.images[0].mode == "RGBA" and np.array_equal(np.asarray(processed.images[0]), arr)

    # the gallery / API: the image, then the layers (RGBA), then the checkerboard previews (RGB)
    extra = processed.extra_images
    rgba = [im for im in extra if im.mode == "RGBA"]
    assert [np.array_equal(np.asarray(im), x) for im, x in zip(rgba, expected, strict=True)] == [True] * 3
    previews = saved(ctx, r"-checkerboard\.png$")
    assert sorted(f.name.split("-", 2)[-1] for f in previews) == sorted(
        ["checkerboard.png"] + [f"layer-{k}-checkerboard.png" for k in (1, 2, 3)]
    )
    assert all(read_png(f)[0] == "RGB" for f in previews)
    assert len(processed.infotexts) == 1 + len(extra)

    # infotext
    info = processed.infotexts[0]
    for key, value in (("layerdiffusion_method", LABEL), ("layerdiffusion_layers", "3"),
                       ("layerdiffusion_resolution", "640"), ("layerdiffusion_true_cfg", "4.0"),
                       ("layerdiffusion_cfg_normalize", "True"), ("Size", "768x512")):  # fmt: skip
        assert f"{key}: {value}" in info, key
    assert "layerdiffusion_weight" not in info and "layerdiffusion_stop_at" not in info

    # the layered PSD beside the image: the layers bottom to top, the input image hidden on top
    (psd_path,) = list((ctx.tmp / ctx.out).glob("*-layers.psd"))
    assert psd_path.name == main.stem + "-layers.psd"
    doc = psd_tools.PSDImage.open(psd_path)
    assert [(layer.name, layer.visible) for layer in doc] == [
        ("Layer 1", True),
        ("Layer 2", True),
        ("Layer 3", True),
        ("Input image", False),
    ]
    for k in range(3):
        assert np.array_equal(np.asarray(doc[k].topil().convert("RGBA")), expected[k])
    assert np.array_equal(np.asarray(doc[3].topil().convert("RGBA")), bucket)
    assert re.search(r"LayerDiffuse: layered PSD \S*" + re.escape(psd_path.name), processed.comments)
    assert [k[0] for k in pipeline._MODELS] == ["qwen_vae"]  # kept for the next request (the default)
    assert ctx.host.generation(p) is None and "sample" not in vars(p)  # p is the host's own again


def test_without_true_cfg_the_negative_prompt_is_never_read(ctx):
    """True CFG 1: one pass per step; the negative conditioning (here an object no reader accepts) is not read.
    With true CFG above 1 the same object is refused, so it is read there."""
    model = transformer(ctx.env)
    sd_model = engine(ctx, negative="not a conditioning", model=model)
    image = input_image(64, 64, seed=3)
    p, processed = generate(ctx, sd_model, args(layers=2, true_cfg=1.0, normalize=False), image=image, steps=1,
                            prompt="a cat", seed=7)  # fmt: skip
    assert p.scripts.errors == []
    _, expected = direct(ctx, model, image, prompt="a cat", negative=None, layers=2, steps=1, seed=7, true_cfg=1.0,
                         normalize=False)  # fmt: skip
    files = [saved(ctx, rf"-layer-{k}\.png$") for k in (1, 2)]
    assert [np.array_equal(read_png(f)[1], x) for (f,), x in zip(files, expected, strict=True)] == [True, True]
    assert (p.width, p.height) == (640, 640)

    ctx.env.fake.images.saved.clear()
    with pytest.raises(RuntimeError, match=r"^LayerDiffuse: the negative prompt "):
        generate(ctx, engine(ctx, negative="not a conditioning", model=model), args(layers=2, true_cfg=2.0),
                 image=image, steps=1, prompt="a cat")  # fmt: skip
    assert ctx.env.fake.images.saved == []


class SdConditioning(list):
    """``modules.prompt_parser.SdConditioning``: a list of prompts with its flags (Neo's signature)."""

    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None,
                 distilled_cfg_scale=None):  # fmt: skip
        super().__init__(prompts)
        self.is_negative_prompt, self.width, self.height = is_negative_prompt, width, height


class SkipsNegative(QwenImage):
    """Neo at CFG Scale 1: the host sets ``p.uc = None`` (modules/processing.py) and never encodes the negative
    prompt; asked with an ``SdConditioning``, its engine returns one ``[T, D]`` state per prompt."""

    asked: list

    def get_learned_conditioning(self, prompts):
        if isinstance(prompts, SdConditioning):  # the adapter's own request
            self.asked.append((list(prompts), prompts.is_negative_prompt, prompts.width, prompts.height))
            return [text_states(text) for text in prompts]
        self.calls += 1
        return multicond(prompts, self.steps) if self.calls % 2 else None


SkipsNegative.__name__ = "QwenImage"  # the adapter knows Neo's engine by its class name


def test_true_cfg_encodes_the_negative_prompt_the_host_skipped(ctx, monkeypatch):
    """True CFG with the WebUI's CFG Scale at 1: the negative prompt is encoded through the host's engine and the
    layers equal a direct guided call with it (seen on the real Neo: it was refused before)."""
    monkeypatch.setitem(sys.modules, "modules.prompt_parser", types.SimpleNamespace(SdConditioning=SdConditioning))
    model = transformer(ctx.env)
    sd_model = SkipsNegative(ctx.env.files.layered, model)
    sd_model.asked = []
    image = input_image(64, 64, seed=5)
    p, _ = generate(ctx, sd_model, args(layers=2, true_cfg=3.0, normalize=True), image=image, steps=1,
                    prompt="a cat", negative_prompt="blurry", seed=11)  # fmt: skip
    assert p.scripts.errors == [] and p.uc is None
    assert sd_model.asked == [(["blurry"], True, 640, 640)]
    _, expected = direct(ctx, model, image, prompt="a cat", negative="blurry", layers=2, steps=1, seed=11,
                         true_cfg=3.0, normalize=True)  # fmt: skip
    _, unguided = direct(ctx, model, image, prompt="a cat", negative=None, layers=2, steps=1, seed=11, true_cfg=1.0,
                         normalize=True)  # fmt: skip
    got = [read_png(f)[1] for (f,) in (saved(ctx, rf"-layer-{k}\.png$") for k in (1, 2))]
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(got, unguided, strict=True))  # the guidance took part


def test_psd_when_the_images_are_not_saved(ctx):
    """Saving off (as API requests without save_images): the PSD still has the layers (written in postprocess)."""
    sd_model = engine(ctx)
    p, processed = generate(ctx, sd_model, args(layers=2, true_cfg=1.0), image=input_image(64, 64), steps=1,
                            prompt="a cat", do_not_save_samples=True)  # fmt: skip
    assert p.scripts.errors == [] and ctx.env.fake.images.saved == []
    assert "could not be written" not in processed.comments, processed.comments
    written = re.findall(r"LayerDiffuse: layered PSD (\S+\.psd)", processed.comments)
    assert len(written) == 1
    doc = psd_tools.PSDImage.open(written[0])
    assert [(layer.name, layer.visible) for layer in doc] == [
        ("Layer 1", True),
        ("Layer 2", True),
        ("Input image", False),
    ]


# -- 2. refusals ----------------------------------------------------------------------------------------


def assert_refused(ctx, p_or_call, pattern, sd_model=None, prepared=False):
    with pytest.raises(RuntimeError, match=r"^LayerDiffuse: ") as info:
        p_or_call()
    message = str(info.value)
    for phrase in pattern if isinstance(pattern, (list, tuple)) else [pattern]:
        assert re.search(phrase, message), (phrase, message)
    assert "LayerDiffuse: " not in message[len("LayerDiffuse: ") :]
    assert not saved(ctx, r".") and not list(ctx.tmp.rglob("*.psd"))  # no image, layer or PSD written
    if not prepared:
        assert ctx.backend == []  # the model was never loaded for sampling
    else:
        assert [c[0] for c in ctx.backend] in ([], ["prepare", "cleanup"])
    return message


REFUSALS = {
    "txt2img": (dict(kind="txt2img"), [r"img2img tab", r"input image"]),
    "batch-2": (dict(batch_size=2), [r"one image at a time", r"Batch size to 1", r"It is 2"]),
    "empty-prompt": (dict(prompt="  "), [r"needs a prompt", r"cannot caption"]),
    "and-prompt": (dict(prompt="a cat AND a dog"), [r"prompt has 2 AND parts", r"one plain prompt"]),
    "plain-qwen": (dict(checkpoint="plain"), [r"plain Qwen-Image", r"qwen_image_layered", r"addition_t_embedding"]),
    "sd15-on-layered": (dict(method=SD15), [r"needs an SD1\.5 checkpoint", r"Qwen-Image-Layered"]),
    "sdxl-on-layered": (dict(method=SDXL), [r"needs an SDXL checkpoint", r"Qwen-Image-Layered"]),
    "layers-11": (dict(layers=11), [r"layers must be between 2 and 10, got 11"]),
    "resolution-800": (dict(resolution=800), [r"resolution must be 640 or 1024", r"800"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals(ctx, case):
    kwargs, phrases = REFUSALS[case]
    kwargs = dict(kwargs)
    kind = kwargs.pop("kind", "img2img")
    script_args = args(layers=kwargs.pop("layers", 2), resolution=kwargs.pop("resolution", 640),
                       method=kwargs.pop("method", LABEL))  # fmt: skip
    sd_model = engine(ctx, kwargs.pop("checkpoint", "layered"))
    kwargs.setdefault("prompt", "a cat")
    model = sd_model.forge_objects.unet.model.diffusion_model
    before = model_state(model)
    holder = {}

    def run():
        holder["p"] = generate(ctx, sd_model, script_args, kind=kind, steps=1, **kwargs)

    assert_refused(ctx, run, phrases)
    assert_model_as_before(model, before)


def test_inpaint_mask_is_refused(ctx):
    """An inpaint mask would be ignored (the whole image is decomposed): refused instead of silently dropped."""
    sd_model = engine(ctx)

    def run():
        p = NeoImg2Img(sd_model, ctx.out, init_images=[input_image()], steps=1, prompt="a cat")
        p.image_mask = Image.new("L", (96, 64), 255)
        script = ctx.env.mod.LayerDiffuseScript()
        script.is_img2img = True
        fa.process_images(p, script, args(layers=2))

    assert_refused(ctx, run, [r"inpaint mask", r"img2img tab"])


def test_refused_on_hosts_that_cannot_run_qwen(ctx, monkeypatch):
    """A host without ``decomposes`` (Forge2, A1111) refuses the method with the same request, saying Forge Neo."""
    monkeypatch.setattr(ctx.env.mod, "host", Forge2Host())
    assert_refused(ctx, lambda: generate(ctx, engine(ctx), args(layers=2), steps=1, prompt="a cat"),
                   [r"runs on Forge Neo only", r"A1111 and Forge2 cannot load Qwen-Image"])  # fmt: skip


@pytest.mark.parametrize("which", ["forge2", "a1111"])
def test_refused_on_hosts_that_cannot_run_qwen_with_their_own_model(ctx, monkeypatch, which):
    """What a user of A1111 or Forge2 sees: their SD1.5 model is loaded; the message must say Forge Neo only,
    not to load a Qwen-Image-Layered checkpoint (which those hosts cannot load)."""
    if which == "forge2":
        monkeypatch.setattr(forge, "_family", forge.family_forge2)
        monkeypatch.setattr(ctx.env.mod, "host", Forge2Host())
        sd_model = engine(ctx)
        sd_model.__class__ = type("StableDiffusion", (QwenImage,), {})
        sd_model.is_sd1 = True
    else:
        monkeypatch.setattr(ctx.env.mod, "host", ctx.env.a1111)
        monkeypatch.setattr(sys.modules["lib_layerdiffuse.hosts.a1111"], "detect_family", lambda unet: "sd15")
        sd_model = fa.FakeSDModel(fa.tiny_unet())
    assert_refused(ctx, lambda: generate(ctx, sd_model, args(layers=2), steps=1, prompt="a cat"),
                   [r"Forge Neo only"])  # fmt: skip


def damaged(ctx, data: bytes):
    (ctx.models / VAE_NAME).write_bytes(data)


@pytest.mark.parametrize("case", ["truncated", "three-channel"])
def test_bad_vae_file_is_refused_before_sampling(ctx, case):
    good = ctx.env.files.vae.read_bytes()
    if case == "truncated":
        damaged(ctx, good[: len(good) // 2])
        phrases = [re.escape(VAE_NAME), r"damaged or incomplete", r"download it again"]
    else:
        damaged(ctx, ctx.env.files.vae3.read_bytes())
        phrases = [re.escape(VAE_NAME), r"3-channel", r"4 image channels"]
    assert_refused(ctx, lambda: generate(ctx, engine(ctx), args(layers=2), steps=1, prompt="a cat"), phrases)
    assert ctx.env.fake.modelloader.calls == []  # the file is there: no download was tried


def test_api_named_args_out_of_range(ctx):
    """The named API form: layers above 10 and a resolution other than the two buckets are refused by name."""
    for values, phrase in (({"layers": 11}, r"layers must be between 2 and 10"),
                           ({"resolution": 800}, r"resolution must be 640 or 1024")):  # fmt: skip
        script_args = [{"enabled": True, "method": LABEL, **values}, *args()[1:]]
        assert_refused(ctx, lambda a=script_args: generate(ctx, engine(ctx), a, steps=1, prompt="a cat"), phrase)


# -- 3. family detection ------------------------------------------------------------------------------


def test_family_of_checkpoint_headers(env):
    f = env.files
    assert hosts.family_of_checkpoint(read_header(f.layered)) == "qwen_layered"
    assert hosts.family_of_checkpoint(read_header(f.plain)) == "Qwen-Image"
    assert hosts.family_of_checkpoint(read_header(f.comfy)) == "qwen_layered"
    assert hosts.family_of_checkpoint(read_header(f.comfy_plain)) == "Qwen-Image"


def test_neo_family_and_addition_weight_from_the_loaded_checkpoint(env):
    """Neo's engine: the family from its checkpoint file, the addition embedding read from it (any prefix)."""
    model = torch.nn.Module()
    for name, family in (("layered", "qwen_layered"), ("comfy", "qwen_layered"), ("plain", "Qwen-Image"),
                         ("comfy_plain", "Qwen-Image")):  # fmt: skip
        sd_model = QwenImage(getattr(env.files, name), model)
        assert forge.family_neo(sd_model) == family, name
        if family == "qwen_layered":
            assert torch.equal(forge.addition_weight(sd_model), env.weights[ql.ADDITION_KEY])
        else:
            with pytest.raises(Exception, match="has no time_text_embed.addition_t_embedding.weight"):
                forge.addition_weight(sd_model)
    unreadable = QwenImage(env.root / "missing.gguf", model)
    assert forge.family_neo(unreadable) == "Qwen-Image"  # a file that cannot be read: not taken for Layered


# -- 4. memory and lifetime ---------------------------------------------------------------------------

LIFETIME_TYPES = ("Decomposition", "DecodedImages", "Layered", "_DecomposedGroups", "Generation", "QwenImage",
                  "NeoImg2Img")  # fmt: skip


def live_objects() -> dict[str, int]:
    counts: dict[str, int] = {}
    for obj in gc.get_objects():
        name = type(obj).__name__
        if name in LIFETIME_TYPES:
            counts[name] = counts.get(name, 0) + 1
    return counts


def test_nothing_outlives_a_request(ctx, monkeypatch):
    """Requests (decomposed, refused in process, refused in p.sample, interrupted mid-sampling) with the garbage
    collector off: reference counting alone frees each one's objects, the layers included."""
    model = transformer(ctx.env)
    gens = []

    class Recorded(D.Decomposition):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            gens.append(weakref.ref(self))

    monkeypatch.setattr(ctx.env.mod, "Decomposition", Recorded)
    interrupt = {"on": False}

    def step_done(self, step, latents, _original=forge.ForgeHost._step_done):
        ctx.env.fake.shared.state.interrupted = interrupt["on"]
        return _original(self, step, latents)

    monkeypatch.setattr(NeoHost, "_step_done", step_done)
    runs = [
        (dict(layers=2, true_cfg=1.0), dict(prompt="a cat"), None),
        (dict(layers=2), dict(prompt="a cat", batch_size=2), "one image at a time"),
        (dict(layers=2), dict(prompt="a cat AND a dog"), "AND parts"),
        (dict(layers=2, true_cfg=1.0), dict(prompt="a cat"), "interrupted after step 1 of 1"),
    ]
    gc.collect()
    baseline = live_objects()
    gc.disable()
    try:
        for _ in range(2):
            for settings, kwargs, error in runs:
                interrupt["on"] = error == "interrupted after step 1 of 1"
                ctx.env.fake.shared.state.interrupted = False  # the hosts reset it when a job starts
                if error is None:
                    generate(ctx, QwenImage(ctx.env.files.layered, model), args(**settings), steps=1,
                             image=input_image(64, 64), **kwargs)  # fmt: skip
                else:
                    try:
                        generate(ctx, QwenImage(ctx.env.files.layered, model), args(**settings), steps=1,
                                 image=input_image(64, 64), **kwargs)  # fmt: skip
                    except RuntimeError as e:
                        assert error in str(e), str(e)
                        e = None  # noqa: F841 - the traceback holds frames of the request
                    else:
                        raise AssertionError(f"not refused: {error}")
                assert live_objects() == baseline, (settings, kwargs)
                assert all(ref() is None for ref in gens), (settings, kwargs)
    finally:
        gc.enable()
        ctx.env.fake.shared.state.interrupted = False
    assert len(gens) == 2 * 3  # the batch-2 request was refused while building its Decomposition
    # Neo's memory management: the interrupted requests let the model go too
    assert [c[0] for c in ctx.backend] == ["prepare", "cleanup"] * 4


def test_the_rgba_vae_is_released_unless_kept(ctx, monkeypatch):
    """Keep-models off: the RGBA VAE the request loaded is freed with it (kept by default: see the first test)."""
    loaded = []

    def spy(kind, path, device, dtype, _original=pipeline.cached_model):
        model = _original(kind, path, device, dtype)
        loaded.append((kind, weakref.ref(model)))
        return model

    monkeypatch.setattr(pipeline, "cached_model", spy)
    ctx.opts.layerdiffuse_keep_models = False
    generate(ctx, engine(ctx), args(layers=2, true_cfg=1.0), image=input_image(64, 64), steps=1, prompt="a cat")
    assert [kind for kind, _ in loaded] == ["qwen_vae"]
    assert not [k for k in pipeline._MODELS if k[0] == "qwen_vae"]
    gc.collect()
    assert loaded[0][1]() is None  # nothing else holds the RGBA VAE


def test_the_vae_file_in_the_wan_layout(ctx):
    """The host's file route (weight_path, the model cache) takes the VAE in the Wan-original (Comfy / Neo) layout
    as the same model as the diffusers one."""
    (ctx.models / VAE_NAME).write_bytes(ctx.env.files.vae_wan.read_bytes())
    path = ctx.host.weight_path(QWEN_VAE_FILE)
    assert path == ctx.models / VAE_NAME and ctx.env.fake.modelloader.calls == []
    vae = pipeline.cached_model("qwen_vae", path, torch.device("cpu"), torch.float32)
    reference = load_vae_file(ctx.env.files.vae).state_dict()
    assert vae.config.image_channels == 4 and vae.state_dict().keys() == reference.keys()
    assert all(torch.equal(v, reference[k]) for k, v in vae.state_dict().items())


def test_room_is_made_on_a_gpu_before_each_vae_call():
    """On a GPU Neo is asked for the VAE's working memory before the encode and each decode (the transformer
    may fill the card); on the CPU nothing is asked."""
    asked = []

    class VAE:
        def parameters(self):
            return iter([torch.zeros(1)])

        def encode_mean(self, x):
            return "z"

        def decode(self, z):
            return "x"

    gpu = forge.RoomFirst(VAE(), "cuda", lambda required, device: asked.append((required, device.type)))
    assert gpu.encode_mean(torch.zeros(1, 4, 64, 96)) == "z" and gpu.decode(torch.zeros(1, 16, 8, 12)) == "x"
    per = forge.VAE_BYTES_PER_PIXEL
    assert asked == [(per * 64 * 96, "cuda"), (per * 64 * 96, "cuda")]
    cpu = forge.RoomFirst(VAE(), torch.device("cpu"), lambda *a: asked.append(a))
    cpu.encode_mean(torch.zeros(1, 4, 8, 8))
    cpu.decode(torch.zeros(1, 16, 1, 1))
    assert len(asked) == 2 and next(cpu.parameters()).numel() == 1


def test_an_interrupt_stops_before_the_next_transformer_pass(ctx, monkeypatch):
    """Interrupt between the two passes of a true-CFG step: the second pass does not run (a pass of the real
    model takes long), the request is refused and nothing is saved."""
    passes = []
    original = ql.layered_forward

    def counted(*a, **k):
        passes.append(1)
        ctx.env.fake.shared.state.interrupted = True  # the user presses Interrupt during the first pass
        return original(*a, **k)

    monkeypatch.setattr(ql, "layered_forward", counted)
    try:
        assert_refused(ctx, lambda: generate(ctx, engine(ctx), args(layers=2, true_cfg=2.0), steps=2, prompt="a cat",
                                             image=input_image(64, 64)),
                       [r"interrupted after step 0 of 2", r"no layers are returned"], prepared=True)  # fmt: skip
    finally:
        ctx.env.fake.shared.state.interrupted = False
    assert len(passes) == 1
