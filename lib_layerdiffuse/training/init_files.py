"""``--init FILE`` (diffusion, layers) and ``--init-encoder`` / ``--init-decoder`` (vae): a
run that starts from a published LayerDiffuse file or an earlier export of the same kind,
e.g. ``layer_xl_transparent_attn.safetensors`` adapted to an Illustrious / NoobAI checkpoint.

The file is checked as the extension checks it (:mod:`lib_layerdiffuse.weights`: a
safetensors header, the kind of file its keys make it, keys and shapes; LoRA ranks by
:func:`lib_layerdiffuse.attention_sharing.file_rank`), its values by the trainer's one finite
check (:func:`.finite.require_finite`). The layout is the file's: its LoRA rank (a ``--rank``
that differs is refused, naming both), lora or diff, and the tensors it patches. The header
checks run before the run's folder is created (:func:`check_header`); the tensors load once
the model is built. A resumed run continues from its own state, not from the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import attention_sharing as sharing
from .. import patches as core_patches
from .. import weights as core_weights
from ..errors import LayerDiffuseError
from .errors import TrainingError, UsageError
from .finite import require_finite

CONV_IN = "input_blocks.0.0.weight"


def _read_header(path: str, flag: str) -> dict[str, tuple[list[int], str]]:
    """The file's header; a path that is no file is worded here, for an option the user gave
    (the extension's words in weights.py are about its own models folder)."""
    problem = core_weights.not_a_file(path)
    if problem is not None:
        raise TrainingError(f"{flag} {path}: {problem}; give the path of the weight file itself")
    if not Path(path).is_file():
        raise TrainingError(f"{flag} {path}: no such file; check the path")
    try:
        return core_weights.read_header(path)
    except LayerDiffuseError as e:
        raise TrainingError(f"{flag} {path}: {e}") from None


def _header(path: str, flag: str, role: str, hint: str) -> dict[str, tuple[list[int], str]]:
    """The file's header (keys -> shape, dtype), refused unless it is a ``role`` file."""
    found = _read_header(path, flag)
    kind = core_weights.guess_role(found)
    if kind != role:
        what = core_weights.ROLE_NAMES.get(kind, "not a LayerDiffuse file")
        raise TrainingError(f"{flag} {path} is {what}, not {core_weights.ROLE_NAMES[role]}: {hint}")
    return found


def _tensors(path: str, flag: str) -> dict[str, torch.Tensor]:
    try:
        state = core_weights.load_unet_file(path)
    except LayerDiffuseError as e:
        raise TrainingError(f"{flag} {path}: {e}") from None
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types for corrupt data)
        raise TrainingError(f"{flag} {path} could not be read ({type(e).__name__}: {str(e)[:200]})") from None
    require_finite(state, f"{flag} {path}")
    return state


def resolve_rank(rank: int | None, file_rank: int, path: str) -> int:
    """The run's LoRA rank: the file's; a ``--rank`` that differs is refused, naming both."""
    if rank is not None and rank != file_rank:
        raise UsageError(f"--rank {rank} conflicts with --init {path}, whose LoRAs have rank {file_rank}: leave --rank "
                         "out (the run takes the file's rank) or start without --init")  # fmt: skip
    return file_rank


# ---------------------------------------------------------------------------------------
# diffusion: an SDXL patch file (layer_xl_*.safetensors, or unet_patch.safetensors / layer_xl_<mode> exports)


@dataclass
class PatchLayout:
    """What an SDXL patch file patches: lora or diff, the ldm names (no prefix, conv_in
    apart), the LoRA rank (None for diff) and the widened conv_in's channels (or None)."""

    mode: str
    names: list[str]
    rank: int | None
    conv_in_channels: int | None


PATCH_HINT = "give an SDXL patch file (layer_xl_*.safetensors or a diffusion-stage export)"


