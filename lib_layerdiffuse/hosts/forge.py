"""Forge2 (lllyasviel/stable-diffusion-webui-forge, 2024 backend) and Forge Neo adapter.

The model side of :class:`pipeline.Host` on Forge's objects (what Forge shares with
A1111 is in :mod:`.common`). Everything goes through the host's ``UnetPatcher`` on a clone that is assigned back to
``p.sd_model.forge_objects.unet`` (the host resets that object before every sampling, so its
own restore applies; our code changes no tensor of the shared model outside the patcher):

* SD1.5 attention sharing: a UNet function wrapper swaps our units into the shared UNet
  only while the UNet runs and puts the originals back in ``finally`` (object patches of
  ``nn.Module``\\ s break on Neo, attention-replace patches get projected q/k/v). The cond
  marks come from ``c["transformer_options"]["cond_mark"]`` (Forge may put uncond first).
* SDXL: weight patches through ``add_patches`` in each host's format (diff with
  ``pad_weight`` for the widened conv_in; LoRA as a tuple on Forge2 and as Neo's
  ``LoRAAdapter``); the concat condition as ``c_concat`` added by the UNet function
  wrapper for every row (Neo ignores ``extra_concat_condition`` on non-inpaint models).
* Stop At: the session's one rule, on ``predictor.percent_to_sigma``; below it the units
  are off and ``c_concat`` is removed; weight-patched modes switch to the unpatched UNet
  through a conditioning modifier, as the official extension does.

Per-host differences (docs/hosts.md §3) are the small functions chosen at import below.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from types import SimpleNamespace

import torch

from ..errors import LayerDiffuseError, PatchError, Refusal
from ..modes import QWEN_IMAGE
from ..patches import PREFIX, Patch, match_keys
from ..session import UNetBackend, UNetSession
from .common import SamplerCapture, WebUIHost, place_infotext, posterior_moments, raw_decode

log = logging.getLogger("layerdiffuse")
ZERO_TERMINAL_SIGMA = 1000.0  # a last sigma above: a zero-terminal-SNR schedule (SD's ends at ~14.6)


def _detect_neo() -> bool:
    try:
        from modules_forge import forge_version  # type: ignore

        if str(getattr(forge_version, "version", "")).lower().startswith("neo"):
            return True
    except ImportError:
        pass
    try:
        return importlib.util.find_spec("modules_forge.packages.comfy") is not None
    except (ImportError, ValueError):
        return False


# -- per-host differences ------------------------------------------------------------------


def lora_value_forge2(up: torch.Tensor, down: torch.Tensor):
    """Forge2's ``merge_lora_to_weight``: ``("lora", (up, down, alpha, mid, dora))``; alpha None = 1."""
    return ("lora", (up, down, None, None, None))


def lora_value_neo(up: torch.Tensor, down: torch.Tensor):
    """Neo wants weight-adapter objects for LoRA (a ``"lora"`` tuple raises "not recognized")."""
    from modules_forge.packages.comfy.weight_adapter.lora import LoRAAdapter  # type: ignore

    return LoRAAdapter(set(), (up, down, None, None, None, None))


def diff_value(delta: torch.Tensor):
    """Both hosts: Neo grows a smaller weight only with ``pad_weight``; Forge2 ignores the flag."""
    return ("diff", (delta, {"pad_weight": True}))


def add_patches_forge2(unet, filename: str, patches: dict, strength: float):
    return unet.add_patches(filename=filename, patches=patches, strength_patch=strength, strength_model=1.0)


def add_patches_neo(unet, filename: str, patches: dict, strength: float):
    # positional: plain patches (filename + online_mode would route them to the LoRA loader);
    # also fits the ComfyUI-style ``add_patches(patches, strength_patch, strength_model)``
    return unet.add_patches(patches, strength, 1.0)


