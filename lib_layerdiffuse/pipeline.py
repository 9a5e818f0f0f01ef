"""One LayerDiffuse generation, the same on every host: validate, patch, keep latents, decode RGBA.

A host adapter (``lib_layerdiffuse.hosts``) implements :class:`Host`, the one contract
between this flow and a WebUI; ``p`` is the host's processing object, passed through and
never stored. The WebUI script calls :class:`Generation` from its hooks:

    gen = Generation(host, settings, family, batch_size, width, height, prompts)  # process(): validates
    host.attach(p, gen)                  # p.sample guarded, p.close restores and releases
    gen.begin_sampling(p, x)             # before every sampling pass (again for hires)
    gen.end_sampling(); gen.check_ran()  # right after sampling (the adapter's p.sample wrapper)
    gen.decode_batch(p, first, latents, pixels)  # there too: a failure fails the request
    rgba = gen.take(index)               # each image, right before saving
    gen.close()                          # always: UNet as before, everything released

Nothing of a generation outlives :meth:`Generation.close`: it holds no reference to ``p``,
and the adapter removes every reference ``p`` and the host's objects hold to it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path

import numpy as np
import torch

from . import conditioning as C
from . import modes as M
from . import psd
from .attention_sharing import AttentionSharing
from .errors import LayerDiffuseError
from .options import DecodeOptions
from .rgba import flatten_on_grey, from_decoder, to_uint8
from .session import UNetBackend, UNetSession, load_sharing
from .settings import Settings, check_init_image
from .vae import (
    MULTIPLE,
    apply_offset,
    available_memory,
    compile_decoder,
    decode_rgba,
    default_tile_size,
    encode_offset,
)
from .weights import check_finite, load_decoder, load_encoder, load_unet_file

log = logging.getLogger("layerdiffuse")
_AND = re.compile(r"\bAND\b")  # where A1111 splits composable prompts

# A degenerate alpha (#23): the published weights on a checkpoint far from the one they were trained on
# (Illustrious, NoobAI, Pony, ...) give an image that is opaque everywhere, or nothing at all. An image
# counts as "opaque" when more than 99.5% of its pixels have alpha >= 250/255, as "empty" when more than
# 99.5% have alpha <= 5/255. The margins of 5/255 absorb the decoder's noise on a flat alpha; 0.5% of
# the pixels (a 72 x 72 patch of a 1024 x 1024 image) leaves room for a few edge pixels, while a real
# cut-out, even a large subject or a small one, keeps well over 0.5% of the frame on the other side.
OPAQUE_FROM = 250  # alpha in 0..255 at or above which a pixel counts as opaque
EMPTY_UP_TO = 5  # and at or below which as transparent
DEGENERATE_SHARE = 0.995  # more than this share of the pixels on one side: degenerate
BACKGROUND_HINT = "simple grey background"  # the phrase users found gives the decoder a usable layer
ALPHA_KEY = "layerdiffusion_alpha"
PREDICTION_KEY = "layerdiffusion_prediction"


def alpha_state(alpha: np.ndarray) -> str | None:
    """``"opaque"``, ``"empty"`` or None (a usable alpha) for an alpha plane in [0, 1]."""
    value = np.asarray(alpha, dtype=np.float32) * 255.0
    tolerance = 1e-3  # 250/255 in float32 times 255 is 249.99998
    if np.mean(value >= OPAQUE_FROM - tolerance) > DEGENERATE_SHARE:
        return "opaque"
    if np.mean(value <= EMPTY_UP_TO + tolerance) > DEGENERATE_SHARE:
        return "empty"
    return None


class AlphaNotes:
    """The ``layerdiffusion_alpha`` value of each image, as a callable infotext entry.

    A1111 1.10, Forge2 and Neo call a callable in ``p.extra_generation_params`` with
    ``create_infotext``'s locals. In the batch loop ``all_prompts`` is one batch's list (``p.prompts``,
    or with Neo's "save prompt comments" a new slice of ``p._all_prompts_c``) and ``index`` the
    index in the batch (``p.iteration`` is the batch); ``Processed.infotext`` and the hires-fix
    "before" save pass the whole job's list and get the global index. So the list's length tells
    them apart: with one batch the two indices are the same. Holds only the states (no ``p``)."""

    def __init__(self):
        self.states: dict[int, str] = {}  # global image index -> "opaque" / "empty"

    def __call__(self, p=None, index=0, all_prompts=None, use_main_prompt=False, **_) -> str | None:
        if use_main_prompt or p is None:  # the grid, or the job's first infotext
            return self.states.get(0)
        job = getattr(p, "all_prompts", None)
        try:
            one_batch = all_prompts is not None and job is not None and len(all_prompts) < len(job)
        except TypeError:  # not lists: take the index as global
            one_batch = False
        if one_batch:
            index = int(getattr(p, "iteration", 0)) * int(getattr(p, "batch_size", 1)) + int(index)
        return self.states.get(int(index))


def strip_hint(prompt: str) -> str:
    """``prompt`` without a trailing ``", <hint>"`` (a prompt pasted from an infotext that used it)."""
    return prompt[: -len(BACKGROUND_HINT) - 2] if prompt.endswith(f", {BACKGROUND_HINT}") else prompt


def add_hint(prompt: str) -> str:
    prompt = strip_hint(prompt)
    return f"{prompt}, {BACKGROUND_HINT}" if prompt.strip() else BACKGROUND_HINT


__all__ = ["Generation", "Host", "LayerDiffuseError", "cached_model", "check_request", "release_models"]


class Host:
    """What the generation flow needs from a WebUI; one adapter per host family implements it.

    Every method takes the host's processing object ``p`` where it needs one; adapters keep
    no per-generation state of their own (it lives in :class:`Generation`).
    """

    name = "host"

    # -- the model ------------------------------------------------------------------------
    def family(self, p) -> str | None:
        """``"sd15"``, ``"sdxl"``, or a name for a model family LayerDiffuse does not drive."""
        raise NotImplementedError

    def prediction(self, p) -> str | None:
        """What the loaded model predicts: ``"eps"``, ``"v"``, another name, or None where the question
        does not apply (flow models)."""
        return None

    def zero_terminal_snr(self, p) -> bool:
        """Whether the model samples a zero-terminal-SNR schedule (NoobAI v-pred and the like)."""
        return False

    def unet_backend(self, p) -> UNetBackend:
        """A fresh backend that installs one sampling pass's changes on the current UNet."""
        raise NotImplementedError

    def percent_to_sigma(self, p, percent: float) -> float:
        """The model's sigma at a fraction of the schedule (Stop At's threshold)."""
        raise NotImplementedError

    def device_dtype(self, p) -> tuple[torch.device, torch.dtype]:
        """Where our modules (units, decoder, encoder) run."""
        raise NotImplementedError

    def latent_format(self, p) -> tuple[float, float]:
        """``(scale, shift)`` with diffusion latent = ``(raw VAE latent - shift) * scale``."""
        raise NotImplementedError

    def vae_moments(self, p, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (unscaled) VAE posterior ``(mean, std)`` of RGB ``[B, 3, H, W]`` in [0, 1]."""
        raise NotImplementedError

    def vae_decode(self, p, latent: torch.Tensor) -> torch.Tensor:
        """The host VAE's raw decode ``[B, 3, H, W]`` in about [-1, 1] of a raw (unscaled) latent."""
        raise NotImplementedError

    def decode_samples(self, p, samples):
        """``p.sample``'s result as the host decodes it (its own VAE route, NaN checks included), in
        the already-decoded form the host takes back from ``p.sample``: a list of ``[3, H, W]``
        in about [-1, 1]. A result the host already decoded (hires fix) is returned as it is."""
        raise NotImplementedError

    def load_lora(self, p, path: Path, weight: float) -> None:
        """Apply a LoRA file through the host's own loader for this generation."""
        raise LayerDiffuseError(f"{self.name} cannot load LoRA files for LayerDiffuse.")

    # -- files, progress, memory ----------------------------------------------------------
    def weight_path(self, name: str) -> Path:
        """The path of a published file (``weights.FILES`` stem), downloaded and checked if needed."""
        raise NotImplementedError

    def progress(self, text: str) -> None:
        """Show what LayerDiffuse is doing in the host's progress text."""

    def interrupted(self) -> bool:
        return False

    def skipped(self) -> bool:
        """The user pressed Skip (the host ends the current image's sampling early)."""
        return False

    def low_vram(self) -> bool:
        """The host keeps models off the GPU between uses (A1111 --lowvram/--medvram, Forge's modes)."""
        return False

    def decode_options(self) -> DecodeOptions:
        """The user's LayerDiffuse settings (Settings > LayerDiffuse), checked."""
        return DecodeOptions()

    def free_memory(self, device) -> int | None:
        """Bytes this process may still allocate on ``device`` (None: not the limit there)."""
        return available_memory(device)

    # -- the generation's objects -----------------------------------------------------------
    def is_init_latent(self, p, x) -> bool:
        """Whether a sampling pass starts from ``p``'s img2img init latent."""
        return False

    def resize_init(self, p, image) -> np.ndarray:
        """An img2img init image at the generation size, float32 HxWx4 RGBA."""
        raise NotImplementedError

    def set_init_latent(self, p, latent: torch.Tensor) -> None:
        """Use ``latent`` (diffusion space, 1 or B rows) as the img2img init latent."""
        raise NotImplementedError

    def final_latents(self, p, samples, sampled: torch.Tensor | None) -> torch.Tensor | None:
        """The final latent batch of ``p.sample``'s result (``sampled``: what the sampler returned last)."""
        raise NotImplementedError

    def attach(self, p, gen: Generation) -> None:
        """Tie ``gen`` to ``p`` for the hooks: guard ``p.sample``, close ``gen`` in ``p.close``."""
        raise NotImplementedError

    def generation(self, p) -> Generation | None:
        raise NotImplementedError

    def xyz_overrides(self, p) -> dict | None:
        """Values the host's X/Y/Z plot set for this generation (settings field -> value)."""
        return None

    def rgba_image(self, p, rgba: np.ndarray, host_image):
        """The image to save for a decoded frame: ``rgba`` (HxWx4 float) as the host's image type,
        at ``host_image``'s size and with its info."""
        raise NotImplementedError

    def publish_previews(self, p, processed, previews: list) -> None:
        """Show and save the checkerboard previews ``[(index, PIL image)]`` with the results."""
        raise NotImplementedError

    # -- Qwen-Image-Layered (lib_layerdiffuse/decompose.py) --------------------------------------
    decomposes = False  # whether the host runs Qwen-Image-Layered models (Forge Neo)

    def decompose_layers(self, p, image: np.ndarray, settings: Settings, conditioning, unconditional_conditioning,
                         seed: int) -> list[np.ndarray]:  # fmt: skip
        """``image`` (uint8 HxWx4 at its bucket size) into ``settings.layers`` RGBA layers (uint8 HxWx4,
        bottom first) by the loaded Qwen-Image-Layered model, with the host's text conditioning."""
        raise NotImplementedError

    def publish_layers(self, p, processed, index: int, layers: list[np.ndarray]) -> None:
        """Show and save the layers of image ``index`` (RGBA PNGs) with the results."""
        raise NotImplementedError

    def comment(self, p, text: str) -> None:
        raise NotImplementedError

    def register_callbacks(self) -> None:
        """Saving checks and API encoding, once at start-up."""


# -- decoder / encoder cache ---------------------------------------------------------------

_MODELS: dict = {}  # (kind, file version, device, dtype) -> decoder / encoder: at most one of each kind
_COMPILED: dict = {}  # id(decoder) -> (decoder, its compiled wrapper): compiled once per loaded decoder


def cached_model(kind: str, path, device, dtype):
    # the file's size and mtime are in the key: a file replaced under the same name (a new
    # download, a trained export) is loaded and checked again, never the old one used
    key = (kind, _file_stamp(path), str(device), dtype)
    if key not in _MODELS:
        for k in [k for k in _MODELS if k[0] == kind]:  # keep one of each kind in memory
            del _MODELS[k]
        if kind == "decoder":
            _COMPILED.clear()
        _MODELS[key] = _loader(kind, path)(path, device=device, dtype=dtype)
    return _MODELS[key]


def _loader(kind: str, path):
    """The loader of a decoder or encoder file: the SD files, or the Flux ``TransparentVAE`` file
    that holds both (16 latent channels)."""
    if kind == "qwen_vae":
        from .qwen_vae import load_vae_file

        return load_vae_file
    if Path(str(path)).name.startswith(M.FLUX_VAE_FILE):
        from . import weights

        return weights.load_flux_decoder if kind == "decoder" else weights.load_flux_encoder
    return load_decoder if kind == "decoder" else load_encoder


def compiled(decoder):
    """``decoder`` through ``torch.compile``, kept with the decoder (compiling costs once per shape)."""
    entry = _COMPILED.get(id(decoder))
    if entry is None or entry[0] is not decoder:
        _COMPILED.clear()
        entry = _COMPILED[id(decoder)] = (decoder, compile_decoder(decoder))
    return entry[1]


_FINITE: set = set()  # (path, size, mtime) of UNet files whose values were found finite


def _file_stamp(path) -> tuple:
    st = os.stat(path)
    return str(path), st.st_size, st.st_mtime_ns


def _check_finite_once(path, state: dict | None = None) -> None:
    """Refuse a UNet-side file with NaN/Inf values; checked once per file version (``state``:
    the file already read, else it is read here only when the check is due)."""
    stamp = _file_stamp(path)
    if stamp not in _FINITE:
        check_finite(state if state is not None else load_unet_file(path), path)
        _FINITE.add(stamp)


def release_models() -> None:
    """Forget the cached transparent decoder and encoder (the next decode loads them again)."""
    _MODELS.clear()
    _COMPILED.clear()


# -- one generation --------------------------------------------------------------------------


def check_request(settings: Settings, family: str | None, batch_size: int, width: int, height: int,
                  prompts: list[str]) -> None:  # fmt: skip
    """Everything about an enabled request that can be refused before sampling: the model family,
    the batch size, the layer images, the size, composable prompts. The generation checks its request
    here, and so does the X/Y/Z plot for every cell before the first (hosts/common.py)."""
    mode = settings.mode
    M.check_family(mode, family)
    M.check_batch(mode, batch_size)
    C.check_inputs(mode, {k: settings.image(k) for k in ("fg", "bg", "blend")}, height, width)
    check_composable(mode, [*prompts, *(settings.prompt(w) for w in mode.prompts)])


def check_composable(mode: M.Mode, prompts: list[str]) -> None:
    """A1111 splits a prompt on the word AND (anywhere, any line) into more conditioning rows, which
    breaks the frame groups of the multi-layer modes."""
    if mode.group > 1 and any(_AND.search(q) for q in prompts if isinstance(q, str)):
        raise LayerDiffuseError(
            f"'{mode.label}' cannot use composable prompts (AND): they break the frame groups. "
            "Remove the word 'AND' from the prompt, the hires prompt and the per-layer prompts (lowercase "
            "'and' is fine)."
        )


class Generation:
    def __init__(self, host: Host, settings: Settings, family: str | None, batch_size: int, width: int,
                 height: int, prompts: list[str] | None = None):  # fmt: skip
        self.host = host
        self.settings = settings
        self.mode = settings.mode
        self.batch_size = batch_size
        self.options = host.decode_options()  # Settings > LayerDiffuse, read once per generation
        check_request(settings, family, batch_size, width, height, prompts or [])
        self.session: UNetSession | None = None  # the sampling pass in progress
        self.error: str | None = None  # a setup failure inside a hook, raised after sampling
        self.passes = 0  # sampling passes since the last check_ran
        self.ran_passes = 0  # of those, passes our changes took part in
        self.unran: list[str] = []  # passes whose UNet calls bypassed our changes, and why
        self.sampled: torch.Tensor | None = None  # the latent the sampler returned last (host-captured)
        self.rgba: dict[int, np.ndarray] = {}  # decoded RGBA by global image index, until its hook takes it
        self.init_rgba: list = []  # img2img: the init images as RGBA PIL images
        self.previews: dict[int, np.ndarray] = {}  # checkerboard previews by image index
        self.tile_used: int | None = None  # the tile side of the last tiled decode (infotext)
        self.alpha = AlphaNotes()  # images whose decoded alpha came out degenerate (infotext, warning)
        self.prediction: str | None = None  # the model's prediction type, read at each sampling pass
        self.zero_snr = False  # whether it samples a zero-terminal-SNR schedule
        self.layered = None  # the host's layered-PSD state of this generation (hosts/layered.py)
        self._state: dict | None = None  # the mode's UNet file, read once per generation
        self._sharing: AttentionSharing | None = None  # SD1.5 units, built once per UNet
        self._aborted: UNetBackend | None = None  # a backend that makes sampling fail (setup error)
        self._pass_key: tuple | None = None  # (id, shape) of the latent the current pass started from

    # -- prompts --------------------------------------------------------------------------

    def layer_prompts(self, prompts: list[str]) -> list[str]:
        """Per-image prompts with each frame's additional prompt in front (SD1.5 multi-layer modes).

        Rewriting the prompts (rather than overriding the context inside the units, as the
        official does) keeps prompt editing, scheduling and long prompts working, and the
        infotext of each image shows its layer's prompt. A prompt pasted from such an
        infotext already starts with a layer prompt of this mode: that one is taken off
        first, so generating again gives every frame the same prompt as before.
        """
        hint = self.hints()
        if not self.mode.prompts and not hint:
            return list(prompts)
        extras = [e.strip() for e in (self.settings.prompt(w) for w in self.mode.prompts) if e and e.strip()]
        out = []
        for i, prompt in enumerate(prompts):
            base = strip_layer_prompt(prompt, extras)
            if hint:  # a pasted frame prompt may end with it: only the decoded frames get it back
                base = strip_hint(base)
            if self.mode.prompts:
                which = self.mode.prompts[i % self.mode.group]
                base = C.layer_prompt(self.settings.prompt(which), base) or base
            out.append(add_hint(base) if hint and self.mode.is_decoded(i) else base)
        check_composable(self.mode, out)
        return out

    def hints(self) -> bool:
        """Whether the decoded frames' prompts get :data:`BACKGROUND_HINT` (Settings > LayerDiffuse)."""
        return self.options.background_hint and self.decodes()

    # -- sampling -------------------------------------------------------------------------

    def _file_state(self) -> dict:
        if self._state is None:
            path = self.host.weight_path(self.mode.unet_file)
            self._state = load_unet_file(path)
            _check_finite_once(path, self._state)
        return self._state

    def _checked_lora(self) -> Path:
        """host_lora modes: the LoRA file the host's loader reads, its values checked finite once
        per file version (its keys are checked against the model by the host's key map)."""
        path = self.host.weight_path(self.mode.unet_file)
        _check_finite_once(path)
        return path

    def _units(self, backend: UNetBackend, device, dtype) -> AttentionSharing | None:
        """The SD1.5 units for ``backend``'s UNet, built once per generation (hires reuses them)."""
        if self.mode.apply != "attention_sharing":
            return None
        if self._sharing is None or self._sharing.unet[0] is not backend.unet:
            self._sharing = None
            source = f"{self.mode.unet_file}.safetensors"
            self._sharing = load_sharing(backend.unet, self.mode, self._file_state(), source).to(device, dtype)
        self._sharing.clear_caches()  # inference-tensor weights have no version counter: merge per pass
        self._sharing.state.calls = 0
        self._sharing.state.enabled = True
        return self._sharing

    def _condition(self, p, h: int, w: int) -> torch.Tensor:
        """The SDXL layer modes' concat condition: deterministic posterior means, diffusion space."""
        scale, shift = self.host.latent_format(p)
        lat = []
        for which in self.mode.concat:
            img = C.prepare_layer_image(self.settings.image(which), self.settings.resize_mode, h * 8, w * 8)
            mean, _ = self.host.vae_moments(p, C.to_tensor(img))
            lat.append((mean - shift) * scale)
        return C.condition_latent(lat)

    def begin_sampling(self, p, x) -> None:
        """Install the mode for one sampling pass (first pass or hires) on the host's UNet.

        Never raises (hosts swallow hook exceptions): a failure is kept in :attr:`error`, the
        backend makes sampling itself fail, and :meth:`check_ran` raises it after sampling.
        """
        key = (id(x), tuple(x.shape))
        session = self.session
        if session is not None and self._pass_key == key and not (session.calls or session.stopped_calls):
            # the hook ran again for the same pass before any UNet call (Forge2 calls it twice
            # around a reset before hires): the earlier install is replaced, not counted
            self.session = None
            session.restore()
        self.end_sampling()
        self._release_abort()
        self._pass_key = key
        backend = None
        try:
            backend = self.host.unet_backend(p)  # first: a refusal below must stop sampling through it
            rows, _, h, w = x.shape
            M.check_batch(self.mode, rows)
            M.check_family(self.mode, self.host.family(p))  # a hires checkpoint may be another model
            self.prediction, self.zero_snr = self.host.prediction(p), self.host.zero_terminal_snr(p)
            device, dtype = self.host.device_dtype(p)
            stop_at = self.settings.stop_at
            sigma_end = 0.0 if stop_at >= 1.0 else float(self.host.percent_to_sigma(p, stop_at))
            sharing = self._units(backend, device, dtype)
            lora = self._checked_lora() if self.mode.apply == "host_lora" else None
            state = None if sharing is not None or lora is not None else self._file_state()
            session = UNetSession(backend, self.mode, state, weight=self.settings.weight, sigma_end=sigma_end,
                                  sharing=sharing, lora=lora)  # fmt: skip
            if self.mode.control is not None:
                img = C.prepare_layer_image(self.settings.image(self.mode.control), self.settings.resize_mode,
                                            h * 8, w * 8)  # fmt: skip
                sharing.set_control(C.to_tensor(img))
            if self.mode.concat:
                session.condition = self._condition(p, h, w)
            if self.mode.decoder_file is not None:  # a damaged decoder is refused before sampling, not after
                self._model(p, "decoder")
            if self.init_rgba and self.mode.encoder_file is not None:
                self._model(p, "encoder")
            self.session = session
            session.install()
            if self.init_rgba and self.host.is_init_latent(p, x):
                self.offset_init_latent(p)
        except Exception as e:
            self.session = None
            self.error = str(e) if isinstance(e, LayerDiffuseError) else f"{type(e).__name__}: {e}"
            log.error("LayerDiffuse: %s", self.error)
            if backend is not None:
                backend.restore()
                backend.abort(self.error)
                self._aborted = backend

    def end_sampling(self) -> None:
        """Undo the pass's changes (idempotent) and note whether they took part in sampling."""
        session, self.session = self.session, None
        if session is None:
            return
        session.restore()
        if session.result is not None:
            self.sampled = session.result
        self.passes += 1
        if session.ran:
            self.ran_passes += 1
        elif session.calls or not session.stopped_calls:  # UNet calls that bypassed our changes
            self.unran.append(
                "its UNet changes did not take part in sampling (another extension may have replaced the "
                "UNet or its function)."
            )

    def check_ran(self) -> None:
        """After sampling: refuse to return an image made without our changes (never silent).

        A pass that lies entirely after Stop At (a hires pass at low denoising) is the user's
        choice, as long as an earlier pass of the same image ran with our changes.
        """
        error, unran, passes, ran = self.error, self.unran, self.passes, self.ran_passes
        self.error, self.unran, self.passes, self.ran_passes = None, [], 0, 0
        if error:
            raise LayerDiffuseError(error)
        self._stop_if_interrupted()  # an interrupt before the first step is not another extension's doing
        if (passes == 0 or unran or not ran) and self.host.skipped():  # nor is Skip
            raise LayerDiffuseError(
                "the image was skipped (Skip) before LayerDiffuse took part in its sampling, so no transparent "
                "image is returned for it."
            )
        if passes == 0:
            raise LayerDiffuseError(
                "its UNet changes were never installed for this sampling (another extension may have replaced "
                "the sampling); the image was not made with LayerDiffuse, so no transparent image is returned."
            )
        if unran:
            raise LayerDiffuseError(f"{unran[0]} No transparent image is returned.")
        if not ran:
            raise LayerDiffuseError(
                f"Stop At {self.settings.stop_at:g} ended LayerDiffuse before the first sampling step (img2img "
                "starts later in the schedule by its denoising strength): raise Stop At. No transparent image is "
                "returned."
            )

    def _release_abort(self) -> None:
        backend, self._aborted = self._aborted, None
        if backend is not None:
            backend.restore()

    def close(self) -> None:
        """Undo and release everything (idempotent); runs on every path, failures included."""
        try:
            self.end_sampling()
            self._release_abort()
        finally:
            if self._sharing is not None:
                self._sharing.clear_caches()
            self._sharing = self._state = self.sampled = None
            self.rgba.clear()
            self.init_rgba.clear()
            self.previews.clear()
            self.layered = None
            if not self.options.keep_models:
                release_models()

    # -- outputs ----------------------------------------------------------------------------

    def _model(self, p, kind: str):
        """The mode's transparent decoder or encoder (loaded, checked and cached once). In the
        host's low-VRAM modes it is kept on the CPU and :meth:`_on_device` moves it for its use."""
        device, dtype = self.host.device_dtype(p)
        if self.host.low_vram():
            device = torch.device("cpu")
        name = self.mode.decoder_file if kind == "decoder" else self.mode.encoder_file
        return cached_model(kind, self.host.weight_path(name), device, dtype)

    @contextlib.contextmanager
    def _on_device(self, p, model):
        """``model`` on the host's device for one use; back on the CPU after it in low-VRAM modes."""
        device, _ = self.host.device_dtype(p)
        low = self.host.low_vram() and torch.device(device).type != "cpu"
        if low:
            model.to(device)
        try:
            yield model
        finally:
            if low:
                model.to("cpu")

    def _tile_size(self, device, dtype, h: int, w: int) -> int | None:
        """The tile side for a decode of ``h x w`` by the user's tiling setting (None: whole)."""
        o = self.options
        side = o.tile_size
        if o.tiling == "never":
            return None
        if o.tiling == "auto":
            fits = default_tile_size(device, dtype, h + -h % MULTIPLE, w + -w % MULTIPLE,
                                     free_memory=self.host.free_memory(device))  # fmt: skip
            if fits is None:
                return None
            side = min(side, fits)
        return side if max(h, w) > side else None  # one tile covering the image is the whole decode

    def infotext(self) -> dict:
        """The generation's infotext entries: the arguments, and the decode settings that change
        the output (after a tiled decode, the tile size it used)."""
        out = self.settings.infotext()
        if self.decodes():
            out.update(self.options.infotext(self.tile_used))
            if self.alpha.states:
                out[ALPHA_KEY] = self.alpha  # per image (AlphaNotes)
        if self.prediction not in (None, "eps"):
            out[PREDICTION_KEY] = self.prediction
        return out

    def alpha_warning(self) -> str | None:
        """One line naming the images whose alpha came out degenerate and what to try, or None."""
        states = self.alpha.states
        if not states:
            return None
        parts = []
        for word, what in (("opaque", "opaque everywhere"), ("empty", "transparent everywhere")):
            which = [i + 1 for i, s in sorted(states.items()) if s == word]
            if which:
                parts.append(f"{what} in image{'s' if len(which) > 1 else ''} {', '.join(map(str, which))}")
        schedule = " with a zero-terminal-SNR schedule" if self.zero_snr else ""
        if self.prediction == "v":
            model = f" This model is v-prediction{schedule}; the published weights were trained on eps models (SD1.5, SDXL base)."
        elif self.zero_snr:
            model = " This model samples a zero-terminal-SNR schedule; the published weights were trained on the standard one."
        else:
            model = ""
        other = {"sdxl": " or the other SDXL method (Attention Injection / Conv Injection)"}.get(self.mode.family, "")
        return (
            f"LayerDiffuse: the transparency came out {'; '.join(parts)} (infotext: {ALPHA_KEY}).{model} Try: "
            f"'{BACKGROUND_HINT}' in the prompt (Settings > LayerDiffuse can add it), a lower Weight{other}, or "
            "adapt the weights to this checkpoint with the trainer (README: Adapt LayerDiffuse to your checkpoint)."
        )

    def decodes(self) -> bool:
        """Whether the mode decodes RGBA (then the adapter decodes right after sampling)."""
        return self.mode.decoder_file is not None

    def decode_batch(self, p, first: int, latents: torch.Tensor, pixels: torch.Tensor) -> None:
        """Right after sampling, inside ``p.sample`` (where an exception fails the request, docs/hosts.md
        §1): the RGBA of every frame of one batch the mode decodes, kept for :meth:`take`.

        latents: the batch's final diffusion-space latents; pixels: the host's decode of them,
        ``[B, 3, H, W]`` in [0, 1] as the host turns it into 8-bit images; ``first``: the global
        index of row 0. Raises :class:`LayerDiffuseError` when the decode fails or the user
        interrupts it: no frame of the batch is then returned as if it were transparent.
        """
        todo = [i for i in range(pixels.shape[0]) if self.mode.is_decoded(first + i)]
        if not todo:
            return
        if latents is None or latents.shape[0] != pixels.shape[0]:
            raise LayerDiffuseError("the sampler's final latents were not found, so the transparent decode cannot run")
        scale, shift = self.host.latent_format(p)
        o = self.options
        with self._on_device(p, self._model(p, "decoder")) as decoder:
            param = next(decoder.parameters())
            run = compiled(decoder) if o.compile else decoder
            for k, i in enumerate(todo):
                pixel = pixels[i : i + 1].float().cpu()
                h, w = pixel.shape[-2:]
                if h % 8 or w % 8:
                    raise LayerDiffuseError(f"image size {w}x{h} is not a multiple of 8; choose a width and height "
                                            "that are multiples of 8")  # fmt: skip
                latent = latents[i : i + 1].detach().to("cpu", torch.float32) / scale + shift
                if latent.shape[-2:] != (h // 8, w // 8):
                    raise LayerDiffuseError(
                        f"the final latent {tuple(latent.shape[-2:])} does not match the {w}x{h} image the host "
                        "decoded from it; another extension changed one of them."
                    )
                text = f"LayerDiffuse: transparent decode, image {k + 1} of {len(todo)}"
                self.host.progress(text)
                self._stop_if_interrupted()

                def step(done: int, total: int, text=text) -> None:
                    self.host.progress(f"{text}, pass {done} of {total}")
                    self._stop_if_interrupted()

                tile = self._tile_size(param.device, param.dtype, h, w)
                knobs = {"passes": o.passes, "tile_size": tile, "callback": step, "extra_memory_gb": o.extra_memory_gb}
                if self.mode.family == "flux":
                    from . import flux

                    # the reference's pixel input: the raw VAE decode mapped x * 0.5 + 0.5, not clipped
                    pixel = self.host.vae_decode(p, latent).detach().to("cpu", torch.float32) * 0.5 + 0.5
                    out = flux.decode_rgba(run, pixel, latent, **knobs)
                else:
                    out = decode_rgba(run, pixel, latent, **knobs)
                if tile is not None:
                    self.tile_used = tile
                rgba = from_decoder(out[0])
                state = alpha_state(rgba[..., 3])
                if state is not None:
                    self.alpha.states[first + i] = state
                self.rgba[first + i] = rgba
                if o.previews:
                    self.previews[first + i] = rgba

    def _stop_if_interrupted(self) -> None:
        if self.host.interrupted():
            raise LayerDiffuseError(
                "the generation was interrupted before the transparent decode finished (during sampling or the "
                "decode); no transparent image is returned for this batch."
            )

    def take(self, index: int) -> np.ndarray | None:
        """The RGBA (HxWx4 float) decoded for image ``index``, or None for frames not decoded."""
        return self.rgba.pop(index, None)

    # -- img2img ------------------------------------------------------------------------------

    def prepare_init(self, images: list) -> list:
        """img2img: keep each init image as RGBA and give the host grey-flattened copies
        (the host's own flatten is white; the transparent encoder expects grey)."""
        from PIL import Image

        if self.mode.encoder_file is None:
            return images
        for i, im in enumerate(images):
            check_init_image(i, *im.size)
        self.init_rgba = [im.convert("RGBA") for im in images]
        flat = [flatten_on_grey(np.asarray(im, dtype=np.float32) / 255.0) for im in self.init_rgba]
        return [Image.fromarray(to_uint8(x)) for x in flat]

    def encode_init(self, p, rgba_images: list[np.ndarray]) -> torch.Tensor:
        """The adjusted raw init latent ``mean + std * offset`` of float RGBA images (Eq. 2)."""
        # grey-flattened RGB is also Flux's VAE input: (rgb * 2 - 1) * alpha in [-1, 1] terms
        flat = np.stack([flatten_on_grey(x) for x in rgba_images])
        mean, std = self.host.vae_moments(p, torch.from_numpy(flat).permute(0, 3, 1, 2).float())
        with self._on_device(p, self._model(p, "encoder")) as encoder:
            if self.mode.family == "flux":
                from . import flux

                offset = flux.encode_offset(encoder, rgba_images)  # with the reference's x300
            else:
                offset = encode_offset(encoder, rgba_images)
        return apply_offset(mean, std, offset.to(mean.device))

    def offset_init_latent(self, p) -> None:
        """img2img: every RGBA init image gets the transparent encoder's offset in ``p``'s init latent."""
        rgba = [self.host.resize_init(p, im) for im in self.init_rgba]
        scale, shift = self.host.latent_format(p)
        self.host.set_init_latent(p, (self.encode_init(p, rgba) - shift) * scale)


def strip_layer_prompt(prompt: str, extras: list[str]) -> str:
    """``prompt`` without a leading ``"<extra>, "`` (a frame prompt pasted back from an infotext)."""
    for extra in sorted(extras, key=len, reverse=True):
        if prompt.startswith(f"{extra}, "):
            return prompt[len(extra) + 2 :]
    return prompt


# -- the layers of each group, for the layered PSD file (lib_layerdiffuse/psd.py) ------------------


def _round_uint8(x: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def input_layer(which: str, image, resize_mode: str, height: int, width: int) -> np.ndarray:
    """A user's layer image as the method used it, at ``height`` x ``width``, uint8 RGBA: the
    foreground keeps its alpha (resized with the same mode); a background or blended image is
    flattened on grey first, as the UNet side saw it (``conditioning.prepare_layer_image``).
    Rounded to 8 bits (not truncated as generated images are): an upload at the generation size
    comes back as its own pixel values, which float error would otherwise put 1 below."""
    if which == "fg":
        return _round_uint8(C.resize_image(C.as_rgba_float(image), resize_mode, height, width))
    rgb = _round_uint8(C.prepare_layer_image(image, resize_mode, height, width))
    return np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=-1)


class LayerGroups:
    """The frames of each group of one generation, as they are saved, until the group is whole.

    ``frames`` are the mode's frame names in batch order (``modes.Mode.frames``), ``inputs``
    the user's layer images by input name ("fg", "bg", "blend") and ``resize_mode`` how the
    method resized them. :meth:`add` returns a group's layers once all its frames are in.
    """

    def __init__(self, frames: tuple[str, ...], inputs: dict, resize_mode: str):
        self.frames, self.inputs, self.resize_mode = frames, inputs, resize_mode
        self.pending: dict[int, dict[str, np.ndarray]] = {}  # group -> frame name -> image

    def group_of(self, index: int) -> int:
        return index // len(self.frames)

    def add(self, index: int, image: np.ndarray) -> list[psd.Layer] | None:
        group = self.pending.setdefault(self.group_of(index), {})
        group[self.frames[index % len(self.frames)]] = np.asarray(image, dtype=np.uint8)
        if len(group) < len(self.frames):
            return None
        del self.pending[self.group_of(index)]
        height, width = next(iter(group.values())).shape[:2]
        inputs = {
            k: input_layer(k, v, self.resize_mode, height, width) for k, v in self.inputs.items() if v is not None
        }
        return psd.mode_layers(group, inputs)
