"""The 14 published SD weight files and the 2 Flux ones, and loading them safely.

SD files are read with safetensors only. The Flux ``TransparentVAE.pth`` is a torch pickle:
it is read by :mod:`lib_layerdiffuse.pth`, which interprets the pickle's data opcodes itself,
so no pickle code ever runs (a safetensors conversion of it is accepted too). Before any
tensor is read, the header (or the pickle's tensor records) is checked against what the
target module expects, so a wrong, truncated or mislabelled file gets an error that names
the file, what was expected and what was found.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import WeightFileError
from .vae import TransparentVAEDecoder, TransparentVAEEncoder

REPO = "LayerDiffusion/layerdiffusion-v1"
# Pinned release revision: the digests below were taken at this commit.
REVISION = "e337e9d7a0f2a6fee6c3580374327380f88d065b"
# The Flux version of LayerDiffuse. No full commit id of it is recorded here, so the branch is
# used: the LoRA is checked against its published SHA-256, the .pth (no digest published) by
# its keys and shapes.
FLUX_REPO = "RedAIGC/Flux-version-LayerDiffuse"
FLUX_REVISION = "main"
QWEN_REPO = "Comfy-Org/Qwen-Image-Layered_ComfyUI"
QWEN_REVISION = "main"
QWEN_VAE_FILE = "qwen_image_layered_vae"


@dataclass(frozen=True)
class WeightFile:
    name: str  # file stem; the file is <name>.<ext>
    family: str  # "sd15", "sdxl" or "flux"
    role: str  # decoder | encoder | attention_sharing | unet_patch | flux_vae | flux_lora
    description: str
    sha256: str | None = None  # None where no public pin exists
    ext: str = "safetensors"
    repo: str = REPO
    revision: str = REVISION
    subdir: str = ""  # the folder of the file in its repository

    @property
    def filename(self) -> str:
        return f"{self.name}.{self.ext}"

    @property
    def url(self) -> str:
        folder = f"{self.subdir}/" if self.subdir else ""
        return f"https://huggingface.co/{self.repo}/resolve/{self.revision}/{folder}{self.filename}"


_FILES = (
    WeightFile("layer_sd15_transparent_attn", "sd15", "attention_sharing", "SD1.5 transparent attention sharing, 1 frame",
               "cc9ee87452bf1ccdd419035bf9618f6bdcaac1a2d3e23694d62e5a9c721da295"),
    WeightFile("layer_sd15_joint", "sd15", "attention_sharing", "SD1.5 fg/bg/blend joint generation, 3 frames",
               "2cc81c33c1a786bdc376c6d1bfb43dbdffda2f610f7c6b4ebd776505a29712bd"),
    WeightFile("layer_sd15_fg2bg", "sd15", "attention_sharing", "SD1.5 foreground to background, 2 frames + control",
               "5bade856ec3e55d6ceb0e35bbc97cea7fa4953f7776c8032f2fe52ba740ed580"),
    WeightFile("layer_sd15_bg2fg", "sd15", "attention_sharing", "SD1.5 background to foreground, 2 frames + control",
               "8367f976da1cc4275e513c7fb40f977ca312e79e720d7db7ae94978a9359fb62"),
    WeightFile("layer_xl_transparent_attn", "sdxl", "unet_patch", "SDXL transparent, rank-256 attention LoRA",
               "b7919c5b4837fb64f24c97a7abdf1a9c6e8d60de080a5dae089dde098266df95"),
    WeightFile("layer_xl_transparent_conv", "sdxl", "unet_patch", "SDXL transparent, offsets of all non-q/k/v layers",
               "5ee958d80dcd515fa7ac915274c536fadd3db5d919adeb5ff45107b6169aacc7"),
    WeightFile("layer_xl_fg2ble", "sdxl", "unet_patch", "SDXL foreground to blended (8-channel conv_in)",
               "50a29851ad56308f14d6c9ed375be17df6921efeca240b31f567f6b8c76d1e70"),
    WeightFile("layer_xl_fgble2bg", "sdxl", "unet_patch", "SDXL foreground + blended to background (12-channel conv_in)",
               "179a61fdcdb149af1897b2840f24ba09466ab6265b2c792b0e99df557f0439be"),
    WeightFile("layer_xl_bg2ble", "sdxl", "unet_patch", "SDXL background to blended (8-channel conv_in)",
               "2901d1353cc4ca763c8bedc48453b36e88680605f417c7f7ec730a7c36845d7c"),
    WeightFile("layer_xl_bgble2fg", "sdxl", "unet_patch", "SDXL background + blended to foreground (12-channel conv_in)",
               "1688f0c17447f74662686fadd431f24d26a1ba8ffea322c6f56c8b5ed581b78d"),
    WeightFile("vae_transparent_decoder", "sdxl", "decoder", "SDXL latent transparency decoder",
               "59dc8feefe40d26b6cb7186aed7af70c60d94ac4f9db8ebe7f121a01ba27a2fc"),
    WeightFile("vae_transparent_encoder", "sdxl", "encoder", "SDXL latent transparency encoder"),
    WeightFile("layer_sd15_vae_transparent_decoder", "sd15", "decoder", "SD1.5 latent transparency decoder",
               "6df4712dfbb3783231b22f869a5da5cbfea782ebb05f782bd9e8744bfb0cdf03"),
    WeightFile("layer_sd15_vae_transparent_encoder", "sd15", "encoder", "SD1.5 latent transparency encoder"),
    # the FLUX.1 pair: a torch pickle holding decoder., encoder. and a copy of the FLUX VAE (sd_vae.),
    # and the LoRA the host's own loader applies
    WeightFile("TransparentVAE", "flux", "flux_vae", "FLUX.1 latent transparency decoder and encoder (16-channel)",
               ext="pth", repo=FLUX_REPO, revision=FLUX_REVISION),
    WeightFile("layerlora", "flux", "flux_lora", "FLUX.1-dev LoRA for latent transparency",
               "ffa34d60e92c7bcd6414dc7a8735e27d5138bcda5248b3131329b3f405aadb53", repo=FLUX_REPO, revision=FLUX_REVISION),
    # Qwen-Image-Layered's 4-channel (RGBA) Wan-2.1 VAE, ComfyUI's repack (Apache-2.0, about 254 MB)
    WeightFile(QWEN_VAE_FILE, "qwen_layered", "qwen_vae", "Qwen-Image-Layered RGBA VAE (4 image channels)",
               repo=QWEN_REPO, revision=QWEN_REVISION, subdir="split_files/vae"),
)  # fmt: skip
FILES: dict[str, WeightFile] = {f.name: f for f in _FILES}

ROLE_NAMES = {
    "decoder": "a transparent VAE decoder",
    "encoder": "a transparent VAE encoder",
    "attention_sharing": "an SD1.5 attention-sharing UNet file",
    "unet_patch": "an SDXL UNet patch file",
    "flux_vae": "the FLUX.1 transparent VAE (TransparentVAE.pth)",
    "flux_lora": "the FLUX.1 LayerDiffuse LoRA",
    "qwen_vae": "the Qwen-Image-Layered RGBA VAE",
}


def files_for(role: str, family: str | None = None) -> list[WeightFile]:
    return [f for f in _FILES if f.role == role and (family is None or f.family == family)]


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
}  # fmt: skip
_MAX_HEADER = 100 * 1024 * 1024


def _fix_hint(path: Path) -> str:
    known = FILES.get(path.stem)
    if known:
        return f" Delete it and download it again from {known.url}"
    return ""


def not_a_file(path: str | os.PathLike) -> str | None:
    """What sits at ``path`` where a weight file belongs, when it is not a file: "<path> is a
    directory", "<path> is a broken link (to <target>)", ...; None when nothing is there
    (or a file is). The caller adds what to do."""
    path = Path(path)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"{path} cannot be read ({e.strerror or e})"
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        try:
            st = path.stat()
        except OSError:  # dangling, a loop, or a target we may not see
            return f"{path} is a broken link (to {target}, which does not exist)"
        if stat.S_ISDIR(st.st_mode):
            return f"{path} is a link to a directory ({target}), not a weight file"
    if stat.S_ISDIR(st.st_mode):
        return f"{path} is a directory, not a weight file"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    return None


def read_header(path: str | os.PathLike) -> dict[str, tuple[list[int], str]]:
    """key -> (shape, dtype string) from a safetensors header, with the file's integrity checked.

    Reads only the header: no tensor data, no pickle. Raises :class:`WeightFileError` for a
    missing, non-safetensors or truncated file.
    """
    path = Path(path)
    if not path.is_file():
        problem = not_a_file(path)
        if problem is not None:
            known = FILES.get(path.stem)
            source = f" (download it from {known.url})" if known else ""
            raise WeightFileError(f"{problem}; remove it and put the weight file there{source}.")
        raise WeightFileError(f"Weight file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
        n = struct.unpack("<Q", head[:8])[0] if len(head) == 9 else -1
        if not (0 < n <= _MAX_HEADER and head[8:9] == b"{"):
            # a safetensors file starts with its header length and a JSON object
            if head[:2] == b"PK" or head[:1] == b"\x80":
                raise WeightFileError(
                    f"{path} is a pickled PyTorch checkpoint, not a safetensors file. LayerDiffuse loads "
                    f"safetensors only (pickle can run code).{_fix_hint(path)}"
                )
            raise WeightFileError(
                f"{path} is not a safetensors file ({size} bytes, no safetensors header).{_fix_hint(path)}"
            )
        if n > size - 8:
            raise WeightFileError(
                f"{path} is truncated: its header alone claims {n} bytes but the file has {size}.{_fix_hint(path)}"
            )
        f.seek(8)
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightFileError(
                f"{path} is not a safetensors file (unreadable header: {e}).{_fix_hint(path)}"
            ) from None
        except RecursionError:  # a header of nested brackets: json recurses once per level
            raise WeightFileError(
                f"{path} is not a safetensors file (its header nests too deeply to be a tensor index).{_fix_hint(path)}"
            ) from None
    header.pop("__metadata__", None)
    out = {}
    end = 0
    try:
        for key, info in header.items():
            out[key] = (list(info["shape"]), info["dtype"])
            end = max(end, int(info["data_offsets"][1]))
    except (TypeError, KeyError, ValueError, IndexError):
        raise WeightFileError(f"{path} is not a safetensors file (malformed header).{_fix_hint(path)}") from None
    if size < 8 + n + end:
        raise WeightFileError(
            f"{path} is truncated: it has {size} bytes, its header needs {8 + n + end} "
            f"({100 * size / (8 + n + end):.0f}% present). The download was probably interrupted.{_fix_hint(path)}"
        )
    return out


def guess_role(keys) -> str | None:
    """Which kind of LayerDiffuse file a key set looks like, or None."""
    keys = list(keys)
    if any("::" in k for k in keys):
        return "unet_patch"
    if any(k.startswith(("hookers.", "kwargs_encoder.")) for k in keys):
        return "attention_sharing"
    if any(k.startswith("latent_conv_in.") for k in keys):
        return "decoder"
    if any(k.startswith("blocks.") for k in keys):
        return "encoder"
    return None


def _few(items, n=4) -> str:
    items = sorted(items)
    more = f", ... ({len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def check_state(path, found: dict[str, tuple[list[int], str]], expected: dict[str, list[int]], role: str) -> None:
    """Compare a file's header with the keys and shapes a module expects; raise on mismatch."""
    path = Path(path)
    want = ROLE_NAMES[role]
    guessed = guess_role(found)
    if guessed is not None and guessed != role:
        names = ", ".join(f.filename for f in files_for(role))
        raise WeightFileError(
            f"{path.name} is {ROLE_NAMES[guessed]}, not {want} (it holds keys such as "
            f"{_few(list(found), 2)}). Use one of: {names}."
        )
    problems = _problems({k: list(v[0]) for k, v in found.items()}, expected)
    bad_dtypes = sorted({d for _, d in found.values() if d not in _DTYPES})
    if bad_dtypes:
        problems.append(f"unsupported tensor dtypes {bad_dtypes} (expected floating point)")
    if problems:
        raise WeightFileError(
            f"{path} does not match {want} ({len(expected)} tensors expected, {len(found)} found): "
            + "; ".join(problems)
            + "."
            + _fix_hint(path)
        )


