"""CLIP's byte-level BPE tokenizer, offline, in plain Python (no regex/ftfy/transformers).

The merges are CLIP's (``clip_bpe_merges.txt.gz`` beside this file, MIT-licensed by
OpenAI: see ``CLIP_BPE_LICENSE.txt``); the vocabulary is built from them the way CLIP
builds it (256 byte symbols, the same with ``</w>``, one entry per merge, then
``<|startoftext|>`` 49406 and ``<|endoftext|>`` 49407).

Text is cleaned as the WebUIs' tokenizer sees it (CLIP with ftfy): unicode NFC, curly
quotes straightened, ligatures and full-width forms folded, HTML entities unescaped,
whitespace runs collapsed, lower case. It is then split like CLIP's pattern
(``'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+``), implemented with
:mod:`unicodedata` categories instead of the third-party ``regex`` module. Prompt-weight
syntax such as ``(word:1.2)`` is plain text here, as in a caption file.
"""

from __future__ import annotations

import functools
import gzip
import html
import unicodedata
from pathlib import Path

import torch

MERGES_FILE = Path(__file__).with_name("clip_bpe_merges.txt.gz")
BOS, EOS = 49406, 49407
CONTEXT = 77
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
                         "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"'})  # fmt: skip
_LIGATURES = (
    "\ufb00\ufb01\ufb02\ufb03\ufb04\ufb05\ufb06\u0132\u0133\u01c4\u01c5\u01c6\u01c7\u01c8\u01c9\u01ca\u01cb\u01cc"
)


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def clean(text: str) -> str:
    """What CLIP's tokenizer does before splitting (with ftfy's default fixes that matter for prompts)."""
    text = unicodedata.normalize("NFC", text)
    text = text.translate(_QUOTES)
    text = "".join(unicodedata.normalize("NFKC", c) if c in _LIGATURES or 0xFF01 <= ord(c) <= 0xFF5E else c
                   for c in text)  # fmt: skip
    text = "".join(c for c in text if c in "\t\n\r" or unicodedata.category(c) not in ("Cc", "Cf", "Co", "Cs"))
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


def _kind(c: str) -> str:
    cat = unicodedata.category(c)
    if cat[0] == "L":
        return "L"
    if cat[0] == "N":
        return "N"
    return "S" if c.isspace() else "P"


def split_words(text: str) -> list[str]:
    """CLIP's pre-tokenisation of cleaned text: contractions, letter runs, single digits,
    runs of other non-space characters (special tokens are not recognised in prompts)."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "'":
            hit = next((s for s in _CONTRACTIONS if text.startswith(s, i)), None)
            if hit:
                out.append(hit)
                i += len(hit)
                continue
        k = _kind(c)
        if k == "S":
            i += 1
            continue
        if k == "N":
            out.append(c)
            i += 1
            continue
        j = i + 1
        if k == "L":
            while j < n and _kind(text[j]) == "L":
                j += 1
        else:  # punctuation and symbols; a contraction ends it only where CLIP's alternation would
            while j < n and _kind(text[j]) == "P":
                j += 1
        out.append(text[i:j])
        i = j
    return out


class CLIPTokenizer:
    """``encode(text) -> ids`` (no BOS/EOS) and ``__call__(texts) -> [B, 77]`` int64 with
    BOS, at most 75 prompt tokens (longer prompts are cut, as CLIP's 77-token window),
    EOS, then ``pad`` (CLIP-L in SD: EOS; OpenCLIP bigG in SDXL: 0)."""

    def __init__(self, merges_file: str | Path = MERGES_FILE):
        with gzip.open(merges_file, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        self.byte_encoder = bytes_to_unicode()
        base = list(self.byte_encoder.values())
        vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        if len(self.encoder) != 49408 or self.encoder["<|endoftext|>"] != EOS:
            raise ValueError(f"{merges_file} is not CLIP's BPE merge list ({len(self.encoder)} tokens)")
        self.ranks = {m: i for i, m in enumerate(merges)}
        self._bpe = functools.lru_cache(maxsize=65536)(self._bpe_uncached)

    def _bpe_uncached(self, token: str) -> tuple[str, ...]:
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in split_words(clean(text)):
            token = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(token))
        return ids

    def __call__(self, texts: list[str], pad: int = EOS) -> torch.Tensor:
        rows = []
        for text in texts:
            ids = [BOS, *self.encode(text)[: CONTEXT - 2], EOS]
            rows.append(ids + [pad] * (CONTEXT - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer()
