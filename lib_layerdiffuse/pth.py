"""A restricted reader of torch's ``.pth`` files (``torch.save``'s zip format): no pickle code runs.

``torch.save`` writes a zip archive ``<name>/data.pkl`` (the pickled object),
``<name>/data/<key>`` (the raw bytes of each tensor storage) and ``<name>/byteorder``.
``torch.load`` unpickles ``data.pkl``, and a pickle can call anything it names
(``weights_only=True`` had code-execution holes before torch 2.6; Forge2 ships 2.3).

Here the pickle is never unpickled: :mod:`pickletools` splits it into opcodes (parsing only) and
a small interpreter below runs the data opcodes itself. The only names a file may refer to are
``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` (replaced by a record of the
tensor's storage, offset, size and stride, checked against the storage's bounds) and the storage
types ``torch.BFloat16Storage``, ``torch.HalfStorage`` and ``torch.FloatStorage``; anything else
(another global, an object-building opcode, a non-tensor value) is refused with a
:class:`~lib_layerdiffuse.errors.WeightFileError` that names it, before any tensor data is read.
The result must be a flat dict of tensors (a state dict). Works with any torch version, as it
uses nothing of torch's serialization.
"""

from __future__ import annotations

import math
import os
import pickletools
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import WeightFileError

MAX_PICKLE_BYTES = 64 * 1024 * 1024  # an 800-tensor state dict pickles to ~100 KB

_STORAGE_DTYPES = {
    "BFloat16Storage": torch.bfloat16,
    "HalfStorage": torch.float16,
    "FloatStorage": torch.float32,
}
DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}  # safetensors' names


class _Global:
    """A name the pickle may refer to (never a callable of its own)."""

    def __init__(self, name: str, dtype: torch.dtype | None = None):
        self.name, self.dtype = name, dtype

    def __repr__(self):
        return self.name


_ORDERED_DICT = _Global("collections.OrderedDict")
_REBUILD = _Global("torch._utils._rebuild_tensor_v2")
_ALLOWED = {
    ("collections", "OrderedDict"): _ORDERED_DICT,
    ("torch._utils", "_rebuild_tensor_v2"): _REBUILD,
    **{("torch", n): _Global(f"torch.{n}", d) for n, d in _STORAGE_DTYPES.items()},
}


