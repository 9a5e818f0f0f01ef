"""Forge2 / Forge Neo adapter (``lib_layerdiffuse.hosts.forge``) against small stand-ins.

The stand-ins mirror the signatures in ``docs/hosts.md`` §3: Forge2's
keyword-only ``add_patches(*, filename, patches, ...)`` and its tuple LoRA / growing diff
merge, Neo's ``add_patches(patches, strength_patch, strength_model, *, filename, online_mode)``
with ``pad_weight`` diffs and ``LoRAAdapter`` objects, ``set_model_unet_function_wrapper``
called as ``wrapper(apply_model, {"input", "timestep", "c", "cond_or_uncond"})`` with
``c["transformer_options"]["cond_mark"]``, ``add_conditioning_modifier`` with the 8-argument
signature, ``predictor.percent_to_sigma``, and ``p.sample`` called directly by the host.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lib_layerdiffuse import hosts, pipeline
from lib_layerdiffuse import modes as M
from lib_layerdiffuse.attention_sharing import MODULE_MAP_SD15, AttentionSharing, AttentionSharingUnit
from lib_layerdiffuse.errors import LayerDiffuseError
from lib_layerdiffuse.hosts import common, forge
from lib_layerdiffuse.options import DecodeOptions
from lib_layerdiffuse.patches import compute_patched_tensors, parse_patch_state
from lib_layerdiffuse.pipeline import Generation
from lib_layerdiffuse.settings import Settings

# -- stand-ins of the hosts' merge code (docs/hosts.md §3) ---------------------------


def merge_forge2(weight, patches):
    """Forge2 ``backend/patcher/lora.py:merge_lora_to_weight`` for diff/lora (fp32)."""
    weight = weight.clone().float()
    for strength, v, _strength_model, _offset, _fn in patches:
        kind, v = v
        if kind == "diff":
            w1 = v[0]
            if w1.shape != weight.shape:
                assert w1.ndim == weight.ndim == 4
                new = torch.zeros([max(n, m) for n, m in zip(weight.shape, w1.shape, strict=True)])
                new[: weight.shape[0], : weight.shape[1], : weight.shape[2], : weight.shape[3]] = weight
                new[: w1.shape[0], : w1.shape[1], : w1.shape[2], : w1.shape[3]] += strength * w1.float()
                weight = new
            else:
                weight += strength * w1.float()
        elif kind == "lora":
            up, down, alpha, mid, dora = v
            assert alpha is None and mid is None and dora is None
            weight += (strength * 1.0) * torch.mm(up.float().flatten(1), down.float().flatten(1)).reshape(weight.shape)
        else:
            raise ValueError(kind)
    return weight


class FakeLoRAAdapter:
    """Neo's ``modules_forge.packages.comfy.weight_adapter.lora.LoRAAdapter(loaded_keys, weights)``."""

    name = "lora"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = weights
        assert len(weights) == 6  # (up, down, alpha, mid, dora, reshape)

    def calculate_weight(self, weight, key, strength, strength_model, offset, function, dtype=torch.float32):
        up, down, alpha, mid, dora, reshape = self.weights
        a = 1.0 if alpha is None else alpha / down.shape[0]
        diff = torch.mm(up.float().flatten(1), down.float().flatten(1)).reshape(weight.shape)
        return weight + (strength * a) * diff


def merge_neo(weight, patches):
    """Neo ``backend/patcher/lora.py:merge_lora_to_weight``: adapters, diff with pad_weight, else refuse."""
    weight = weight.clone().float()
    for strength, v, strength_model, _offset, fn in patches:
        if isinstance(v, FakeLoRAAdapter):
            weight = v.calculate_weight(weight, "k", strength, strength_model, None, fn)
            continue
        kind, v = v
        if kind != "diff":
            raise ValueError(f'"k" of type "{kind}" is not recognized...')
        diff = v[0]
        if len(v) > 1 and v[1]["pad_weight"] and diff.shape != weight.shape:
            pad = torch.zeros(diff.shape)
            pad[tuple(slice(0, s) for s in weight.shape)] = weight
            weight = pad
        if diff.shape != weight.shape:
            raise AssertionError("SHAPE MISMATCH ... NOT MERGED")
        weight += strength * diff.float()
    return weight


# -- stand-ins of the patcher and the model ---------------------------------------------------


class Predictor:
    def percent_to_sigma(self, percent):
        return 0.0 if percent >= 1.0 else 10.0 * (1.0 - percent)  # monotone, enough for the switch


class KModel(nn.Module):
    """``backend/modules/k_model.py:KModel``: ``apply_model`` concatenates ``c_concat``."""

    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.predictor = Predictor()
        self.computation_dtype = torch.float32
        self.seen = []

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, transformer_options=None, **kwargs):
        if c_concat is not None:
            x = torch.cat([x, c_concat], dim=1)
        try:
            attn1 = type(self.diffusion_model.get_submodule(MODULE_MAP_SD15[0])).__name__
        except AttributeError:  # not an SD1.5 tree
            attn1 = None
        self.seen.append({"x": x, "options": transformer_options, "attn1": attn1})
        if hasattr(self.diffusion_model, "input_blocks") and c_crossattn is not None:
            return self.diffusion_model(x, t, context=c_crossattn)
        return x[:, :4]


def set_param(model, key, weight):
    """``backend.utils.set_attr``: the merged weight replaces the model's parameter object."""
    path, _, name = key.rpartition(".")
    setattr(model.get_submodule(path), name, weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight))


class FakeLoraLoader:
    """The hosts' ``LoraLoader`` (one per model, shared by every clone): ``refresh`` puts the
    base parameters back from ``backup`` and sets merged ones in their place, and does nothing when
    the patch list is the one merged last (``loaded_hash``). So a generation's merge stays in the
    shared model until the next model load. Diffs merge as Forge2 does (a larger diff grows the
    weight: the widened conv_in); the stand-in merge of anything else adds 0.25 x strength."""

    def __init__(self, model):
        self.model, self.backup, self.loaded_hash = model, {}, str([])

    @torch.no_grad()
    def refresh(self, patches):
        hashes = str(sorted((k, [(e[0], id(e[1])) for e in v]) for k, v in patches.items()))
        if hashes == self.loaded_hash:
            return
        for k, w in self.backup.items():
            set_param(self.model, k, w)
        self.backup = {}
        for k, entries in patches.items():
            weight = self.model.get_parameter(k)
            self.backup[k] = weight
            diffs = [e for e in entries if isinstance(e[1], tuple) and e[1][0] == "diff"]
            merged = merge_forge2(weight, diffs) if diffs else weight + 0.25 * sum(e[0] for e in entries)
            set_param(self.model, k, merged.to(weight.dtype))
        self.loaded_hash = hashes


