"""One sampling pass's UNet changes for a mode, installed through a host's UNet backend.

    session = UNetSession(backend, mode, state, weight=1.0, sigma_end=0.0)  # validates, touches nothing
    session.condition = latent      # SDXL layer modes: the concat condition (diffusion space)
    try:
        session.install()           # the backend puts the changes on its UNet
        ...                         # sample: the backend calls session.step(sigma) per UNet call
    finally:
        session.restore()           # every tensor and module as before (A1111: bit for bit)

A backend is how one host's UNet takes the changes: :class:`ModuleBackend` patches a plain
ldm module tree (AUTOMATIC1111); the Forge adapter's backend goes through the host's
``UnetPatcher``. Both call :meth:`UNetSession.step` once per UNet call, which is the single
Stop At rule and the count the never-silent guard reads.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention_sharing import AttentionSharing, file_rank
from .errors import LayerDiffuseError, PatchError, Refusal
from .modes import Mode
from .patches import CONV_IN, ModulePatcher, Patch, check_conv_in, parse_patch_state
from .weights import state_mismatch


class UNetBackend:
    """How a host's UNet takes a :class:`UNetSession`. Subclasses implement the three calls."""

    unet: nn.Module  # the ldm/sgm ``diffusion_model`` tree the units and patches are built for
    loads_lora = False  # applies ``session.lora`` through the host's own LoRA loader

    def install(self, session: UNetSession) -> None:
        raise NotImplementedError

    def disable(self, session: UNetSession) -> None:
        """Stop At reached: the rest of this pass samples as if unpatched."""
        raise NotImplementedError

    def restore(self) -> None:
        """Undo :meth:`install` (idempotent, also after a partial install) and drop the session."""
        raise NotImplementedError

    def abort(self, message: str) -> None:
        """Make the next UNet call raise ``message``: a setup failure must not sample unpatched."""
        raise NotImplementedError

    def base_weight(self, name: str) -> torch.Tensor | None:
        """A weight of :attr:`unet` (``name`` without ``diffusion_model.``) as the model has it without
        merged patches: what checks before sampling read (None: the model has no such weight)."""
        try:
            return self.unet.get_parameter(name)
        except AttributeError:
            return None


def load_sharing(unet: nn.Module, mode: Mode, state: dict, source: str) -> AttentionSharing:
    """The SD1.5 units of ``mode`` around ``unet``, loaded strictly from the file's state, at
    the file's LoRA rank (256 for the official files; trained files may have another)."""
    try:
        rank = file_rank(state)
    except LayerDiffuseError as e:
        raise PatchError(f"{source}: {e}.") from None
    sharing = AttentionSharing(unet, frames=mode.group, use_control=mode.control is not None, rank=rank)
    why = state_mismatch(sharing, state)  # torch's own message names no key in its first line
    if why:
        raise PatchError(f"{source} does not fit '{mode.label}': {why}. Delete {source} and download it again.")
    sharing.load_state_dict(state, strict=True)
    return sharing