def family_flux(sd_model) -> str | None:
    """FLUX.1-dev and its fine-tunes: the host's ``Flux`` engine without schnell's schedule (the
    LayerDiffuse LoRA was trained on dev). None: not a Flux engine."""
    if type(sd_model).__name__ != "Flux":
        return None
    repo = str(getattr(getattr(sd_model, "model_config", None), "huggingface_repo", "") or "")
    return "FLUX.1-schnell" if "schnell" in repo.lower() else "flux"


def family_forge2(sd_model) -> str | None:
    if getattr(sd_model, "is_sd1", False):
        return "sd15"
    if getattr(sd_model, "is_sdxl", False):
        return "sdxl"
    flux = family_flux(sd_model)
    if flux is not None:
        return flux
    for flag, name in (("is_sd2", "SD2"), ("is_sd3", "SD3")):
        if getattr(sd_model, flag, False):
            return name
    return type(sd_model).__name__


def family_neo(sd_model) -> str | None:
    """Neo also loads Flux2, Chroma, Qwen-Image, Lumina, Z-Image, Anima and Wan: named by engine;
    a Qwen-Image engine is "qwen_layered" when its checkpoint file is Qwen-Image-Layered."""
    if getattr(sd_model, "is_sd1", False):
        return "sd15"
    if getattr(sd_model, "is_sdxl", False):
        return "sdxl"
    flux = family_flux(sd_model)
    if flux is not None:
        return flux
    if type(sd_model).__name__ == "QwenImage":
        from . import qwen_family

        keys = _checkpoint_keys(sd_model)
        return (qwen_family(keys) if keys else None) or QWEN_IMAGE
    return type(sd_model).__name__


def _checkpoint_path(sd_model) -> str | None:
    return getattr(getattr(sd_model, "sd_checkpoint_info", None), "filename", None)


def _checkpoint_keys(sd_model) -> list[str]:
    """The tensor names of the loaded checkpoint's file (its header only); [] where it cannot be read
    (a GGUF file, a folder)."""
    from ..errors import WeightFileError
    from ..weights import read_header

    path = _checkpoint_path(sd_model)
    try:
        return list(read_header(path)) if path else []
    except (OSError, WeightFileError):
        return []


def addition_weight(sd_model) -> torch.Tensor:
    """``addition_t_embedding.weight`` of the loaded Qwen-Image-Layered checkpoint. Neo's Qwen-Image module
    has no such parameter and drops it at load, so it is read from the file (one small tensor)."""
    from safetensors import safe_open

    from ..qwen_layered import ADDITION_KEY

    path = _checkpoint_path(sd_model)
    keys = _checkpoint_keys(sd_model)
    key = next((k for k in keys if k == ADDITION_KEY or k.endswith("." + ADDITION_KEY)), None)
    if key is None:
        raise LayerDiffuseError(
            f"the loaded checkpoint ({path}) has no {ADDITION_KEY}: it is not Qwen-Image-Layered (or not a "
            ".safetensors file LayerDiffuse can read). Load qwen_image_layered_bf16.safetensors or its fp8 version."
        )
    with safe_open(path, "pt") as f:
        return f.get_tensor(key)


def _negative_conditioning(p):
    """The negative prompt's conditioning as the host makes it (one image; Neo's Qwen engine returns a list
    of ``[T, D]`` states), for true CFG when the host itself skipped it (CFG Scale 1)."""
    from modules import prompt_parser  # type: ignore

    texts = prompt_parser.SdConditioning(
        [(getattr(p, "negative_prompts", None) or [""])[0]], is_negative_prompt=True, width=p.width, height=p.height
    )
    states = p.sd_model.get_learned_conditioning(texts)
    return [[SimpleNamespace(cond=states[0])]]


# peak working memory of the RGBA VAE per output pixel, fp32: about 2.3 KB measured for a 512x512 decode on
# CPU (encode about 1 KB), rounded up
VAE_BYTES_PER_PIXEL = 3 * 1024