class BasePatcher:
    def __init__(self, model):
        self.model = model
        self.model_options = {"transformer_options": {}}
        self.patches = {}
        if not hasattr(model, "lora_loader"):
            model.lora_loader = FakeLoraLoader(model)
        self.lora_loader = model.lora_loader

    def load(self):
        """The host's model load for sampling: the LoRA patches are merged (or kept) here."""
        self.lora_loader.refresh(self.patches)

    def clone(self):
        n = self.__class__(self.model)
        n.patches = dict(self.patches)
        n.model_options = copy.deepcopy(self.model_options)  # as both hosts do
        return n

    def set_model_unet_function_wrapper(self, fn):
        self.model_options["model_function_wrapper"] = fn

    def add_conditioning_modifier(self, modifier):
        self.model_options.setdefault("conditioning_modifiers", []).append(modifier)

    def _add(self, patches, strength_patch, strength_model):
        keys = {k for k, _ in self.model.named_parameters()}
        out = []
        for k, v in patches.items():
            if k in keys:
                self.patches.setdefault(k, []).append((strength_patch, v, strength_model, None, None))
                out.append(k)
        return out

    def run(self, x, sigma, rows_cond_first=False, **c):
        """One UNet call the way ``calc_cond_uncond_batch`` makes it (uncond rows first by default)."""
        b = x.shape[0]
        order = [0, 1] if rows_cond_first else [1, 0]
        mark = torch.tensor([float(o) for o in order for _ in range(b)])
        c = dict(c, transformer_options={"cond_mark": mark, "cond_or_uncond": order})
        model, xx = self.model, torch.cat([x, x])
        t = torch.full((2 * b,), float(sigma))
        for m in self.model_options.get("conditioning_modifiers", []):
            model = m(model, xx, t, [], [], 5.0, self.model_options, 0)[0]
        wrapper = self.model_options.get("model_function_wrapper")
        args = {"input": xx, "timestep": t, "c": c, "cond_or_uncond": order}
        return wrapper(model.apply_model, args) if wrapper else model.apply_model(xx, t, **c)


class Forge2Patcher(BasePatcher):
    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False):
        return self._add(patches, strength_patch, strength_model)


class NeoPatcher(BasePatcher):
    """Neo (``backend/patcher/base.py``): patches of a LoRA file (``filename`` and ``online_mode``
    given) go through the lora loader; plain patches are merged by the patcher itself when the model
    loads (ComfyUI's ``patch_model``), the weights from before kept in ``backup`` (one dict shared by
    every clone) and put back only when other patches load next (``patches_uuid``)."""

    def __init__(self, model):
        super().__init__(model)
        self.backup, self.patches_uuid, self.lora_keys = {}, object(), set()

    def clone(self):
        n = super().clone()
        n.backup, n.patches_uuid, n.lora_keys = self.backup, self.patches_uuid, set(self.lora_keys)
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0, *, filename=None, online_mode=None):
        added = self._add(patches, strength_patch, strength_model)
        if filename is not None and online_mode is not None:
            self.lora_keys.update(added)
        else:
            self.patches_uuid = object()
        return added

    @torch.no_grad()
    def load(self):
        self.lora_loader.refresh({k: v for k, v in self.patches.items() if k in self.lora_keys})
        model = self.model
        if getattr(model, "current_weight_patches_uuid", None) is self.patches_uuid:
            return
        for k, bk in self.backup.items():  # unpatch_model
            set_param(model, k, bk.weight)
        self.backup.clear()
        for k, entries in self.patches.items():
            if k not in self.lora_keys:
                weight = model.get_parameter(k)
                self.backup[k] = SimpleNamespace(weight=weight, inplace_update=False)
                set_param(model, k, merge_neo(weight, entries).to(weight.dtype))
        model.current_weight_patches_uuid = self.patches_uuid


HOSTS = {
    "forge2": (Forge2Patcher, forge.lora_value_forge2, forge.add_patches_forge2, merge_forge2),
    "neo": (NeoPatcher, forge.lora_value_neo, forge.add_patches_neo, merge_neo),
}


@pytest.fixture
def neo_adapter(monkeypatch):
    """Neo's LoRAAdapter module path, so ``lora_value_neo`` imports it."""
    names = ["modules_forge", "modules_forge.packages", "modules_forge.packages.comfy",
             "modules_forge.packages.comfy.weight_adapter", "modules_forge.packages.comfy.weight_adapter.lora"]  # fmt: skip
    for n in names:
        monkeypatch.setitem(sys.modules, n, types.ModuleType(n))
    sys.modules[names[-1]].LoRAAdapter = FakeLoRAAdapter


def use_host(monkeypatch, name, neo_adapter=None):
    patcher, lora_value, add_patches, merge = HOSTS[name]
    monkeypatch.setattr(forge, "lora_value", lora_value)
    monkeypatch.setattr(forge, "add_patches", add_patches)
    monkeypatch.setattr(forge, "_family", forge.family_neo if name == "neo" else forge.family_forge2)
    return patcher, merge


# -- model / p / gen builders ---------------------------------------------------------------


def sdxl_like():
    """conv_in (4 ch) + one Linear: enough for the widened diff and a LoRA."""
    dm = nn.Module()
    dm.input_blocks = nn.ModuleList([nn.ModuleList([nn.Conv2d(4, 8, 3, padding=1)])])
    dm.proj = nn.Linear(5, 6)
    for prm in dm.parameters():
        nn.init.normal_(prm)
    return dm


def sd15_tiny():
    from lib_layerdiffuse.ldm_unet import UNetModel

    torch.manual_seed(0)
    return UNetModel(in_channels=4, model_channels=32, out_channels=4, num_res_blocks=2, channel_mult=(1, 1, 1, 1),
                     transformer_depth=(1, 1, 1, 0), transformer_depth_middle=1, num_heads=2, context_dim=16,
                     use_linear_in_transformer=False).eval()  # fmt: skip


def sharing_state(unet, frames, control=False):
    with torch.device("meta"):
        s = AttentionSharing(unet, frames, control)
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in s.state_dict().items()}


def make_p(patcher_cls, dm, sd_model=None, batch=1):
    unet = patcher_cls(KModel(dm))
    fo = SimpleNamespace(unet=unet, vae=None)
    sd = sd_model or SimpleNamespace(is_sd1=True, is_sdxl=False)
    sd.forge_objects = fo
    return SimpleNamespace(sd_model=sd, batch_size=batch, width=64, height=64, extra_result_images=[],
                           latents_after_sampling=[], sample=lambda *a, **k: "samples", close=lambda: None)  # fmt: skip


class StandInHost(forge.ForgeHost):
    """The Forge adapter with the mode's file given in memory (no model folder)."""

    def __init__(self, state):
        self.state = state

    def weight_path(self, name):
        return SimpleNamespace(name=name, state=self.state)

    def latent_format(self, p):
        return 1.0, 0.0

    def progress(self, text):
        pass

    @contextlib.contextmanager
    def progress_scope(self):  # no host progress text to clear here
        yield

    def decode_options(self):
        return DecodeOptions()

    def interrupted(self):
        return False

    def skipped(self):
        return False

    def decode_samples(self, p, samples):  # the host's VAE decode: grey pixels, 8x the latent
        return [torch.zeros(3, z.shape[-2] * 8, z.shape[-1] * 8) for z in samples]


@pytest.fixture(autouse=True)
def files_in_memory(monkeypatch):
    loads = []
    monkeypatch.setattr(pipeline, "load_unet_file", lambda path: (loads.append(path.name), path.state)[1])
    model = torch.nn.Linear(1, 1)  # the decoder / encoder stand-in (decode_rgba is replaced too)
    monkeypatch.setattr(pipeline, "cached_model", lambda kind, path, device, dtype: (loads.append(path.name), model)[1])
    monkeypatch.setattr(pipeline, "_file_stamp", lambda path: (path.name, id(path.state)))
    monkeypatch.setattr(
        pipeline, "decode_rgba", lambda decoder, pixel, latent, **kw: torch.zeros(1, 4, *pixel.shape[-2:])
    )
    return loads


def make_gen(method, state, batch=1, stop_at=1.0, weight=1.0, family="sd15", **images):
    settings = Settings.from_dict({"enabled": True, "method": method, "stop_at": stop_at, "weight": weight, **images})
    return Generation(StandInHost(state), settings, family, batch, 64, 64, ["p"] * batch)


