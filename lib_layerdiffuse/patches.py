"""SDXL patch files (``<model_key>::<lora|diff>::<index>``): parse, compute, install, restore.

Computing the patched tensors is separate from installing them:

* :func:`parse_patch_state` turns a loaded file into ``{model_key: Patch}``.
* :func:`compute_patched_tensors` gives the tensors the official merge produces
  (``lora``: ``W + weight * up @ down``; ``diff``: ``W + weight * delta``; the widened
  ``conv_in``: base in the first 4 input channels, the new ones ``weight * delta``), in
  fp32, cast back to the model's dtype. Hosts with their own patcher (Forge) install these.
* :class:`ModulePatcher` installs a file on a plain module tree (A1111): ``lora`` entries
  on Linear layers as forward hooks adding ``weight * up(down(x))`` (no weight is touched,
  so A1111's built-in LoRA never captures them), ``diff`` entries merged in place with a
  bit-exact backup, the widened conv_in as an extra convolution over the condition latent.
  :meth:`ModulePatcher.restore` puts every tensor back bit for bit; use it in ``finally``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LayerDiffuseError, PatchError

log = logging.getLogger("layerdiffuse")

PREFIX = "diffusion_model."
CONV_IN = "input_blocks.0.0.weight"
# A1111's built-in LoRA keeps lazy backups on the modules it patches (docs/hosts.md §2).
FOREIGN_BACKUP_ATTRS = ("network_weights_backup", "network_bias_backup", "network_current_names")
MOST_MISSING = 0.5  # refuse a file when more than this share of its keys is absent from the model


@dataclass
class Patch:
    kind: str  # "lora" | "diff"
    slots: dict[int, torch.Tensor] = field(default_factory=dict)


def parse_patch_state(state: Mapping[str, torch.Tensor], source: str = "patch file") -> dict[str, Patch]:
    """``{model_key: Patch}`` from a state dict with ``<model_key>::<type>::<index>`` keys."""
    patches: dict[str, Patch] = {}
    for key, tensor in state.items():
        parts = key.split("::")
        if len(parts) != 3 or not parts[2].isdigit() or not 0 <= int(parts[2]) < 16:
            raise PatchError(f"{source}: key {key!r} is not of the form '<model_key>::<lora|diff>::<index>'")
        name, kind, index = parts[0], parts[1], int(parts[2])
        if kind not in ("lora", "diff"):
            raise PatchError(f"{source}: key {key!r} has patch type {kind!r}; only 'lora' and 'diff' exist")
        patch = patches.setdefault(name, Patch(kind))
        if patch.kind != kind:
            raise PatchError(f"{source}: {name} has both {patch.kind!r} and {kind!r} entries")
        patch.slots[index] = tensor
    for name, patch in patches.items():
        need = (0, 1) if patch.kind == "lora" else (0,)
        if any(i not in patch.slots for i in need):
            raise PatchError(
                f"{source}: {name} '{patch.kind}' patch lacks slot(s) {[i for i in need if i not in patch.slots]}"
            )
    return patches


def patch_delta(patch: Patch, shape: torch.Size | tuple, weight: float) -> torch.Tensor:
    """``weight * delta`` in fp32: ``up @ down`` reshaped for lora, the stored tensor for diff."""
    if patch.kind == "lora":
        up, down = patch.slots[0].float(), patch.slots[1].float()
        return weight * torch.mm(up.flatten(1), down.flatten(1)).reshape(shape)
    return weight * patch.slots[0].float()


def patched_tensor(base: torch.Tensor, patch: Patch, weight: float) -> torch.Tensor:
    """The merged tensor, as the official (Forge) merge computes it, in the base's dtype.

    A 4-D ``diff`` larger than the base (the widened conv_in) gives a tensor of the larger
    shape: the base in the leading slice, plus ``weight * delta`` over the delta's extent.
    """
    if patch.kind == "diff" and tuple(patch.slots[0].shape) != tuple(base.shape):
        delta = patch.slots[0]
        if base.ndim != 4 or delta.ndim != 4 or any(d < b for d, b in zip(delta.shape, base.shape, strict=True)):
            raise PatchError(f"diff of shape {list(delta.shape)} does not fit a weight of shape {list(base.shape)}")
        out = torch.zeros(delta.shape, dtype=torch.float32, device=base.device)
        out[tuple(slice(0, s) for s in base.shape)] = base.float()
        out += weight * delta.to(base.device).float()
        return out.to(base.dtype)
    delta = patch_delta(patch, base.shape, weight).to(base.device)
    if delta.shape != base.shape:
        raise PatchError(
            f"{patch.kind} patch of shape {list(delta.shape)} does not fit a weight of shape {list(base.shape)}"
        )
    return (base.float() + delta).to(base.dtype)


def match_keys(patches: Mapping[str, Patch], names, source: str) -> list[str]:
    """Model keys of the file that the model lacks; refuse when most of them are missing (the patch
    files are all made for SDXL UNets)."""
    names = set(names)
    missing = sorted(k for k in patches if k not in names)
    if patches and len(missing) > MOST_MISSING * len(patches):
        raise PatchError(
            f"{source}: {len(missing)} of its {len(patches)} keys do not exist in the loaded model "
            f"(e.g. {', '.join(missing[:3])}). It is made for SDXL UNets: the loaded checkpoint is "
            "probably another model family. Load an SDXL checkpoint."
        )
    if missing:
        log.warning("%s: %d keys not in the model, skipped: %s", source, len(missing), ", ".join(missing))
    return missing


def compute_patched_tensors(
    params: Mapping[str, torch.Tensor],
    patches: Mapping[str, Patch],
    weight: float,
    source: str = "patch file",
) -> dict[str, torch.Tensor]:
    """``{model_key: patched tensor}`` for every patch whose key is in ``params``.

    ``params`` maps full model keys (``diffusion_model.…``, as in the files) to the current
    tensors, e.g. ``{PREFIX + n: p for n, p in unet.named_parameters()}``. Keys the model
    lacks are logged (or refused, when most are missing: wrong model family).
    """
    match_keys(patches, params, source)
    return {k: patched_tensor(params[k], p, weight) for k, p in patches.items() if k in params}


def check_conv_in(patches: Mapping[str, Patch], base: torch.Tensor | None, latent_channels: int, extra: int,
                  source: str, label: str) -> None:  # fmt: skip
    """The SDXL layer modes' widened conv_in: the file's conv_in diff must take the latent plus the
    condition channels (a fact of the file alone), and the model's own conv_in (``base``: as the model
    is without anyone's merged patches) the latent channels. Only the first proves the file bad."""
    need = latent_channels + extra
    patch = patches.get(PREFIX + CONV_IN)
    delta = patch.slots.get(0) if patch is not None and patch.kind == "diff" else None
    found = int(delta.shape[1]) if delta is not None and delta.ndim == 4 else None
    if found != need:
        what = "no conv_in patch" if found is None else f"a conv_in patch for {found} input channels"
        raise PatchError(
            f"{source} holds {what}; '{label}' needs one for {need} ({latent_channels} latent + {extra} condition "
            f"channels), so the file is not the one this method uses. Delete it and download it again."
        )
    have = int(base.shape[1]) if base is not None and base.ndim == 4 else None
    if have != latent_channels:
        raise PatchError(
            f"'{label}' needs an SDXL UNet whose conv_in takes {latent_channels} input channels, but the loaded "
            f"model's takes {have if have is not None else 'none (it has no conv_in)'} input channels (an "
            "inpainting or otherwise modified UNet). Load a standard SDXL checkpoint."
        )


