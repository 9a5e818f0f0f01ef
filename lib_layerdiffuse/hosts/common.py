"""What both host adapters share: the WebUI API that AUTOMATIC1111, Forge2 and Neo have in common.

:class:`WebUIHost` implements the parts of :class:`pipeline.Host` that read the same on
every host (model folder and downloads, progress, tying a generation to ``p``, saving,
the API's PNG encoding, img2img init latents); each adapter adds its model and UNet side.
``modules`` is imported inside the methods: this file also loads where no WebUI exists.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
from pathlib import Path

import numpy as np
import torch

from .. import conditioning as C
from ..errors import LayerDiffuseError, Refusal, SettingsError, WeightFileError
from ..options import BY_KEY, OPTIONS, SECTION, DecodeOptions, check
from ..pipeline import Generation, Host
from ..rgba import has_alpha, pil_to_rgba, to_pil, write_png
from ..settings import TITLE, check_args
from ..weights import FILES, sha256_of, verify_file

log = logging.getLogger("layerdiffuse")
MODELS_DIR = "layerdiffuse_models_dir"  # the option, and the flag's attribute in cmd_opts (preload.py)
TAG = "layerdiffuse_rgba"  # attribute on our PIL images: their straight alpha, for the saved-file checks
_GEN = "_layerdiffuse"  # the attribute of p that carries its Generation while it runs
_OWN = "_layerdiffuse_own"  # p's own sample / close instance attributes, put back when the generation ends


def posterior_moments(first_stage, rgb: torch.Tensor):
    """(mean, std) of an ldm/sgm AutoencoderKL posterior, unscaled, for RGB in [0, 1].

    Read from the encoder and quant_conv directly: the hosts' encode functions return a
    sample (random) or a scaled latent, while the transparent offset needs mean and std.
    """
    param = next(first_stage.parameters())
    with torch.no_grad():
        h = first_stage.encoder((rgb * 2 - 1).to(param.device, param.dtype))
        quant_conv = getattr(first_stage, "quant_conv", None)
        moments = quant_conv(h) if quant_conv is not None else h
        mean, logvar = moments.float().chunk(2, dim=1)
    return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))


def raw_decode(first_stage, latent: torch.Tensor) -> torch.Tensor:
    """An AutoencoderKL's decode of a raw (unscaled) latent, ``[B, 3, H, W]`` in about [-1, 1]."""
    param = next(first_stage.parameters())
    with torch.no_grad():
        return first_stage.decode(latent.to(param.device, param.dtype)).float()


_DOWNLOAD_LOCK = threading.Lock()  # one download at a time per process: no two writers of one .part


def _weight_present(path: Path, info) -> bool:
    """Whether the weight file is there; raises when something else sits where it belongs
    (``path.is_file()`` alone is False for a directory or a dead link, which then went to
    the downloader and came back as "could not download it")."""
    from ..weights import not_a_file

    problem = not_a_file(path)
    if problem is not None:
        raise WeightFileError(
            f"{problem}; remove it and try again: LayerDiffuse then downloads {info.filename} "
            f"(or download it from {info.url} and put it there yourself)."
        )
    return path.is_file()


def _remove_file(path: Path) -> None:
    """Remove a file or link; nothing else, and never raise (a cleanup must not hide the error)."""
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
    except OSError:
        pass


def clean_partial_downloads(folder: str | os.PathLike, current: str | None = None) -> list[Path]:
    """Remove leftovers of interrupted downloads of the published files from the models
    folder: ``<file>.part`` (A1111's downloader takes an existing one as complete) and
    torch.hub's ``<file>.part.<hex>.partial``, plus fileio's stale temporary files.

    ``current`` (a file name about to be downloaded) loses its ``.part`` whatever its age;
    other leftovers go once untouched for ``fileio.DEAD_WRITER_GRACE_S`` (another process may
    be downloading them). Never raises; returns the paths removed.
    """
    from ..fileio import DEAD_WRITER_GRACE_S, clean_stale, remove_where

    parts = {f.filename + ".part" for f in FILES.values()}

    def leftover(path: Path, now: float) -> bool:
        name = path.name
        if name not in parts and not (name.endswith(".partial") and name.split(".part.", 1)[0] + ".part" in parts):
            return False
        try:
            st = path.lstat()
        except OSError:
            return False
        if stat.S_ISDIR(st.st_mode):
            return False
        return name == f"{current}.part" or now - st.st_mtime > DEAD_WRITER_GRACE_S

    return clean_stale(folder) + remove_where(folder, leftover)


