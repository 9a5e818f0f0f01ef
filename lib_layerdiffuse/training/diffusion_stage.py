"""Stage 2 (paper §3.2, Eq. 7): fine-tune the UNet on adjusted latents.

    x_a   = scale * (mean + std * E(I_alpha, I_c))    frozen VAE + frozen stage-1 encoder
    x_t   = sqrt(abar_t) x_a + sqrt(1 - abar_t) eps   SD's scaled-linear DDPM schedule
    L     = || eps - eps_theta(x_t, t, c) ||^2          (Eq. 7)

The base UNet stays frozen (never in DDP, no gradients). What trains is :class:`UNetDelta`:

* ``lora`` (rank r): ``W + up @ down`` on the attention projections (``to_q``, ``to_k``,
  ``to_v``, ``to_out.0`` of every attn1/attn2; ``--targets all``: every Linear weight);
  ``up`` starts at zero, ``down ~ N(0, 1/r)``, no alpha (as the official files);
* ``diff``: a full offset ``W + delta`` per target tensor (``--targets all``: every tensor).

The forward runs the base UNet with the effective weights substituted
(``torch.func.functional_call``), computed in fp32 exactly as the extension merges a patch
file (:func:`lib_layerdiffuse.patches.patched_tensor` at weight 1). The export is the
official SDXL patch format: ``diffusion_model.<key>::lora::0`` = up ``[out, r]``,
``::lora::1`` = down ``[r, in]``, or ``::diff::0`` = the offset; with ``--export-dtype
fp32`` parse_patch_state + compute_patched_tensors on the base UNet give the trained
weights bit for bit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .. import patches as core_patches
from . import checkpoint as ckpt
from . import data as tdata
from . import init_files, sampling
from .config import DiffusionStageConfig
from .errors import TrainingError, UsageError
from .runner import stage_entry, start_run
from .unet_training import (
    Conditioning,
    LatentSource,
    StageParts,
    draw_noise_and_timesteps,
    export_metadata,
    frozen_parts,
    held_out_batch,
    layout_unet,
    q_sample,
    run_stage,
)

PATCH_FILE = "unet_patch.safetensors"
CONV_IN = "input_blocks.0.0.weight"
ATTN_PROJECTIONS = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")


def target_names(unet: nn.Module, mode: str, targets: str) -> list[str]:
    """Parameter names (ldm, no prefix) that the delta covers."""
    if targets == "attn":
        names = [n for n, _ in unet.named_parameters()
                 if any(n.endswith(f"{a}.{p}") for a in ("attn1", "attn2") for p in ATTN_PROJECTIONS)]  # fmt: skip
    elif targets == "all":
        if mode == "lora":
            linear = {f"{n}.weight" for n, m in unet.named_modules() if isinstance(m, nn.Linear)}
            names = [n for n, _ in unet.named_parameters() if n in linear]
        else:
            names = [n for n, _ in unet.named_parameters()]
    else:
        raise ValueError(f"--targets must be 'attn' or 'all', got {targets!r}")
    if not names:
        raise ValueError(f"the UNet has no parameters for --targets {targets} (mode {mode})")
    return names


class UNetDelta(nn.Module):
    """The trainable part of the fine-tune, around a frozen UNet that it does not own.

    ``forward(x, t, context, y=None)`` = the UNet with every target weight replaced by its
    :meth:`effective` value. Parameters live in ``up``/``down`` (lora) or ``delta`` (diff),
    keyed by the ldm name with dots as ``__``.
    """

    def __init__(self, unet: nn.Module, mode: str = "lora", rank: int = 256, targets: str = "attn",
                 conv_in_channels: int | None = None, names: list[str] | None = None):  # fmt: skip
        """``names``: the tensors to patch (an ``--init`` file's) instead of ``targets``'."""
        super().__init__()
        if mode not in ("lora", "diff"):
            raise ValueError(f"mode must be 'lora' or 'diff', got {mode!r}")
        self._unet = (unet,)  # not a submodule: never in DDP, never in the state
        self.mode, self.rank = mode, rank
        names = target_names(unet, mode, targets) if names is None else names
        self.names = [n for n in names if not (conv_in_channels and n == CONV_IN)]
        params = dict(unet.named_parameters())
        if conv_in_channels:
            # an SDXL layer model's widened conv_in: a full diff over [out, 4 + 4k, 3, 3], zero at
            # the start (the condition channels begin ignored, the model at the base's output)
            w = params[CONV_IN]
            self.conv_in = nn.Parameter(torch.zeros(w.shape[0], conv_in_channels, *w.shape[2:], device=w.device))
        if mode == "lora":
            self.up, self.down = nn.ParameterDict(), nn.ParameterDict()
            for n in self.names:
                w = params[n]
                self.up[self._key(n)] = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device))
                self.down[self._key(n)] = nn.Parameter(torch.randn(rank, w.shape[1], device=w.device) / rank)
        else:
            self.delta = nn.ParameterDict(
                {self._key(n): nn.Parameter(torch.zeros(params[n].shape, device=params[n].device)) for n in self.names}
            )

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    @property
    def unet(self) -> nn.Module:
        return self._unet[0]

    def effective(self) -> dict[str, torch.Tensor]:
        """``{name: W_base + delta}`` in fp32 math, cast to the base dtype (the patch merge's arithmetic)."""
        base = dict(self.unet.named_parameters())
        out = {}
        with torch.autocast(base[self.names[0]].device.type, enabled=False):
            for n in self.names:
                w = base[n]
                k = self._key(n)
                if self.mode == "lora":
                    d = torch.mm(self.up[k].float().flatten(1), self.down[k].float().flatten(1)).reshape(w.shape)
                else:
                    d = self.delta[k].float()
                out[n] = (w.float() + d).to(w.dtype)
            if hasattr(self, "conv_in"):
                # core patches.patched_tensor for a larger diff: the base in the leading slice, plus the diff
                w = base[CONV_IN]
                pad = w.new_zeros(w.shape[0], self.conv_in.shape[1] - w.shape[1], *w.shape[2:], dtype=torch.float32)
                out[CONV_IN] = (torch.cat([w.float(), pad], dim=1) + self.conv_in.float()).to(w.dtype)
        return out

    def forward(self, x, t, context=None, y=None):
        kwargs = {"context": context} if y is None else {"context": context, "y": y}
        return functional_call(self.unet, self.effective(), (x, t), kwargs)

    def export_state(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        """The official SDXL patch-file tensors (``diffusion_model.<key>::lora|diff::<i>``)."""
        state = {}
        for n in self.names:
            k, key = self._key(n), core_patches.PREFIX + n
            if self.mode == "lora":
                state[f"{key}::lora::0"] = self.up[k].detach().to(dtype)
                state[f"{key}::lora::1"] = self.down[k].detach().to(dtype)
            else:
                state[f"{key}::diff::0"] = self.delta[k].detach().to(dtype)
        if hasattr(self, "conv_in"):
            state[f"{core_patches.PREFIX}{CONV_IN}::diff::0"] = self.conv_in.detach().to(dtype)
        return state

    @torch.no_grad()
    def load_export_state(self, state: dict[str, torch.Tensor]) -> None:
        """The inverse of :meth:`export_state` (an ``--init`` file; keys and shapes checked by the caller)."""
        for n in self.names:
            k, key = self._key(n), core_patches.PREFIX + n
            if self.mode == "lora":
                self.up[k].copy_(state[f"{key}::lora::0"].float())
                self.down[k].copy_(state[f"{key}::lora::1"].float())
            else:
                self.delta[k].copy_(state[f"{key}::diff::0"].float())
        if hasattr(self, "conv_in"):
            self.conv_in.copy_(state[f"{core_patches.PREFIX}{CONV_IN}::diff::0"].float())


@dataclass(frozen=True)
class LayerMode:
    """An SDXL layer model: the frames VAE-encoded and concatenated after the noisy latent
    (the extension's ``modes.Mode.concat`` order), and the frame it generates."""

    concat: tuple[str, ...]
    target: str


LAYER_MODES = {
    "fg2ble": LayerMode(("fg",), "blend"),
    "fgble2bg": LayerMode(("fg", "blend"), "bg"),
    "bg2ble": LayerMode(("bg",), "blend"),
    "bgble2fg": LayerMode(("bg", "blend"), "fg"),
}


def _frame_latent(source: LatentSource, batch: dict, frame: str, device, transparent: bool) -> torch.Tensor:
    """A triplet frame's scaled latent: the fg's adjusted latent where it is generated
    (``transparent``), else the deterministic posterior mean of the RGB the extension encodes
    (the fg flattened on 50 % grey, bg and blend as they are)."""
    if frame == "fg" and transparent:
        return source.transparent(*(batch[k].to(device) for k in ("fg_alpha", "fg_padded", "fg_premult")))
    return source.plain(batch["fg_premult" if frame == "fg" else frame].to(device))


def _transparent_latents(source: LatentSource, batch: dict, device) -> torch.Tensor:
    """The scaled adjusted latents of an RGBA batch."""
    return source.transparent(*(batch[k].to(device) for k in ("alpha", "padded", "premult")))


def _conv_in(base: nn.Module, layer) -> int | None:
    """The widened conv_in's channels of a --layer-mode run (None: the UNet's own conv_in)."""
    return base.input_blocks[0][0].in_channels + 4 * len(layer.concat) if layer else None


def _init_names(cfg: DiffusionStageConfig, init: init_files.PatchLayout, base: nn.Module, mode: str,
                layer) -> tuple[list[str], str]:  # fmt: skip
    """The ``--init`` file's names checked against ``base`` (a meta UNet before the run, the
    loaded one after), ``--targets`` and ``--layer-mode``; returns them and the targets' name."""
    conv_in = _conv_in(base, layer)
    wanted = (
        [n for n in target_names(base, mode, cfg.targets) if not (conv_in and n == CONV_IN)] if cfg.targets else None
    )
    init_files.check_patch_names(cfg.init, init, base, wanted, cfg.targets, conv_in)
    targets = cfg.targets or "attn"
    if cfg.targets is None:  # what the file patches, named as --targets where it is one of them
        named = {t: sorted(n for n in target_names(base, mode, t) if not (conv_in and n == CONV_IN))
                 for t in ("attn", "all")}  # fmt: skip
        targets = next((t for t, n in named.items() if n == init.names), "init")
    return init.names, targets


@stage_entry
def train_diffusion_stage(cfg: DiffusionStageConfig, frozen_vae: nn.Module | None = None,
                          unet: nn.Module | None = None) -> dict:  # fmt: skip
    """Run stage 2 (single process or one torchrun rank); returns the summary."""
    if not cfg.encoder:
        raise ValueError("the diffusion stage trains on adjusted latents: give --encoder, the "
                         "transparent_encoder.safetensors of a vae-stage run (or a published encoder file)")  # fmt: skip
    layer = LAYER_MODES[cfg.layer_mode] if cfg.layer_mode else None
    if cfg.decoder and layer is not None and layer.target != "fg":
        raise UsageError(f"--decoder: --layer-mode {cfg.layer_mode} generates the {layer.target}, an image without "
                         "alpha; RGBA samples are for the transparent model (no --layer-mode) and bgble2fg")  # fmt: skip
    # --init: the file's header decides the layout (a conflicting --mode / --rank refused) before --out is made
    init = init_files.patch_layout(cfg.init, cfg.mode, cfg.rank) if cfg.init else None
    if cfg.init:
        init_files.check_layer_mode(cfg.init, cfg.layer_mode)
    mode = init.mode if init else cfg.mode or "lora"
    rank = (init.rank if init else None) or cfg.rank or 256
    if init is not None:  # its names and conv_in against --targets / --layer-mode, on the UNet's layout
        layout = layout_unet(cfg, unet)
        if layout is not None:
            _init_names(cfg, dataclasses.replace(init, names=list(init.names)), layout, mode, layer)
    info, _ = start_run(cfg)
    decoder = sampling.load_decoder(cfg.decoder, info) if cfg.decoder else None
    dataset = tdata.stage_dataset(cfg, triplets=layer is not None)
    if info.is_main:
        print(f"[diffusion] data: {tdata.describe(dataset)}", flush=True)

    def target_latents(src: LatentSource, batch: dict, device) -> torch.Tensor:
        if layer is None:
            return _transparent_latents(src, batch, device)
        return _frame_latent(src, batch, layer.target, device, transparent=True)

    frozen = frozen_parts(cfg, info, dataset, frozen_vae, unet, target_latents, "diffusion")
    source, base = frozen.source, frozen.unet
    if layer is not None and (frozen.family == "sd15" or getattr(base, "adm_in_channels", None) is None):
        raise TrainingError(f"--layer-mode {cfg.layer_mode} trains an SDXL layer model: give an SDXL --checkpoint "
                            "(or, for experiments, --unet-preset tiny-sdxl)")  # fmt: skip
    cond = Conditioning(cfg, frozen, info.device)
    schedule = frozen.schedule
    acp = schedule.alphas_cumprod.to(info.device)

    torch.manual_seed(cfg.seed)  # the same initial delta on every rank
    conv_in = _conv_in(base, layer)
    targets = cfg.targets or "attn"
    names = None
    if init is not None:
        names, targets = _init_names(cfg, init, base, mode, layer)
    delta = UNetDelta(base, mode, rank, targets if names is None else "attn", conv_in, names).to(info.device)
    if init is not None:
        init_files.load_patch(cfg.init, delta)
        if info.is_main:
            print(f"[diffusion] --init {cfg.init}: {mode} patches of {len(delta.names)} tensors"
                  + (f", rank {rank}" if mode == "lora" else "") + (", conv_in" if conv_in else ""), flush=True)  # fmt: skip

    def loss_fn(model, batch, step):
        dev = info.device
        x0 = target_latents(source, batch, dev)
        indices = [int(i) for i in batch["index"]]
        noise, t = draw_noise_and_timesteps(indices, step, cfg.seed, tuple(x0.shape[1:]))
        noise, t = noise.to(dev), t.to(dev)
        ctx, y = cond(batch, step, layer.target if layer else None)
        x_t = q_sample(x0, t, noise, acp)
        if layer is not None:  # the concat condition, as the extension feeds it at inference
            x_t = torch.cat([x_t, *(_frame_latent(source, batch, f, dev, False) for f in layer.concat)], dim=1)
        out = model(x_t, t, ctx, y)
        return F.mse_loss(out.float(), schedule.target(x0.float(), noise, t)), {}

    def sample(path: Path, batch: dict) -> None:
        """A few of the batch's prompts sampled with the trained delta; layer modes: rows =
        the condition frames, then the generated frame."""
        dev, b = info.device, sampling.first(batch)
        ctx, y = cond(b, -1, layer.target if layer else None)
        conds = [_frame_latent(source, b, f, dev, False) for f in layer.concat] if layer else []

        def model_fn(x, t):
            return delta(torch.cat([x, *conds], dim=1), t, ctx, y).float()

        n, h = len(b["index"]), cfg.size // 8
        z = sampling.ddim(model_fn, (n, 4, h, h), acp, cfg.sample_steps, cfg.seed, dev, schedule.prediction)
        pixels = sampling.decode(source.vae, torch.cat([*conds, z]), source.scale)
        sampling.save(path, sampling.grid(pixels, len(conds) + 1))
        if decoder is not None:  # the generated row is an adjusted latent: its RGBA
            rgba = sampling.decode_rgba(decoder, pixels[-n:], z, source.scale)
            sampling.save(sampling.rgba_path(path), sampling.grid(rgba, 1))

    export_file = f"layer_xl_{cfg.layer_mode}.safetensors" if layer else PATCH_FILE

    def export(out_dir: Path, step: int, meta: dict) -> Path:
        meta = {**meta, "format": "sdxl-patch", "mode": mode, "rank": str(rank), "targets": targets,
                "layer_mode": cfg.layer_mode or ""}  # fmt: skip
        return ckpt.atomic_save(delta.export_state(ckpt.DTYPES[cfg.export_dtype]), out_dir / export_file, meta)

    parts = StageParts(
        label="diffusion",
        model=delta,
        dataset=dataset,
        loss=loss_fn,
        export=export,
        eval_batch=held_out_batch(cfg, dataset, tdata.SyntheticTriplets if layer else tdata.SyntheticRGBA),
        sample=sample,
        signature={
            "stage": "diffusion",
            "mode": mode,
            "rank": rank,
            "targets": targets,
            "names": len(delta.names),
            **({"layer_mode": cfg.layer_mode} if layer else {}),
            **schedule.signature,
        },  # fmt: skip
        metadata={
            **export_metadata(source.scale, frozen.family, schedule, cfg.init),
            **({"layer_mode": cfg.layer_mode} if layer else {}),
        },  # fmt: skip
        schedule=schedule,
    )
    return run_stage(cfg, info, parts)
