"""Layered PSD files of the multi-layer methods on the hosts (A1111, Forge2 and Neo alike).

Each group of a multi-layer method (``modes.Mode.group`` > 1, or one with layer inputs) becomes
one ``<first saved image>-layers.psd`` beside the group's images (:mod:`..psd` builds it):

- ``frame`` (the script's ``postprocess_image_after_composite``) keeps each frame's final image
  and tags the PIL image with its batch index;
- ``saved`` (``on_image_saved``) keeps what was written (the saved pixels and the infotext) and,
  once every frame of a group is saved, writes the PSD beside the group's first image;
- ``finish`` (the script's ``postprocess``) writes the groups the host did not save (saving
  off, API requests without ``save_images``) to the host's temporary folder, adds a line per
  file to the comments under the gallery, lists them for the accordion's download box and, for
  API requests, adds them as base64 to the response's ``info`` (``layerdiffuse_psd``).

A PSD that cannot be written (psd-tools missing, disk full) is a comment and a log line; the
images are already saved and no partial ``.psd`` is left (psd.write_psd is atomic).
"""

from __future__ import annotations

import base64
import logging
import os
import tempfile
import threading
import uuid
from pathlib import Path

import numpy as np

from .. import psd
from ..pipeline import LayerGroups

log = logging.getLogger("layerdiffuse")
INDEX = "_layerdiffuse_frame"  # attribute of a frame's PIL image: its global index in the generation
SUFFIX = "-layers.psd"
_last: dict[str, list[str]] = {}  # "txt2img" / "img2img" -> the PSD files of that tab's last generation
_temp: dict[str, list[str]] = {}  # of those, the unsaved ones in the temporary folder (deleted when replaced)
TEMP_PREFIX = "layerdiffuse-"  # unsaved PSDs: layerdiffuse-<unique>-<group>-layers.psd
_last_lock = threading.Lock()
_said_unavailable = False


def wanted(mode) -> bool:
    """Whether a method's results are layers (several frames, frames that fit given layers, or the
    layers of a decomposed image)."""
    return mode.group > 1 or bool(mode.inputs) or mode.apply == "decompose"


class _DecomposedGroups:
    """The decompose method's stand-in for :class:`LayerGroups`: each image is a group of its own, and
    its PSD layers are the generation's (lib_layerdiffuse/decompose.py: ``psd_layers``)."""

    def __init__(self, gen):
        self.gen = gen

    def add(self, index: int, image: np.ndarray) -> list[psd.Layer] | None:
        return self.gen.psd_layers(index)


class Layered:
    """One generation's PSD state; lives on its ``Generation`` (``gen.layered``) and ends with it."""

    def __init__(self, mode, settings, gen=None):
        inputs = {k: settings.image(k) for k in mode.inputs}
        if mode.apply == "decompose":
            self.groups = _DecomposedGroups(gen)
        else:
            self.groups = LayerGroups(mode.frames, inputs, settings.resize_mode)
        self.group_size = mode.group
        self.images: dict[int, np.ndarray] = {}  # global index -> final pixels (saved ones replace them)
        self.files: dict[int, tuple[str, str | None]] = {}  # global index -> (saved path, infotext)
        self.written: list[str] = []  # PSD files of this generation
        self.rendered: list[tuple[str, bytes]] = []  # (name, file) of the PSDs an API request gets, not on disk
        self.errors: list[str] = []

    def frame(self, index: int, image) -> None:
        setattr(image, INDEX, index)
        self.images[index] = np.asarray(image.convert("RGBA") if image.mode not in ("RGB", "RGBA") else image)

    def saved(self, index: int, image, path: str, text: str | None) -> None:
        if index not in self.images:
            return
        self.images[index] = np.asarray(image.convert("RGBA") if image.mode not in ("RGB", "RGBA") else image)
        self.files[index] = (path, text)
        first = index - index % self.group_size
        members = range(first, first + self.group_size)
        if all(i in self.files for i in members):
            self._write(first, Path(self.files[first][0]).with_suffix("").as_posix() + SUFFIX, self.files[first][1])

    def finish(self, infotexts: dict[int, str], folder: str | None, stem: str) -> None:
        """The whole groups the host did not save: written to ``folder``, or, with no folder (an
        API request), rendered in memory only (:attr:`rendered`), so nothing is left on disk."""
        for first in sorted(i for i in self.images if i % self.group_size == 0):
            members = range(first, first + self.group_size)
            if all(i in self.images for i in members) and not any(i in self.files for i in members):
                name = f"{stem}-{first // self.group_size:03d}{SUFFIX}"
                self._write(first, os.path.join(folder, name) if folder else name, infotexts.get(first), folder is None)
        self.images.clear()
        self.files.clear()

    def _write(self, first: int, path: str, text: str | None, in_memory: bool = False) -> None:
        members = [self.images.pop(i, None) for i in range(first, first + self.group_size)]
        try:
            layers = None
            for offset, image in enumerate(members):
                if image is not None:
                    layers = self.groups.add(first + offset, image)
            if layers is None:
                raise ValueError("the group's frames are incomplete")
            if in_memory:
                self.rendered.append((path, psd.render(layers, text)))
                return
            path = _free_name(path)
            psd.write_psd(path, layers, text)
        except Exception as e:  # the images are saved; the PSD is an extra
            log.warning("LayerDiffuse: could not write %s: %s", path, e)
            self.errors.append(f"LayerDiffuse: the layered PSD {os.path.basename(path)} could not be written ({e}).")
            return
        self.written.append(str(path))