class RoomFirst:
    """The RGBA VAE as ``qwen_layered.decompose`` uses it, with Neo asked to make room on the device before each
    encode and decode (``memory_management.free_memory`` offloads the transformer as far as needed, as Neo does
    before its own VAE work), so a card filled by the 20 B transformer does not run out at the decode."""

    def __init__(self, vae, device, free_memory):
        self.vae, self.device, self.free_memory = vae, device, free_memory

    def parameters(self):
        return self.vae.parameters()

    def _room(self, pixels: int) -> None:
        if torch.device(self.device).type != "cpu":
            self.free_memory(VAE_BYTES_PER_PIXEL * pixels, torch.device(self.device))

    def encode_mean(self, x):
        self._room(x.shape[-2] * x.shape[-1])
        return self.vae.encode_mean(x)

    def decode(self, z):
        self._room(z.shape[-2] * z.shape[-1] * 64)
        return self.vae.decode(z)


def single_cond(value, what: str) -> torch.Tensor:
    """The one text conditioning ``[1, T, D]`` of a batch of one, from the host's objects: the prompt's
    ``MulticondLearnedConditioning`` (``.batch[image][AND part].schedules[step].cond``) or the negative
    prompt's lists (``[image][step].cond``)."""

    def one(items, kind: str):
        if not isinstance(items, (list, tuple)) or len(items) != 1:
            n = len(items) if isinstance(items, (list, tuple)) else type(items).__name__
            raise LayerDiffuseError(
                f"the {what} has {n} {kind}; Qwen-Image-Layered takes one plain prompt for one image (no AND, no "
                "[from:to:when] prompt editing)."
            )
        return items[0]

    if hasattr(value, "batch"):
        schedules = one(one(value.batch, "images"), "AND parts").schedules
    else:
        schedules = one(value, "images")
    cond = getattr(one(schedules, "prompt-editing steps"), "cond", None)
    if not isinstance(cond, torch.Tensor) or cond.ndim not in (2, 3):
        raise LayerDiffuseError(
            f"the {what}'s conditioning is {type(cond).__name__}, not the text encoder's states of Qwen-Image."
        )
    return cond if cond.ndim == 3 else cond[None]


NEO = _detect_neo()
HOST_NAME = "Forge Neo" if NEO else "Forge2"
lora_value = lora_value_neo if NEO else lora_value_forge2
add_patches = add_patches_neo if NEO else add_patches_forge2
_family = family_neo if NEO else family_forge2


# -- one sampling pass ----------------------------------------------------------------------


def host_patches(patches: dict[str, Patch], params: dict, source: str) -> dict:
    """``{model_key: host patch value}`` for ``add_patches`` (keys the model lacks are dropped)."""
    match_keys(patches, params, source)
    out = {}
    for key, patch in patches.items():
        if key not in params:
            continue
        if patch.kind == "lora":
            out[key] = lora_value(patch.slots[0], patch.slots[1])
        else:
            out[key] = diff_value(patch.slots[0])
    return out


def host_lora_patches(unet, path) -> tuple[dict, str]:
    """A LoRA file parsed by the host's own loader for ``unet`` (a patcher clone): the host's key
    map (diffusers/kohya names onto fused Flux weights, with slices) and its patch objects.
    A file none of whose keys map onto the model is refused, naming a few."""
    from backend.patcher import lora as host_lora  # type: ignore
    from backend.utils import load_torch_file  # type: ignore

    state = load_torch_file(str(path), safe_load=True)
    key_map = host_lora.model_lora_keys_unet(unet.model, {})  # a fresh dict: the host's default is shared
    patches, unmatched = host_lora.load_lora(state, key_map)
    name = Path(str(path)).name
    if not patches:
        few = ", ".join(sorted(state)[:3])
        raise PatchError(
            f"{name}: none of its {len(state)} keys map onto the loaded model (e.g. {few}); it was made for "
            "another model."
        )
    if unmatched:
        log.warning("LayerDiffuse: %s: %d keys do not map onto this model", name, len(unmatched))
    return patches, name