# -- detection ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "present,version,expected",
    [
        ({"backend.patcher.unet"}, "2.0.1v1.10.1", "forge2"),
        ({"backend.patcher.unet"}, "neo", "neo"),
        ({"backend.patcher.unet", "modules_forge.packages.comfy"}, None, "neo"),
        ({"backend.patcher.unet"}, None, "forge2"),
        ({"modules_forge.unet_patcher"}, None, "forge1"),
        ({"modules.scripts", "modules.processing"}, None, "a1111"),
    ],
)
def test_detect(monkeypatch, present, version, expected):
    monkeypatch.setattr(hosts, "_has", lambda m: m in present)
    if version is None:
        monkeypatch.setitem(sys.modules, "modules_forge", None)  # import fails
    else:
        mf = types.ModuleType("modules_forge")
        mf.forge_version = SimpleNamespace(version=version)
        monkeypatch.setitem(sys.modules, "modules_forge", mf)
    assert hosts.detect() == expected
    assert ("forge2" in hosts.SUPPORTED) and ("neo" in hosts.SUPPORTED) and "forge1" not in hosts.SUPPORTED


# -- SDXL weight patches --------------------------------------------------------------------


@pytest.mark.parametrize("host", ["forge2", "neo"])
def test_patch_values_equal_core_math(monkeypatch, neo_adapter, host):
    patcher_cls, merge = use_host(monkeypatch, host)
    dm = sdxl_like()
    params = {f"diffusion_model.{k}": v.detach() for k, v in dm.named_parameters()}
    g = torch.Generator().manual_seed(3)
    state = {
        "diffusion_model.input_blocks.0.0.weight::diff::0": torch.randn(8, 8, 3, 3, generator=g),  # widened
        "diffusion_model.input_blocks.0.0.bias::diff::0": torch.randn(8, generator=g),
        "diffusion_model.proj.weight::lora::0": torch.randn(6, 2, generator=g),
        "diffusion_model.proj.weight::lora::1": torch.randn(2, 5, generator=g),
    }
    host_values = forge.host_patches(parse_patch_state(state), params, "f")
    unet = patcher_cls(KModel(dm))
    accepted = forge.add_patches(unet, "f", host_values, 0.7)
    assert sorted(accepted) == sorted(host_values)
    expected = compute_patched_tensors(params, parse_patch_state(state), 0.7)
    for key, patches in unet.patches.items():
        got = merge(params[key], patches)
        torch.testing.assert_close(got, expected[key].float(), rtol=0, atol=1e-5)
    assert expected["diffusion_model.input_blocks.0.0.weight"].shape == (8, 8, 3, 3)


def test_host_formats_are_not_interchangeable(neo_adapter):
    up, down = torch.ones(6, 2), torch.ones(2, 5)
    with pytest.raises(ValueError, match="not recognized"):  # Forge2's tuple on Neo
        merge_neo(torch.zeros(6, 5), [(1.0, forge.lora_value_forge2(up, down), 1.0, None, None)])
    with pytest.raises(TypeError):  # Neo's positional call on Forge2's keyword-only add_patches
        Forge2Patcher(KModel(sdxl_like())).add_patches({}, 1.0)
    assert isinstance(forge.lora_value_neo(up, down), FakeLoRAAdapter)
    # a diff without pad_weight is not merged on Neo (the official's load_frozen_patcher format)
    with pytest.raises(AssertionError, match="SHAPE MISMATCH"):
        merge_neo(torch.zeros(8, 4, 3, 3), [(1.0, ("diff", (torch.ones(8, 8, 3, 3),)), 1.0, None, None)])


@pytest.mark.parametrize("host", ["forge2", "neo"])
def test_sdxl_concat_every_row_and_stop_at(monkeypatch, neo_adapter, host):
    patcher_cls, _ = use_host(monkeypatch, host)
    state = {"diffusion_model.input_blocks.0.0.weight::diff::0": torch.zeros(8, 8, 3, 3)}
    fg = np.zeros((64, 64, 4), np.float32)
    gen = make_gen("FG_TO_BLEND", state, batch=2, stop_at=0.5, family="sdxl", fg_image=fg)
    p = make_p(patcher_cls, sdxl_like(), SimpleNamespace(is_sd1=False, is_sdxl=True), batch=2)
    original = p.sd_model.forge_objects.unet
    monkeypatch.setattr(StandInHost, "latent_format", lambda self, p: (1.0, 0.0))
    monkeypatch.setattr(StandInHost, "vae_moments", lambda self, p, rgb: (torch.full((1, 4, 8, 8), 0.5), None))
    gen.begin_sampling(p, torch.zeros(2, 4, 8, 8))
    unet = p.sd_model.forge_objects.unet
    assert unet is not original and not original.patches and "diffusion_model.input_blocks.0.0.weight" in unet.patches
    assert len(unet.model_options["conditioning_modifiers"]) == 1  # the unpatched switch below Stop At
    unet.model_options["conditioning_modifiers"] = []  # (its model load needs the real memory manager)
    unet.run(torch.zeros(2, 4, 8, 8), sigma=9.0)  # above sigma_end = 5: concat for all 4 rows
    seen = unet.model.seen[-1]["x"]
    assert seen.shape == (4, 8, 8, 8) and torch.all(seen[:, 4:] == 0.5)
    unet.run(torch.zeros(2, 4, 8, 8), sigma=1.0)  # below: removed
    assert unet.model.seen[-1]["x"].shape == (4, 4, 8, 8)
    assert gen.session.calls == 1 and gen.session.stopped_calls == 1
    gen.end_sampling()
    gen.check_ran()
    assert p.sd_model.forge_objects.unet is original


SDXL_KEYS = [m.key for m in M.MODES if m.family == "sdxl"]


def sdxl_patch_state(mode, seed=0):
    """A patch file of ``mode`` for :func:`sdxl_like`: LoRA on the Linear for the attention method,
    diffs (conv_in widened by the mode's condition channels) for the others."""
    g = torch.Generator().manual_seed(seed)
    if mode.apply == "lora":
        return {"diffusion_model.proj.weight::lora::0": torch.randn(6, 2, generator=g) * 0.1,
                "diffusion_model.proj.weight::lora::1": torch.randn(2, 5, generator=g) * 0.1}  # fmt: skip
    return {
        "diffusion_model.input_blocks.0.0.weight::diff::0": torch.randn(8, 4 + mode.concat_channels, 3, 3, generator=g),
        "diffusion_model.proj.weight::diff::0": torch.randn(6, 5, generator=g) * 0.1,
    }


def sdxl_generation(monkeypatch, p, key):
    """One SDXL generation as the host runs it: the hook, the host's model load for sampling (which
    merges this pass's patches into the shared model and leaves them there), UNet calls, decode."""
    mode = M.resolve(key)
    images = {f"{k}_image": np.full((64, 64, 4), 0.5, np.float32) for k in mode.inputs}
    host = StandInHost(sdxl_patch_state(mode, seed=SDXL_KEYS.index(key)))
    monkeypatch.setattr(StandInHost, "vae_moments", lambda self, p, rgb: (torch.full((1, 4, 8, 8), 0.5), None))
    gen = Generation(host, Settings.from_dict({"enabled": True, "method": key, **images}), "sdxl", 1, 64, 64, ["p"])

    def host_sample(*args, **kwargs):
        host.generation(p).begin_sampling(p, torch.zeros(1, 4, 8, 8))
        unet = p.sd_model.forge_objects.unet
        unet.load()
        with torch.no_grad():
            for sigma in (9.0, 4.0, 1.0):
                unet.run(torch.zeros(1, 4, 8, 8), sigma=sigma)
        return torch.zeros(1, 4, 8, 8)

    p.sample, p.close, p.iteration, p.extra_generation_params = host_sample, lambda: None, 0, {}
    host.attach(p, gen)
    try:
        p.sample()
    finally:
        p.close()


