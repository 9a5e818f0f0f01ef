"""'(Qwen-Image-Layered) Decompose Into Layers': one img2img generation, the same on every host.

The counterpart of :class:`pipeline.Generation` for the decompose method, with the same hooks
the script and the adapter call (``attach``, ``take``, ``previews``, ``infotext``, ``close``), so
the flow of a request stays the one of hosts/common.py. What differs: no UNet is patched and the
host's sampler does not run. The adapter's ``p.sample`` calls :meth:`Decomposition.run`, which
has the host run the model (:meth:`pipeline.Host.decompose_layers`: the host's own Qwen-Image
transformer through lib_layerdiffuse/qwen_layered.py) and returns the layers recomposed as the
batch's one image, already decoded. The layers themselves are extra outputs:

- ``outputs[index]``: the ``layers`` straight-alpha RGBA images, bottom layer first (the
  pipeline's order: layer 1 is the back, the last one the front);
- ``rgba[index]``: their "over" composite (what the host saves as the image, RGBA);
- ``psd_layers(index)``: the layers for the layered PSD, with the input image as a hidden layer
  on top (to compare against), written by hosts/layered.py like the other methods' PSDs.

The init image is taken as RGBA (RGB as opaque) and resized to its bucket (``qwen_layered.bucket_size``,
Lanczos as the pipeline does); the WebUI's width and height are set to that size for the request.
"""

from __future__ import annotations

import numpy as np
import torch

from . import modes as M
from . import psd
from .errors import LayerDiffuseError, SettingsError
from .options import DecodeOptions
from .qwen_layered import bucket_size
from .settings import Settings, check_init_image

INPUT_LAYER = "Input image"  # the PSD's hidden top layer


class DecodedImages(list):
    """The batch as decoded images (``[3, H, W]`` in [-1, 1]): the hosts' ``process_images_inner`` takes
    a result with ``already_decoded`` as pixels and does not decode it again."""

    already_decoded = True


def check_host(settings: Settings, host_decomposes: bool) -> None:
    """First of all: a host that cannot load Qwen-Image models (its users cannot load the checkpoint
    the family check would ask for)."""
    if not host_decomposes:
        raise SettingsError(
            f"'{settings.mode.label}' runs on Forge Neo only: A1111 and Forge2 cannot load Qwen-Image models. Use "
            "Forge Neo, or pick a method for the loaded model."
        )


def check_decompose(settings: Settings, img2img: bool, batch_size: int, prompts: list[str],
                    masked: bool = False) -> None:  # fmt: skip
    """What the decompose method refuses before anything runs, after the host and the family checks."""
    label = settings.mode.label
    if masked:
        raise SettingsError(
            f"'{label}' splits the whole image and cannot keep an inpaint mask: use the plain img2img tab (no mask), "
            "or crop the image to the part to decompose."
        )
    if not img2img:
        raise SettingsError(
            f"'{label}' splits an existing image into layers: use it in the img2img tab with the image to decompose "
            "as the input image."
        )
    if batch_size != 1:
        raise SettingsError(
            f"'{label}' decomposes one image at a time: set Batch size to 1 (Batch count makes more tries with "
            f"other seeds). It is {batch_size}."
        )
    if any(not (q or "").strip() for q in prompts):
        raise SettingsError(
            f"'{label}' needs a prompt describing the image (its objects, colours, text and background). Forge Neo "
            "cannot caption an image automatically as the reference pipeline does, so write one, e.g. 'a red apple "
            "on a wooden table, white background'."
        )