class ConcatConv:
    """The widened conv_in's extra input channels, as a convolution over the condition latent.

    ``conv(W, cat[x, c]) = conv(W[:, :4], x) + conv(W[:, 4:], c)``: a forward hook on the
    4-channel conv_in adds the second term. ``condition`` (``[1 or B, C, h, w]``, diffusion
    space) is set by the pipeline and repeated to every row of the batch, cond and uncond
    alike; ``enabled`` is cleared by Stop At.
    """

    def __init__(self, extra_weight: torch.Tensor, padding):
        self.weight = extra_weight
        self.padding = padding
        self.condition: torch.Tensor | None = None
        self.enabled = True
        self.calls = 0

    def __call__(self, module, args, output):
        if not self.enabled:
            return output
        if self.condition is None:
            raise LayerDiffuseError("the condition latent of this mode was not set before sampling")
        x = args[0]
        c = self.condition.to(x.device, x.dtype)
        if c.shape[0] != x.shape[0]:
            if x.shape[0] % c.shape[0]:
                raise LayerDiffuseError(f"condition batch {c.shape[0]} does not divide UNet batch {x.shape[0]}")
            c = c.repeat(x.shape[0] // c.shape[0], 1, 1, 1)
        self.calls += 1
        return output + F.conv2d(c, self.weight.to(x.dtype), padding=self.padding)


class _LoraHook:
    def __init__(self, up: torch.Tensor, down: torch.Tensor, weight: float):
        self.up, self.down, self.weight = up, down, weight
        self.enabled = True
        self.calls = 0

    def __call__(self, module, args, output):
        if not self.enabled:
            return output
        self.calls += 1
        x = args[0]
        return output + self.weight * F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype))