@pytest.mark.parametrize("host", ["forge2", "neo"])
def test_every_ordered_pair_of_sdxl_methods_back_to_back(monkeypatch, neo_adapter, host):
    """The hosts keep a generation's merged weights in the shared model until their next model load
    (seen on a real Neo: the 12-channel conv_in of one layer method was still there when the next
    one's check ran): no generation's checks may read what the previous one merged."""
    patcher_cls, _ = use_host(monkeypatch, host)
    for first in SDXL_KEYS:
        for second in SDXL_KEYS:
            if first == second:
                continue
            dm = sdxl_like()
            base = {k: v.detach().clone() for k, v in dm.named_parameters()}
            p = make_p(patcher_cls, dm, SimpleNamespace(is_sd1=False, is_sdxl=True))
            original = p.sd_model.forge_objects.unet
            sdxl_generation(monkeypatch, p, first)
            if M.resolve(first).concat:
                assert dm.input_blocks[0][0].weight.shape[1] > 4  # the host's merge is still in place
            sdxl_generation(monkeypatch, p, second)
            assert p.sd_model.forge_objects.unet is original
            original.load()  # a plain generation: the host puts the base back
            assert all(torch.equal(v, base[k]) for k, v in dm.named_parameters()), (first, second)


def test_a_conv_in_patch_of_another_width_names_the_file(monkeypatch, neo_adapter):
    """The file itself is wrong (a conv_in for another method): the message says so and how to fix it;
    a model whose own conv_in is not 4-channel is refused without blaming the file."""
    patcher_cls, _ = use_host(monkeypatch, "neo")
    fg = np.full((64, 64, 4), 0.5, np.float32)
    wrong = sdxl_patch_state(M.resolve("FG_BLEND_TO_BG"))  # 12 channels where bg2ble needs 8
    gen = make_gen("BG_TO_BLEND", wrong, family="sdxl", bg_image=fg)
    monkeypatch.setattr(StandInHost, "vae_moments", lambda self, p, rgb: (torch.full((1, 4, 8, 8), 0.5), None))
    p = make_p(patcher_cls, sdxl_like(), SimpleNamespace(is_sd1=False, is_sdxl=True))
    gen.begin_sampling(p, torch.zeros(1, 4, 8, 8))
    assert "layer_xl_bg2ble.safetensors" in gen.error and "12" in gen.error and "Delete it" in gen.error
    gen.close()
    dm = sdxl_like()
    dm.input_blocks[0][0] = nn.Conv2d(9, 8, 3, padding=1)  # an inpainting UNet's conv_in
    gen = make_gen("BG_TO_BLEND", sdxl_patch_state(M.resolve("BG_TO_BLEND")), family="sdxl", bg_image=fg)
    p = make_p(patcher_cls, dm, SimpleNamespace(is_sd1=False, is_sdxl=True))
    gen.begin_sampling(p, torch.zeros(1, 4, 8, 8))
    assert "9 input channels" in gen.error and "Delete" not in gen.error
    gen.close()


# -- SD1.5 attention sharing ----------------------------------------------------------------


@pytest.mark.parametrize("host", ["forge2", "neo"])
def test_sd15_units_only_during_the_call(monkeypatch, neo_adapter, host):
    patcher_cls, _ = use_host(monkeypatch, host)
    dm = sd15_tiny()
    gen = make_gen("JOINT_SD15", sharing_state(dm, 3), batch=3)
    p = make_p(patcher_cls, dm, batch=3)
    before = {k: v.clone() for k, v in dm.state_dict().items()}
    gen.begin_sampling(p, torch.zeros(3, 4, 8, 8))
    unet = p.sd_model.forge_objects.unet
    assert type(dm.get_submodule(MODULE_MAP_SD15[0])).__name__ != "AttentionSharingUnit"
    ctx = torch.randn(6, 77, 16)
    with torch.no_grad():
        out = unet.run(torch.randn(3, 4, 8, 8), sigma=5.0, c_crossattn=ctx)
    assert out.shape == (6, 4, 8, 8)
    call = unet.model.seen[-1]
    assert call["attn1"] == "AttentionSharingUnit"  # swapped in while the UNet ran
    assert not isinstance(dm.get_submodule(MODULE_MAP_SD15[0]), AttentionSharingUnit)  # and back after
    assert gen.session.sharing.state.cond_mark.tolist() == call["options"]["cond_mark"].tolist()  # uncond first
    assert gen.session.calls > 0 and gen.session.ran
    assert all(torch.equal(before[k], v) for k, v in dm.state_dict().items())


def test_sd15_restored_when_the_unet_raises(monkeypatch, neo_adapter):
    patcher_cls, _ = use_host(monkeypatch, "neo")
    dm = sd15_tiny()
    gen = make_gen("FG_ONLY_ATTN_SD15", sharing_state(dm, 1))
    p = make_p(patcher_cls, dm)
    gen.begin_sampling(p, torch.zeros(1, 4, 8, 8))
    with pytest.raises(RuntimeError):
        p.sd_model.forge_objects.unet.run(torch.zeros(1, 4, 8, 8), sigma=5.0, c_crossattn=torch.randn(2, 5, 99))
    assert all(not isinstance(m, AttentionSharingUnit) for m in dm.modules())


def test_sd15_stop_at_and_clone_by_others(monkeypatch, neo_adapter):
    patcher_cls, _ = use_host(monkeypatch, "forge2")
    dm = sd15_tiny()
    gen = make_gen("FG_ONLY_ATTN_SD15", sharing_state(dm, 1), stop_at=0.5)
    p = make_p(patcher_cls, dm)
    gen.begin_sampling(p, torch.zeros(1, 4, 8, 8))
    ours = p.sd_model.forge_objects.unet
    other = ours.clone()  # another extension clones our patcher (deepcopy)
    assert other.model_options["model_function_wrapper"] is ours.model_options["model_function_wrapper"]
    with torch.no_grad():
        other.run(torch.zeros(1, 4, 8, 8), sigma=1.0, c_crossattn=torch.randn(2, 77, 16))  # below Stop At
    assert other.model.seen[-1]["attn1"] != "AttentionSharingUnit"
    assert gen.session.stopped_calls == 1 and gen.session.sharing.state.calls == 0
    # the hires hook can run twice on our own clone: the second pass starts from the host's patcher again
    original = gen.session.backend.original
    gen.begin_sampling(p, torch.zeros(1, 4, 8, 8))
    assert gen.session.backend.original is original and p.sd_model.forge_objects.unet is not ours
    gen.close()  # the pass is over: clones others made of ours behave as the host's own
    assert p.sd_model.forge_objects.unet is original
    with torch.no_grad():
        other.run(torch.zeros(1, 4, 8, 8), sigma=5.0, c_crossattn=torch.randn(2, 77, 16))
    assert other.model.seen[-1]["attn1"] != "AttentionSharingUnit"


# -- never silent ---------------------------------------------------------------------------


def test_guard_wrapper_replaced_by_another_extension(monkeypatch, neo_adapter):
    patcher_cls, _ = use_host(monkeypatch, "neo")
    dm = sd15_tiny()
    gen = make_gen("FG_ONLY_ATTN_SD15", sharing_state(dm, 1))
    p = make_p(patcher_cls, dm)

    def host_sample(*args, **kwargs):  # the host calls the hook inside p.sample, then samples
        gen.begin_sampling(p, torch.zeros(1, 4, 8, 8))
        p.sd_model.forge_objects.unet.set_model_unet_function_wrapper(lambda f, a: f(a["input"], a["timestep"]))
        p.sd_model.forge_objects.unet.run(torch.zeros(1, 4, 8, 8), sigma=5.0)
        return "samples"

    p.sample = host_sample
    forge.HOST.attach(p, gen)
    with pytest.raises(LayerDiffuseError, match="did not take part"):
        p.sample()