def patch_layout(path: str, mode: str | None, rank: int | None) -> PatchLayout:
    """The header of a ``diffusion --init`` file: one patch kind (a ``--mode`` that differs is
    refused), one LoRA rank (see :func:`resolve_rank`). No tensor is read."""
    found = _header(path, "--init", "unet_patch", PATCH_HINT)
    kinds, ranks, names, conv_in = set(), {}, [], None
    for key, (shape, _) in found.items():
        parts = key.split("::")
        if len(parts) != 3 or parts[1] not in ("lora", "diff") or not parts[0].startswith(core_patches.PREFIX):
            raise TrainingError(f"--init {path}: key {key!r} is not '{core_patches.PREFIX}<name>::<lora|diff>::<i>' "
                                f"({PATCH_HINT})")  # fmt: skip
        name = parts[0][len(core_patches.PREFIX) :]
        if name == CONV_IN and parts[1] == "diff":
            conv_in = int(shape[1])
            continue
        kinds.add(parts[1])
        if parts[2] == "0":
            names.append(name)
        if parts[1] == "lora":
            ranks.setdefault(int(shape[0] if parts[2] == "1" else shape[-1]), key)
    if len(kinds) != 1:
        raise TrainingError(f"--init {path} mixes lora and diff patches: the trainer continues one kind ({PATCH_HINT})")
    kind = kinds.pop()
    if mode is not None and mode != kind:
        raise UsageError(f"--mode {mode} conflicts with --init {path}, a {kind} patch file: leave --mode out "
                         "(the run takes the file's) or start without --init")  # fmt: skip
    file_rank = None
    if kind == "diff" and rank is not None:
        raise UsageError(f"--rank {rank} has no meaning with --init {path}, a diff patch file (whole weight "
                         "offsets, no LoRA): leave --rank out")  # fmt: skip
    if kind == "lora":
        if len(ranks) != 1:
            (r1, k1), (r2, k2) = sorted(ranks.items())[:2]
            raise TrainingError(f"--init {path} mixes LoRA ranks ({k1}: {r1}, {k2}: {r2}); the trainer needs one rank")
        file_rank = resolve_rank(rank, next(iter(ranks)), path)
    return PatchLayout(kind, sorted(names), file_rank, conv_in)


def check_layer_mode(path: str, layer_mode: str | None) -> None:
    """A file made for another layer mode is refused: fg2ble and bg2ble (and fgble2bg and bgble2fg)
    have the same conv_in width, so the shapes alone cannot tell. The file says its mode in our
    exports' metadata ("" for the transparent model); a published file, in its name."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # the header was checked already; no metadata is no claim
        meta = {}
    found = meta.get("layer_mode")
    if found is None:
        stem = Path(path).name.removesuffix(".safetensors")
        published = {f"layer_xl_{m}": m for m in ("fg2ble", "fgble2bg", "bg2ble", "bgble2fg")}
        published.update({"layer_xl_transparent_attn": "", "layer_xl_transparent_conv": ""})
        found = published.get(stem)
    if found is None or found == (layer_mode or ""):
        return
    made = f"--layer-mode {found}" if found else "the transparent model (no --layer-mode)"
    run = f"--layer-mode {layer_mode}" if layer_mode else "the transparent model (no --layer-mode)"
    raise UsageError(f"--init {path} was made for {made}; this run trains {run}: give the file of this mode")


def check_patch_names(path: str, layout: PatchLayout, unet: nn.Module, expected: list[str] | None,
                      targets: str | None, conv_in_channels: int | None) -> None:  # fmt: skip
    """The file's names against the UNet (and ``--targets`` when given), its conv_in against
    ``--layer-mode``: one :class:`TrainingError` naming what differs."""
    params = dict(unet.named_parameters())
    base_in = params[CONV_IN].shape[1] if CONV_IN in params else None
    if conv_in_channels is None and layout.mode == "diff" and layout.conv_in_channels == base_in:
        # a plain conv_in diff (--targets all without --layer-mode): one of the patched tensors
        layout.names = sorted([*layout.names, CONV_IN])
        layout.conv_in_channels = None
    unknown = [n for n in layout.names if n not in params]
    if unknown:
        raise TrainingError(f"--init {path} patches {len(unknown)} tensors this UNet does not have (e.g. "
                            f"{unknown[0]}): it was made for another model family")  # fmt: skip
    if layout.mode == "lora":
        flat = [n for n in layout.names if params[n].dim() != 2]
        if flat:
            raise TrainingError(f"--init {path}: LoRA on {flat[0]} (not a Linear weight); the trainer's LoRAs are on "
                                "Linear weights")  # fmt: skip
    if expected is not None and sorted(expected) != layout.names:
        missing = sorted(set(expected) - set(layout.names))
        extra = sorted(set(layout.names) - set(expected))
        raise UsageError(f"--targets {targets} conflicts with --init {path}: the file patches {len(layout.names)} "
                         f"tensors ({len(missing)} of --targets missing, e.g. {(missing or ['-'])[0]}; {len(extra)} "
                         f"others, e.g. {(extra or ['-'])[0]}); leave --targets out (the run takes the file's)")  # fmt: skip
    if layout.conv_in_channels != conv_in_channels:
        have = f"a widened conv_in of {layout.conv_in_channels} channels" if layout.conv_in_channels else "no conv_in"
        want = f"{conv_in_channels} channels (--layer-mode)" if conv_in_channels else "none (no --layer-mode)"
        raise UsageError(f"--init {path} has {have}; this run's is {want}: give the file of this --layer-mode")


def load_patch(path: str, delta: nn.Module) -> None:
    """The file's tensors into a :class:`.diffusion_stage.UNetDelta` built to its layout."""
    state = _tensors(path, "--init")
    expected = {k: list(v.shape) for k, v in delta.export_state(torch.float32).items()}
    try:
        core_weights.check_state(path, {k: (list(v.shape), _dtype(v)) for k, v in state.items()}, expected,
                                 "unet_patch")  # fmt: skip
    except LayerDiffuseError as e:
        raise TrainingError(f"--init {path}: {e}") from None
    delta.load_export_state(state)


