"""Training data: RGBA folders, a synthetic RGBA generator, and rank-aware batching.

Every sample is a dict of float32 CHW tensors in [0, 1]:

- ``rgba``: straight (not premultiplied) RGBA, alpha last;
- ``alpha``: ``[1, H, W]``; ``padded``: the padded RGB ``I_c`` (core ``rgba.pad_rgb``,
  the format the LayerDiffuse models were trained on);
- ``premult``: the paper's premultiplied image ``I = I_c * I_alpha`` with RGB in [-1, 1],
  stored in [0, 1] units, i.e. ``(I + 1) / 2`` = the RGBA flattened on 50% grey (core
  ``rgba.flatten_on_grey``). This is what the frozen VAE encodes;
- ``index``: the sample's index (for sharding checks).

Batches are a pure function of (seed, step, rank): :class:`StepBatches` takes each
epoch's order from :class:`torch.utils.data.distributed.DistributedSampler` (``set_epoch``),
so every rank reads a disjoint shard, an epoch sees each sample once across ranks, and a
resumed run continues with exactly the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import json
import math
import struct
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from .. import rgba as core_rgba

IMAGE_SUFFIXES = {".png", ".webp"}
# Images above this many pixels are skipped (read from the header, before decoding): far
# more than a training crop needs, and a decompression bomb stays harmless.
MAX_PIXELS = 8192 * 8192
HELD_OUT_OFFSET = 10_000_000  # synthetic indices from here on are never used for training


class NoUsableImagesError(ValueError):
    """A data folder without a single usable RGBA image; the message says what was found."""


# ---------------------------------------------------------------------------------------
# Preparation


def resize_crop(rgba: np.ndarray, size: int) -> np.ndarray:
    """Resize so the short side is ``size`` and centre-crop to ``size x size``.

    Resizing is done on premultiplied colour (then divided back) so transparent pixels'
    undefined colours do not bleed into visible edges.
    """
    h, w = rgba.shape[:2]
    scale = size / min(h, w)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        a = rgba[..., 3:]
        pm = cv2.resize(np.ascontiguousarray(rgba[..., :3] * a), (nw, nh), interpolation=interp)
        a = cv2.resize(np.ascontiguousarray(a), (nw, nh), interpolation=interp)[..., None].clip(0, 1)
        c = np.where(a > 1e-6, pm / np.maximum(a, 1e-6), 0.0).clip(0, 1)
        rgba = np.concatenate([c, a], axis=2).astype(np.float32)
    top, left = (rgba.shape[0] - size) // 2, (rgba.shape[1] - size) // 2
    return np.ascontiguousarray(rgba[top : top + size, left : left + size])


def _chw(x: np.ndarray) -> torch.Tensor:
    """HxWxC array to a float32 CxHxW tensor."""
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))).float()


def prepare(rgba: np.ndarray, index: int) -> dict:
    """One training sample (see the module docstring) from an HxWx4 float32 straight RGBA."""
    padded = core_rgba.pad_rgb(rgba)
    premult = core_rgba.flatten_on_grey(rgba)
    return {
        "rgba": _chw(rgba),
        "alpha": _chw(rgba[..., 3:]),
        "padded": _chw(padded),
        "premult": _chw(premult),
        "index": index,
    }


def usable(alpha: np.ndarray) -> str | None:
    """None if the alpha has a transparent and a visible pixel, else why not (paper §3.4)."""
    if alpha.min() >= 255:
        return "no transparent pixel"
    if alpha.max() <= 0:
        return "no visible pixel"
    return None


def _open_checked(path: Path, want_alpha: bool) -> np.ndarray | str:
    """The image as HxWx4 (``want_alpha``) or HxWx3 uint8, or the reason it cannot be used.

    The size is read from the header before any pixel is decoded: more than
    :data:`MAX_PIXELS` is refused (a decompression bomb would otherwise take the memory of
    the whole run); PIL's own bomb error and warning give the same reason.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    return "oversized (more than 8192x8192 pixels)"
                if w < 1 or h < 1:
                    return "unreadable (empty image)"
                if want_alpha:
                    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
                    if not has_alpha:
                        return f"no alpha channel (mode {im.mode})"
                im.load()
                return np.array(im.convert("RGBA" if want_alpha else "RGB"))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "oversized (more than 8192x8192 pixels)"
    except (OSError, ValueError, SyntaxError, struct.error, EOFError) as e:
        # PIL raises all of these for damaged or truncated files
        return f"unreadable ({type(e).__name__})"


