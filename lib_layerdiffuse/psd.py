"""Layered PSD files: the layers of one multi-layer result in one document an editor opens.

Each layer covers the whole canvas at offset (0, 0). Layers are given bottom to top; the
document's merged image (what previewers and ``magick file.psd[0]`` show) is the visible
layers composited with the ordinary "over" operator on straight alpha, computed here (psd-tools
composites only with its optional scipy/aggdraw extra). The generation parameters go into the
XMP packet (image resource 1060, ``dc:description``), where editors keep a file's description.

psd-tools is imported on first use: without it, :func:`available` says why and nothing else
of LayerDiffuse is affected.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

from .fileio import atomic_write

XMP_RESOURCE = 1060  # Photoshop image resource ID of the XMP packet
_NS = {
    "x": "adobe:ns:meta/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "dc": "http://purl.org/dc/elements/1.1/",
    "xmp": "http://ns.adobe.com/xap/1.0/",
}
# XML 1.0 cannot hold these characters at all, escaped or not
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


@dataclass
class Layer:
    name: str
    rgba: np.ndarray  # HxWx4 uint8, straight alpha
    visible: bool = True


# layer name of each frame a mode generates (modes.Mode.frames) and of each layer image a user gives
FRAME_LAYERS = {"background": "Background", "foreground": "Foreground", "blended": "Blended"}
INPUT_LAYERS = {"bg": "Background", "fg": "Foreground", "blend": "Blended"}
ORDER = ("Background", "Foreground", "Blended")  # bottom to top; Blended is hidden


def mode_layers(generated: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> list[Layer]:
    """The layers of one group: ``generated`` maps a frame name ("foreground", ...) to the saved
    image (HxWx3 or HxWx4 uint8), ``inputs`` an input name ("fg", ...) to the layer image as the
    method used it (HxWx4 uint8). Background and Blended are made opaque; Blended is hidden, so the
    visible composite is the foreground over the background."""
    named = {INPUT_LAYERS[k]: v for k, v in inputs.items()}
    named.update({FRAME_LAYERS[k]: v for k, v in generated.items()})
    layers = []
    for name in ORDER:
        if name not in named:
            continue
        rgba = np.asarray(named[name], dtype=np.uint8)
        if rgba.shape[-1] == 3 or name != "Foreground":
            rgba = np.concatenate([rgba[..., :3], np.full(rgba.shape[:2] + (1,), 255, np.uint8)], axis=-1)
        layers.append(Layer(name, np.ascontiguousarray(rgba), visible=name != "Blended"))
    return layers


_checked: list = []  # [reason or None] once psd-tools has been tried


def available() -> str | None:
    """None when layered PSD files can be written, else the reason (shown to the user once).

    Tried once per process by writing a tiny document in memory: A1111 1.10 pins Pillow 9.5,
    older than psd-tools asks for, so install.py installs psd-tools there without its
    dependencies, and only a real write tells whether that works."""
    if not _checked:
        _checked.append(_try_write())
    return _checked[0]


def _try_write() -> str | None:
    try:
        import psd_tools  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return (
            f"the psd-tools package could not be imported ({type(e).__name__}: {e}); install it with "
            "'pip install \"psd-tools>=1.26,<2\"' in the WebUI's environment (the extension's install.py does "
            "this at start-up) to get layered PSD files. The PNGs are saved as before."
        )
    try:
        tiny = np.zeros((2, 2, 4), np.uint8)
        render([Layer("Background", tiny + 255), Layer("Foreground", tiny)], "check")
    except Exception as e:
        return (
            f"psd-tools could not write a PSD here ({type(e).__name__}: {e}); update psd-tools and Pillow "
            "('pip install -U \"psd-tools>=1.26,<2\"'). The PNGs are saved as before."
        )
    return None


def composite(layers: list[Layer]) -> np.ndarray:
    """The visible layers, bottom to top, "over" on straight alpha: HxWx4 float32 in [0, 1]."""
    out = None
    for layer in layers:
        if not layer.visible:
            continue
        src = layer.rgba.astype(np.float32) / 255.0
        if out is None:
            out = src
            continue
        a_s, a_d = src[..., 3:], out[..., 3:]
        a = a_s + a_d * (1.0 - a_s)
        premult = src[..., :3] * a_s + out[..., :3] * a_d * (1.0 - a_s)
        color = np.divide(premult, a, out=np.zeros_like(premult), where=a > 0)
        out = np.concatenate([color, a], axis=-1)
    if out is None:
        shape = layers[0].rgba.shape[:2] if layers else (1, 1)
        return np.zeros((*shape, 4), np.float32)
    return out


def xmp_packet(description: str) -> bytes:
    """An XMP packet with ``description`` as ``dc:description`` (the generation parameters)."""
    text = escape(_XML_INVALID.sub("\ufffd", description), {'"': "&quot;"})
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        f'<x:xmpmeta xmlns:x="{_NS["x"]}">\n'
        f' <rdf:RDF xmlns:rdf="{_NS["rdf"]}">\n'
        f'  <rdf:Description rdf:about="" xmlns:dc="{_NS["dc"]}" xmlns:xmp="{_NS["xmp"]}">\n'
        "   <xmp:CreatorTool>sd-webui-layerdiffuse</xmp:CreatorTool>\n"
        f'   <dc:description><rdf:Alt><rdf:li xml:lang="x-default">{text}</rdf:li></rdf:Alt></dc:description>\n'
        "  </rdf:Description>\n"
        " </rdf:RDF>\n"
        "</x:xmpmeta>\n"
        '<?xpacket end="w"?>'
    ).encode()


def description_from_xmp(data: bytes) -> str | None:
    """``dc:description`` back from an XMP packet (None when there is none or it is unreadable)."""
    text = data.decode("utf-8", "replace")
    start, end = text.find("<x:xmpmeta"), text.rfind("</x:xmpmeta>")
    if start < 0 or end < 0:
        return None
    try:
        root = ET.fromstring(text[start : end + len("</x:xmpmeta>")])
    except ET.ParseError:
        return None
    item = root.find(".//dc:description/rdf:Alt/rdf:li", _NS)
    return None if item is None else (item.text or "")


def render(layers: list[Layer], description: str | None = None) -> bytes:
    """``layers`` (bottom to top, equal sizes) as the bytes of an 8-bit RGB document with transparency."""
    import io

    from PIL import Image
    from psd_tools import PSDImage
    from psd_tools.api import numpy_io
    from psd_tools.api.layers import PixelLayer
    from psd_tools.psd.image_resources import ImageResource

    if not layers:
        raise ValueError("a layered PSD needs at least one layer")
    height, width = layers[0].rgba.shape[:2]
    for layer in layers:
        if layer.rgba.shape != (height, width, 4) or layer.rgba.dtype != np.uint8:
            raise ValueError(
                f"layer {layer.name!r} is {layer.rgba.shape} {layer.rgba.dtype}, expected ({height}, {width}, 4) uint8"
            )
    doc = PSDImage.new("RGBA", (width, height))
    for layer in layers:
        opaque = bool((layer.rgba[..., 3] == 255).all())
        image = Image.fromarray(layer.rgba[..., :3] if opaque else layer.rgba, "RGB" if opaque else "RGBA")
        pixel = PixelLayer.frompil(image, doc, layer.name, 0, 0)
        pixel.visible = layer.visible
        doc.append(pixel)
    merged = composite(layers)
    record = doc._record  # the document's sections: the merged image is set here, not by psd-tools' renderer
    info = record.layer_and_mask_information.layer_info
    # the PSD format's flag that the merged image's extra channel is its transparency
    info.layer_count = -abs(info.layer_count)
    record.image_data.set_data(numpy_io.encode_image_data(doc, merged[..., :3], merged[..., 3:]), record.header)
    if description is not None:
        record.image_resources[XMP_RESOURCE] = ImageResource(key=XMP_RESOURCE, data=xmp_packet(description))
    with io.BytesIO() as f:
        record.write(f)
        return f.getvalue()


def write_psd(path: str | os.PathLike, layers: list[Layer], description: str | None = None) -> Path:
    """:func:`render` written atomically (a temporary file renamed into place: never a partial ``.psd``)."""
    data = render(layers, description)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def read_description(path: str | os.PathLike) -> str | None:
    """The generation parameters of a PSD written by :func:`write_psd` (None if it has none).

    Reads only the file header and image resources (PIL's PSD reader keeps them), no pixels.
    """
    from PIL import Image

    with Image.open(path) as im:
        for key, _name, data in getattr(im, "resources", ()):
            if key == XMP_RESOURCE:
                return description_from_xmp(data)
    return None