class UNetSession:
    def __init__(self, backend: UNetBackend, mode: Mode, state: dict[str, torch.Tensor] | None = None,
                 weight: float = 1.0, sigma_end: float = 0.0, sharing: AttentionSharing | None = None,
                 source: str | None = None, lora=None):  # fmt: skip
        """``sharing``: units already built for this UNet (reused across passes); else built from
        ``state``. ``lora``: the path of a LoRA file the backend applies through the host's own
        loader (``host_lora`` modes)."""
        self.backend = backend
        self.mode = mode
        self.weight = float(weight)
        self.sigma_end = float(sigma_end)  # Stop At: changes active while sigma >= sigma_end
        self.source = source or f"{mode.unet_file}.safetensors"
        self.sharing: AttentionSharing | None = None
        self.patches: dict[str, Patch] | None = None
        self.lora = lora  # host_lora modes: the file the backend gives the host's loader
        self.condition: torch.Tensor | None = None  # concat modes: [1, 4*k, h, w], diffusion space
        self.result: torch.Tensor | None = None  # the latent the sampler returned (hosts that capture it)
        self.calls = 0  # UNet calls with our changes active
        self.stopped_calls = 0  # UNet calls after Stop At
        self.stopped = False
        if mode.apply == "attention_sharing":
            self.sharing = sharing if sharing is not None else load_sharing(backend.unet, mode, state, self.source)
        elif mode.apply == "host_lora":
            if lora is None:
                raise PatchError(f"'{mode.label}' needs its LoRA file ({self.source}).")
            if not getattr(backend, "loads_lora", False):
                raise PatchError(f"'{mode.label}' needs a host that loads LoRA files (Forge2 or Forge Neo).")
        else:
            self.patches = parse_patch_state(state, self.source)
            if not self.patches:  # it would sample unpatched and still claim transparency
                raise PatchError(f"{self.source} holds no patches. Delete it and download it again.")
            if mode.concat:
                check_conv_in(self.patches, backend.base_weight(CONV_IN), mode.latent_channels,
                              mode.concat_channels, self.source, mode.label)  # fmt: skip

    def install(self) -> None:
        try:
            self.backend.install(self)
        except BaseException:
            self.restore()
            raise

    def active(self, sigma: float) -> bool:
        """Whether our changes apply at this sigma (the official rule: off once ``sigma < sigma_end``)."""
        return not self.stopped and sigma >= self.sigma_end

    def step(self, sigma) -> bool:
        """Called by the backend before each UNet call; switches off once at Stop At."""
        s = float(torch.as_tensor(sigma).detach().float().max()) if not isinstance(sigma, float) else sigma
        if self.active(s):
            self.calls += 1
            return True
        if not self.stopped:
            self.stopped = True
            self.backend.disable(self)
        self.stopped_calls += 1
        return False

    @property
    def ran(self) -> bool:
        """Our changes took part in sampling (for the units: they really shared attention)."""
        if self.sharing is not None:
            return self.calls > 0 and self.sharing.state.calls > 0
        return self.calls > 0

    def restore(self) -> None:
        self.backend.restore()
        if self.sharing is not None:
            self.sharing.state.enabled = True


class ModuleBackend(UNetBackend):
    """A plain ldm module tree (AUTOMATIC1111): units swapped in, patches as hooks and merged
    diffs (:class:`patches.ModulePatcher`), and a forward pre-hook that reads each call's
    timestep, turns it into sigma with ``sigma_of_t`` and calls :meth:`UNetSession.step`."""

    def __init__(self, unet: nn.Module, sigma_of_t):
        self.unet = unet
        self.sigma_of_t = sigma_of_t
        self.session: UNetSession | None = None
        self.patcher: ModulePatcher | None = None
        self._handle = None

    def install(self, session: UNetSession) -> None:
        self.session = session
        if session.sharing is not None:
            session.sharing.install()
        else:
            self.patcher = ModulePatcher(self.unet)
            self.patcher.install(session.patches, session.weight, session.source)
            if self.patcher.concat is not None:
                self.patcher.concat.condition = session.condition
        self._handle = self.unet.register_forward_pre_hook(self._before_call, with_kwargs=True)

    def _before_call(self, module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs.get("timesteps", kwargs.get("t"))
        if t is not None and self.session is not None:
            self.session.step(self.sigma_of_t(t))

    def disable(self, session: UNetSession) -> None:
        if session.sharing is not None:
            session.sharing.state.enabled = False
        elif self.patcher is not None:
            self.patcher.disable()

    def restore(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.session is not None and self.session.sharing is not None:
            self.session.sharing.restore()
        if self.patcher is not None:
            self.patcher.restore()
            self.patcher = None
        self.session = None

    def abort(self, message: str) -> None:
        def fail(module, args):
            raise Refusal(message)

        self._handle = self.unet.register_forward_pre_hook(fail)