def _read_rgba_uint8(path: Path) -> np.ndarray | str:
    """HxWx4 uint8, or the reason it cannot be used."""
    return _open_checked(path, want_alpha=True)


def _rejection(path: Path) -> str | None:
    """None if ``path`` is a usable RGBA image, else why not."""
    img = _read_rgba_uint8(path)
    return img if isinstance(img, str) else usable(img[..., 3])


def _load_rgba(path: Path, size: int) -> np.ndarray:
    """A usable RGBA image as ``size x size`` float32 straight RGBA (:func:`resize_crop`)."""
    img = _read_rgba_uint8(path)
    if isinstance(img, str):
        raise NoUsableImagesError(f"{path} became unusable during training: {img}")
    return resize_crop(img.astype(np.float32) / 255.0, size)


def _found_and_rejected(found: str, rejected: dict[str, int]) -> str:
    """What a folder held, for :class:`NoUsableImagesError`: ``found`` plus the rejection counts."""
    if rejected:
        found += "; rejected: " + ", ".join(f"{n} {why}" for why, n in sorted(rejected.items()))
    return found


# ---------------------------------------------------------------------------------------
# Captions: ``NAME.txt`` beside ``NAME.png``, or ``metadata.jsonl`` lines
# ``{"file_name": "NAME.png", "text": "..."}`` (the Hugging Face image-folder convention;
# ``file_name`` relative to the jsonl's folder). A ``.txt`` wins over the jsonl.

METADATA_FILE = "metadata.jsonl"


def read_caption_file(path: Path) -> str:
    """The text of a caption file (``.txt`` or ``metadata.jsonl``): UTF-8, a leading BOM
    dropped. Any other encoding is a :class:`NoUsableImagesError` naming the file: decoding it
    with replacement characters would train on the wrong words without a word said."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise NoUsableImagesError(f"caption file {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                                  f"{e.start}; latin-1 or Windows-1252?): save it as UTF-8") from None  # fmt: skip


def read_metadata_captions(folder: Path) -> dict[Path, str]:
    """``{image path: caption}`` from every ``metadata.jsonl`` under ``folder``; a bad line is
    a :class:`NoUsableImagesError` naming the file and line (a typo should not silently drop captions)."""
    out: dict[Path, str] = {}
    for meta in sorted(folder.rglob(METADATA_FILE)):
        for n, line in enumerate(read_caption_file(meta).split("\n"), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                name, text = rec["file_name"], rec.get("text", "")
                if not isinstance(name, str) or not isinstance(text, str):
                    raise TypeError("file_name and text must be strings")
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise NoUsableImagesError(f"{meta} line {n}: expected {{\"file_name\": ..., \"text\": ...}} "
                                          f"({type(e).__name__}: {e})") from None  # fmt: skip
            out[(meta.parent / name).resolve()] = text.strip()
    return out


def caption_for(image: Path, metadata: dict[Path, str]) -> str | None:
    """The image's caption: ``image.txt`` beside it, else its ``metadata.jsonl`` entry, else None."""
    txt = image.with_suffix(".txt")
    if txt.is_file():
        return read_caption_file(txt).strip() or None
    return metadata.get(image.resolve()) or None