def _problems(found: dict[str, list[int]], expected: dict[str, list[int]]) -> list[str]:
    missing = set(expected) - set(found)
    unexpected = set(found) - set(expected)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_few(unexpected)})")
    bad_shapes = [
        f"{k}: expected {expected[k]}, found {found[k]}"
        for k in sorted(expected)
        if k in found and list(found[k]) != list(expected[k])
    ]
    if bad_shapes:
        problems.append(f"{len(bad_shapes)} shape mismatches ({'; '.join(bad_shapes[:3])})")
    return problems


def state_mismatch(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> str:
    """Why ``module.load_state_dict(state, strict=True)`` fails, with the key names, in one
    line ("3 missing keys (a, b, c); 1 unexpected keys (x)"); empty when keys and shapes fit.

    torch's own message starts with a line that names no key ("Error(s) in loading
    state_dict for ..."); use this instead wherever a load error reaches the user.
    """
    return "; ".join(_problems({k: list(v.shape) for k, v in state.items()}, expected_shapes(module)))


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _non_finite(t: torch.Tensor) -> tuple[int, int]:
    """(NaN count, infinite count) of a floating-point tensor, in bounded temporary memory."""
    nan = inf = 0
    for chunk in t.detach().reshape(-1).split(1 << 24):
        if not bool(torch.isfinite(chunk).all()):
            nan += int(torch.isnan(chunk).sum())
            inf += int(torch.isinf(chunk).sum())
    return nan, inf


def check_finite(state: dict[str, torch.Tensor], path) -> None:
    """Refuse a state with NaN or infinite values, naming the first such key (in sorted order)
    and how many tensors are affected. Integer tensors are skipped.

    A weight file with NaN / Inf loads without complaint and then gives NaN latents or an
    image with alpha 0 everywhere; call this on every loaded file before it is used.
    """
    first, bad = None, 0
    for key in sorted(state):
        t = state[key]
        if not (torch.is_tensor(t) and t.is_floating_point()):
            continue
        nan, inf = _non_finite(t)
        if nan or inf:
            bad += 1
            if first is None:
                first = (key, nan, inf, t.numel())
    if first is not None:
        key, nan, inf, numel = first
        also = f" ({bad - 1} more tensors too)" if bad > 1 else ""
        raise WeightFileError(
            f"{path} holds non-finite values: {key} has {nan} NaN and {inf} infinite of {numel} values{also}. "
            "The file is damaged (or saved from a diverged training run) and would give NaN latents or an "
            f"empty alpha.{_fix_hint(Path(path)) or ' Replace it with a good copy.'}"
        )


def expected_shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def check_module_file(cls, role: str, path) -> tuple[torch.nn.Module, dict]:
    """The header check of a decoder / encoder file (keys, shapes, dtypes; no tensor is read):
    returns the module on the meta device and the header."""
    with torch.device("meta"):
        module = cls()
    found = read_header(path)
    check_state(path, found, expected_shapes(module), role)
    return module, found


def _load_module(cls, role: str, path, device, dtype) -> torch.nn.Module:
    from safetensors import safe_open

    module, found = check_module_file(cls, role, path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            state = {k: f.get_tensor(k) for k in found}
    except Exception as e:  # safetensors raises its own error types for corrupt data
        raise WeightFileError(
            f"{path} could not be read ({type(e).__name__}: {_one_line(e)}).{_fix_hint(Path(path))}"
        ) from None
    check_finite(state, path)
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # torch's first line names no key: say which keys instead
        detail = state_mismatch(module, state) or _one_line(e)
        raise WeightFileError(f"{path} does not fit {ROLE_NAMES[role]}: {detail}.{_fix_hint(Path(path))}") from None
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_decoder(path, device="cpu", dtype=torch.float32) -> TransparentVAEDecoder:
    """A ready :class:`TransparentVAEDecoder` from a ``*vae_transparent_decoder.safetensors``."""
    return _load_module(TransparentVAEDecoder, "decoder", path, device, dtype)


def load_encoder(path, device="cpu", dtype=torch.float32) -> TransparentVAEEncoder:
    """A ready :class:`TransparentVAEEncoder` from a ``*vae_transparent_encoder.safetensors``."""
    return _load_module(TransparentVAEEncoder, "encoder", path, device, dtype)


def sha256_of(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_file(path, info: WeightFile) -> None:
    """Check a (downloaded) file's layout against its role before it is used; raise otherwise.

    Decoder / encoder: every key and shape. UNet-side files: the key grammar and the 32
    attention-sharing units, or the ``<model_key>::<lora|diff>::<index>`` patch keys (their
    shapes depend on the user's model and are checked when they are applied).
    """
    if info.role == "flux_vae":
        check_flux_vae(path, read_flux_vae_layout(path))
        return
    if info.role == "flux_lora":
        check_flux_lora(path, read_header(path))
        return
    if info.role == "qwen_vae":
        from .qwen_vae import load_vae_file

        load_vae_file(path)
        return
    found = read_header(path)
    if info.role in ("decoder", "encoder"):
        with torch.device("meta"):
            module = TransparentVAEDecoder() if info.role == "decoder" else TransparentVAEEncoder()
        check_state(path, found, expected_shapes(module), info.role)
        return
    guessed = guess_role(found)
    if guessed != info.role:
        what = ROLE_NAMES.get(guessed, "an unrecognised file")
        raise WeightFileError(
            f"{Path(path).name} should be {ROLE_NAMES[info.role]} but is {what}.{_fix_hint(Path(info.filename))}"
        )
    if info.role == "attention_sharing":
        units = {int(k.split(".")[2]) for k in found if k.startswith("hookers.layers.")}
        if units != set(range(32)):
            raise WeightFileError(
                f"{Path(path).name} holds attention-sharing units {sorted(units)[:5]}..., expected 0..31.{_fix_hint(Path(info.filename))}"
            )
    else:
        bad = [k for k in found if len(k.split("::")) != 3 or k.split("::")[1] not in ("lora", "diff")]
        if bad:
            raise WeightFileError(f"{Path(path).name}: keys such as {_few(bad, 2)} are not LayerDiffuse patch keys.")


def load_unet_file(path) -> dict[str, torch.Tensor]:
    """A UNet-side file (SDXL patches, SD1.5 attention sharing): safetensors only, header checked first."""
    from safetensors.torch import load_file

    read_header(path)  # truncated / not safetensors / pickle: refused before any tensor is read
    return load_file(str(path))


# ---------------------------------------------------------------------------------------
# FLUX.1: TransparentVAE.pth (or a safetensors conversion of it) and layerlora.safetensors

FLUX_VAE_PARTS = ("decoder", "encoder")
FLUX_IGNORED_PREFIX = "sd_vae."  # a copy of the FLUX.1 VAE: the hosts use their own


def flux_vae_shapes() -> dict[str, list[int]]:
    """key -> shape the FLUX.1 file must hold: ``decoder.*`` (538) and ``encoder.*`` (18)."""
    with torch.device("meta"):
        modules = {
            "decoder": TransparentVAEDecoder(latent_channels=16),
            "encoder": TransparentVAEEncoder(latent_channels=16),
        }
    return {f"{part}.{k}": v for part, m in modules.items() for k, v in expected_shapes(m).items()}


def read_flux_vae_layout(path) -> dict[str, tuple[list[int], str]]:
    """key -> (shape, dtype string) of a ``TransparentVAE.pth`` or its safetensors conversion,
    told apart by content. Reads no tensor data and runs no pickle code (:mod:`.pth`)."""
    from . import pth

    path = Path(path)
    if path.is_file() and pth.is_torch_zip(path):
        return {k: (list(r.shape), r.dtype_name) for k, r in pth.read_layout(path).items()}
    return read_header(path)  # safetensors; its errors name a missing file, a pickle, truncation


def check_flux_vae(path, found: dict[str, tuple[list[int], str]]) -> None:
    """All 538 ``decoder.`` + 18 ``encoder.`` keys with their shapes, floating-point; ``sd_vae.``
    ignored; raise naming the keys otherwise. (The reference loads with ``strict=False``, which
    would load nothing from a file with other prefixes and say nothing.)"""
    path = Path(path)
    expected = flux_vae_shapes()
    ours = {k: list(v[0]) for k, v in found.items() if not k.startswith(FLUX_IGNORED_PREFIX)}
    problems = _problems(ours, expected)
    bad_dtypes = sorted({d for k, (_, d) in found.items() if k in expected and d not in _DTYPES})
    if bad_dtypes:
        problems.append(f"unsupported tensor dtypes {bad_dtypes} (expected floating point)")
    if problems:
        raise WeightFileError(
            f"{path} does not match {ROLE_NAMES['flux_vae']} ({len(expected)} tensors expected under decoder. and "
            f"encoder., {len(ours)} found): " + "; ".join(problems) + "." + _fix_hint(path)
        )


def check_flux_lora(path, found: dict[str, tuple[list[int], str]]) -> None:
    """A LoRA file: LoRA keys (lora_A/lora_B, lora_down/lora_up, ...) in floating point. Its key
    format is the host loader's business (it maps diffusers and kohya names)."""
    path = Path(path)
    if not any("lora" in k.lower() for k in found):
        raise WeightFileError(
            f"{path.name} should be {ROLE_NAMES['flux_lora']} but holds no LoRA keys (keys such as "
            f"{_few(list(found), 2)}).{_fix_hint(path)}"
        )
    bad_dtypes = sorted({d for _, d in found.values() if d not in _DTYPES})
    if bad_dtypes:
        raise WeightFileError(f"{path.name}: unsupported tensor dtypes {bad_dtypes} (expected floating point).")


def _read_flux_state(path, parts) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    from . import pth

    path = Path(path)
    layout = read_flux_vae_layout(path)
    check_flux_vae(path, layout)
    prefixes = tuple(f"{p}." for p in parts)
    try:
        if pth.is_torch_zip(path):
            return pth.load(path, select=lambda k: k.startswith(prefixes))
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in layout if k.startswith(prefixes)}
    except WeightFileError:
        raise
    except Exception as e:  # safetensors / zipfile raise their own error types for corrupt data
        raise WeightFileError(
            f"{path} could not be read ({type(e).__name__}: {_one_line(e)}).{_fix_hint(path)}"
        ) from None


def load_flux_vae(path, device="cpu", dtype=torch.float32, parts=FLUX_VAE_PARTS) -> dict[str, torch.nn.Module]:
    """``{"decoder": TransparentVAEDecoder(16), "encoder": TransparentVAEEncoder(16)}`` (those in
    ``parts``), ready, from ``TransparentVAE.pth`` or a safetensors conversion with the same keys.

    The file is checked first (all keys and shapes, :func:`check_flux_vae`), only the wanted
    prefixes are read, values are checked finite, and each module loads ``strict=True``.
    """
    state = _read_flux_state(path, parts)
    check_finite(state, path)
    out = {}
    for part in parts:
        cls = TransparentVAEDecoder if part == "decoder" else TransparentVAEEncoder
        with torch.device("meta"):
            module = cls(latent_channels=16)
        prefix = f"{part}."
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(sub, strict=True, assign=True)
        except RuntimeError as e:
            detail = state_mismatch(module, sub) or _one_line(e)
            raise WeightFileError(f"{path} does not fit {ROLE_NAMES['flux_vae']} ({part}): {detail}.") from None
        out[part] = module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return out


def load_flux_decoder(path, device="cpu", dtype=torch.float32) -> TransparentVAEDecoder:
    """The FLUX.1 transparent decoder (16 latent channels) from ``TransparentVAE.pth``; for
    :func:`lib_layerdiffuse.flux.decode_rgba`."""
    return load_flux_vae(path, device, dtype, parts=("decoder",))["decoder"]


def load_flux_encoder(path, device="cpu", dtype=torch.float32) -> TransparentVAEEncoder:
    """The FLUX.1 offset encoder (16 latent channels) from ``TransparentVAE.pth``; for
    :func:`lib_layerdiffuse.flux.encode_offset`."""
    return load_flux_vae(path, device, dtype, parts=("encoder",))["encoder"]