def test_guard_install_failure_aborts_sampling(monkeypatch, neo_adapter):
    patcher_cls, _ = use_host(monkeypatch, "forge2")
    dm = sd15_tiny()
    state = sharing_state(dm, 1)
    state.pop(next(iter(state)))  # a broken file
    gen = make_gen("FG_ONLY_ATTN_SD15", state)
    p = make_p(patcher_cls, dm)
    gen.begin_sampling(p, torch.zeros(1, 4, 8, 8))  # a hook: must not raise (hosts swallow it)
    with pytest.raises(LayerDiffuseError, match="does not fit"):
        p.sd_model.forge_objects.unet.run(torch.zeros(1, 4, 8, 8), sigma=5.0)


def test_guard_never_installed(neo_adapter):
    gen = make_gen("FG_ONLY_ATTN_SD15", {})
    p = make_p(NeoPatcher, sd15_tiny())
    forge.HOST.attach(p, gen)
    with pytest.raises(LayerDiffuseError, match="never installed"):
        p.sample()


# -- families ---------------------------------------------------------------------------------


class Chroma:  # a Neo engine: no is_sd1 / is_sdxl set
    is_sd1 = False
    is_sdxl = False
    is_wan = False


@pytest.mark.parametrize("host", ["forge2", "neo"])
def test_family_refusals_before_weights(monkeypatch, neo_adapter, host, files_in_memory):
    patcher_cls, _ = use_host(monkeypatch, host)
    fam = forge._family(Chroma())
    assert fam == "Chroma"
    with pytest.raises(ValueError, match="Chroma.*supports SD1.5, SDXL and FLUX.1-dev"):
        make_gen("FG_ONLY_ATTN_SD15", {}, family=fam)
    # SD1.5 mode on an SDXL model, caught again at install time, before any file is read
    gen = make_gen("FG_ONLY_ATTN_SD15", {"x": torch.zeros(1)})
    p = make_p(patcher_cls, sdxl_like(), SimpleNamespace(is_sd1=False, is_sdxl=True))
    original = p.sd_model.forge_objects.unet
    gen.begin_sampling(p, torch.zeros(1, 4, 8, 8))
    assert files_in_memory == [] and not original.patches
    with pytest.raises(LayerDiffuseError, match="SDXL"):
        p.sd_model.forge_objects.unet.run(torch.zeros(1, 4, 8, 8), sigma=5.0)
    assert forge.family_forge2(SimpleNamespace(is_sd1=False, is_sdxl=False, is_sd3=True)) == "SD3"
    with pytest.raises(ValueError, match="SD3"):
        M.check_family(M.resolve("FG_ONLY_ATTN"), "SD3")


class FakeInitialModel:  # both hosts' placeholder until the first generation loads the checkpoint
    pass


@pytest.mark.parametrize("host", ["forge2", "neo"])
def test_family_before_the_first_load_comes_from_the_selected_checkpoint(monkeypatch, neo_adapter, host):
    """Found on a real Neo: an X/Y/Z plot as the first generation checked its cells against the
    placeholder model and refused a valid SD1.5 plot ("the loaded model is FakeInitialModel")."""
    import lib_layerdiffuse.hosts as hosts_pkg

    use_host(monkeypatch, host)
    seen = []
    monkeypatch.setattr(hosts_pkg, "checkpoint_family", lambda title=None: seen.append(title) or "sd15")
    p = SimpleNamespace(sd_model=FakeInitialModel())
    assert forge.ForgeHost().family(p) == "sd15" and seen == [None]
    monkeypatch.setattr(hosts_pkg, "checkpoint_family", lambda title=None: None)  # unreadable file
    assert forge.ForgeHost().family(p) is None  # not "FakeInitialModel": each cell then checks itself
    p.sd_model = SimpleNamespace(is_sd1=False, is_sdxl=True)
    assert forge.ForgeHost().family(p) == "sdxl"


# -- outputs ----------------------------------------------------------------------------------


def test_stealth_alpha_repaired_before_save():
    rgba = np.zeros((16, 16, 4), np.float32)
    rgba[..., 3] = np.linspace(0, 1, 16)[None]
    image = forge.HOST.to_pil_rgba(rgba)
    want = np.asarray(image)[..., 3].copy()
    image.putalpha(255)  # Forge2 stealth "Alpha": in place, before on_before_image_saved
    params = SimpleNamespace(image=image, filename="x.png", pnginfo={"parameters": "p"})
    common.before_image_saved(params)
    assert params.image is image and np.array_equal(np.asarray(image)[..., 3], want)
    plain = Image.new("RGBA", (4, 4), (1, 2, 3, 255))  # not ours: untouched
    common.before_image_saved(SimpleNamespace(image=plain))
    assert np.asarray(plain)[..., 3].min() == 255


def test_previews_and_final_latents():
    p = SimpleNamespace(extra_result_images=[], batch_size=2, latents_after_sampling=[torch.ones(4, 2, 2)] * 3)
    processed = SimpleNamespace(extra_images=p.extra_result_images)
    forge.HOST.show_preview(processed, Image.new("RGB", (8, 8)), "info")
    assert len(p.extra_result_images) == 1 and p.extra_result_images[0].mode == "RGB"
    samples = torch.zeros(2, 4, 2, 2)
    assert forge.HOST.final_latents(p, samples, None) is samples

    class Decoded(list):
        already_decoded = True

    # after hires Forge's latents_after_sampling holds decoded pixels (seen on a real Forge2):
    # the latent is the one the sampler returned, captured during the pass
    captured = torch.ones(2, 4, 2, 2)
    assert forge.HOST.final_latents(p, Decoded(), captured) is captured
    sampler = SimpleNamespace(sample_img2img=lambda *a: captured)
    session = SimpleNamespace(result=None)
    capture = common.SamplerCapture(sampler)
    capture.install(session)
    assert sampler.sample_img2img() is captured and session.result is captured
    capture.restore()
    assert sampler.sample_img2img() is captured and session.result is captured
    session.result = None
    sampler.sample_img2img()
    assert session.result is None  # unwrapped


# -- nothing outlives a generation ------------------------------------------------------------


def live_objects() -> dict[str, int]:
    names = ("Generation", "UNetSession", "ForgeBackend", "AttentionSharing", "AttentionSharingUnit", "SharingState")
    counts: dict[str, int] = {}
    for obj in gc.get_objects():
        name = type(obj).__name__
        if name in names and type(obj).__module__.startswith("lib_layerdiffuse"):
            counts[name] = counts.get(name, 0) + 1
    return counts


def run_generation(p, method, state, batch, fail=None, **settings):
    """What the script and the host do for one generation, through the host contract only."""
    host = StandInHost(state)
    gen = Generation(host, Settings.from_dict({"enabled": True, "method": method, **settings}), "sd15", batch,
                     64, 64, ["p"] * batch)  # fmt: skip

    def host_sample(*args, **kwargs):  # the script's hook, then sampling on whatever patcher is current
        host.generation(p).begin_sampling(p, torch.zeros(batch, 4, 8, 8))
        unet = p.sd_model.forge_objects.unet
        with torch.no_grad():
            for sigma in (9.0, 4.0, 1.0):
                if fail == "mid":
                    raise RuntimeError("boom")
                unet.run(torch.zeros(batch, 4, 8, 8), sigma=sigma, c_crossattn=torch.randn(2 * batch, 77, 16))
        return torch.zeros(batch, 4, 8, 8)

    def close():
        p.closed += 1

    p.sample, p.close = host_sample, close
    host.attach(p, gen)
    del gen
    try:
        p.sample()
    finally:
        p.close()