class SamplerCapture:
    """Keeps the latent ``p.sampler`` returns during one pass in ``session.result``: after hires
    fix ``p.sample`` returns decoded images, and the transparent decode needs the latent
    (docs/hosts.md §1). The sampler's methods are wrapped for the pass and unwrapped after."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.wrapped: dict = {}  # name -> the sampler's own instance attribute (or None)

    def install(self, session) -> None:
        for name in ("sample", "sample_img2img"):
            original = getattr(self.sampler, name, None)
            if original is None:
                continue

            def run(*args, _original=original, **kwargs):
                samples = _original(*args, **kwargs)
                session.result = samples
                return samples

            self.wrapped[name] = vars(self.sampler).get(name)
            setattr(self.sampler, name, run)

    def restore(self) -> None:
        for name, own in self.wrapped.items():
            vars(self.sampler).pop(name, None)
            if own is not None:
                setattr(self.sampler, name, own)
        self.wrapped.clear()
        self.sampler = None


class WebUIHost(Host):
    # -- files ------------------------------------------------------------------------------

    def models_dir(self) -> Path:
        """The weight folder: ``--layerdiffuse-models-dir`` (created when missing, as before: a start-up
        flag names its folder on purpose), else the setting (options.check_folder: an existing folder,
        never created), else ``models/layer_model`` (created)."""
        from modules import paths, shared  # type: ignore

        setting = check(MODELS_DIR, getattr(shared.opts, MODELS_DIR, ""))  # checked even when the flag wins
        flag = getattr(shared.cmd_opts, MODELS_DIR, None)
        if flag:
            return _make_folder(flag, f"--layerdiffuse-models-dir {flag!r}", "start the WebUI with another folder")
        if setting:
            return Path(setting)
        folder = os.path.join(paths.models_path, "layer_model")
        return _make_folder(folder, f"The default folder {folder}", f"remove what is there, or name another folder "
                            f"in Settings > LayerDiffuse > {BY_KEY[MODELS_DIR].label}")  # fmt: skip

    def weight_path(self, name: str) -> Path:
        """The file's path, downloaded on first use (``<file>.part``, checked, fsync'd, renamed).

        A directory or a broken link where the file belongs is refused with its own message
        (not sent to the downloader); stale ``.part`` / ``.partial`` leftovers are removed
        before a download (A1111's downloader would take a stale ``.part`` as complete), and a
        failed, rejected or interrupted download leaves no ``.part`` behind.
        """
        from modules import modelloader  # type: ignore

        from ..fileio import fsync_dir, fsync_path

        info = FILES[name]
        folder = self.models_dir()
        path = folder / info.filename
        if _weight_present(path, info):
            return path
        with _DOWNLOAD_LOCK:
            if _weight_present(path, info):  # another thread downloaded it meanwhile
                return path
            part = folder / (info.filename + ".part")
            clean_partial_downloads(folder, info.filename)
            try:
                try:
                    modelloader.load_file_from_url(info.url, model_dir=str(folder), file_name=part.name)
                except Exception as e:  # offline, proxy, HTTP errors: the user needs the manual route
                    raise WeightFileError(
                        f"LayerDiffuse needs {info.filename} and could not download it ({type(e).__name__}: {e}). "
                        f"Download it from {info.url} and put it in {folder}."
                    ) from None
                try:
                    verify_file(part, info)  # keys and shapes always
                    if info.sha256 and sha256_of(part) != info.sha256:
                        raise WeightFileError(
                            f"{info.filename}: the downloaded file has the wrong SHA-256; it was deleted. Try again."
                        )
                    fsync_path(part)
                    os.replace(part, path)
                except OSError as e:
                    raise WeightFileError(
                        f"{info.filename}: the downloaded file could not be checked or moved into place "
                        f"({type(e).__name__}: {e}); it was deleted. Try again, or download it from {info.url} "
                        f"and put it in {folder}."
                    ) from None
            except BaseException:  # failed, rejected or interrupted (Ctrl+C, the host's stop): no .part left
                _remove_file(part)
                raise
        fsync_dir(folder)
        return path

    # -- settings ---------------------------------------------------------------------------

    def decode_options(self) -> DecodeOptions:
        from modules import shared  # type: ignore

        return DecodeOptions.read(lambda key, default: getattr(shared.opts, key, default))

    def add_settings(self) -> None:
        """Settings > LayerDiffuse (the same API on A1111, Forge2 and Neo): one option per row of
        ``options.OPTIONS``; those with an infotext key paste back as override settings."""
        import gradio as gr
        from modules import shared  # type: ignore

        for o in OPTIONS:
            if o.kind == "radio":
                component, args = gr.Radio, {"choices": list(o.choices)}
            elif o.kind == "slider":
                component, args = gr.Slider, {"minimum": o.minimum, "maximum": o.maximum, "step": o.step}
            elif o.kind == "checkbox":
                component, args = gr.Checkbox, {}
            else:
                component, args = gr.Textbox, {}
            info = shared.OptionInfo(o.default, o.label, component, args, section=SECTION, infotext=o.infotext)
            if o.help and hasattr(info, "info"):
                info = info.info(o.help)
            shared.opts.add_option(o.key, info)
        _check_on_set(shared.opts)
        _extend_api_options_model()

    # -- progress ---------------------------------------------------------------------------

    def progress(self, text: str) -> None:
        from modules import shared  # type: ignore

        state = getattr(shared, "state", None)
        if state is not None:
            state.textinfo = text

    @contextlib.contextmanager
    def progress_scope(self):
        """Our progress texts last only as long as the block: after it (finished, failed or
        interrupted) the host's text from before is back, so neither the next X/Y/Z cell's sampling
        nor ``/sdapi/v1/progress`` after the job shows a decode that has ended."""
        from modules import shared  # type: ignore

        state = getattr(shared, "state", None)
        before = getattr(state, "textinfo", None)
        try:
            yield
        finally:
            state = getattr(shared, "state", None)
            if state is not None and str(getattr(state, "textinfo", None) or "").startswith("LayerDiffuse:"):
                state.textinfo = before

    def interrupted(self) -> bool:
        from modules import shared  # type: ignore

        state = getattr(shared, "state", None)
        return bool(getattr(state, "interrupted", False))

    def skipped(self) -> bool:
        from modules import shared  # type: ignore

        return bool(getattr(getattr(shared, "state", None), "skipped", False))

    # -- a generation on p ------------------------------------------------------------------

    def generation(self, p) -> Generation | None:
        return p.__dict__.get(_GEN)

    def xyz_overrides(self, p) -> dict | None:
        """Values the X/Y/Z plot set for this cell (field -> value), if any."""
        return xyz_overrides(p)

    def attach(self, p, gen: Generation) -> None:
        """``p.sample`` (called by the host itself, so its exceptions reach the user) ends the
        pass, runs the never-silent check and, for modes that decode RGBA, decodes the batch
        (docs/hosts.md §1); ``p.close`` (runs on every path) closes ``gen`` and takes every
        reference to it off ``p`` again, so nothing outlives the generation."""
        self.detach(p)  # img2img's Batch tab runs process() once per file on one p, closed once at the end
        original_sample, original_close = p.sample, p.close
        own = {name: p.__dict__[name] for name in ("sample", "close") if name in p.__dict__}  # instance attributes

        def sample(*args, **kwargs):
            if gen.mode.apply == "decompose":
                return self._decompose(p, gen, *args, **kwargs)
            try:
                samples = original_sample(*args, **kwargs)
            finally:
                gen.end_sampling()
            try:
                gen.check_ran()
                p.extra_generation_params.update(gen.infotext())  # what sampling learnt (the prediction type)
                if gen.decodes():
                    return self._decode_batch(p, gen, samples)
            except LayerDiffuseError as e:
                raise Refusal(str(e)) from None
            except Exception as e:  # out of memory and the like: still a refusal, not an RGB image
                log.exception("LayerDiffuse: transparent decode failed")
                raise Refusal(
                    f"the transparent decode failed ({type(e).__name__}: {e}); no transparent image is returned. "
                    "If memory ran out: in Settings > LayerDiffuse set 'Tiled transparent decode' to always (a "
                    "smaller tile size uses less) and lower the batching memory, or make the image smaller."
                ) from None
            return samples

        def close(*args, **kwargs):
            try:
                self.detach(p)
            finally:
                p.__dict__.pop(XYZ, None)
            return original_close(*args, **kwargs)

        p.sample, p.close = sample, close
        p.__dict__[_GEN] = gen
        p.__dict__[_OWN] = own

    def detach(self, p) -> None:
        """Close ``p``'s generation, if any, and give ``p`` back its own ``sample`` and ``close``."""
        gen = p.__dict__.get(_GEN)
        if gen is None:
            return
        try:
            gen.close()
        finally:
            own = p.__dict__.pop(_OWN, {})
            for name in ("sample", "close", _GEN):
                p.__dict__.pop(name, None)
            p.__dict__.update(own)

    def _decompose(self, p, gen, conditioning=None, unconditional_conditioning=None, seeds=None, *args, **kwargs):
        """``p.sample`` of the decompose method (the hosts call it with these names): the layers instead
        of the host's sampler; every failure is a refusal (lib_layerdiffuse/decompose.py)."""
        try:
            with self.progress_scope():
                return gen.run(p, conditioning, unconditional_conditioning, seeds if seeds is not None else p.seeds)
        except Refusal:
            raise
        except LayerDiffuseError as e:
            raise Refusal(str(e)) from None
        except Exception as e:  # out of memory and the like: a refusal naming it, not a traceback
            log.exception("LayerDiffuse: the decomposition failed")
            raise Refusal(
                f"the decomposition into layers failed ({type(e).__name__}: {e}); no image is returned. If memory ran "
                "out: use the 640 resolution, fewer layers, or Forge Neo's lower-VRAM options."
            ) from None

    def publish_layers(self, p, processed, index: int, layers: list[np.ndarray]) -> None:
        """Each layer as an RGBA PNG (``-layer-<k>``, bottom layer 1) beside the image, and in the gallery
        and the API's images after the host's own, with the image's infotext."""
        from PIL import Image

        info = processed.infotext(p, index) if hasattr(processed, "infotext") else ""
        for k, rgba in enumerate(layers, start=1):
            image = Image.fromarray(np.ascontiguousarray(rgba, dtype=np.uint8), "RGBA")
            setattr(image, TAG, np.array(image)[..., 3])
            self._publish_extra(p, processed, image, index, f"-layer-{k}", info)

    def _decode_batch(self, p, gen: Generation, samples):
        """Decode the batch the host's way once, hand those pixels to the transparent decode, and
        give the host the decoded batch (it then does not decode again)."""
        latents = self.final_latents(p, samples, gen.sampled)
        gen.sampled = None
        decoded = self.decode_samples(p, samples)
        pixels = torch.stack([x.detach().to("cpu", torch.float32) for x in decoded])
        # as the host makes its 8-bit images: clamp((x + 1) / 2), then 255 * x truncated
        pixels = ((pixels + 1.0) / 2.0).clamp(0.0, 1.0).mul(255.0).floor().div(255.0)
        with self.progress_scope():
            gen.decode_batch(p, p.iteration * p.batch_size, latents, pixels)
        p.extra_generation_params.update(gen.infotext())  # the tile size a decode used
        return decoded

    def decode_samples(self, p, samples):
        """The host's own decode of a latent batch (the steps its ``process_images_inner`` runs)."""
        if getattr(samples, "already_decoded", False):
            return samples
        from modules import devices, processing, shared  # type: ignore

        devices.test_for_nans(samples, "unet")
        method = getattr(shared.opts, "sd_vae_decode_method", "Full")
        if method != "Full":
            p.extra_generation_params["VAE Decoder"] = method
        return processing.decode_latent_batch(p.sd_model, samples, target_device=devices.cpu, check_for_nans=True)

    def rgba_image(self, p, rgba: np.ndarray, host_image):
        """The saved image of a decoded frame: RGBA at the host image's size and with its info.

        Inpaint "only masked" decodes the crop region only; the host pastes it back at
        ``p.paste_to`` and blends it into the original through ``p.mask_for_overlay`` (the
        blurred mask). The RGBA goes back the same way, over the original RGBA init image, and
        the preview shows that full image. Another size (an extension resized the image) gets
        the RGBA resized to it.
        """
        from PIL import Image

        image = to_pil(rgba)
        size = host_image.size
        if image.size != size:
            paste_to = getattr(p, "paste_to", None)
            gen = self.generation(p)
            if paste_to is not None:
                full = _paste_masked(image, size, paste_to, getattr(p, "mask_for_overlay", None),
                                     _init_rgba(gen, p.batch_index, size))  # fmt: skip
                image = to_pil(full)
                if gen is not None and gen.options.previews:
                    gen.previews[p.iteration * p.batch_size + p.batch_index] = full
            else:
                log.warning("LayerDiffuse: the image is %s, the decode %s: the transparency is resized", size,
                            image.size)  # fmt: skip
                image = image.resize(size, Image.LANCZOS)
        setattr(image, TAG, np.array(image)[..., 3])
        image.info.update(host_image.info)
        return image

    def comment(self, p, text: str) -> None:
        try:
            p.comment(text)
        except Exception:
            print(text)

    def warn(self, processed, text: str) -> None:
        """A warning under the result (``processed.comments``, which the txt2img / img2img tabs show
        below the infotext; the hosts build it from ``p.comment`` when the generation ends, before the
        scripts' ``postprocess``), and in the console."""
        log.warning("%s", text)
        comments = getattr(processed, "comments", None)
        if isinstance(comments, str) and text not in comments:
            processed.comments = f"{comments}{text}\n"
            add_info(processed, "layerdiffuse_warnings", text)  # the API's info has no comments (seen on Neo)

    # -- img2img ----------------------------------------------------------------------------

    def is_init_latent(self, p, x) -> bool:
        return x is getattr(p, "init_latent", None)

    def resize_init(self, p, image) -> np.ndarray:
        """The init image at the generation size with its alpha (Neo's resize_image returns RGB)."""
        from modules import images  # type: ignore

        out = images.resize_image(p.resize_mode, image, p.width, p.height)
        if out.mode == "RGBA":
            return np.asarray(out, dtype=np.float32) / 255.0
        names = {1: "Crop and Resize", 2: "Resize and Fill"}
        x = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        return C.resize_image(x, names.get(int(p.resize_mode), "Just Resize"), p.height, p.width)

    def final_latents(self, p, samples, sampled):
        """The batch's final latents: the sampler's result when the host already decoded (hires)."""
        return sampled if getattr(samples, "already_decoded", False) else samples

    def set_init_latent(self, p, latent: torch.Tensor) -> None:
        """Inpaint: the masked area keeps what the host put there (``p.mask`` / ``p.nmask``), so
        the untouched area gets the transparent offset. "Only masked" and shapes the host does
        not expect keep the plain init latent, with a warning."""
        if getattr(p, "paste_to", None) is not None:
            log.warning("LayerDiffuse: 'Inpaint only masked' keeps the plain init latent (no transparency offset)")
            return
        latent = latent.to(p.init_latent.device, p.init_latent.dtype)
        if latent.shape[0] == 1:
            latent = latent.repeat(p.init_latent.shape[0], 1, 1, 1)
        if latent.shape != p.init_latent.shape:
            log.warning(
                "LayerDiffuse: init latent %s != %s; offset skipped", tuple(latent.shape), tuple(p.init_latent.shape)
            )
            return
        if getattr(p, "mask", None) is not None:
            latent = latent * p.mask + p.init_latent * p.nmask
        p.init_latent = latent

    # -- outputs ----------------------------------------------------------------------------

    def to_pil_rgba(self, rgba: np.ndarray):
        im = to_pil(rgba)
        setattr(im, TAG, np.array(im)[..., 3])
        return im

    def save_extra(self, p, image, index: int, suffix: str, infotext: str) -> None:
        """Save one extra output like the host saves samples (respects the user's save settings);
        the image then carries ``already_saved_as``, so the gallery serves that file instead of
        writing a copy to the host's temporary folder."""
        from modules import images, shared  # type: ignore

        if not p.save_samples():
            return
        fmt = "png" if image.mode == "RGBA" else str(getattr(shared.opts, "samples_format", "png")).lower()
        images.save_image(image, p.outpath_samples, "", p.all_seeds[index], p.all_prompts[index], fmt,
                          info=infotext, p=p, suffix=suffix)  # fmt: skip

    def publish_previews(self, p, processed, previews: list) -> None:
        from PIL import Image

        from ..rgba import to_uint8

        for index, preview, *suffix in previews:  # (index, preview) or (index, preview, file suffix)
            info = processed.infotext(p, index) if hasattr(processed, "infotext") else ""
            image = Image.fromarray(to_uint8(preview))
            self._publish_extra(p, processed, image, index, suffix[0] if suffix else "-checkerboard", info)

    def _publish_extra(self, p, processed, image, index: int, suffix: str, info: str) -> None:
        """One extra output of image ``index``: saved like the host's samples (a failure is a log line: the
        generation's own images are already saved) and shown after the host's images with ``info``."""
        image.info["parameters"] = info
        try:
            self.save_extra(p, image, index, suffix, info)
        except Exception as e:
            log.warning("LayerDiffuse: could not save %s: %s", suffix.lstrip("-"), e)
        if getattr(image, "already_saved_as", None) is None:
            _ensure_temp_dir()
        self.show_preview(processed, image, info)

    def show_preview(self, processed, image, info: str) -> None:
        """Put a preview in the gallery and the API response (after the host's own images), with
        its infotext at the same gallery index (:func:`place_infotext`)."""
        raise NotImplementedError

    def register_callbacks(self) -> None:
        from modules import script_callbacks  # type: ignore

        # now as well as in the callbacks: API-only servers (--nowebui) run no on_ui_settings (the
        # options would be missing from /sdapi/v1/options), and the X/Y/Z plot builds its axis list
        # when the scripts are set up, before app_started; the host's scripts/ load before extensions
        self.add_settings()
        add_xyz_axes(self)
        script_callbacks.on_ui_settings(self.add_settings)
        script_callbacks.on_before_ui(lambda *a, **k: add_xyz_axes(self))
        script_callbacks.on_app_started(lambda *a, **k: add_xyz_axes(self))
        script_callbacks.on_image_grid(grid_on_checkerboard)
        script_callbacks.on_before_image_saved(before_image_saved)
        script_callbacks.on_image_saved(check_saved)
        script_callbacks.on_app_started(lambda demo=None, app=None, *a, **k: self._started(app))

    def _started(self, app=None) -> None:
        """At start-up: PNG for our API images, the API's script arguments and options checked, and
        leftovers of interrupted writes and downloads in the models folder removed (A1111's
        downloader would take a stale .part as complete)."""
        install_api_png()
        install_api_args_check()
        install_api_options_check(app)
        self.add_settings()  # again: a settings load after import replaces opts.data (Neo API-only)
        try:
            clean_partial_downloads(self.models_dir())
        except LayerDiffuseError as e:  # a bad folder setting: generations refuse it by name
            log.warning("LayerDiffuse: %s", e)


def _make_folder(folder: str, what: str, fix: str) -> Path:
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as e:  # ValueError: a NUL character
        reason = getattr(e, "strerror", None) or e
        raise WeightFileError(f"{what} cannot be used as the LayerDiffuse models folder ({reason}): {fix}.") from None
    return Path(folder)


_NOTHING = object()


def _check_on_set(opts) -> None:
    """Check our settings where the host stores them. ``/sdapi/v1/options``, ``override_settings``
    and the settings page all store through ``opts.set`` (A1111 1.10, Forge2 and Neo alike; their
    ``modules/options.py``, ``sysinfo.set_config``, ``processing.process_images``), which keeps any
    JSON value as sent. Wrapped on this ``opts`` instance, a bad value of ours is refused by name
    with options.check instead of being stored: ``override_settings`` (``is_api``) fails with the
    reason; the settings page (not ``is_api``) sets every key in turn and saves afterwards, so there
    the value is kept unchanged (False, as the host's own "no change") with a warning, and the other
    keys apply. ``/sdapi/v1/options`` is checked as a whole first (install_api_options_check). Other keys, and
    a value equal to the stored one (no change, by the host's rule), go to the host unchanged. So
    does the value a change replaced: Forge2 and Neo put ``override_settings`` back through
    ``opts.set`` after the generation, and a bad value stored earlier (``config.json``) must go back
    too; generations refuse it when they read it (DecodeOptions.read)."""
    original = getattr(opts, "set", None)
    if original is None or getattr(original, "_layerdiffuse", False):
        return
    replaced: dict = {}  # key -> the value the last change of ours replaced

    def set_option(key, value, *args, **kwargs):
        current = getattr(opts, key, None)
        if key in BY_KEY and value != current:
            try:
                value = check(key, value)  # stored as used: 8.0 -> 8
            except SettingsError as e:
                before = replaced.get(key, _NOTHING)
                if not (value is before or (type(value) is type(before) and value == before)):
                    if kwargs.get("is_api", args[0] if args else False):
                        raise Refusal(str(e)) from None
                    _refused_on_page(key, current, e)
                    return False
            replaced[key] = current
        return original(key, value, *args, **kwargs)

    set_option._layerdiffuse = True
    opts.set = set_option


def _refused_on_page(key: str, current, error: SettingsError) -> None:
    text = f"LayerDiffuse: {error} The value was not saved; {key} stays {current!r}."
    log.warning(text)
    try:  # a toast where gradio has one (3.41 shows only "Error" for an exception here)
        import gradio as gr  # type: ignore

        gr.Warning(text)
    except Exception:
        pass


def _check_options_request(api, req) -> None:
    """Every key of ours in a ``/sdapi/v1/options`` request, before the host stores any (it sets
    them one by one and saves): a bad value answers 422 naming it, and nothing is stored."""
    from modules import shared  # type: ignore

    for key, value in req.items() if isinstance(req, dict) else ():
        if key in BY_KEY and value != getattr(shared.opts, key, None):
            try:
                check(key, value)
            except SettingsError as e:
                http_error = getattr(api, "HTTPException", None)
                if http_error is None:
                    raise Refusal(str(e)) from None
                raise http_error(status_code=422, detail=f"LayerDiffuse: {e}") from None


def install_api_options_check(app=None) -> None:
    """``Api.set_config`` (``/sdapi/v1/options``) stores a request key by key (A1111 1.10 directly,
    Forge2 and Neo through ``sysinfo.set_config``), so a bad value in the middle would leave the
    keys before it stored: the request is checked first (_check_options_request). The host's
    ``Api`` binds its ``set_config`` to the route before ``app_started``, so the route's call is
    wrapped too, where ``app`` has it."""
    try:
        from modules.api import api  # type: ignore
    except Exception:  # API not loaded
        return
    import functools

    cls = getattr(api, "Api", None)
    original = getattr(cls, "set_config", None)
    if original is not None and not getattr(original, "_layerdiffuse", False):

        @functools.wraps(original)
        def set_config(self, req, *args, **kwargs):
            _check_options_request(api, req)
            return original(self, req, *args, **kwargs)

        set_config._layerdiffuse = True
        cls.set_config = set_config
    for route in getattr(app, "routes", None) or ():
        dependant = getattr(route, "dependant", None)
        call = getattr(dependant, "call", None)
        if getattr(route, "path", None) != "/sdapi/v1/options" or "POST" not in (getattr(route, "methods", None) or ()):
            continue
        if call is None or getattr(call, "_layerdiffuse", False):
            continue

        @functools.wraps(call)
        def checked(*args, _call=call, **kwargs):
            _check_options_request(api, kwargs["req"] if "req" in kwargs else (args[0] if args else None))
            return _call(*args, **kwargs)

        checked._layerdiffuse = True
        dependant.call = checked


def install_api_args_check() -> None:
    """The API spreads a request's ``alwayson_scripts[...]["args"]`` over the script's positions one
    by one, up to the script's own count (``Api.init_script_args``, the same on A1111 1.10, Forge2
    and Neo): a 13th value is dropped and a string becomes its characters before the script sees
    them. So the shape is checked here, where the request's own value is visible
    (settings.check_args), and a bad one answered with HTTP 422 and the reason."""
    try:
        from modules.api import api  # type: ignore
    except Exception:  # API not loaded
        return
    cls = getattr(api, "Api", None)
    original = getattr(cls, "init_script_args", None)
    if original is None or getattr(original, "_layerdiffuse", False):
        return

    def init_script_args(self, request, *args, **kwargs):
        scripts = getattr(request, "alwayson_scripts", None)
        for name, entry in scripts.items() if isinstance(scripts, dict) else ():
            # the host finds a script by its title, case-insensitively
            if str(name).lower() == TITLE.lower() and isinstance(entry, dict) and "args" in entry:
                try:
                    entry["args"] = check_args(entry["args"], request=True)
                except SettingsError as e:
                    http_error = getattr(api, "HTTPException", None)
                    if http_error is None:
                        raise Refusal(str(e)) from None
                    raise http_error(status_code=422, detail=f"LayerDiffuse: {e}") from None
        return original(self, request, *args, **kwargs)

    init_script_args._layerdiffuse = True
    cls.init_script_args = init_script_args


def place_infotext(processed, position: int, info: str) -> None:
    """Put ``info`` at ``processed.infotexts[position]``, the gallery index of the image it belongs
    to. The gallery looks the infotext of a clicked image up by index and keeps the one shown
    before when the index is past the list's end (the "previous image's infotext" on a preview);
    images other extensions added without an infotext are padded with the generation's."""
    infotexts = getattr(processed, "infotexts", None)
    if infotexts is None:
        return
    pad = getattr(processed, "info", "") or (infotexts[0] if infotexts else "")
    infotexts.extend([pad] * (position - len(infotexts)))
    infotexts.insert(position, info)


def _extend_api_options_model() -> None:
    """``/sdapi/v1/options`` answers through a pydantic model the host builds from the options
    known when ``modules.api.models`` is first imported, which can be before extensions load: then
    our options are filtered out of the answer. The model gains them here (before the API adds its
    routes); a model built later reads them from ``opts.data_labels`` itself."""
    import sys

    models = sys.modules.get("modules.api.models")
    model = getattr(models, "OptionsModel", None)
    if model is None:
        return
    try:
        from typing import Optional

        from pydantic import Field, create_model

        have = getattr(model, "model_fields", None) or getattr(model, "__fields__", {})
        missing = {
            o.key: (Optional[type(o.default)], Field(default=o.default, description=o.label))  # noqa: UP045
            for o in OPTIONS
            if o.key not in have
        }
        if missing:
            models.OptionsModel = create_model("Options", __base__=model, **missing)
    except Exception as e:  # the settings still work; only the API listing lacks them
        log.warning("LayerDiffuse: could not add the settings to the API's options model: %s", e)


_INFO = "_layerdiffuse_info"  # the attribute of a Processed that holds our additions to its info JSON


def add_info(processed, key: str, value) -> None:
    """Append ``value`` (or what a callable returns when the JSON is made) to the list ``key`` of
    the ``info`` JSON the API returns (``processed.js()``; on every host it carries neither the
    comments under the gallery nor anything of ours otherwise)."""
    extra = processed.__dict__.get(_INFO)
    if extra is None:
        import json

        extra = processed.__dict__[_INFO] = {}
        original = processed.js

        def js():
            info = json.loads(original())
            info.update({k: [v() if callable(v) else v for v in values] for k, values in extra.items()})
            return json.dumps(info, default=lambda o: None)

        processed.js = js
    extra.setdefault(key, []).append(value)


def _init_rgba(gen, index: int, size) -> np.ndarray:
    """The original RGBA init image at ``size`` (float HxWx4), or transparent if there is none."""
    from PIL import Image

    if gen is None or not gen.init_rgba:
        return np.zeros((size[1], size[0], 4), np.float32)
    init = gen.init_rgba[min(index, len(gen.init_rgba) - 1)]
    if init.size != size:
        init = init.resize(size, Image.LANCZOS)
    return np.asarray(init, dtype=np.float32) / 255.0


def _paste_masked(region, size, paste_to, mask, original: np.ndarray) -> np.ndarray:
    """The decoded crop ``region`` put back as the host puts its colours back: resized into the
    ``paste_to`` rectangle, then blended over ``original`` by the overlay mask (straight RGBA
    interpolation; without a mask the whole rectangle is replaced)."""
    from PIL import Image

    x, y, w, h = (int(v) for v in paste_to)
    placed = np.zeros_like(original)
    inside = np.zeros(original.shape[:2] + (1,), np.float32)
    crop = np.asarray(region.resize((w, h), Image.LANCZOS), dtype=np.float32) / 255.0
    placed[y : y + h, x : x + w] = crop[: original.shape[0] - y, : original.shape[1] - x]
    inside[y : y + h, x : x + w] = 1.0
    if mask is not None:
        m = mask.convert("L")
        if m.size != size:
            m = m.resize(size, Image.LANCZOS)
        inside = inside * (np.asarray(m, dtype=np.float32)[..., None] / 255.0)
    return placed * inside + original * (1.0 - inside)


XYZ = "_layerdiffuse_xyz"  # the attribute of p that carries X/Y/Z plot values for the script
XYZ_FIELD = "layerdiffuse_field"  # on our axis options: the settings field the axis sets
MODEL_AXES = ("Checkpoint name",)  # host axes that change the model per cell (then the family is checked per cell)


def xyz_overrides(p) -> dict | None:
    return p.__dict__.get(XYZ)


def add_xyz_axes(host=None) -> None:
    """Method, Weight and Stop At as axes of the host's X/Y/Z plot script (found among the loaded
    scripts, as other extensions do); they apply when LayerDiffuse is enabled. Their values are
    checked before the first cell (``confirm``, :func:`_check_plot`), and the plot is guarded
    (:func:`_guard_plot`). Idempotent."""
    from modules import scripts  # type: ignore

    from .. import modes as M
    from ..settings import XYZ_AXES

    data = next((d for d in scripts.scripts_data if d.script_class.__module__ == "xyz_grid.py"), None)
    if data is None:
        return
    xyz = data.module
    _guard_plot(xyz, data.script_class, host)
    have = {getattr(o, "label", None) for o in xyz.axis_options}
    for field, label, kind in XYZ_AXES:
        label = f"[LayerDiffuse] {label}"
        if label in have:
            continue

        def apply(p, x, xs, field=field):
            # a new dict per cell: the plot makes each cell's p as a shallow copy of one p
            p.__dict__[XYZ] = {**p.__dict__.get(XYZ, {}), field: x}

        def confirm(p, xs, field=field, label=label):
            for x in xs:
                _check_cell(p, host, {field: x}, f"{label} = {x}", model=False)

        choices = (lambda: list(M.LABELS)) if field == "method" else None
        option = xyz.AxisOption(label, kind, apply, confirm=confirm, choices=choices)
        setattr(option, XYZ_FIELD, field)
        xyz.axis_options.append(option)


def _script_args(p) -> list | None:
    """Our script's arguments in ``p`` (the host's ``ScriptRunner`` slices ``p.script_args`` the same way)."""
    from ..settings import TITLE

    for script in getattr(getattr(p, "scripts", None), "alwayson_scripts", None) or ():
        try:
            if script.title() == TITLE:
                return list(p.script_args[script.args_from : script.args_to])
        except Exception:  # another extension's script; not ours
            continue
    return None


def _check_cell(p, host, overrides: dict, where: str, model: bool) -> None:
    """Refuse the plot if a cell with ``overrides`` would be refused: the same checks as the cell's
    own generation (settings.Settings.from_args, pipeline.check_request). ``model``: also the
    model family (False where another axis may load another checkpoint for the cell)."""
    from ..pipeline import check_request
    from ..settings import Settings

    args = _script_args(p)
    if args is None:  # not found: each cell checks itself
        return
    try:
        settings = Settings.from_args(args, overrides)
        if not settings.enabled:
            raise LayerDiffuseError(
                "the [LayerDiffuse] axes apply only when LayerDiffuse is enabled: tick LayerDiffuse, or choose "
                "another axis."
            )
        family = host.family(p) if model and host is not None else None
        if family is None:  # another axis loads the cell's model, or the model is not known yet: each cell checks
            family = settings.mode.family
        prompts = [getattr(p, "prompt", ""), getattr(p, "hr_prompt", "")]
        prompts = [q for v in prompts for q in (v if isinstance(v, list) else [v])]
        check_request(settings, family, p.batch_size, p.width, p.height, prompts)
    except LayerDiffuseError as e:
        raise Refusal(f"X/Y/Z plot, {where}: {e} The plot was not started.") from None


def _axes() -> list:
    """The plot's three ``AxisInfo(axis, values)``, which the host sets before drawing the grid."""
    from modules import shared  # type: ignore

    state = getattr(shared, "state", None)
    return [getattr(state, f"xyz_plot_{n}", None) for n in "xyz"]


def _check_plot(p, host) -> None:
    """Before the first cell: every combination of our axes' values, checked as its cells will be."""
    import itertools

    axes = [a for a in _axes() if a is not None]
    ours = [a for a in axes if getattr(a.axis, XYZ_FIELD, None)]
    if not ours:
        return
    model = not any(getattr(a.axis, "label", None) in MODEL_AXES for a in axes)
    for values in itertools.product(*(a.values for a in ours)):
        where = ", ".join(f"{a.axis.label} = {v}" for a, v in zip(ours, values, strict=True))
        _check_cell(p, host, {getattr(a.axis, XYZ_FIELD): v for a, v in zip(ours, values, strict=True)}, where,
                    model)  # fmt: skip


class _Plot:
    """One run of the X/Y/Z plot: the refusal that stopped it, and the transparent cells to return."""

    def __init__(self):
        self.refusal: str | None = None
        self.where = ""  # the cell that is generating
        self.cells: list = []  # (RGBA image, infotext) of every cell, in cell order

    def collect(self, processed) -> None:
        infotexts = getattr(processed, "infotexts", None) or []
        for i, image in enumerate(getattr(processed, "images", None) or []):
            if getattr(image, TAG, None) is not None:
                self.cells.append((image, infotexts[i] if i < len(infotexts) else ""))

    def publish(self, processed) -> None:
        """The transparent cells after the plot's own images (the gallery and the API show and return
        ``processed.images`` with ``processed.infotexts`` by index); Forge's extra images follow them."""
        shown = {id(im) for im in processed.images}
        cells = [(im, info) for im, info in self.cells if id(im) not in shown]  # "Include Sub Images" has them
        if not cells:
            return
        at = len(processed.images)
        infotexts = list(processed.infotexts[:at])
        infotexts += [getattr(processed, "info", "") or (infotexts[0] if infotexts else "")] * (at - len(infotexts))
        processed.images = [*processed.images, *(im for im, _ in cells)]
        processed.infotexts = infotexts + [info for _, info in cells]


_PLOT = threading.local()  # .plot: the X/Y/Z run in progress on this thread (the host runs one job at a time)


def _current_plot() -> _Plot | None:
    return getattr(_PLOT, "plot", None)


def _guard_plot(xyz, script_class, host) -> None:
    """Make the host's X/Y/Z plot keep our promises (once per loaded module). The plot catches every
    exception of a cell and draws it blank, so a refused cell would vanish into the server log, and it
    returns only its grid: so its ``process_images`` notes our refusals and our transparent images, its
    ``draw_xyz_grid`` checks the cells up front and stops at a refused cell (drawing and saving no
    grid), and its ``run`` raises that refusal and returns the transparent cells after the grid."""
    if getattr(xyz, "_layerdiffuse_guarded", False):
        return
    original_process, original_draw, original_run = xyz.process_images, xyz.draw_xyz_grid, script_class.run

    def process_images(p, *args, **kwargs):
        plot = _current_plot()
        if plot is None:
            return original_process(p, *args, **kwargs)
        try:
            processed = original_process(p, *args, **kwargs)
        except LayerDiffuseError as e:
            plot.refusal = f"X/Y/Z plot, {plot.where}: {str(e).removeprefix('LayerDiffuse: ')}"
            raise
        plot.collect(processed)
        return processed

    def draw_xyz_grid(p, *args, cell, **kwargs):
        from modules.processing import Processed  # type: ignore

        plot = _current_plot()
        if plot is None:
            return original_draw(p, *args, cell=cell, **kwargs)
        _check_plot(p, host)
        axes = _axes()

        def guarded(x, y, z, *index):
            if plot.refusal is not None:  # the plot failed: no more cells
                return Processed(p, [], p.seed, "")
            shown = [
                (a, v) for a, v in zip(axes, (x, y, z), strict=True) if a is not None and a.axis.label != "Nothing"
            ]
            plot.where = ", ".join(f"{a.axis.label} = {v}" for a, v in shown) or "the cell"
            return cell(x, y, z, *index)

        processed = original_draw(p, *args, cell=guarded, **kwargs)
        return Processed(p, []) if plot.refusal is not None else processed

    def run(self, p, *args, **kwargs):
        plot, previous = _Plot(), _current_plot()
        _PLOT.plot = plot
        try:
            processed = original_run(self, p, *args, **kwargs)
        finally:
            _PLOT.plot = previous
        if plot.refusal is not None:
            raise Refusal(f"{plot.refusal} The plot was stopped; no grid is saved.")
        if processed is not None and getattr(processed, "images", None):
            plot.publish(processed)
        return processed

    xyz.process_images, xyz.draw_xyz_grid, script_class.run = process_images, draw_xyz_grid, run
    xyz._layerdiffuse_guarded = True


def grid_on_checkerboard(params) -> None:
    """``on_image_grid``: in an X/Y/Z plot, our transparent cells are drawn on the checkerboard (the
    hosts paste them onto an RGB grid, or an RGBA one saved as JPG: their alpha was lost, the colour
    under transparent pixels shown)."""
    if _current_plot() is None:
        return
    from PIL import Image

    from ..rgba import checkerboard_preview, to_uint8

    def flat(image):
        if getattr(image, TAG, None) is None or image.mode != "RGBA":
            return image
        return Image.fromarray(to_uint8(checkerboard_preview(np.asarray(image, dtype=np.float32) / 255.0)))

    params.imgs = [flat(im) for im in params.imgs]


def _ensure_temp_dir() -> None:
    """An unsaved image reaches the gallery through the host's temporary folder (``opts.temp_dir``),
    which some launchers create and ``launch.py`` does not: without it the gallery shows nothing."""
    from modules import shared  # type: ignore

    folder = getattr(shared.opts, "temp_dir", "")
    if folder:
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
        except OSError as e:  # the gallery then misses this preview; the saved files are complete
            log.warning("LayerDiffuse: cannot create the temporary folder %s: %s", folder, e)


def before_image_saved(params):
    """Forge2's default stealth infotext ("Alpha") sets our alpha to 255 in place before this
    callback; put the decoded alpha back (the PNG keeps its infotext in tEXt). The user's
    settings are not changed. Other hosts write no stealth data: nothing to do there."""
    image = params.image
    alpha = getattr(image, TAG, None)
    if alpha is None or image.mode != "RGBA":
        return
    if not np.array_equal(np.asarray(image)[..., 3], alpha):
        from PIL import Image

        image.putalpha(Image.fromarray(alpha))
        log.info("LayerDiffuse: restored the transparency that the stealth infotext option overwrote")


def _samples_format() -> str:
    from modules import shared  # type: ignore

    return str(getattr(shared.opts, "samples_format", "png")).lower()


def install_api_png():
    """API responses encode images per the output format (jpg/webp drop alpha): ours go as PNG."""
    try:
        from modules.api import api  # type: ignore
    except Exception:  # API not loaded
        return
    original = api.encode_pil_to_base64
    if getattr(original, "_layerdiffuse", False):
        return

    def encode(image):
        if getattr(image, TAG, None) is not None and _samples_format() != "png":
            import base64
            import io

            from PIL import PngImagePlugin

            info = PngImagePlugin.PngInfo()
            if isinstance(image.info.get("parameters"), str):
                info.add_text("parameters", image.info["parameters"])
            with io.BytesIO() as out:
                image.save(out, format="PNG", pnginfo=info)
                return base64.b64encode(out.getvalue())
        return original(image)

    encode._layerdiffuse = True
    api.encode_pil_to_base64 = encode


def saved_path(params) -> str:
    """The absolute path of the file ``on_image_saved`` reports. The hosts write ``params.filename``
    as given, so a relative one is relative to the current directory (their output folders are).
    With "Add number suffix when the file exists" they write ``<name>-1.png`` but leave
    ``params.filename`` at ``<name>.png``: Neo names the file written in ``already_saved_as``;
    A1111 1.10 nowhere, so there it is the newest of ``<name>.png``, ``<name>-1.png``, ... (the
    names its loop tries in turn, all taken up to the one it wrote)."""
    path = os.path.abspath(params.filename)
    written = getattr(params.image, "already_saved_as", None)
    if isinstance(written, str) and os.path.abspath(written) != path and os.path.isfile(written):
        return os.path.abspath(written)
    try:
        from modules import shared  # type: ignore

        numbered = getattr(shared.opts, "save_images_replace_action", "Replace") != "Replace"
    except Exception:
        numbered = False
    if not numbered:
        return path
    stem, ext = os.path.splitext(path)
    found, n, name = [], 0, path
    while os.path.isfile(name):
        found.append((os.stat(name).st_mtime_ns, n, name))
        n += 1
        name = f"{stem}-{n}{ext}"
    return max(found)[2] if found else path  # same time: the last name taken


def check_saved(params):
    """on_image_saved: the file on disk must be RGBA with our alpha; else warn with the fix.

    When the user's format drops alpha (jpg, webp), a PNG copy is written beside the file.
    """
    alpha = getattr(params.image, TAG, None)
    if alpha is None:
        return
    path = Path(saved_path(params))
    if path.suffix.lower() != ".png":
        png = path.with_suffix(".png")
        text = params.pnginfo.get("parameters") if isinstance(getattr(params, "pnginfo", None), dict) else None
        write_png(png, params.image.convert("RGBA"), parameters=text)
        log.warning(
            "LayerDiffuse: %s cannot hold alpha; the transparent image was also saved as %s", path.name, png.name
        )
        path = png
    from PIL import Image

    try:
        with Image.open(path) as im:
            ok = has_alpha(im) and np.array_equal(pil_to_rgba(im)[..., 3], alpha)
            mode = im.mode
    except OSError as e:
        log.warning("LayerDiffuse: could not re-open %s to check its alpha: %s", path, e)
        return
    if not ok:
        msg = (
            f"LayerDiffuse: the saved file {path} lost the transparency (mode {mode}). "
            "Another extension or a setting rewrote the image before saving; save as PNG and disable options that "
            "hide data in the alpha channel."
        )
        log.warning(msg)
        print(msg)