def unavailable_once() -> str | None:
    """The reason PSD files cannot be written, the first time only (then None)."""
    global _said_unavailable
    reason = psd.available()
    if reason is None or _said_unavailable:
        return None
    _said_unavailable = True
    log.warning("LayerDiffuse: no layered PSD: %s", reason)
    return f"LayerDiffuse: no layered PSD file: {reason}"


def temp_folder() -> str:
    """Where unsaved PSDs go: the host's temporary folder (``opts.temp_dir``) or the system's."""
    from modules import shared  # type: ignore

    folder = getattr(shared.opts, "temp_dir", "") or os.path.join(tempfile.gettempdir(), "layerdiffuse")
    Path(folder).mkdir(parents=True, exist_ok=True)
    return folder


def remember(tab: str, files: list[str]) -> None:
    """The tab's box offers ``files`` now; the unsaved PSDs it offered before (ours, in the
    temporary folder) are deleted: they existed only to be downloaded from that box."""
    with _last_lock:
        _last[tab] = list(files)
        stale, _temp[tab] = _temp.get(tab, []), [f for f in files if os.path.basename(f).startswith(TEMP_PREFIX)]
    for f in stale:
        if f not in files:
            try:
                os.remove(f)
            except OSError:
                pass


def last(tab: str) -> list[str]:
    with _last_lock:
        return [f for f in _last.get(tab, []) if os.path.isfile(f)]


def _entry(path: str) -> dict:
    with open(path, "rb") as f:
        return {"name": os.path.basename(path), "path": path, "data": base64.b64encode(f.read()).decode()}


def _memory_entry(name: str, data: bytes) -> dict:
    return {"name": name, "path": None, "data": base64.b64encode(data).decode()}


# -- the hooks the script calls -----------------------------------------------------------------


def start(p, gen, settings) -> None:
    """``process``: a multi-layer generation with the setting on collects its groups."""
    if not wanted(gen.mode) or not gen.options.save_psd:
        return
    if psd.available() is not None:
        reason = unavailable_once()
        if reason:
            p.comment(reason)
        return
    gen.layered = Layered(gen.mode, settings, gen)


def _free_name(path: str) -> str:
    """``path``, or with the hosts' kind of number (``-1``, ``-2``, ...) before the extension when a
    file is there: another run's PSD beside a file of the same name is never replaced."""
    stem, ext = os.path.splitext(path)
    n = 0
    while os.path.exists(path):
        n += 1
        path = f"{stem}-{n}{ext}"
    return path


def frame(gen, index: int, image) -> None:
    """``postprocess_image_after_composite``: the frame's final image (what the host saves)."""
    if getattr(gen, "layered", None) is not None:
        gen.layered.frame(index, image)