def add_host_lora(unet, path, weight: float) -> dict:
    """The LoRA file on ``unet`` (a patcher clone) through the host's loader; returns its patches."""
    patches, name = host_lora_patches(unet, path)
    # keywords: Forge2's signature is keyword-only, and Neo takes patches with a filename and
    # online_mode as a LoRA; online_mode off merges them when the host loads the model
    unet.add_patches(filename=name, patches=patches, strength_patch=weight, strength_model=1.0, online_mode=False)
    return patches


def _base_weight(patcher, key: str) -> torch.Tensor | None:
    """A weight of ``patcher``'s model as the base model has it (None: no such weight).

    Both hosts merge patches into the shared model when it loads for sampling and leave them there
    until the next load of other patches, keeping the weights from before: LoRA files in
    ``lora_loader.backup`` (both hosts), Neo's plain patches in the patcher's ``backup`` (one dict
    shared by its clones; entries hold ``.weight``). So when a generation starts, the model may still
    hold what the previous one merged (a 12-channel conv_in, seen on a real Neo): the base is read
    from those backups (docs/hosts.md §3)."""
    for backup in (getattr(getattr(patcher, "lora_loader", None), "backup", None), getattr(patcher, "backup", None)):
        entry = backup.get(key) if isinstance(backup, dict) else None
        if entry is not None:
            return getattr(entry, "weight", entry)
    try:
        return patcher.model.get_parameter(key)
    except AttributeError:
        return None


def _probe_rows(patcher, target) -> tuple[str, slice, torch.Tensor] | None:
    """A few rows of one patched weight as the base model has them: (name, rows, values).

    The hosts merge again only when the set of patches changed: a LoRA still merged from the
    previous generation is the base plus the LoRA now, so the base comes from the host's backup
    (:func:`_base_weight`, docs/hosts.md §4)."""
    key, offset = (target[0], target[1]) if isinstance(target, tuple) else (target, None)
    base = _base_weight(patcher, key)
    if base is None:
        return None
    start = int(offset[1]) if offset is not None and int(offset[0]) == 0 else 0
    rows = slice(start, start + 8)
    return key, rows, base.detach()[rows].float().cpu().clone()