def test_nothing_outlives_a_generation(monkeypatch, neo_adapter):
    patcher_cls, _ = use_host(monkeypatch, "neo")
    dm = sd15_tiny()
    p = make_p(patcher_cls, dm, batch=3)
    p.closed, p.iteration, p.extra_generation_params = 0, 0, {}
    original = p.sd_model.forge_objects.unet
    states = {1: sharing_state(dm, 1), 3: sharing_state(dm, 3)}
    gc.collect()
    baseline = live_objects()
    gc.disable()
    try:
        for _ in range(2):
            run_generation(p, "FG_ONLY_ATTN_SD15", states[1], 1)
            assert live_objects() == baseline
            run_generation(p, "JOINT_SD15", states[3], 3, stop_at=0.5)
            assert live_objects() == baseline
            with pytest.raises(RuntimeError, match="boom"):
                run_generation(p, "JOINT_SD15", states[3], 3, fail="mid")
            assert live_objects() == baseline
            with pytest.raises(LayerDiffuseError, match="does not fit"):  # a broken file: refused
                run_generation(p, "JOINT_SD15", states[1], 3)
            assert live_objects() == baseline
    finally:
        gc.enable()
    assert p.sd_model.forge_objects.unet is original and not original.model_options.get("model_function_wrapper")
    assert p.closed == 8 and "_layerdiffuse" not in vars(p)


# -- a LoRA file through the host's own loader ----------------------------------------------


@pytest.fixture
def host_lora(monkeypatch):
    """Both hosts' ``backend.utils.load_torch_file`` and ``backend.patcher.lora`` (key map, parser)."""
    files = {}
    names = ["backend", "backend.utils", "backend.patcher", "backend.patcher.lora"]
    mods = {n: types.ModuleType(n) for n in names}
    for n, m in mods.items():
        monkeypatch.setitem(sys.modules, n, m)
    mods["backend.utils"].load_torch_file = lambda path, safe_load=False: safe_load and files[path]
    seen_maps = []

    def model_lora_keys_unet(model, key_map):
        seen_maps.append(key_map)
        for k, _ in model.named_parameters():
            if k.endswith(".weight"):  # kohya-style name -> the model's key
                key_map["lora_unet_" + k[: -len(".weight")].replace(".", "_")] = k
        return key_map

    def load_lora(state, key_map):
        patches, unmatched = {}, []
        for k, v in state.items():
            base = k.split(".")[0]
            if base in key_map:
                patches[key_map[base]] = ("lora", (v, v, None, None, None))
            else:
                unmatched.append(k)
        return patches, unmatched

    mods["backend.patcher.lora"].model_lora_keys_unet = model_lora_keys_unet
    mods["backend.patcher.lora"].load_lora = load_lora
    return SimpleNamespace(files=files, seen_maps=seen_maps)


def test_load_lora_through_the_host(monkeypatch, host_lora):
    patcher_cls, _ = use_host(monkeypatch, "forge2")
    p = make_p(patcher_cls, sdxl_like(), SimpleNamespace(is_sd1=False, is_sdxl=True))
    original = p.sd_model.forge_objects.unet
    host_lora.files["good.safetensors"] = {"lora_unet_diffusion_model_proj.lora_up.weight": torch.ones(1),
                                           "lora_unet_elsewhere.lora_up.weight": torch.ones(1)}  # fmt: skip
    forge.HOST.load_lora(p, "good.safetensors", 0.8)
    unet = p.sd_model.forge_objects.unet
    assert unet is not original and not original.patches  # a clone, the host's patcher untouched
    assert (
        list(unet.patches) == ["diffusion_model.proj.weight"]
        and unet.patches["diffusion_model.proj.weight"][0][0] == 0.8
    )
    host_lora.files["other.safetensors"] = {"lora_te_text_model.lora_up.weight": torch.ones(1)}
    p.sd_model.forge_objects.unet = original
    with pytest.raises(LayerDiffuseError, match="other.safetensors: none of its 1 keys map.*lora_te_text_model"):
        forge.HOST.load_lora(p, "other.safetensors", 1.0)
    assert p.sd_model.forge_objects.unet is original
    assert len(host_lora.seen_maps) == 2 and host_lora.seen_maps[0] is not host_lora.seen_maps[1]  # fresh key maps


def test_contract_model_operations(monkeypatch):
    """The VAE, sigma and device operations of the Forge adapter on stand-in objects."""
    from lib_layerdiffuse.hosts.common import posterior_moments

    vae = nn.Module()
    vae.encoder = nn.Conv2d(3, 8, 8, stride=8)
    vae.quant_conv = None
    vae.decoder = nn.ConvTranspose2d(4, 3, 8, stride=8)
    vae.decode = lambda z: vae.decoder(z)
    vae.scaling_factor, vae.shift_factor = 0.3611, 0.1159
    dm = sdxl_like()
    p = make_p(Forge2Patcher, dm, SimpleNamespace(is_sd1=False, is_sdxl=True))
    p.sd_model.forge_objects.vae = SimpleNamespace(first_stage_model=vae)
    assert forge.HOST.latent_format(p) == (0.3611, 0.1159)
    rgb = torch.rand(1, 3, 16, 16)
    mean, std = forge.HOST.vae_moments(p, rgb)
    assert mean.shape == std.shape == (1, 4, 2, 2) and torch.equal(mean, posterior_moments(vae, rgb)[0])
    assert forge.HOST.vae_decode(p, mean).shape == (1, 3, 16, 16)
    assert forge.HOST.percent_to_sigma(p, 0.25) == 7.5
    assert forge.HOST.device_dtype(p) == (torch.device("cpu"), torch.float32)
    assert forge.HOST.low_vram() is False  # no memory manager here


def test_hook_twice_around_a_reset_is_one_pass(monkeypatch, neo_adapter):
    """Forge2 calls process_before_every_sampling twice before hires, resetting forge_objects in
    between: the second install replaces the first, and the pass counts once."""
    patcher_cls, _ = use_host(monkeypatch, "forge2")
    dm = sd15_tiny()
    gen = make_gen("FG_ONLY_ATTN_SD15", sharing_state(dm, 1))
    p = make_p(patcher_cls, dm)
    original = p.sd_model.forge_objects.unet
    x = torch.zeros(1, 4, 8, 8)
    gen.begin_sampling(p, x)
    p.sd_model.forge_objects.unet = original  # the host's reset
    gen.begin_sampling(p, x)
    with torch.no_grad():
        p.sd_model.forge_objects.unet.run(x, sigma=5.0, c_crossattn=torch.randn(2, 77, 16))
    gen.end_sampling()
    gen.check_ran()  # no "did not take part" for the replaced install
    # a pass whose UNet calls all bypassed our changes is still refused
    gen.begin_sampling(p, torch.zeros(1, 4, 8, 8))
    gen.end_sampling()
    with pytest.raises(LayerDiffuseError, match="did not take part"):
        gen.check_ran()
    gen.close()


# -- FLUX: detection, the LoRA through the host's loader, the merged check ------------------------


class Flux(SimpleNamespace):
    """The hosts' ``backend/diffusion_engine/flux.py`` engine class (detected by its name)."""