def image_saved(host, params) -> None:
    """``on_image_saved``: a frame was written; a group whose frames are all written gets its PSD."""
    index = getattr(params.image, INDEX, None)
    gen = host.generation(params.p) if index is not None and params.p is not None else None
    layered = getattr(gen, "layered", None)
    if layered is None:
        return
    from .common import saved_path

    path = saved_path(params)
    pnginfo = getattr(params, "pnginfo", None)
    text = pnginfo.get("parameters") if isinstance(pnginfo, dict) else None
    layered.saved(index, params.image, str(path), text)


def finish(p, gen, processed, tab: str) -> None:
    """``postprocess``: the groups the host did not save are written to the temporary folder (UI)
    or rendered in memory (API); every PSD of the generation is named in the comments, offered in
    the accordion (UI) and, for API requests, returned in ``info``."""
    layered = getattr(gen, "layered", None)
    if layered is None:
        return
    gen.layered = None
    api = bool(getattr(p, "is_api", False))
    first = getattr(processed, "index_of_first_image", 0)
    texts = {i - first: t for i, t in enumerate(getattr(processed, "infotexts", []) or []) if i >= first}
    stem = f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}"  # unique: cells and requests may share a seed and a second
    try:
        layered.finish(texts, None if api else temp_folder(), stem)
    except OSError as e:
        layered.errors.append(f"LayerDiffuse: no temporary folder for the layered PSD ({e}).")
    lines = [f"LayerDiffuse: layered PSD {f}" for f in layered.written] + layered.errors
    if lines:
        processed.comments = (getattr(processed, "comments", "") or "") + "".join(f"{line}\n" for line in lines)
    if not api:
        remember(tab, layered.written)
        return
    from .common import add_info

    for f in layered.written:  # read when the response is made: no copy in memory until then
        add_info(processed, "layerdiffuse_psd", lambda f=f: _entry(f))
    for name, data in layered.rendered:
        add_info(processed, "layerdiffuse_psd", _memory_entry(name, data))


def new_generation(p, tab: str) -> None:
    """``process`` of every UI generation: the box no longer offers the previous generation's files."""
    if not getattr(p, "is_api", False):
        remember(tab, [])


# -- the accordion's download box, refreshed when the tab's output changes ---------------------------

_boxes: dict[str, object] = {}
_triggers: dict[str, object] = {}  # tab -> the output component whose change refreshes the box
# what changes after every generation, by elem_id on all three hosts: the gallery (gradio 4: Forge2,
# Neo), else the infotext under it (A1111's gradio 3.41 Gallery has no change event)
_OUTPUTS = {"txt2img_gallery": "txt2img", "img2img_gallery": "img2img",
            "html_info_txt2img": "txt2img", "html_info_img2img": "img2img"}  # fmt: skip


def reset_ui() -> None:
    """``on_before_ui``: a rebuilt UI (Reload UI) has new components; the old ones are let go."""
    _boxes.clear()
    _triggers.clear()


def add_box(tab: str) -> None:
    """The accordion's "Layered PSD files" box (not a script argument)."""
    import gradio as gr

    _boxes[tab] = gr.File(label="Layered PSD files of the last generation", file_count="multiple",
                          interactive=False, visible=False, elem_id=f"layerdiffuse_{tab}_psd")  # fmt: skip
    if tab in _triggers:
        _wire(tab, _triggers[tab])


def after_component(component, elem_id) -> None:
    """``on_after_component``: the tab's outputs, built after the scripts' UI."""
    tab = _OUTPUTS.get(elem_id or "")
    if tab is None or not callable(getattr(component, "change", None)) or tab in _triggers:
        return  # the first output with a change event (the gallery where it has one) wins
    _triggers[tab] = component
    if tab in _boxes:
        _wire(tab, component)


def box_update(tab: str):
    import gradio as gr

    files = last(tab)
    return gr.update(value=files or None, visible=bool(files))


def _wire(tab: str, trigger) -> None:
    try:
        trigger.change(lambda: box_update(tab), inputs=None, outputs=[_boxes[tab]], show_progress=False)
    except Exception as e:  # the files are still saved and named under the gallery
        log.warning("LayerDiffuse: cannot offer the layered PSD files in the %s tab: %s", tab, e)