class Decomposition:
    """One decompose request; built in the script's ``process`` (which has checked the family)."""

    def __init__(self, host, settings: Settings, family: str | None, batch_size: int, width: int, height: int,
                 prompts: list[str] | None = None, *, img2img: bool = True, masked: bool = False):  # fmt: skip
        self.host = host
        self.settings = settings
        self.mode = settings.mode
        self.options: DecodeOptions = host.decode_options()
        check_host(settings, bool(getattr(host, "decomposes", False)))
        M.check_family(self.mode, family)
        check_decompose(settings, img2img, batch_size, prompts or [], masked)
        self.inputs: list[np.ndarray] = []  # the init images as RGBA uint8 at their bucket size
        self.size: tuple[int, int] | None = None  # (w, h) of the first init image's bucket
        self.rgba: dict[int, np.ndarray] = {}  # index -> the recomposed image (HxWx4 float in [0, 1])
        self.outputs: dict[int, list[np.ndarray]] = {}  # index -> the layers (HxWx4 uint8), bottom first
        self.previews: dict[int, np.ndarray] = {}  # the recomposed image on the checkerboard
        self.layered = None  # hosts/layered.py's PSD state

    # -- the hooks of pipeline.Generation the script and the adapter call --------------------

    def layer_prompts(self, prompts: list[str]) -> list[str]:
        return prompts

    def prepare_init(self, images: list) -> list:
        """Keep each init image as RGBA at its bucket size; the host gets them unchanged (its own
        img2img setup still runs at the size :meth:`size` names, and its encode is not used)."""
        from PIL import Image

        self.inputs = []
        for i, image in enumerate(images):
            check_init_image(i, *image.size)
            w, h = bucket_size(image.size[0], image.size[1], self.settings.resolution)
            # Pillow resizes RGBA with premultiplied alpha, as the pipeline's PIL resize does
            self.inputs.append(np.asarray(image.convert("RGBA").resize((w, h), Image.LANCZOS), dtype=np.uint8))
        if not self.inputs:
            raise SettingsError(f"'{self.mode.label}' needs an input image: put the image to decompose in img2img.")
        self.size = self.inputs[0].shape[1], self.inputs[0].shape[0]
        return images

    def input_for(self, iteration: int) -> np.ndarray:
        """The image a batch decomposes: the hosts give batch ``n`` init image ``n % count``."""
        return self.inputs[iteration % len(self.inputs)]

    def run(self, p, conditioning, unconditional_conditioning, seeds) -> DecodedImages:
        """The adapter's ``p.sample``: the layers of this batch's image, and their composite as the
        batch's decoded image (its RGB; the saved image gets the RGBA through :meth:`take`)."""
        index = p.iteration * p.batch_size
        image = self.input_for(p.iteration)
        layers = self.host.decompose_layers(p, image, self.settings, conditioning, unconditional_conditioning,
                                            int(seeds[0]))  # fmt: skip
        self._check_layers(layers, image.shape)
        composite = psd.composite([psd.Layer(f"Layer {k + 1}", layer) for k, layer in enumerate(layers)])
        self.outputs[index] = layers
        self.rgba[index] = composite
        if self.options.previews:
            self.previews[index] = composite
        rgb = torch.from_numpy(np.ascontiguousarray(composite[..., :3])).permute(2, 0, 1) * 2.0 - 1.0
        return DecodedImages([rgb])

    def _check_layers(self, layers, shape) -> None:
        n = self.settings.layers
        if len(layers) != n or any(layer.shape != (*shape[:2], 4) or layer.dtype != np.uint8 for layer in layers):
            raise LayerDiffuseError(
                f"the model returned {len(layers)} images of shapes {sorted({tuple(x.shape) for x in layers})}; "
                f"expected {n} RGBA layers of {shape[1]}x{shape[0]}. No image is returned."
            )

    def take(self, index: int) -> np.ndarray | None:
        return self.rgba.pop(index, None)

    def take_layers(self, index: int) -> list[np.ndarray]:
        """The layers of image ``index``; kept until :meth:`close`, for the PSD the host writes after."""
        return self.outputs.get(index, [])

    def psd_layers(self, index: int) -> list[psd.Layer] | None:
        """The PSD of image ``index``: its layers bottom to top, the input image hidden on top."""
        layers = self.outputs.get(index)
        if layers is None:
            return None
        out = [psd.Layer(f"Layer {k + 1}", np.ascontiguousarray(layer)) for k, layer in enumerate(layers)]
        out.append(psd.Layer(INPUT_LAYER, np.ascontiguousarray(self.input_for(index)), visible=False))
        return out

    def infotext(self) -> dict:
        return self.settings.infotext()

    def alpha_warning(self) -> str | None:
        return None

    def close(self) -> None:
        from .pipeline import release_models

        self.inputs.clear()
        self.rgba.clear()
        self.outputs.clear()
        self.previews.clear()
        self.layered = None
        if not self.options.keep_models:
            release_models()  # the RGBA VAE