@pytest.mark.parametrize("host", ["forge2", "neo"])
def test_flux_detection(monkeypatch, host):
    use_host(monkeypatch, host)
    dev = Flux(
        is_sd1=False, is_sdxl=False, model_config=SimpleNamespace(huggingface_repo="black-forest-labs/FLUX.1-dev")
    )
    schnell = Flux(model_config=SimpleNamespace(huggingface_repo="black-forest-labs/FLUX.1-schnell"))
    assert forge._family(dev) == "flux"
    assert forge._family(schnell) == "FLUX.1-schnell"
    flux_mode = M.resolve("(FLUX) Only Generate Transparent Image")
    M.check_family(flux_mode, "flux")
    with pytest.raises(
        LayerDiffuseError, match=r"needs a FLUX.1-dev checkpoint, but the loaded model is FLUX.1-schnell"
    ):
        M.check_family(flux_mode, forge._family(schnell))
    with pytest.raises(
        LayerDiffuseError, match=r"needs an SDXL checkpoint, but the loaded model is FLUX.1-dev.*\(FLUX\)"
    ):
        M.check_family(M.DEFAULT, "flux")


def flux_gen(host_lora, stop_at=1.0, weight=1.0):
    host_lora.files["layerlora.safetensors"] = {"lora_unet_diffusion_model_proj.lora_up.weight": torch.ones(1)}
    settings = Settings.from_dict({"enabled": True, "method": "FG_ONLY_FLUX", "stop_at": stop_at, "weight": weight})

    class FluxHost(StandInHost):
        def weight_path(self, name):
            assert name in ("layerlora", "TransparentVAE")
            return Path(f"{name}.safetensors")

    return Generation(FluxHost({}), settings, "flux", 1, 64, 64, ["p"])


@pytest.fixture
def lora_file_checks(monkeypatch, host_lora):
    """The finite check reads the LoRA file once per version: the stand-in file is in memory."""
    monkeypatch.setattr(pipeline, "load_unet_file", lambda path: host_lora.files[str(path)])
    monkeypatch.setattr(pipeline, "_file_stamp", lambda path: (str(path), len(host_lora.files[str(path)])))
    pipeline._FINITE.clear()


@pytest.mark.parametrize("host", ["forge2", "neo"])
def test_flux_lora_goes_through_the_host_and_is_checked_merged(monkeypatch, host_lora, lora_file_checks, host):
    patcher_cls, _ = use_host(monkeypatch, host)
    dm = sdxl_like()
    p = make_p(patcher_cls, dm, Flux(is_sd1=False, is_sdxl=False))
    original = p.sd_model.forge_objects.unet
    gen = flux_gen(host_lora, weight=0.7)
    x = torch.zeros(1, 4, 8, 8)
    gen.begin_sampling(p, x)
    assert gen.error is None
    unet = p.sd_model.forge_objects.unet
    assert unet is not original and not original.patches  # a clone carries the LoRA
    assert (
        list(unet.patches) == ["diffusion_model.proj.weight"]
        and unet.patches["diffusion_model.proj.weight"][0][0] == 0.7
    )
    with torch.no_grad():
        dm.proj.weight.add_(0.25)  # the host merges the LoRA when it loads the model for sampling
        unet.run(x, sigma=5.0)
    gen.end_sampling()
    gen.check_ran()
    assert p.sd_model.forge_objects.unet is original
    gen.close()


@pytest.mark.parametrize("host", ["forge2", "neo"])
def test_flux_lora_still_merged_from_the_last_generation_counts(monkeypatch, host_lora, lora_file_checks, host):
    """The host merges a LoRA again only when the patch list changed: the second of two identical
    generations starts with the LoRA merged and is accepted; one at another strength re-merges,
    a generation without it restores the base (seen on a real Neo, docs/hosts.md §4)."""
    patcher_cls, _ = use_host(monkeypatch, host)
    dm = sdxl_like()
    p = make_p(patcher_cls, dm, Flux(is_sd1=False, is_sdxl=False))
    original = p.sd_model.forge_objects.unet
    base = dm.proj.weight.detach().clone()
    x = torch.zeros(1, 4, 8, 8)
    for weight in (1.0, 1.0, 0.5, 0.5):
        gen = flux_gen(host_lora, weight=weight)
        gen.begin_sampling(p, x)
        unet = p.sd_model.forge_objects.unet
        unet.load()
        with torch.no_grad():
            unet.run(x, sigma=5.0)
        gen.end_sampling()
        gen.check_ran()
        gen.close()
        assert p.sd_model.forge_objects.unet is original
        assert torch.allclose(dm.proj.weight, base + 0.25 * weight)
    original.load()  # a plain generation
    assert torch.equal(dm.proj.weight, base)


def test_flux_lora_not_merged_is_refused(monkeypatch, host_lora, lora_file_checks):
    patcher_cls, _ = use_host(monkeypatch, "forge2")
    p = make_p(patcher_cls, sdxl_like(), Flux(is_sd1=False, is_sdxl=False))
    gen = flux_gen(host_lora)
    gen.begin_sampling(p, torch.zeros(1, 4, 8, 8))
    with pytest.raises(LayerDiffuseError, match=r"did not merge layerlora.safetensors into the model"):
        p.sd_model.forge_objects.unet.run(torch.zeros(1, 4, 8, 8), sigma=5.0)  # weights unchanged
    gen.end_sampling()
    with pytest.raises(LayerDiffuseError, match="did not take part"):
        gen.check_ran()
    gen.close()


def test_flux_lora_nan_is_refused_before_sampling(monkeypatch, host_lora, lora_file_checks):
    patcher_cls, _ = use_host(monkeypatch, "forge2")
    p = make_p(patcher_cls, sdxl_like(), Flux(is_sd1=False, is_sdxl=False))
    original = p.sd_model.forge_objects.unet
    gen = flux_gen(host_lora)
    host_lora.files["layerlora.safetensors"]["lora_unet_diffusion_model_proj.lora_up.weight"] = torch.tensor(
        [float("nan")]
    )
    gen.begin_sampling(p, torch.zeros(1, 4, 8, 8))
    assert "layerlora.safetensors holds non-finite values: lora_unet_diffusion_model_proj" in gen.error
    with pytest.raises(LayerDiffuseError):
        p.sd_model.forge_objects.unet.run(torch.zeros(1, 4, 8, 8), sigma=5.0)  # sampling cannot run
    gen.close()
    assert p.sd_model.forge_objects.unet is original


def test_flux_stop_at_switches_to_the_unpatched_model(monkeypatch, host_lora, lora_file_checks):
    patcher_cls, _ = use_host(monkeypatch, "forge2")
    dm = sdxl_like()
    p = make_p(patcher_cls, dm, Flux(is_sd1=False, is_sdxl=False))
    gen = flux_gen(host_lora, stop_at=0.5)  # sigma_end 5.0 on the stand-in predictor
    gen.begin_sampling(p, torch.zeros(1, 4, 8, 8))
    unet = p.sd_model.forge_objects.unet
    assert unet.model_options.get("conditioning_modifiers")  # the official Stop At route
    with torch.no_grad():
        dm.proj.weight.add_(0.25)
        unet.run(torch.zeros(1, 4, 8, 8), sigma=8.0)
    assert gen.session.calls == 1
    gen.end_sampling()
    gen.check_ran()
    gen.close()


