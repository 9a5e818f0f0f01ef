"""One generation's UNet changes for a mode, on a plain module tree (the A1111 way).

    session = UNetSession(unet, mode, file_state, weight=1.0)  # validates, touches nothing
    try:
        session.install()
        ...  # set session.concat.condition / session.sharing.state, sample, session.disable() at Stop At
    finally:
        session.restore()  # every tensor and module as before, bit for bit

Forge hosts install through their own patcher instead and use the pieces directly
(:func:`patches.compute_patched_tensors`, :class:`attention_sharing.AttentionSharing`).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention_sharing import AttentionSharing
from .modes import Mode, check_family
from .patches import ConcatConv, ModulePatcher, PatchError, parse_patch_state
from .unet import detect_family


class UNetSession:
    def __init__(self, unet: nn.Module, mode: Mode, state: dict[str, torch.Tensor], weight: float = 1.0,
                 family: str | None = None, source: str | None = None):  # fmt: skip
        self.mode = mode
        self.weight = float(weight)
        self.source = source or f"{mode.unet_file}.safetensors"
        check_family(mode, family if family is not None else detect_family(unet))
        self.sharing: AttentionSharing | None = None
        self.patcher: ModulePatcher | None = None
        if mode.apply == "attention_sharing":
            self.sharing = AttentionSharing(unet, frames=mode.group, use_control=mode.control is not None)
            try:
                self.sharing.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise PatchError(
                    f"{self.source} does not fit '{mode.label}': {str(e).splitlines()[0]} "
                    f"Re-download {mode.unet_file}.safetensors."
                ) from None
        else:
            self.patches = parse_patch_state(state, self.source)
            self.patcher = ModulePatcher(unet)

    def install(self) -> list[str]:
        """Apply the mode's changes; returns file keys skipped because the model lacks them."""
        if self.sharing is not None:
            self.sharing.install()
            return []
        missing = self.patcher.install(self.patches, self.weight, self.source)
        if self.mode.concat and self.patcher.concat is None:
            self.patcher.restore()
            raise PatchError(
                f"{self.source} has no widened conv_in ({4 + self.mode.concat_channels} input channels) "
                f"for '{self.mode.label}'."
            )
        return missing

    @property
    def concat(self) -> ConcatConv | None:
        return None if self.patcher is None else self.patcher.concat

    def disable(self):
        """Stop At: the rest of sampling runs the unpatched UNet."""
        if self.sharing is not None:
            self.sharing.state.enabled = False
        else:
            self.patcher.disable()

    def restore(self):
        if self.sharing is not None:
            self.sharing.restore()
            self.sharing.state.enabled = True
        if self.patcher is not None:
            self.patcher.restore()

    @property
    def calls(self) -> int:
        """Calls of our code during sampling: 0 means the patches never ran (refuse to decode)."""
        if self.sharing is not None:
            return self.sharing.state.calls
        return self.patcher.calls
