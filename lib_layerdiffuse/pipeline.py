"""One LayerDiffuse generation, host-independent: validate, patch, keep latents, decode RGBA.

A host adapter (``lib_layerdiffuse.hosts``) supplies the few host operations through a
small interface (:class:`HostOps`); the WebUI script calls :class:`Generation` from its hooks:

    gen = Generation(ops, settings, batch_size, width, height, prompts)   # process(): validates
    gen.begin_sampling(unet, x_shape)        # process_before_every_sampling (again for hires)
    gen.keep_latents(iteration, latents)     # post_sample: diffusion-space latents
    rgba = gen.decode(index, pixel_rgb)      # postprocess_image_after_composite
    gen.close()                              # always (p.close / finally): UNet as before
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from . import conditioning as C
from . import modes as M
from .rgba import from_decoder
from .session import UNetSession
from .settings import Settings
from .unet import percent_to_sigma, sigmas_from_alphas_cumprod
from .vae import apply_offset, decode_rgba, encode_offset
from .weights import load_decoder, load_encoder

log = logging.getLogger("layerdiffuse")


class LayerDiffuseError(RuntimeError):
    """A generation LayerDiffuse must refuse; shown to the user as it is."""


@dataclass
class HostOps:
    """What the pipeline needs from a host. Every callable is small and host-specific."""

    weight_path: object  # (file stem) -> path of the .safetensors, downloading it if needed
    load_state: object  # (path) -> dict of tensors (safetensors only)
    encode_moments: object = None  # (images [B,3,H,W] in [0,1]) -> (mean, std), unscaled latents
    device: object = "cpu"
    dtype: object = torch.float32


_MODELS: dict = {}  # (file, device, dtype) -> decoder / encoder; keyed by file, so a family switch swaps them


def cached_model(kind: str, path, device, dtype):
    key = (kind, str(path), str(device), dtype)
    if key not in _MODELS:
        for k in [k for k in _MODELS if k[0] == kind]:  # keep one of each kind in memory
            del _MODELS[k]
        _MODELS[key] = (load_decoder if kind == "decoder" else load_encoder)(path, device=device, dtype=dtype)
    return _MODELS[key]


class Generation:
    def __init__(self, ops: HostOps, settings: Settings, batch_size: int, width: int, height: int,
                 prompts: list[str] | None = None, family: str | None = None):  # fmt: skip
        self.ops = ops
        self.settings = settings
        self.mode = settings.mode
        self.batch_size = batch_size
        M.check_family(self.mode, family)
        self.family = family
        M.check_batch(self.mode, batch_size)
        C.check_inputs(self.mode, {k: settings.image(k) for k in ("fg", "bg", "blend")}, height, width)
        if prompts and self.mode.group > 1 and any(" AND " in p for p in prompts):
            raise LayerDiffuseError(
                f"'{self.mode.label}' cannot use composable prompts (AND): they break the frame groups. "
                "Remove 'AND' from the prompt."
            )
        self.session: UNetSession | None = None
        self.latents: dict[int, torch.Tensor] = {}
        self._stop_hook = None
        self._sigma_end = None

    # -- prompts ----------------------------------------------------------------------

    def layer_prompts(self, prompts: list[str]) -> list[str]:
        """Per-image prompts with each frame's additional prompt in front (SD1.5 multi-layer modes).

        Rewriting the prompts (rather than overriding the context inside the units, as the
        official does) keeps prompt editing, scheduling and long prompts working, and the
        infotext of each image shows its layer's prompt.
        """
        if not self.mode.prompts:
            return list(prompts)
        out = []
        for i, prompt in enumerate(prompts):
            which = self.mode.prompts[i % self.mode.group]
            out.append(C.layer_prompt(self.settings.prompt(which), prompt) or prompt)
        return out

    # -- sampling ---------------------------------------------------------------------

    def begin_sampling(self, unet: torch.nn.Module, x_shape, alphas_cumprod=None, family=None,
                       encode_condition=None):  # fmt: skip
        """Install the mode on ``unet`` for one sampling pass (first pass or hires).

        ``encode_condition(rgb [1,3,H,W] in [0,1]) -> diffusion-space latent`` is needed by
        the SDXL layer modes. Anything installed by an earlier pass is undone first.
        """
        self.end_sampling()
        rows, _, h, w = x_shape
        M.check_batch(self.mode, rows)
        state = self.ops.load_state(self.ops.weight_path(self.mode.unet_file))
        family = family if family is not None else self.family  # detected once, in process()
        session = UNetSession(unet, self.mode, state, weight=self.settings.weight, family=family,
                              source=f"{self.mode.unet_file}.safetensors")  # fmt: skip
        session.install()
        self.session = session
        try:
            if self.mode.control is not None:
                img = C.prepare_layer_image(
                    self.settings.image(self.mode.control), self.settings.resize_mode, h * 8, w * 8
                )
                session.sharing.to(self.ops.device, self.ops.dtype)
                session.sharing.set_control(C.to_tensor(img))
            elif session.sharing is not None:
                session.sharing.to(self.ops.device, self.ops.dtype)
            if self.mode.concat:
                if encode_condition is None:
                    raise LayerDiffuseError("this host cannot VAE-encode the layer images")
                lat = []
                for which in self.mode.concat:
                    img = C.prepare_layer_image(self.settings.image(which), self.settings.resize_mode, h * 8, w * 8)
                    lat.append(encode_condition(C.to_tensor(img)))
                session.concat.condition = C.condition_latent(lat)
            if self.settings.stop_at < 1.0 and alphas_cumprod is not None:
                self._install_stop_at(unet, alphas_cumprod)
        except BaseException:
            self.end_sampling()
            raise

    def _install_stop_at(self, unet, alphas_cumprod):
        """Stop At: a forward pre-hook reads the timestep of each UNet call (any sampler)."""
        self._sigma_end = percent_to_sigma(alphas_cumprod, self.settings.stop_at)
        log_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod.detach().float().cpu()).log()

        def hook(module, args, kwargs):
            t = args[1] if len(args) > 1 else kwargs.get("timesteps", kwargs.get("t"))
            if t is None or self.session is None:
                return
            t = float(torch.as_tensor(t).float().max().clamp(0, len(log_sigmas) - 1))
            lo, hi = int(t // 1), int(-(-t // 1))
            sigma = float(((1 - (t - lo)) * log_sigmas[lo] + (t - lo) * log_sigmas[hi]).exp())
            if sigma < self._sigma_end:
                self.session.disable()

        self._stop_hook = unet.register_forward_pre_hook(hook, with_kwargs=True)

    def end_sampling(self):
        if self._stop_hook is not None:
            self._stop_hook.remove()
            self._stop_hook = None
        if self.session is not None:
            self.session.restore()

    def close(self):
        """Undo everything (idempotent); call on every path, failure and interrupt included."""
        self.end_sampling()

    @property
    def calls(self) -> int:
        return 0 if self.session is None else self.session.calls

    # -- outputs ----------------------------------------------------------------------

    def keep_latents(self, iteration: int, latents: torch.Tensor):
        """Final diffusion-space latents of one batch (after hires), by global image index."""
        for i, z in enumerate(latents):
            self.latents[iteration * self.batch_size + i] = z.detach().to("cpu", torch.float32)

    def decode(self, index: int, pixel_rgb: np.ndarray, latent_scale: float) -> np.ndarray | None:
        """RGBA (HxWx4 float) for image ``index`` if the mode decodes it, else None.

        pixel_rgb: the host's final image, uint8 HxWx3. The latent is unscaled by
        ``latent_scale`` (the decoder was trained on unscaled latents).
        """
        if not self.mode.is_decoded(index):
            return None
        if index not in self.latents:
            raise LayerDiffuseError(f"no latent was kept for image {index}; the transparent decode needs it")
        pixel = torch.from_numpy(np.array(pixel_rgb[..., :3], dtype=np.float32)).div(255).permute(2, 0, 1)[None]
        h, w = pixel.shape[-2:]
        latent = self.latents[index][None] / latent_scale
        if latent.shape[-2:] != (h // 8, w // 8):
            # inpaint "only masked" and odd sizes: the latent covers another region than the pixels
            log.warning(
                "LayerDiffuse: latent %s does not match the %dx%d image; resizing it", tuple(latent.shape[-2:]), w, h
            )
            latent = torch.nn.functional.interpolate(latent, size=(h // 8, w // 8), mode="bilinear")
        if h % 8 or w % 8:
            raise LayerDiffuseError(f"image size {w}x{h} is not a multiple of 8")
        decoder = cached_model("decoder", self.ops.weight_path(self.mode.decoder_file), self.ops.device, self.ops.dtype)
        y = decode_rgba(decoder, pixel, latent)
        return from_decoder(y[0])

    def encode_init(self, rgba_images: list[np.ndarray]) -> torch.Tensor | None:
        """img2img: the adjusted init latent ``mean + std * offset`` (unscaled) of RGBA init images."""
        if self.mode.encoder_file is None or self.ops.encode_moments is None:
            return None
        encoder = cached_model("encoder", self.ops.weight_path(self.mode.encoder_file), self.ops.device, self.ops.dtype)
        flat = np.stack([C.flatten_on_grey(x) for x in rgba_images])
        mean, std = self.ops.encode_moments(torch.from_numpy(flat).permute(0, 3, 1, 2).float())
        offset = encode_offset(encoder, rgba_images)
        return apply_offset(mean, std, offset.to(mean.device))