class ModulePatcher:
    """Install an SDXL patch file on a module tree with ldm names; undo it bit-exactly.

    ``root`` is the UNet (A1111: ``sd_model.model.diffusion_model``); file keys are matched
    after stripping ``diffusion_model.``. Usage::

        patcher = ModulePatcher(unet)
        try:
            patcher.install(parse_patch_state(state), weight=1.0)
            if patcher.concat is not None:
                patcher.concat.condition = cond_latent
            ...  # sample
        finally:
            patcher.restore()
    """

    def __init__(self, root: nn.Module, prefix: str = PREFIX):
        self.root = root
        self.prefix = prefix
        self._backups: list[tuple[nn.Module, str, torch.Tensor]] = []
        self._foreign: list[tuple[nn.Module, dict]] = []
        self._handles: list = []
        self.hooks: list = []
        self.concat: ConcatConv | None = None

    @property
    def installed(self) -> bool:
        return bool(self._backups or self._handles)

    def _module_and_attr(self, key: str) -> tuple[nn.Module, str]:
        path, _, attr = key[len(self.prefix) :].rpartition(".")
        return self.root.get_submodule(path), attr

    def install(self, patches: Mapping[str, Patch], weight: float, source: str = "patch file") -> list[str]:
        """Apply every patch; returns the skipped (missing) keys. Restores itself if it fails."""
        if self.installed:
            raise LayerDiffuseError("patches are already installed; restore() first")
        params = {self.prefix + n: p for n, p in self.root.named_parameters()}
        missing = match_keys(patches, params, source)
        try:
            with torch.no_grad():
                for key, patch in patches.items():
                    if key in params:
                        self._install_one(key, params[key], patch, weight)
        except BaseException:
            self.restore()
            raise
        return missing

    def _install_one(self, key: str, param: torch.Tensor, patch: Patch, weight: float):
        module, attr = self._module_and_attr(key)
        if patch.kind == "lora" and isinstance(module, nn.Linear) and attr == "weight":
            up = patch.slots[0].to(param.device, torch.float32)
            down = patch.slots[1].to(param.device, torch.float32)
            if (up.shape[0], down.shape[1]) != tuple(param.shape):
                raise PatchError(
                    f"{key}: lora of shape {list(up.shape)} x {list(down.shape)} does not fit {list(param.shape)}"
                )
            hook = _LoraHook(up.to(param.dtype), down.to(param.dtype), weight)
            self._handles.append(module.register_forward_hook(hook))
            self.hooks.append(hook)
            return
        self._forget_foreign_backup(module)  # first: the merge must start from the clean weight
        new = patched_tensor(param, patch, weight)
        self._backups.append((module, attr, param.detach().to("cpu", copy=True)))
        if new.shape != param.shape:  # the widened conv_in
            if not isinstance(module, nn.Conv2d):
                raise PatchError(f"{key}: only a Conv2d can take a widened weight, found {type(module).__name__}")
            c = param.shape[1]
            param.copy_(new[:, :c])
            self.concat = ConcatConv(new[:, c:].contiguous(), module.padding)
            self._handles.append(module.register_forward_hook(self.concat))
            self.hooks.append(self.concat)
        else:
            param.copy_(new)

    def _forget_foreign_backup(self, module: nn.Module):
        """Make A1111's LoRA re-read clean weights during this generation, and restore its state after."""
        if any(m is module for m, _ in self._foreign):
            return
        saved = {a: getattr(module, a) for a in FOREIGN_BACKUP_ATTRS if hasattr(module, a)}
        if not saved:
            return
        self._foreign.append((module, saved))
        weights_backup = saved.get("network_weights_backup")
        if weights_backup is not None:
            self._backups.append((module, "weight", module.weight.detach().to("cpu", copy=True)))
            module.weight.copy_(weights_backup)
            bias_backup = saved.get("network_bias_backup")
            if bias_backup is not None and module.bias is not None:
                self._backups.append((module, "bias", module.bias.detach().to("cpu", copy=True)))
                module.bias.copy_(bias_backup)
        module.network_weights_backup = None
        module.network_bias_backup = None
        module.network_current_names = ()

    def disable(self):
        """Stop At: from here on the UNet behaves unpatched (hooks off, merged weights back)."""
        for hook in self.hooks:
            hook.enabled = False
        self._restore_tensors()

    def _restore_tensors(self):
        with torch.no_grad():
            # reverse order: a tensor backed up twice gets its oldest value last
            for module, attr, backup in reversed(self._backups):
                getattr(module, attr).copy_(backup)
        self._backups.clear()

    def restore(self):
        """Remove hooks, put back every tensor bit for bit and A1111's LoRA bookkeeping. Idempotent."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._restore_tensors()
        for module, saved in self._foreign:
            for a, v in saved.items():
                setattr(module, a, v)
        self._foreign.clear()
        self.hooks.clear()
        self.concat = None

    @property
    def calls(self) -> int:
        """How many times an installed hook ran (0 while only merged diffs are installed)."""
        return sum(h.calls for h in self.hooks)