def _dtype(t: torch.Tensor) -> str:
    return {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}.get(t.dtype, "?")


# ---------------------------------------------------------------------------------------
# layers: an SD1.5 attention-sharing file (layer_sd15_*.safetensors or an attention_sharing export)

SHARING_HINT = "give an SD1.5 attention-sharing file (layer_sd15_*.safetensors or a layers-stage export)"


def sharing_rank(path: str, rank: int | None) -> int:
    """The LoRA rank of a ``layers --init`` file, from its header (see :func:`resolve_rank`)."""
    found = _header(path, "--init", "attention_sharing", SHARING_HINT)
    try:
        file_rank = sharing.file_rank({k: shape for k, (shape, _) in found.items()})
    except LayerDiffuseError as e:
        raise TrainingError(f"--init {path}: {e}") from None
    return resolve_rank(rank, file_rank, path)


def load_sharing(path: str, model: nn.Module, layout: str) -> None:
    """The file's tensors into a :class:`.layers_stage.LayerSharingModel` (strict: the file's
    frames and control must be this run's, ``layout`` names them)."""
    state = _tensors(path, "--init")
    why = core_weights.state_mismatch(model, state)
    if why:
        raise TrainingError(f"--init {path} does not fit {layout}: {why}. Give the file of these frames "
                            "(layer_sd15_transparent_attn: --frames fg; layer_sd15_joint: --frames fg,bg,blend; "
                            "fg2bg / bg2fg: --condition fg / bg --condition-via control)")  # fmt: skip
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


# ---------------------------------------------------------------------------------------
# vae: the encoder / decoder pair, each optional


def check_vae_file(path: str, flag: str, role: str, module: nn.Module) -> None:
    """The header of ``--init-encoder`` / ``--init-decoder`` against the module of ``--widths``."""
    found = _read_header(path, flag)
    expected = core_weights.expected_shapes(module)
    try:
        core_weights.check_state(path, found, expected, role)
    except LayerDiffuseError as e:
        # the hint only where a tensor's shape differs: other widths; not for another kind of file
        other_widths = any(list(found[k][0]) != list(v) for k, v in expected.items() if k in found)
        hint = " (its widths must be --widths's; published files: --widths full)" if other_widths else ""
        raise TrainingError(f"{flag} {path}: {e}{hint}") from None


def load_vae_file(path: str, flag: str, role: str, module: nn.Module, lambda_offset: float | None = None) -> None:
    """The file's tensors into the encoder or decoder. An encoder file holds lambda_offset
    folded into its last conv (:func:`.checkpoint.encoder_export_state`): unfolded here, so
    training continues in its own units and the next export folds it back."""
    check_vae_file(path, flag, role, module)
    state = {k: v.float() for k, v in _tensors(path, flag).items()}
    if lambda_offset is not None:
        last = f"blocks.{len(module.blocks) - 1}"
        state[f"{last}.weight"] = state[f"{last}.weight"] / lambda_offset
        state[f"{last}.bias"] = state[f"{last}.bias"] / lambda_offset
    module.load_state_dict(state, strict=True)


def describe(path: str) -> str:
    return Path(path).name