class ForgeBackend(UNetBackend):
    """One pass on a clone of the host's ``UnetPatcher``, assigned to ``forge_objects.unet``.

    The clone's UNet function wrapper is this object: it calls :meth:`UNetSession.step`
    per UNet call, swaps the SD1.5 units in only while the UNet runs and adds ``c_concat``.
    After :meth:`restore` it is inert (other code may still hold clones of our clone).
    """

    loads_lora = True

    def __init__(self, forge_objects, sampler=None):
        self.objects = forge_objects  # the host's shared namespace; never p
        self.capture = SamplerCapture(sampler)
        self.original = forge_objects.unet
        self.unet = self.original.model.diffusion_model
        self.clone = None
        self.session: UNetSession | None = None
        self.message: str | None = None  # abort(): every UNet call raises this
        self.probes: list | None = None  # host_lora: base weights, to see the host merged the LoRA

    def base_weight(self, name: str) -> torch.Tensor | None:
        return _base_weight(self.original, PREFIX + name)

    def __deepcopy__(self, memo):
        # UnetPatcher.clone() deep-copies model_options: a copy would copy the units and the UNet
        return self

    def _assign(self, clone) -> None:
        clone.set_model_unet_function_wrapper(self)
        self.clone = clone
        self.objects.unet = clone

    def install(self, session: UNetSession) -> None:
        self.session = session
        clone = self.original.clone()
        if session.patches is not None:
            params = {k: v for k, v in clone.model.named_parameters() if k.startswith(PREFIX)}
            values = host_patches(session.patches, params, session.source)
            accepted = add_patches(clone, session.source, values, session.weight)
            if accepted is not None and len(accepted) < len(values):
                raise PatchError(
                    f"{HOST_NAME} accepted {len(accepted)} of the {len(values)} patches of {session.source}."
                )
        if session.lora is not None:
            patches = add_host_lora(clone, session.lora, session.weight)
            self.probes = [pr for pr in (_probe_rows(clone, t) for t in list(patches)[:4]) if pr is not None]
        if (session.patches is not None or session.lora is not None) and session.sigma_end > 0:
            clone.add_conditioning_modifier(self._unpatched_below)
        self._assign(clone)
        self.capture.install(session)

    def __call__(self, apply_model, args):
        x, t, c = args["input"], args["timestep"], dict(args["c"])
        if self.message is not None:
            raise Refusal(self.message)
        session = self.session
        if session is None:  # the pass is over: behave as the host would
            return apply_model(x, t, **c)
        if self.probes is not None:
            self._check_merged()
        active = session.step(t)
        if session.condition is not None:
            if active:
                cond = session.condition.to(x.device, x.dtype)
                if x.shape[0] % cond.shape[0]:
                    raise LayerDiffuseError(f"condition batch {cond.shape[0]} does not divide UNet batch {x.shape[0]}")
                c["c_concat"] = cond.repeat(x.shape[0] // cond.shape[0], 1, 1, 1)
            else:
                c.pop("c_concat", None)
        sharing = session.sharing
        if sharing is None or not active:
            return apply_model(x, t, **c)
        sharing.state.cond_mark = (c.get("transformer_options") or {}).get("cond_mark")
        sharing.install()
        try:
            return apply_model(x, t, **c)
        finally:
            sharing.restore()

    def _check_merged(self) -> None:
        """host_lora: by the first UNet call the host has merged the LoRA (at model load, or it is
        still merged from the previous generation); if every probed weight equals the base,
        sampling would run without it. Checked once per pass."""
        probes, self.probes = self.probes, None
        model = self.clone.model
        for key, rows, base in probes:
            now = model.get_parameter(key).detach()[rows].float().cpu()
            if not torch.equal(now, base):
                return
        raise PatchError(
            f"{HOST_NAME} did not merge {Path(str(self.session.lora)).name} into the model (the weights it patches "
            "equal the base model's at the first sampling step), so the image would not be transparent."
        )

    def _unpatched_below(self, model, x, timestep, uncond, cond, cond_scale, model_options, seed):
        """Stop At for weight patches (the official way): below ``sigma_end`` sample with the
        unpatched patcher, which the host's memory manager loads (its weights, its restore)."""
        session = self.session
        if session is None or session.active(float(torch.as_tensor(timestep).max())):
            return model, x, timestep, uncond, cond, cond_scale, model_options, seed
        from backend import memory_management  # type: ignore
        from backend.sampling.sampling_function import sampling_prepare  # type: ignore

        loaded = [getattr(m, "model", None) for m in memory_management.current_loaded_models]
        if not any(m is self.original for m in loaded):
            sampling_prepare(self.original, x)
        return self.original.model, x, timestep, uncond, cond, cond_scale, model_options, seed

    def disable(self, session: UNetSession) -> None:
        pass  # the wrapper and the modifier read session.active() on every call

    def restore(self) -> None:
        self.capture.restore()
        if self.session is not None and self.session.sharing is not None:
            self.session.sharing.restore()  # idempotent; the wrapper already restored in finally
        if self.clone is not None and self.objects.unet is self.clone:
            self.objects.unet = self.original
        self.clone = self.session = self.message = self.probes = None

    def abort(self, message: str) -> None:
        self.message = message
        self._assign(self.original.clone())


# -- the host ---------------------------------------------------------------------------------


def _predictor(p):
    """The host's ``k_prediction`` object of the current UNet patcher (None if there is none)."""
    model = getattr(getattr(getattr(p.sd_model, "forge_objects", None), "unet", None), "model", None)
    return getattr(model, "predictor", None)


class ForgeHost(WebUIHost):
    name = HOST_NAME

    def family(self, p) -> str | None:
        if type(p.sd_model).__name__ == "FakeInitialModel":
            # both hosts load the checkpoint inside the first generation; before it (an X/Y/Z plot's
            # check of its cells) the selected checkpoint's file header tells the family
            from . import checkpoint_family

            return checkpoint_family()
        return _family(p.sd_model)

    def prediction(self, p) -> str | None:
        """The host's predictor says it (``prediction_type``; Neo and Forge2 set ``"v_prediction"`` from a
        checkpoint's ``v_pred`` key or its .yaml config); flow models (``"const"``) give None."""
        kind = getattr(_predictor(p), "prediction_type", "epsilon")
        return {"epsilon": "eps", "v_prediction": "v", "edm": "edm"}.get(str(kind))

    def zero_terminal_snr(self, p) -> bool:
        """Neo: ``model_config.ztsnr`` (a checkpoint's ``ztsnr`` key) or the Noise schedule setting; its
        predictor gets the rescaled sigmas only while it samples, which is when this is read too (the
        last sigma then is ~4517 instead of ~14.6)."""
        if getattr(getattr(p.sd_model, "model_config", None), "ztsnr", False):
            return True
        try:
            from modules import shared  # type: ignore

            if getattr(shared.opts, "sd_noise_schedule", None) == "Zero Terminal SNR":
                return True
        except ImportError:
            pass
        sigmas = getattr(_predictor(p), "sigmas", None)
        return isinstance(sigmas, torch.Tensor) and sigmas.numel() > 0 and float(sigmas[-1]) > ZERO_TERMINAL_SIGMA

    def unet_backend(self, p) -> ForgeBackend:
        return ForgeBackend(p.sd_model.forge_objects, getattr(p, "sampler", None))

    def percent_to_sigma(self, p, percent: float) -> float:
        return float(p.sd_model.forge_objects.unet.model.predictor.percent_to_sigma(percent))

    def device_dtype(self, p):
        unet = p.sd_model.forge_objects.unet
        try:
            from backend import memory_management  # type: ignore

            device = memory_management.get_torch_device()
        except Exception:
            device = next(unet.model.diffusion_model.parameters()).device
        return device, getattr(unet.model, "computation_dtype", None) or torch.float32

    def _vae(self, p):
        return p.sd_model.forge_objects.vae.first_stage_model

    def latent_format(self, p) -> tuple[float, float]:
        vae = self._vae(p)
        return float(getattr(vae, "scaling_factor", 0.18215)), float(getattr(vae, "shift_factor", 0.0) or 0.0)

    def vae_moments(self, p, rgb):
        return posterior_moments(self._vae(p), rgb)

    def vae_decode(self, p, latent):
        return raw_decode(self._vae(p), latent)

    def load_lora(self, p, path, weight: float) -> None:
        """The host's own LoRA route on a clone of the current patcher (its key mapping onto
        fused weights, its merge, restore and memory management), assigned for this pass."""
        unet = p.sd_model.forge_objects.unet.clone()
        add_host_lora(unet, path, weight)
        p.sd_model.forge_objects.unet = unet

    def low_vram(self) -> bool:
        try:
            from backend import memory_management  # type: ignore

            return memory_management.vram_state in (memory_management.VRAMState.LOW_VRAM,
                                                    memory_management.VRAMState.NO_VRAM)  # fmt: skip
        except Exception:
            return False

    # -- Qwen-Image-Layered --------------------------------------------------------------------
    decomposes = NEO  # Forge2 cannot load Qwen-Image models

    def decompose_layers(self, p, image, settings, conditioning, unconditional_conditioning, seed):
        """The layers by Neo's own Qwen-Image transformer (its patcher's memory management loads it, with
        the user's LoRAs merged as for any generation), called module by module with the Layered inputs
        (lib_layerdiffuse/qwen_layered.py: layered_forward); Neo's model is not changed. The RGBA VAE is
        our file (Neo's Qwen VAE has 3 channels)."""

        from backend import memory_management  # type: ignore
        from backend.sampling.sampling_function import sampling_cleanup, sampling_prepare  # type: ignore

        from ..pipeline import cached_model
        from ..qwen_layered import LATENT_CHANNELS, VAE_SCALE, addition_row, decompose, layered_forward
        from ..weights import QWEN_VAE_FILE

        engine = p.sd_model
        unet = engine.forge_objects.unet
        model = unet.model.diffusion_model
        addition = addition_row(addition_weight(engine), getattr(model, "inner_dim", None))
        device, dtype = self.device_dtype(p)
        guided = settings.true_cfg > 1
        context = single_cond(conditioning, "prompt")
        negative = None
        if guided:
            if unconditional_conditioning is None:  # the WebUI's CFG Scale is 1: the host skipped the negative prompt
                unconditional_conditioning = _negative_conditioning(p)
            negative = single_cond(unconditional_conditioning, "negative prompt")
        vae = cached_model("qwen_vae", self.weight_path(QWEN_VAE_FILE), device, torch.float32)

        def rope(ids):
            return model.pe_embedder(ids).squeeze(1).unsqueeze(2).to(dtype)

        def branch(ctx):
            return {"context": ctx.to(device, dtype), "addition": addition, "rope": rope}

        def transformer(hidden, timestep, **inputs):
            self._stop_if_asked()  # before each pass too: with true CFG a step is two long passes
            return layered_forward(model, hidden, timestep, **inputs)

        h, w = image.shape[0] // VAE_SCALE, image.shape[1] // VAE_SCALE
        size = torch.empty((1, LATENT_CHANNELS, settings.layers + 2, h, w), device="meta")
        steps = int(p.steps)
        self._steps(steps)
        sampling_prepare(unet, size)  # loads the transformer as Neo's samplers do
        try:
            return decompose(
                image,
                vae=RoomFirst(vae, device, memory_management.free_memory),
                transformer=transformer,
                cond=branch(context),
                uncond=branch(negative) if guided else None,
                layers=settings.layers,
                steps=steps,
                seed=seed,
                true_cfg_scale=settings.true_cfg,
                normalize=settings.normalize,
                device=device,
                dtype=dtype,
                callback=self._step_done,
            )
        finally:
            sampling_cleanup(unet)

    def _steps(self, steps: int) -> None:
        from modules import shared  # type: ignore

        shared.state.sampling_steps = steps
        shared.state.sampling_step = 0

    def _step_done(self, step: int, latents) -> None:
        """Progress for the UI, and Interrupt / Skip honoured between steps (nothing is returned)."""
        from modules import shared  # type: ignore

        shared.state.sampling_step = step + 1
        self._stop_if_asked()

    def _stop_if_asked(self) -> None:
        if self.interrupted() or self.skipped():
            from modules import shared  # type: ignore

            raise LayerDiffuseError(
                f"the decomposition was {'interrupted' if self.interrupted() else 'skipped'} after step "
                f"{shared.state.sampling_step} of {shared.state.sampling_steps}; no layers are returned."
            )

    def show_preview(self, processed, image, info: str) -> None:
        """Forge shows and returns ``processed.images + processed.extra_images`` (the extra ones are
        ``p.extra_result_images``) and looks the infotext of a gallery index up in ``processed.infotexts``."""
        extra = getattr(processed, "extra_images", None)
        if extra is None:
            extra = processed.extra_images = []
        place_infotext(processed, len(getattr(processed, "images", None) or []) + len(extra), info)
        extra.append(image)


HOST = ForgeHost()
