"""Forge2 (lllyasviel/stable-diffusion-webui-forge, 2024 backend) and Forge Neo adapter.

Same function names as :mod:`.a1111`; the script does not know which host it runs on.
Everything goes through the host's ``UnetPatcher`` on a clone that is assigned back to
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
* Stop At: ``predictor.percent_to_sigma``; below it the units are off and ``c_concat`` is
  removed; weight-patched modes switch to the unpatched UNet through a conditioning
  modifier, as the official extension does.
* img2img: the transparent-encoder offset on ``p.init_latent`` by our own code (Neo has
  no VAE regulation hook).
* Never silent: ``p.sample`` is wrapped; if our wrapper did not take part in sampling the
  request fails with the reason (hook exceptions are swallowed by both hosts).

Per-host differences (forge-hosts.md §6.2) are the small functions chosen at import below.
"""

from __future__ import annotations

import importlib.util
import logging

import numpy as np
import torch

from .. import conditioning as C
from ..attention_sharing import AttentionSharing
from ..patches import PREFIX, match_keys, parse_patch_state
from ..pipeline import HostOps, LayerDiffuseError
from .common import condition_encoder, posterior_moments, set_init_latent

log = logging.getLogger("layerdiffuse")


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


def family_forge2(sd_model) -> str | None:
    if getattr(sd_model, "is_sd1", False):
        return "sd15"
    if getattr(sd_model, "is_sdxl", False):
        return "sdxl"
    for flag, name in (("is_sd2", "SD2"), ("is_sd3", "SD3")):
        if getattr(sd_model, flag, False):
            return name
    return type(sd_model).__name__


def family_neo(sd_model) -> str | None:
    """Neo also loads Flux, Flux2, Chroma, Qwen-Image, Lumina, Z-Image, Anima and Wan: named by engine."""
    if getattr(sd_model, "is_sd1", False):
        return "sd15"
    if getattr(sd_model, "is_sdxl", False):
        return "sdxl"
    return type(sd_model).__name__


NEO = _detect_neo()
HOST_NAME = "Forge Neo" if NEO else "Forge2"
lora_value = lora_value_neo if NEO else lora_value_forge2
add_patches = add_patches_neo if NEO else add_patches_forge2
_family = family_neo if NEO else family_forge2


# -- host objects ---------------------------------------------------------------------------


def family(p) -> str | None:
    return _family(p.sd_model)


def latent_scale(p) -> float:
    return float(getattr(p.sd_model.forge_objects.vae.first_stage_model, "scaling_factor", 0.18215))


def alphas_cumprod(p):
    return None  # Stop At uses the predictor's percent_to_sigma on Forge


def _vae_module(p):
    return p.sd_model.forge_objects.vae.first_stage_model


def encode_moments(p):
    """(mean, std) of the VAE posterior, unscaled, for RGB in [0, 1]."""
    return lambda rgb: posterior_moments(_vae_module(p), rgb)


def encode_condition(p):
    """Deterministic condition latent (posterior mean, scaled) for the SDXL layer modes."""
    shift = float(getattr(_vae_module(p), "shift_factor", 0.0) or 0.0)
    return condition_encoder(encode_moments(p), latent_scale(p), shift)


def _device_dtype(p):
    unet = p.sd_model.forge_objects.unet
    try:
        from backend import memory_management  # type: ignore

        device = memory_management.get_torch_device()
    except Exception:
        device = next(unet.model.diffusion_model.parameters()).device
    dtype = getattr(unet.model, "computation_dtype", None) or torch.float32
    return device, dtype


def ops(p) -> HostOps:
    from .a1111 import load_state, weight_path  # same model folder and download rules

    device, dtype = _device_dtype(p)
    return HostOps(weight_path=weight_path, load_state=load_state, encode_moments=encode_moments(p),
                   device=device, dtype=dtype)  # fmt: skip


# -- one sampling pass --------------------------------------------------------------------