def test_flux_decode_reads_the_raw_unclipped_decode_and_the_unscaled_latent(monkeypatch, host_lora):
    """The Flux decode's inputs as the reference makes them (docs/hosts.md §4): the host VAE's raw
    decode x * 0.5 + 0.5 without clipping, and z / scale + shift; RGBA comes back alpha first."""
    from lib_layerdiffuse import flux

    seen = {}

    def spy(decoder, pixel, latent, **knobs):
        seen.update(pixel=pixel, latent=latent, knobs=knobs)
        out = torch.zeros(1, 4, *pixel.shape[-2:])
        out[:, 0] = 0.25  # alpha first
        return out

    monkeypatch.setattr(flux, "decode_rgba", spy)
    raw = torch.linspace(-1.2, 1.2, 3 * 64 * 64).reshape(1, 3, 64, 64)  # overshoots [-1, 1]

    class FluxVAEHost(StandInHost):
        def device_dtype(self, p):
            return torch.device("cpu"), torch.float32

        def low_vram(self):
            return False

        def latent_format(self, p):
            return 0.3611, 0.1159

        def vae_decode(self, p, latent):
            seen["decoded"] = latent.clone()
            return raw

    settings = Settings.from_dict({"enabled": True, "method": "FG_ONLY_FLUX"})
    gen = Generation(FluxVAEHost({}), settings, "flux", 1, 64, 64, ["p"])
    z = torch.randn(1, 16, 8, 8)
    host_pixels = torch.rand(1, 3, 64, 64)  # the host's clamped 8-bit decode: not what Flux reads
    gen.decode_batch(SimpleNamespace(), 0, z, host_pixels)
    want_latent = z / 0.3611 + 0.1159
    assert torch.allclose(seen["latent"], want_latent) and torch.allclose(seen["decoded"], want_latent)
    assert torch.equal(seen["pixel"], raw * 0.5 + 0.5) and seen["pixel"].max() > 1.0  # not clipped
    assert seen["knobs"]["passes"] == 8
    rgba = gen.take(0)
    assert rgba.shape == (64, 64, 4) and np.allclose(rgba[..., 3], 0.25)  # alpha last in the image


def test_flux_img2img_offset_uses_the_flux_encoder(monkeypatch):
    from lib_layerdiffuse import flux

    calls = []
    monkeypatch.setattr(flux, "encode_offset", lambda enc, rgba: (calls.append(len(rgba)), torch.ones(1, 16, 8, 8))[1])
    monkeypatch.setattr(pipeline, "encode_offset", lambda enc, rgba: pytest.fail("the SD encoder was used"))

    class FluxVAEHost(StandInHost):
        def device_dtype(self, p):
            return torch.device("cpu"), torch.float32

        def low_vram(self):
            return False

        def vae_moments(self, p, rgb):
            return torch.zeros(1, 16, 8, 8), torch.full((1, 16, 8, 8), 0.5)

    settings = Settings.from_dict({"enabled": True, "method": "FG_ONLY_FLUX"})
    gen = Generation(FluxVAEHost({}), settings, "flux", 1, 64, 64, ["p"])
    adjusted = gen.encode_init(SimpleNamespace(), [np.random.default_rng(0).random((64, 64, 4), dtype=np.float32)])
    assert calls == [1] and torch.allclose(adjusted, torch.full((1, 16, 8, 8), 0.5))  # mean + std * offset


# -- the checkpoints people run today (#23) -----------------------------------------------------


def sdxl_run(monkeypatch, host, prediction_type=None, sigmas=None, model_config=None):
    """One SDXL 'Only Generate Transparent Image' generation through the host contract on the stand-ins
    (attach, the host's ``p.sample`` with the script's hook, the decode); returns ``p``."""
    patcher_cls, _ = use_host(monkeypatch, host)
    gen = make_gen("FG_ONLY_ATTN", sdxl_patch_state(M.resolve("FG_ONLY_ATTN")), family="sdxl")
    sd = SimpleNamespace(is_sd1=False, is_sdxl=True)
    if model_config is not None:
        sd.model_config = model_config
    p = make_p(patcher_cls, sdxl_like(), sd)
    predictor = p.sd_model.forge_objects.unet.model.predictor
    if prediction_type is not None:
        predictor.prediction_type = prediction_type
    if sigmas is not None:
        predictor.sigmas = sigmas
    p.extra_generation_params, p.iteration = {}, 0

    def host_sample(*args, **kwargs):
        gen = gen_host.generation(p)
        gen.begin_sampling(p, torch.zeros(1, 4, 8, 8))
        unet = p.sd_model.forge_objects.unet
        unet.model_options["conditioning_modifiers"] = []  # (its model load needs the real memory manager)
        unet.run(torch.zeros(1, 4, 8, 8), sigma=9.0)
        return torch.zeros(1, 4, 8, 8)

    gen_host = gen.host
    p.sample = host_sample
    gen_host.attach(p, gen)
    p.sample()
    p.gen = gen
    return p


@pytest.mark.parametrize("host", ["forge2", "neo"])
@pytest.mark.parametrize("prediction_type,written", [("v_prediction", "v"), ("epsilon", None), (None, None)])
def test_v_prediction_is_detected_and_written(monkeypatch, neo_adapter, host, prediction_type, written):
    p = sdxl_run(monkeypatch, host, prediction_type)
    assert p.extra_generation_params.get("layerdiffusion_prediction") == written
    assert p.gen.prediction == (written or "eps")


@pytest.mark.parametrize("host", ["forge2", "neo"])
def test_zero_terminal_snr_is_detected(monkeypatch, neo_adapter, host):
    from lib_layerdiffuse.schedules import rescale_zero_terminal_snr, scaled_linear_alphas_cumprod

    acp = scaled_linear_alphas_cumprod()
    assert not sdxl_run(monkeypatch, host, sigmas=((1 - acp) / acp) ** 0.5).gen.zero_snr
    ztsnr = rescale_zero_terminal_snr(acp)
    assert sdxl_run(monkeypatch, host, sigmas=((1 - ztsnr) / ztsnr) ** 0.5).gen.zero_snr  # Neo while it samples
    assert sdxl_run(monkeypatch, host, model_config=SimpleNamespace(ztsnr=True)).gen.zero_snr  # the ztsnr key


@pytest.mark.parametrize("host", ["forge2", "neo"])
def test_degenerate_alpha_reaches_the_infotext(monkeypatch, neo_adapter, host):
    """The stand-in decode gives alpha 0 everywhere: the image is named 'empty' through the callable
    infotext entry the hosts' create_infotext calls with its locals."""
    p = sdxl_run(monkeypatch, host)
    note = p.extra_generation_params["layerdiffusion_alpha"]
    assert note(p=p, index=0, all_prompts=["p"]) == "empty"
    assert note(p=p, index=1, all_prompts=["p"]) is None
    assert "transparent everywhere in image 1 " in p.gen.alpha_warning()
    assert "v-prediction" not in p.gen.alpha_warning() and "zero-terminal" not in p.gen.alpha_warning()


@pytest.mark.parametrize(
    "prediction,ztsnr,words",
    [
        ("v", True, "This model is v-prediction with a zero-terminal-SNR schedule; the published weights"),
        ("v", False, "This model is v-prediction; the published weights"),
        (None, True, "This model samples a zero-terminal-SNR schedule; the published weights"),
    ],
)
def test_the_alpha_warning_names_what_the_model_differs_in(monkeypatch, neo_adapter, prediction, ztsnr, words):
    """What sampling learnt of the model (v-prediction, a zero-terminal-SNR schedule) is named in the warning."""
    p = sdxl_run(monkeypatch, "neo", prediction_type="v_prediction" if prediction == "v" else None,
                 model_config=SimpleNamespace(ztsnr=True) if ztsnr else None)  # fmt: skip
    assert words in p.gen.alpha_warning()