class RGBAFolder(Dataset):
    """RGBA images (PNG or WebP with alpha, any size) under ``folder``, recursively.

    Images without an alpha channel, without a transparent pixel or without a visible
    pixel are dropped at construction (counted in ``self.rejected``); if none is left,
    :class:`NoUsableImagesError` says what the folder held.
    """

    def __init__(self, folder: str | Path, size: int):
        self.folder = Path(folder)
        self.size = size
        if not self.folder.is_dir():
            raise NoUsableImagesError(f"data folder {self.folder} does not exist or is not a folder")
        files = sorted(p for p in self.folder.rglob("*") if p.is_file())
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        self.paths: list[Path] = []
        self.rejected: dict[str, int] = {}
        for p in images:
            reason = _rejection(p)
            if reason is None:
                self.paths.append(p)
            else:
                self.rejected[reason] = self.rejected.get(reason, 0) + 1
        if not self.paths:
            found = _found_and_rejected(f"{len(files)} files, {len(images)} of them PNG/WebP", self.rejected)
            raise NoUsableImagesError(
                f"no usable RGBA images in {self.folder} ({found}). Training needs PNG/WebP images with an alpha "
                "channel that have at least one transparent and one visible pixel."
            )

        metadata = read_metadata_captions(self.folder)
        self.captions = [caption_for(p, metadata) for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def uncaptioned(self) -> int:
        return sum(c is None for c in self.captions)

    def __getitem__(self, i: int) -> dict:
        return {**prepare(_load_rgba(self.paths[i], self.size), i), "caption": self.captions[i] or ""}


# ---------------------------------------------------------------------------------------
# Synthetic RGBA


def _smooth_colour_field(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth HxWx3 colour gradient so shapes are not flat."""
    c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    ang = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    t = np.cos(ang) * xx + np.sin(ang) * yy
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    return (c0 * (1 - t[..., None]) + c1 * t[..., None]).astype(np.float32)


def _blur(mask: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(mask, (0, 0), sigma) if sigma > 0.3 else mask


def _over(dst_pm: np.ndarray, dst_a: np.ndarray, colour: np.ndarray, alpha: np.ndarray):
    """Porter-Duff 'over' in premultiplied space; alpha HxW."""
    a = alpha[..., None]
    return colour * a + dst_pm * (1 - a), a + dst_a * (1 - a)


def synthetic_rgba(index: int, size: int, seed: int = 0) -> np.ndarray:
    """A deterministic synthetic transparent image, HxWx4 float32 straight RGBA in [0, 1].

    Seeded by (seed, index) only, so any rank can build any sample of its shard. Layers
    composited 'over' a transparent canvas: soft opaque shapes, glass-like semi-transparent
    panes, thin hair-like strokes and a radial glow. Always has a transparent and a
    visible pixel.
    """
    rng = np.random.default_rng([seed, index])
    pm = np.zeros((size, size, 3), np.float32)
    acc = np.zeros((size, size, 1), np.float32)
    s = size / 64.0  # features scale with the image
    kinds = rng.choice(["shape", "glass", "hair", "glow"], size=rng.integers(2, 5), replace=True)
    for kind in kinds:
        colour = _smooth_colour_field(rng, size)
        mask = np.zeros((size, size), np.float32)
        if kind in ("shape", "glass"):
            cx, cy = rng.uniform(0.2, 0.8, 2) * size
            ax, ay = rng.uniform(0.1, 0.35, 2) * size
            if rng.random() < 0.5:
                cv2.ellipse(
                    mask, (int(cx), int(cy)), (int(ax), int(ay)), rng.uniform(0, 180), 0, 360, 1.0, -1, cv2.LINE_AA
                )
            else:
                pts = (rng.uniform(0.1, 0.9, (rng.integers(3, 7), 2)) * size).astype(np.int32)
                cv2.fillPoly(mask, [cv2.convexHull(pts)], 1.0, cv2.LINE_AA)
            mask = _blur(mask, rng.uniform(0.0, 2.0) * s)
            if kind == "glass":  # low, uneven opacity with a brighter rim
                rim = np.clip(mask - _blur(mask, 3.0 * s), 0, 1) * 2
                mask = np.clip(mask * rng.uniform(0.15, 0.55) + rim * 0.4, 0, 1)
                colour = np.clip(colour * 0.5 + 0.5, 0, 1)
        elif kind == "hair":
            base = rng.uniform(0.2, 0.8, 2) * size
            for _ in range(rng.integers(4, 12)):
                t = np.linspace(0, 1, 8)[:, None]
                direction = rng.normal(0, 1, 2) * size * 0.5
                bend = rng.normal(0, 1, 2) * size * 0.15
                pts = base + t * direction + np.sin(t * math.pi) * bend + rng.normal(0, 0.05 * size, 2)
                cv2.polylines(mask, [pts.astype(np.int32)], False, float(rng.uniform(0.5, 1.0)), 1, cv2.LINE_AA)
            mask = np.clip(mask, 0, 1)
        else:  # glow: a Gaussian falloff of a bright colour
            cx, cy = rng.uniform(0.2, 0.8, 2) * size
            r = rng.uniform(0.08, 0.3) * size
            yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
            mask = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)) * rng.uniform(0.6, 1.0)
            colour = np.clip(colour * 0.3 + 0.7, 0, 1)
        pm, acc = _over(pm, acc, colour, mask.astype(np.float32))
    acc = np.clip(acc, 0, 1)
    if acc.max() <= 0:  # rare: every layer fell outside; put a dot in the middle
        acc[size // 2, size // 2] = 1.0
        pm[size // 2, size // 2] = 0.5
    if acc.min() >= 1:  # rare: fully covered; clear a corner
        acc[0, 0] = 0.0
        pm[0, 0] = 0.0
    straight = np.where(acc > 1e-6, pm / np.maximum(acc, 1e-6), 0.0).clip(0, 1)
    return np.concatenate([straight, acc], axis=2).astype(np.float32)


class _SyntheticSet(Dataset):
    """``n`` generated items; item i depends on (seed, offset + i) only."""

    def __init__(self, n: int, size: int, seed: int = 0, offset: int = 0):
        if n <= 0:
            raise ValueError(f"synthetic sample count must be positive, got {n}")
        self.n, self.size, self.seed, self.offset = n, size, seed, offset

    def __len__(self) -> int:
        return self.n


class SyntheticRGBA(_SyntheticSet):
    """``n`` synthetic samples; item i is ``synthetic_rgba(offset + i, size, seed)``."""

    def __getitem__(self, i: int) -> dict:
        return {**prepare(synthetic_rgba(self.offset + i, self.size, self.seed), i), "caption": ""}


# ---------------------------------------------------------------------------------------
# Batching


class Repeated(torch.utils.data.Dataset):
    """``dataset`` ``repeats`` times. Copy ``i`` of a sample carries ``index`` ``i``: the random
    draws keyed by the index (noise, timestep, caption and offset dropout) differ between copies,
    so a repeated sample is another training example, not the same one twice."""

    def __init__(self, dataset, repeats: int):
        self.dataset, self.repeats = dataset, repeats

    def __len__(self) -> int:
        return len(self.dataset) * self.repeats

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[i % len(self.dataset)], "index": i}


class StepBatches:
    """Index lists for steps ``start .. stop - 1`` of one rank; usable as a ``batch_sampler``.

    Step ``s`` is batch ``s % per_epoch`` of epoch ``s // per_epoch`` of this rank's
    :class:`DistributedSampler` shard (shuffled with ``seed + epoch``, incomplete shards and
    batches dropped so every rank takes the same number of steps). A dataset smaller than one
    global batch is repeated (``repeats`` times per epoch) so that a step can be filled, as
    trainers repeat small folders: the indices then run over the copies, read through
    :class:`Repeated`.
    """

    def __init__(self, dataset_len: int, batch_size: int, rank: int, world_size: int, seed: int,
                 start: int = 0, stop: int = 0):  # fmt: skip
        if dataset_len < 1:
            raise ValueError("no samples to train on")
        self.repeats = -(-world_size * batch_size // dataset_len)  # ceil; 1 when one batch fits
        self.sampler = DistributedSampler(
            range(dataset_len * self.repeats), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
            drop_last=True,
        )  # fmt: skip
        self.batch_size = batch_size
        self.per_epoch = len(self.sampler) // batch_size
        self.start, self.stop = start, stop
        self._epoch, self._order = None, None

    def indices(self, step: int) -> list[int]:
        epoch, j = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._epoch, self._order = epoch, list(self.sampler)
        return self._order[j * self.batch_size : (j + 1) * self.batch_size]

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield self.indices(step)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


# ---------------------------------------------------------------------------------------
# Multi-layer triplets {fg RGBA, bg RGB, blended RGB} (paper §3.3-3.4)
#
# A triplet item holds the foreground's fields of :func:`prepare` prefixed ``fg_``
# (``fg_rgba``, ``fg_alpha``, ``fg_padded``, ``fg_premult``), the background ``bg`` and the
# blended image ``blend`` as ``[3, H, W]`` RGB in [0, 1], and ``index``.

FRAME_NAMES = ("fg", "bg", "blend")
RGB_SUFFIXES = IMAGE_SUFFIXES | {".jpg", ".jpeg"}


def synthetic_background(index: int, size: int, seed: int = 0) -> np.ndarray:
    """A deterministic opaque background, HxWx3 float32 in [0, 1]: a colour gradient, a few
    opaque shapes and mild texture. Its random stream is separate from the foreground's."""
    rng = np.random.default_rng([seed, index, 0xB6])
    img = _smooth_colour_field(rng, size)
    for _ in range(rng.integers(1, 4)):
        colour = _smooth_colour_field(rng, size)
        mask = np.zeros((size, size), np.float32)
        cx, cy = rng.uniform(0.0, 1.0, 2) * size
        ax, ay = rng.uniform(0.15, 0.5, 2) * size
        cv2.ellipse(mask, (int(cx), int(cy)), (int(ax), int(ay)), rng.uniform(0, 180), 0, 360, 1.0, -1, cv2.LINE_AA)
        mask = _blur(mask, rng.uniform(0.0, 3.0) * size / 64.0)[..., None]
        img = img * (1 - mask) + colour * mask
    img = img + rng.normal(0, 0.02, img.shape).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


def blend_over(fg_rgba: np.ndarray, bg_rgb: np.ndarray) -> np.ndarray:
    """Straight-alpha ``fg over bg``: ``fg_rgb * a + bg * (1 - a)``, HxWx3."""
    a = fg_rgba[..., 3:]
    return (fg_rgba[..., :3] * a + bg_rgb * (1 - a)).astype(np.float32)


def prepare_triplet(fg_rgba: np.ndarray, bg_rgb: np.ndarray, blend_rgb: np.ndarray, index: int) -> dict:
    """One triplet item (see above) from HxW float32 arrays in [0, 1]."""
    fg = prepare(fg_rgba, index)
    item = {f"fg_{k}": v for k, v in fg.items() if k != "index"}
    item.update(bg=_chw(bg_rgb), blend=_chw(blend_rgb), index=index)
    return item


class SyntheticTriplets(_SyntheticSet):
    """``n`` synthetic triplets: fg = ``synthetic_rgba``, bg = ``synthetic_background``,
    blend = fg over bg. Item i depends on (seed, offset + i) only, as :class:`SyntheticRGBA`."""

    def __getitem__(self, i: int) -> dict:
        fg = synthetic_rgba(self.offset + i, self.size, self.seed)
        bg = synthetic_background(self.offset + i, self.size, self.seed)
        return {**prepare_triplet(fg, bg, blend_over(fg, bg), i), **{f"caption_{f}": "" for f in FRAME_NAMES}}


def _read_rgb(path: Path, size: int) -> np.ndarray:
    img = _open_checked(path, want_alpha=False)
    if isinstance(img, str):
        raise NoUsableImagesError(f"{path} became unusable during training: {img}")
    rgb = img.astype(np.float32) / 255.0
    rgba = np.concatenate([rgb, np.ones_like(rgb[..., :1])], axis=2)
    return resize_crop(rgba, size)[..., :3]


class TripletFolder(Dataset):
    """Triplets from ``root/fg`` (RGBA PNG/WebP), ``root/bg`` and ``root/blend`` (RGB; PNG,
    WebP or JPEG), matched by file name without the suffix.

    A name is used when all three files exist and the fg has a usable alpha (as
    :class:`RGBAFolder`); the others are counted in ``self.rejected``. No usable triplet:
    :class:`NoUsableImagesError` with what was found.
    """

    def __init__(self, root: str | Path, size: int):
        self.root = Path(root)
        self.size = size
        dirs = {name: self.root / name for name in FRAME_NAMES}
        absent = [str(d) for d in dirs.values() if not d.is_dir()]
        if absent:
            raise NoUsableImagesError(
                f"triplet folder {self.root} needs the sub-folders fg/, bg/ and blend/; missing: {', '.join(absent)}"
            )

        def index(folder: Path, suffixes) -> dict[str, Path]:
            return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in suffixes}

        fgs, bgs, blends = (
            index(dirs["fg"], IMAGE_SUFFIXES),
            index(dirs["bg"], RGB_SUFFIXES),
            index(dirs["blend"], RGB_SUFFIXES),
        )
        self.names: list[str] = []
        self.rejected: dict[str, int] = {}

        def reject(why: str) -> None:
            self.rejected[why] = self.rejected.get(why, 0) + 1

        for stem, path in fgs.items():
            if stem not in bgs or stem not in blends:
                reject("no matching bg/blend file")
                continue
            reason = _rejection(path)
            if reason is not None:
                reject(f"fg {reason}")
                continue
            for frame, other in (("bg", bgs[stem]), ("blend", blends[stem])):
                img = _open_checked(other, want_alpha=False)
                if isinstance(img, str):
                    reason = f"{frame} {img}"
                    break
            if reason is None:
                self.names.append(stem)
            else:
                reject(reason)
        self.paths = {s: (fgs[s], bgs[s], blends[s]) for s in self.names}
        if not self.names:
            found = _found_and_rejected(f"{len(fgs)} fg, {len(bgs)} bg, {len(blends)} blend images", self.rejected)
            raise NoUsableImagesError(
                f"no usable triplets in {self.root} ({found}). Each triplet is fg/NAME.png (RGBA with a transparent "
                "and a visible pixel), bg/NAME.* and blend/NAME.* (RGB)."
            )

        self.captions = self._captions()

    def __len__(self) -> int:
        return len(self.names)

    def _captions(self) -> list[dict[str, str | None]]:
        """Per name and frame: ``<frame>/NAME.txt`` (or that folder's metadata.jsonl), else the
        triplet's shared caption ``NAME.txt`` in the root (or the root's metadata.jsonl,
        ``file_name`` NAME with or without a suffix), else the blend's caption."""
        metadata = read_metadata_captions(self.root)
        shared_meta = {p.parent / p.stem: t for p, t in metadata.items() if p.parent == self.root.resolve()}
        out = []
        for stem in self.names:
            shared_txt = self.root / f"{stem}.txt"
            shared = (read_caption_file(shared_txt).strip() if shared_txt.is_file() else
                      shared_meta.get(self.root.resolve() / stem)) or None  # fmt: skip
            own = dict(zip(FRAME_NAMES, (caption_for(p, metadata) for p in self.paths[stem]), strict=True))
            out.append({f: own[f] or shared or own["blend"] for f in FRAME_NAMES})
        return out

    @property
    def uncaptioned(self) -> int:
        return sum(all(c is None for c in caps.values()) for caps in self.captions)

    def __getitem__(self, i: int) -> dict:
        fg_path, bg_path, blend_path = self.paths[self.names[i]]
        fg = _load_rgba(fg_path, self.size)
        item = prepare_triplet(fg, _read_rgb(bg_path, self.size), _read_rgb(blend_path, self.size), i)
        return {**item, **{f"caption_{f}": c or "" for f, c in self.captions[i].items()}}


# ---------------------------------------------------------------------------------------
# A stage's training set


class ForegroundFolder(RGBAFolder):
    """An RGBA folder as foreground-only triplet items (``fg_*`` keys, ``caption_fg``): the
    layers stage with ``--frames fg`` (the SD1.5 transparent-attention model) on plain RGBA data."""

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        out = {f"fg_{k}": v for k, v in item.items() if k not in ("index", "caption")}
        return {**out, "index": item["index"], "caption_fg": item["caption"]}


def stage_dataset(cfg, triplets: bool = False, fg_only: bool = False) -> Dataset:
    """A stage's training set: the folder ``cfg.data`` or ``cfg.synthetic`` generated samples
    (exactly one of them), of RGBA samples or, with ``triplets``, of fg/bg/blend triplets
    (``fg_only``: a folder without ``fg/`` is read as foregrounds, :class:`ForegroundFolder`)."""
    folder_cls, synthetic_cls = (TripletFolder, SyntheticTriplets) if triplets else (RGBAFolder, SyntheticRGBA)
    if triplets and fg_only and cfg.data is not None and not (Path(cfg.data) / "fg").is_dir():
        folder_cls = ForegroundFolder
    if (cfg.data is None) == (cfg.synthetic <= 0):
        data_arg = "--data DIR (fg/, bg/, blend/)" if triplets else "--data DIR"
        raise ValueError(f"give exactly one of {data_arg} or --synthetic N")
    if cfg.data is not None:
        return folder_cls(cfg.data, cfg.size)
    return synthetic_cls(cfg.synthetic, cfg.size, seed=cfg.seed)


def describe(dataset) -> str:
    """One line on what a stage trains on: the usable count and the skipped files by reason."""
    n = len(dataset)
    if isinstance(dataset, (RGBAFolder, TripletFolder)):
        what = "images" if isinstance(dataset, RGBAFolder) else "triplets"
        folder = getattr(dataset, "folder", None) or dataset.root
        line = f"{n} {what} from {folder}"
        skipped = sum(dataset.rejected.values())
        if skipped:
            line += f"; skipped {skipped}: " + ", ".join(f"{c} {why}" for why, c in sorted(dataset.rejected.items()))
        return line + f"; {dataset.uncaptioned} without a caption (trained on the empty prompt)"
    return f"{n} synthetic samples"