class ForgeSession:
    """Our changes for one sampling pass, on a UnetPatcher clone. ``calls`` feeds the guard."""

    def __init__(self, gen, unet, sharing: AttentionSharing | None, concat: torch.Tensor | None,
                 sigma_end: float | None, patched: bool):  # fmt: skip
        self.gen = gen
        self.unet = unet
        self.sharing = sharing
        self.concat = concat
        self.sigma_end = sigma_end
        self.patched = patched
        self.wrapper_calls = 0  # UNet calls that went through our wrapper with our changes active
        self.stopped_calls = 0  # UNet calls below Stop At

    def __deepcopy__(self, memo):
        # UnetPatcher.clone() deep-copies model_options: another extension cloning our patcher
        # must keep this object (a copy would copy the units and the UNet they point to)
        return self

    def active(self, timestep) -> bool:
        if self.sigma_end is None:
            return True
        return float(torch.as_tensor(timestep).flatten()[0]) >= self.sigma_end

    def __call__(self, apply_model, args):
        x, t, c = args["input"], args["timestep"], dict(args["c"])
        active = self.active(t)
        if active:
            self.wrapper_calls += 1
        else:
            self.stopped_calls += 1
        if self.concat is not None:
            if active:
                cond = self.concat.to(x.device, x.dtype)
                if x.shape[0] % cond.shape[0]:
                    raise LayerDiffuseError(
                        f"LayerDiffuse: condition batch {cond.shape[0]} does not divide UNet batch {x.shape[0]}"
                    )
                c["c_concat"] = cond.repeat(x.shape[0] // cond.shape[0], 1, 1, 1)
            else:
                c.pop("c_concat", None)
        if self.sharing is None or not active:
            return apply_model(x, t, **c)
        state = self.sharing.state
        state.enabled = True
        state.cond_mark = (c.get("transformer_options") or {}).get("cond_mark")
        self.sharing.install()
        try:
            return apply_model(x, t, **c)
        finally:
            self.sharing.restore()

    @property
    def calls(self) -> int:
        """0 means our changes never took part in sampling (the guard refuses to decode)."""
        if self.sharing is not None:
            return self.sharing.state.calls if self.wrapper_calls else 0
        return self.wrapper_calls

    def disable(self):
        self.sigma_end = float("inf")

    def restore(self):
        if self.sharing is not None:
            self.sharing.restore()  # idempotent; the wrapper already restored in finally
            self.sharing.state.enabled = True


def _sharing(gen, diffusion_model, state, device, dtype) -> AttentionSharing:
    """The units of the mode's file, built once per generation (the UNet object is the same)."""
    cached = getattr(gen, "_forge_sharing", None)
    if cached is not None and cached.unet[0] is diffusion_model:
        return cached
    sharing = AttentionSharing(diffusion_model, frames=gen.mode.group, use_control=gen.mode.control is not None)
    try:
        sharing.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise LayerDiffuseError(
            f"LayerDiffuse: {gen.mode.unet_file}.safetensors does not fit '{gen.mode.label}': "
            f"{str(e).splitlines()[0]} Re-download it."
        ) from None
    sharing.to(device, dtype)
    gen._forge_sharing = sharing
    return sharing


def host_patches(state: dict, params: dict, weight: float, source: str) -> dict:
    """``{model_key: host patch value}`` for ``add_patches`` (keys the model lacks are dropped)."""
    patches = parse_patch_state(state, source)
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


def install(p, gen, x_shape):
    """Clone the UNet patcher, add the mode, assign it back. Returns the session."""
    current = p.sd_model.forge_objects.unet
    if getattr(current, "_layerdiffuse", None) is gen:  # already ours (hires: the hook can run twice)
        return gen.session
    rows, _, h, w = x_shape
    if rows % gen.mode.group:
        raise LayerDiffuseError(
            f"'{gen.mode.label}' generates groups of {gen.mode.group} images: the batch size must be a "
            f"multiple of {gen.mode.group}, but the UNet batch has {rows} rows."
        )
    fam = family(p)
    if fam != gen.mode.family:
        from ..modes import check_family

        check_family(gen.mode, fam)
    unet = current.clone()
    mode, settings = gen.mode, gen.settings
    state = gen.ops.load_state(gen.ops.weight_path(mode.unet_file))
    device, dtype = _device_dtype(p)
    source = f"{mode.unet_file}.safetensors"
    sharing = concat = None
    patched = False
    if mode.apply == "attention_sharing":
        sharing = _sharing(gen, unet.model.diffusion_model, state, device, dtype)
        sharing.state.calls = 0
        sharing.state.enabled = True
        for unit in sharing.units:  # inference-mode weights have no version counter: re-merge per pass
            unit._merged.clear()
        if mode.control is not None:
            img = C.prepare_layer_image(settings.image(mode.control), settings.resize_mode, h * 8, w * 8)
            sharing.set_control(C.to_tensor(img))
    else:
        params = {k: v for k, v in unet.model.named_parameters() if k.startswith(PREFIX)}
        patches = host_patches(state, params, settings.weight, source)
        accepted = add_patches(unet, source, patches, settings.weight)
        if accepted is not None and len(accepted) < len(patches):
            raise LayerDiffuseError(
                f"LayerDiffuse: {HOST_NAME} accepted {len(accepted)} of the {len(patches)} patches of {source}"
            )
        patched = True
        if mode.concat:
            encode = encode_condition(p)
            lat = []
            for which in mode.concat:
                img = C.prepare_layer_image(settings.image(which), settings.resize_mode, h * 8, w * 8)
                lat.append(encode(C.to_tensor(img)))
            concat = C.condition_latent(lat)
    sigma_end = None
    if settings.stop_at < 1.0:
        sigma_end = float(unet.model.predictor.percent_to_sigma(settings.stop_at))
    session = ForgeSession(gen, unet, sharing, concat, sigma_end, patched)
    unet.set_model_unet_function_wrapper(session)
    if patched and sigma_end is not None:
        unet.add_conditioning_modifier(_unpatched_below(current, session))
    unet._layerdiffuse = gen
    p.sd_model.forge_objects.unet = unet
    return session


def _unpatched_below(original, session: ForgeSession):
    """Stop At for weight patches (the official way): below ``sigma_end`` sample with the
    unpatched patcher, which the host's memory manager loads (its weights, its restore)."""

    def modifier(model, x, timestep, uncond, cond, cond_scale, model_options, seed):
        if session.active(timestep):
            return model, x, timestep, uncond, cond, cond_scale, model_options, seed
        from backend import memory_management  # type: ignore
        from backend.sampling.sampling_function import sampling_prepare  # type: ignore

        loaded = [getattr(m, "model", None) for m in memory_management.current_loaded_models]
        if not any(m is original for m in loaded):
            sampling_prepare(original, x)
        return original.model, x, timestep, uncond, cond, cond_scale, model_options, seed

    return modifier


def begin_sampling(p, gen, x):
    """process_before_every_sampling (first pass, again for hires). A failure here must not
    let sampling run unpatched: the clone then carries a wrapper that raises the reason."""
    try:
        gen.session = install(p, gen, x.shape)
        if getattr(gen, "init_rgba", None) and x is getattr(p, "init_latent", None):
            offset_init_latent(p, gen)
    except Exception as e:
        message = str(e).removeprefix("LayerDiffuse: ")
        log.error("LayerDiffuse: %s", message)
        gen._forge_error = message
        unet = p.sd_model.forge_objects.unet.clone()

        def abort(apply_model, args):
            raise LayerDiffuseError(f"LayerDiffuse: {message}")

        unet.set_model_unet_function_wrapper(abort)
        p.sd_model.forge_objects.unet = unet


def prepare(p, gen):
    """process(): wrap ``p.sample`` (called directly by the host, not swallowed) so that a
    sampling our changes did not take part in fails the request instead of being decoded."""
    original = p.sample

    def sample(*args, **kwargs):
        gen._forge_error = None
        out = original(*args, **kwargs)
        check_ran(gen)
        return out

    p.sample = sample


def check_ran(gen):
    error = getattr(gen, "_forge_error", None)
    if error:
        raise LayerDiffuseError(f"LayerDiffuse: {error}")
    session = getattr(gen, "session", None)
    if session is None or not isinstance(session, ForgeSession):
        raise LayerDiffuseError(
            "LayerDiffuse: its UNet changes were never installed for this sampling (another extension may have "
            "replaced the UNet); the image was not generated with LayerDiffuse, so no transparent decode."
        )
    if session.calls == 0 and session.stopped_calls == 0:
        raise LayerDiffuseError(
            "LayerDiffuse: its UNet changes did not take part in sampling (another extension may have replaced "
            "the UNet function); refusing to return a 'transparent' image made without them."
        )


def patches_ran(gen) -> bool:
    session = getattr(gen, "session", None)
    return isinstance(session, ForgeSession) and (session.calls > 0 or session.stopped_calls > 0)


def _resized_rgba(images, p, im) -> np.ndarray:
    """The init image at the generation size with its alpha (Neo's resize_image returns RGB)."""
    out = images.resize_image(p.resize_mode, im, p.width, p.height)
    if out.mode == "RGBA":
        return np.asarray(out, dtype=np.float32) / 255.0
    names = {1: "Crop and Resize", 2: "Resize and Fill"}
    x = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
    return C.resize_image(x, names.get(int(p.resize_mode), "Just Resize"), p.height, p.width)


def offset_init_latent(p, gen):
    """img2img: the init latent with the transparent-encoder offset (``mean + std * offset``)."""
    from modules import images  # type: ignore

    if getattr(p, "paste_to", None) is not None:
        log.warning("LayerDiffuse: 'Inpaint only masked' keeps the plain init latent (no transparency offset)")
        return
    rgba = [_resized_rgba(images, p, im) for im in gen.init_rgba]
    latent = gen.encode_init(rgba)
    if latent is None:
        return
    shift = float(getattr(_vae_module(p), "shift_factor", 0.0) or 0.0)
    set_init_latent(p, (latent - shift) * latent_scale(p), log)


def final_latents(p, gen, samples):
    """post_sample: the final latent batch; when the host already decoded (hires), the
    latents Forge keeps in ``p.latents_after_sampling`` (this batch's are the last ones)."""
    if not getattr(samples, "already_decoded", False):
        return samples
    kept = getattr(p, "latents_after_sampling", None) or []
    if len(kept) >= p.batch_size:
        return torch.stack([torch.as_tensor(z) for z in kept[-p.batch_size :]])
    return None


# -- outputs --------------------------------------------------------------------------------


TAG = "layerdiffuse_rgba"  # as hosts.a1111.TAG: our images carry their straight alpha (repair and check)


def to_pil_rgba(rgba: np.ndarray):
    from ..rgba import to_pil

    im = to_pil(rgba)
    setattr(im, TAG, np.array(im)[..., 3])
    return im


def add_preview(p, index: int, image: np.ndarray):
    """Forge shows and returns ``p.extra_result_images`` (UI gallery and API)."""
    from PIL import Image

    from ..rgba import to_uint8

    extra = getattr(p, "extra_result_images", None)
    if extra is None:
        extra = p.extra_result_images = []
    extra.append(Image.fromarray(to_uint8(image)))


def before_image_saved(params):
    """Forge2's default stealth infotext ("Alpha") sets our alpha to 255 in place before this
    callback; put the decoded alpha back (the PNG keeps its infotext in tEXt). The user's
    settings are not changed. Neo writes no stealth data: nothing to do there."""
    image = params.image
    alpha = getattr(image, TAG, None)
    if alpha is None or image.mode != "RGBA":
        return
    if not np.array_equal(np.asarray(image)[..., 3], alpha):
        from PIL import Image

        image.putalpha(Image.fromarray(alpha))
        log.info("LayerDiffuse: restored the transparency that the stealth infotext option overwrote")


def save_extra(p, image, index, suffix, infotext):
    from .a1111 import save_extra as _save

    return _save(p, image, index, suffix, infotext)


def check_saved(params):
    from .a1111 import check_saved as _check

    return _check(params)


def install_api_png():
    from .a1111 import install_api_png as _install

    return _install()