@dataclass(frozen=True)
class _Storage:
    key: str  # the zip entry data/<key>
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class TensorRecord:
    """Where one tensor of a ``.pth`` lies: a view of a storage (nothing read yet)."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.storage.dtype]


class _Refused(Exception):
    pass


_OPCODES_DATA = {
    "NONE": None, "NEWTRUE": True, "NEWFALSE": False,
}  # fmt: skip
_OPCODES_PUSH_ARG = {
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
    "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
    "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
}  # fmt: skip


def _what(x) -> str:
    """A short name for a value from the pickle: never its full repr, which a crafted pickle can
    make exponentially long (tuples of tuples sharing one memo entry)."""
    if isinstance(x, _Global):
        return x.name
    if isinstance(x, (str, int, float, bool)) or x is None:
        text = repr(x)
        return text if len(text) <= 60 else text[:57] + "..."
    return f"a {type(x).__name__}"


def _rebuild(args) -> TensorRecord:
    if not isinstance(args, tuple) or len(args) not in (6, 7):
        raise _Refused(f"the tensor rebuild got {type(args).__name__} arguments, not torch's 6 or 7")
    storage, offset, size, stride, requires_grad, hooks = args[:6]
    ok = (
        isinstance(storage, _Storage)
        and type(offset) is int
        and isinstance(size, tuple)
        and isinstance(stride, tuple)
        and len(size) == len(stride)
        and all(type(s) is int and s >= 0 for s in size + stride)
        and isinstance(requires_grad, bool)
        and isinstance(hooks, dict)
        and not hooks
        and (len(args) == 6 or args[6] is None or isinstance(args[6], dict))
    )
    if not ok:
        raise _Refused("a tensor rebuild has arguments that are not a storage, offset, size and stride")
    if (
        math.prod(size)
        and not 0 <= offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) < storage.numel
    ):
        raise _Refused(f"a tensor of shape {list(size)} lies outside its storage of {storage.numel} elements")
    if offset < 0:
        raise _Refused("a tensor has a negative storage offset")
    return TensorRecord(storage, offset, size, stride)


def _interpret(data: bytes) -> object:
    """Run the data opcodes of a pickle; refuse everything else (raises :class:`_Refused`)."""
    stack: list = []
    marks: list[list] = []
    memo: dict = {}
    storages: dict[str, _Storage] = {}

    def pop_mark() -> list:
        nonlocal stack
        items = stack
        stack = marks.pop()
        return items

    def persistent(pid) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Refused(f"the pickle refers to an outside object ({_what(pid)}), not a tensor storage")
        _, kind, key, _location, numel = pid
        if not (isinstance(kind, _Global) and kind.dtype is not None):
            raise _Refused(
                f"a storage has type {_what(kind)}; allowed: {', '.join('torch.' + n for n in _STORAGE_DTYPES)}"
            )
        if not (isinstance(key, str) and type(numel) is int and numel >= 0):
            raise _Refused("a storage reference is malformed")
        s = _Storage(key, kind.dtype, numel)
        if storages.setdefault(key, s) != s:
            raise _Refused(f"storage {key} is declared twice with different types or sizes")
        return s

    for op, arg, _pos in pickletools.genops(data):
        name = op.name
        if name in _OPCODES_DATA:
            stack.append(_OPCODES_DATA[name])
        elif name in _OPCODES_PUSH_ARG:
            stack.append(arg)
        elif name in ("PROTO", "FRAME"):
            pass
        elif name == "STOP":
            if len(stack) != 1 or marks:
                raise _Refused("the pickle ends with a malformed stack")
            return stack[0]
        elif name == "MARK":
            marks.append(stack)
            stack = []
        elif name == "POP":
            stack.pop()
        elif name == "POP_MARK":
            pop_mark()
        elif name == "DUP":
            stack.append(stack[-1])
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if arg not in memo:
                raise _Refused(f"the pickle reads memo entry {arg}, which was never written")
            stack.append(memo[arg])
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name == "TUPLE":
            items = pop_mark()  # before naming `stack`: pop_mark rebinds it
            stack.append(tuple(items))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            items = tuple(stack[-n:])
            del stack[-n:]
            stack.append(items)
        elif name == "EMPTY_LIST":
            stack.append([])
        elif name == "LIST":
            items = pop_mark()
            stack.append(items)
        elif name in ("APPEND", "APPENDS"):
            items = [stack.pop()] if name == "APPEND" else pop_mark()
            if type(stack[-1]) is not list:
                raise _Refused(f"the pickle appends to a {type(stack[-1]).__name__}")
            stack[-1].extend(items)
        elif name == "EMPTY_DICT":
            stack.append({})
        elif name in ("DICT", "SETITEM", "SETITEMS"):
            if name == "SETITEM":
                items = stack[-2:]
                del stack[-2:]
            else:
                items = pop_mark()
            target = {} if name == "DICT" else stack[-1]
            if type(target) not in (dict, OrderedDict) or len(items) % 2:
                raise _Refused(f"the pickle sets items of a {type(target).__name__}")
            for k, v in zip(items[::2], items[1::2], strict=True):
                if not isinstance(k, (str, int)):
                    raise _Refused(f"the pickle uses a {type(k).__name__} as a dict key")
                target[k] = v
            if name == "DICT":
                stack.append(target)
        elif name in ("GLOBAL", "STACK_GLOBAL"):
            if name == "GLOBAL":
                module, _, attr = arg.partition(" ")
            else:
                attr, module = stack.pop(), stack.pop()
                if not (isinstance(module, str) and isinstance(attr, str)):
                    raise _Refused("the pickle builds an import name from non-strings")
            found = _ALLOWED.get((module, attr))
            if found is None:
                raise _Refused(f"the pickle imports {module}.{attr}")
            stack.append(found)
        elif name == "REDUCE":
            args, func = stack.pop(), stack.pop()
            if func is _ORDERED_DICT and args == ():
                stack.append(OrderedDict())
            elif func is _REBUILD:
                stack.append(_rebuild(args))
            else:
                raise _Refused(f"the pickle calls {_what(func)}" + (" with arguments" if func is _ORDERED_DICT else ""))
        elif name == "BUILD":
            state = stack.pop()
            # torch's state dicts carry a _metadata attribute (versions per module): ignored
            if type(stack[-1]) not in (dict, OrderedDict) or not isinstance(state, dict):
                raise _Refused(f"the pickle sets the state of a {type(stack[-1]).__name__}")
        elif name == "BINPERSID":
            stack.append(persistent(stack.pop()))
        else:
            raise _Refused(f"the pickle uses the {name} opcode (it builds objects or runs code)")
    raise _Refused("the pickle has no STOP")


def _archive(zf: zipfile.ZipFile, name: str) -> str:
    """The folder prefix of torch's archive (``<name>/``) from its one ``data.pkl``."""
    pkls = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
        raise WeightFileError(f"{name} is a zip file but not a torch checkpoint (no single <folder>/data.pkl inside)")
    return pkls[0][: -len("data.pkl")]


