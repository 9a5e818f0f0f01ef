"""``--cache-embeddings``: the frozen text encoders' output for every caption of a dataset,
computed once and kept in a file beside the data, so later runs (and this one) need no text
encoder in memory (SDXL's two towers hold about 1.6 GB in fp16).

The file is ``<data>/.layerdiffuse_cache/embeddings_<id>.safetensors`` (``<out>/`` where the
data folder is not writable or the data are synthetic). ``<id>`` is the text encoders'
identity: the checkpoint file (resolved path, size, modification time) and ``--frozen-dtype``; one entry per caption text (``ctx.<sha256>``, and SDXL ``pooled.<sha256>``),
stored in the encoders' dtype, so a cached embedding equals the one the encoders give (the
UNet gets the same fp32 values). A run with new captions encodes only those and rewrites the
file; rank 0 writes it while the other ranks wait, then every rank reads it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import safe_open

from . import checkpoint as ckpt
from . import dist
from .base_checkpoint import TextConditioner
from .errors import TrainingError

CACHE_DIR = ".layerdiffuse_cache"
ENCODE_BATCH = 32  # captions per text-encoder call while filling the cache


def encoder_id(checkpoint: str | os.PathLike, frozen_dtype: str) -> str:
    """The text encoders' identity: a changed, moved or replaced checkpoint, or another
    ``--frozen-dtype``, gives another id."""
    path = Path(checkpoint).resolve()
    st = path.stat()
    text = f"{path}|{st.st_size}|{st.st_mtime_ns}|{frozen_dtype}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def caption_key(caption: str) -> str:
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()[:32]


def dataset_captions(dataset) -> set[str]:
    """Every caption text a run on ``dataset`` can ask for: each image's (or triplet frame's),
    an absent one as the empty prompt, and the empty prompt itself (caption dropout)."""
    texts = {""}
    for caps in getattr(dataset, "captions", []):
        texts.update(caps.values() if isinstance(caps, dict) else [caps])
    return {t or "" for t in texts}


def cache_path(data: str | None, out: str | os.PathLike, ident: str) -> Path:
    folder = Path(data) / CACHE_DIR if data is not None and os.access(data, os.W_OK) else Path(out)
    return folder / f"embeddings_{ident}.safetensors"


def holds(path: Path, dataset) -> bool:
    """Whether ``path`` is a readable cache with every caption of ``dataset``."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = set(f.keys())
    except Exception:  # noqa: BLE001  (absent or damaged: not usable)
        return False
    return all(f"ctx.{caption_key(c)}" in keys for c in dataset_captions(dataset))


class CachedText(TextConditioner):
    """:class:`TextConditioner` whose embeddings come from a cache file, with no encoder loaded.
    A caption that is not in the file is a :class:`TrainingError` (every caption of the
    dataset was put there before training)."""

    def __init__(self, family: str, path: Path, device):
        super().__init__(family, None, None)
        self.path, self._device = path, torch.device(device)
        self._file = safe_open(str(path), framework="pt", device="cpu")
        self.keys = set(self._file.keys())

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device) -> CachedText:
        self._device = torch.device(device)
        self._cache.clear()
        return self

    def _encode(self, prompts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        out = []
        for p in prompts:
            k = caption_key(p)
            if f"ctx.{k}" not in self.keys:
                raise TrainingError(f"the caption {p[:60]!r} is not in the embedding cache {self.path}; "
                                    "delete the file to rebuild it")  # fmt: skip
            ctx = self._file.get_tensor(f"ctx.{k}").to(self._device).float()
            pooled = self._file.get_tensor(f"pooled.{k}").to(self._device).float() if self.family == "sdxl" else None
            out.append((ctx, pooled))
        return out


def build(text: TextConditioner | None, family: str, dataset, path: Path,
          info: dist.DistInfo) -> tuple[CachedText, dict]:  # fmt: skip
    """Put every caption of ``dataset`` missing from ``path`` into it (rank 0, with ``text``'s
    encoders; None where the file already :func:`holds` them), then open it on every rank.
    Every rank calls this once (one barrier). Returns the cached conditioner and counts."""
    captions = sorted(dataset_captions(dataset))
    counts = {"captions": len(captions), "cached": 0, "encoded": 0}
    if info.is_main:
        old: dict[str, torch.Tensor] = {}
        if path.is_file():
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    old = {k: f.get_tensor(k) for k in f.keys()}
            except Exception as e:  # noqa: BLE001  (a damaged cache is rebuilt, never trusted)
                print(f"[embeddings] {path} is unreadable ({type(e).__name__}); rebuilding it", flush=True)
        todo = [c for c in captions if f"ctx.{caption_key(c)}" not in old]
        counts["cached"], counts["encoded"] = len(captions) - len(todo), len(todo)
        if todo and text is None:
            raise TrainingError(f"the embedding cache {path} changed during start-up; run again")
        if todo:
            dtype = next(text.clip.parameters()).dtype  # stored as the encoders computed them: no rounding
            new = dict(old)
            for i in range(0, len(todo), ENCODE_BATCH):
                chunk = todo[i : i + ENCODE_BATCH]
                for c, (ctx, pooled) in zip(chunk, text._encode(chunk), strict=True):
                    new[f"ctx.{caption_key(c)}"] = ctx.to(dtype)
                    if pooled is not None:
                        new[f"pooled.{caption_key(c)}"] = pooled.to(dtype)
            ckpt.atomic_save(new, path, {"format": "layerdiffuse-embeddings", "family": family})
    dist.barrier()
    if not path.is_file():
        raise TrainingError(f"the embedding cache {path} was not written (rank 0 failed: see its error)")
    return CachedText(family, path, info.device), counts


def describe(counts: dict, path: Path) -> str:
    return (f"embeddings: {counts['captions']} captions, {counts['cached']} from the cache {path}, "
            f"{counts['encoded']} encoded; no text encoder kept in memory")  # fmt: skip