def is_torch_zip(path: str | os.PathLike) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _open(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] == b"\x80":  # a bare pickle: torch's format before 1.6
            raise WeightFileError(
                f"{path.name}: refused: a legacy (pre-zip) torch pickle; only torch.save's zip format is read "
                "(no pickle code ever runs). Use the original download or a safetensors conversion."
            ) from None
        raise WeightFileError(f"{path.name} is not a torch checkpoint (not a zip archive: {e})") from None


def read_layout(path: str | os.PathLike) -> dict[str, TensorRecord]:
    """key -> :class:`TensorRecord` of a ``.pth`` state dict, checked; no tensor data is read.

    Raises :class:`~lib_layerdiffuse.errors.WeightFileError` for anything but a flat dict of
    bfloat16 / float16 / float32 tensors, naming what was found ("X.pth: refused: the pickle
    imports os.system ..."), and for missing or mis-sized storage entries.
    """
    path = Path(path)
    with _open(path) as zf:
        return _read_layout(zf, path)


def _read_layout(zf: zipfile.ZipFile, path: Path) -> dict[str, TensorRecord]:
    prefix = _archive(zf, path.name)
    info = zf.getinfo(prefix + "data.pkl")
    if info.file_size > MAX_PICKLE_BYTES:
        raise WeightFileError(f"{path.name}: refused: its pickle is {info.file_size} bytes, far more than a state dict")
    names = set(zf.namelist())
    if prefix + "byteorder" in names and zf.read(prefix + "byteorder").strip() != b"little":
        raise WeightFileError(f"{path.name}: refused: tensors stored big-endian")
    try:
        obj = _interpret(zf.read(info))
    except _Refused as e:
        raise WeightFileError(
            f"{path.name}: refused: {e}. Only a flat dict of float32 / float16 / bfloat16 tensors is read, "
            "and nothing in the file was run."
        ) from None
    except (ValueError, IndexError, KeyError, TypeError, RecursionError) as e:  # pickletools on a malformed pickle
        raise WeightFileError(f"{path.name}: refused: its pickle is malformed ({type(e).__name__}: {e})") from None
    if type(obj) not in (dict, OrderedDict):
        raise WeightFileError(f"{path.name}: refused: it holds a {type(obj).__name__}, not a dict of tensors")
    bad = [
        f"{_what(k)} ({type(v).__name__})"
        for k, v in obj.items()
        if not (isinstance(k, str) and isinstance(v, TensorRecord))
    ]
    if bad:
        raise WeightFileError(
            f"{path.name}: refused: not a flat dict of tensors ({len(bad)} entries such as {', '.join(bad[:3])})"
        )
    for s in {r.storage for r in obj.values()}:
        entry = f"{prefix}data/{s.key}"
        if entry not in names:
            raise WeightFileError(f"{path.name} is damaged: storage {entry} is missing (an interrupted download?)")
        e = zf.getinfo(entry)
        want = s.numel * torch.empty((), dtype=s.dtype).element_size()
        # torch writes storages uncompressed and exactly their size; anything else is not its file
        if e.compress_type != zipfile.ZIP_STORED or e.file_size != want:
            raise WeightFileError(
                f"{path.name} is damaged: storage {entry} has {e.file_size} bytes "
                f"({'compressed' if e.compress_type != zipfile.ZIP_STORED else 'stored'}), expected {want} stored"
            )
    return dict(obj)


def load(path: str | os.PathLike, select=None) -> dict[str, torch.Tensor]:
    """The tensors of a ``.pth`` state dict (CPU, their stored dtype), without running pickle code.

    ``select(key) -> bool`` keeps only some keys; the storages of the others are not read.
    Raises :class:`~lib_layerdiffuse.errors.WeightFileError` as :func:`read_layout` does.
    """
    path = Path(path)
    with _open(path) as zf:
        layout = _read_layout(zf, path)
        prefix = _archive(zf, path.name)
        bases: dict[str, torch.Tensor] = {}
        out = {}
        for key, rec in layout.items():
            if select is not None and not select(key):
                continue
            s = rec.storage
            if s.key not in bases:
                try:
                    raw = bytearray(zf.read(f"{prefix}data/{s.key}"))
                except (zipfile.BadZipFile, OSError, EOFError) as e:
                    raise WeightFileError(f"{path.name} is damaged: storage {s.key} unreadable ({e})") from None
                bases[s.key] = torch.frombuffer(raw, dtype=s.dtype) if raw else torch.empty(0, dtype=s.dtype)
            base = bases[s.key]
            t = torch.as_strided(base, rec.shape, rec.stride, rec.offset)
            # a view of part of a storage is copied, so no tensor keeps a larger storage alive
            out[key] = t if t.is_contiguous() and t.numel() == base.numel() else t.clone()
    return out
