"""Stage 3 (paper §3.3, Eq. 8-9): per-frame LoRAs with attention sharing on a frozen SD1.5 UNet.

A batch of B triplets becomes ``B * F`` UNet rows in groups of F consecutive frames (e.g.
``[fg, bg]`` or ``[fg, bg, blend]``), the layout the extension's SD1.5 modes sample with.
Every attn1/attn2 of the 16 SD1.5 transformers is replaced by an attention-sharing unit
(:mod:`lib_layerdiffuse.attention_sharing`): frame f's projections get LoRA f, and a
cross-frame ("temporal") attention mixes the frames at each token. One timestep per group;
the joint loss of Eq. 9 is ``|| [eps_f, eps_b, ...] - eps_theta(x_f, x_b, ..., t, c) ||^2``.

Latents: fg = the adjusted latent of the fg RGBA (frozen VAE + stage-1 encoder, as stage 2;
without ``--encoder`` the plain VAE mean of the premultiplied fg), bg and blend = the frozen
VAE's mean. Conditioning: a fixed random prompt embedding per sample and frame.

Conditional variants (``--condition fg|bg``):

* ``--condition-via latent`` (the paper): the condition frame stays in the group with
  ``eps = 0`` ("always eps_f = 0"): its input is ``sqrt(abar_t) x_f`` and its target 0.
* ``--condition-via control`` (the official SD1.5 fg2bg / bg2fg files): the condition image
  (fg flattened on grey, or bg) goes through the control encoder (``kwargs_encoder``) and
  every unit's ``control_convs``; the group holds the other frames only (fg2bg: ``[bg,
  blend]``, bg2fg: ``[fg, blend]``).

Trained: every unit's LoRAs (``down ~ N(0, 1/r)``, ``up = 0``), its temporal layers
(``temporal_o`` zero-initialised, so training starts at the base UNet) and, with control,
the control encoder and convs (last conv zero-initialised). The export is exactly the
official SD1.5 layout (``hookers.layers.N.*``, ``kwargs_encoder.*`` with control) and loads
into :class:`~lib_layerdiffuse.attention_sharing.AttentionSharing` with ``strict=True``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from .. import attention_sharing as sharing
from . import checkpoint as ckpt
from . import data as tdata
from . import init_files, sampling
from .config import LayersStageConfig
from .errors import UsageError
from .runner import stage_entry, start_run
from .unet_training import (
    Conditioning,
    LatentSource,
    StageParts,
    draw_noise_and_timesteps,
    export_metadata,
    frozen_parts,
    held_out_batch,
    q_sample,
    run_stage,
)

SHARING_FILE = "attention_sharing.safetensors"
FRAME_IDS = {name: i for i, name in enumerate(tdata.FRAME_NAMES)}
# the official file a set-up corresponds to (frames in the UNet group, control frame)
OFFICIAL_NAMES = {
    (("fg",), None): "layer_sd15_transparent_attn",
    (("fg", "bg", "blend"), None): "layer_sd15_joint",
    (("bg", "blend"), "fg"): "layer_sd15_fg2bg",
    (("fg", "blend"), "bg"): "layer_sd15_bg2fg",
}


class TrainableSharingUnit(sharing.AttentionSharingUnit):
    """The core unit with a differentiable forward: the merged per-frame weights and the
    control features are recomputed with gradients on every call (the core caches them
    under ``no_grad`` for sampling). Same parameters, same names, same arithmetic."""

    def _merged_weights(self, name: str, dtype, device):
        org = self.original_module[0].to_out[0] if name == "to_out" else getattr(self.original_module[0], name)
        base = org.weight.to(device, torch.float32)
        w = torch.stack([base + m.up.weight.float() @ m.down.weight.float() for m in getattr(self, f"{name}_lora")])
        w = w.transpose(1, 2).to(dtype)
        return w, None if org.bias is None else org.bias.to(device, dtype)

    def _control(self, tokens: int, dtype, device) -> torch.Tensor:
        """``[F, B, tokens, C]``: one control image per group (signals ``[B, 256, h, w]``)."""
        if self.control_signals is None or tokens not in self.control_signals:
            raise RuntimeError(f"no control signal for {tokens} tokens; the model sets them in forward()")
        sig = self.control_signals[tokens].to(device)
        return torch.stack([conv(sig).flatten(2).transpose(1, 2) for conv in self.control_convs]).to(dtype)


class LayerSharingModel(nn.Module):
    """The trained modules with the official state layout (``hookers.layers.N``,
    ``kwargs_encoder``), installed into a frozen SD1.5-layout UNet that it does not own.

    ``forward(x, t, context, control=None)``: ``x [B*F, 4, h, w]`` in groups of F frames,
    ``control [B, 3, H, W]`` in [0, 1] (one image per group; with ``use_control``).
    """

    def __init__(self, unet: nn.Module, frames: int, use_control: bool, rank: int = sharing.RANK):
        super().__init__()
        missing = [n for n in sharing.MODULE_MAP_SD15 if not sharing._has_submodule(unet, n)]
        if missing:
            raise ValueError(f"the UNet lacks {len(missing)} of the 32 SD1.5 attention modules (e.g. {missing[0]}): "
                             "the layers stage needs an SD1.5-layout UNet (e.g. --unet-preset tiny-sd15)")  # fmt: skip
        self._unet = (unet,)
        self.frames = frames
        self.state = sharing.SharingState()
        originals = [unet.get_submodule(n) for n in sharing.MODULE_MAP_SD15]
        if any(isinstance(m, sharing.AttentionSharingUnit) for m in originals):
            raise RuntimeError("the UNet already holds attention-sharing units")
        self._originals = originals
        units = [TrainableSharingUnit(m, frames, use_control, rank, self.state) for m in originals]
        self.hookers = nn.Module()
        self.hookers.layers = nn.ModuleList(units)
        self.kwargs_encoder = sharing.ControlEncoder() if use_control else None
        with torch.no_grad():
            for u in units:
                for name in ("to_q", "to_k", "to_v", "to_out"):
                    for lora in getattr(u, f"{name}_lora"):
                        nn.init.normal_(lora.down.weight, std=1.0 / rank)
                        nn.init.zeros_(lora.up.weight)
                nn.init.zeros_(u.temporal_o.weight)
                nn.init.zeros_(u.temporal_o.bias)
                if u.control_convs is not None:
                    for conv in u.control_convs:
                        nn.init.zeros_(conv[2].weight)
                        nn.init.zeros_(conv[2].bias)
        self.install()

    @property
    def unet(self) -> nn.Module:
        return self._unet[0]

    def install(self) -> None:
        for name, unit in zip(sharing.MODULE_MAP_SD15, self.hookers.layers, strict=True):
            parent, _, attr = name.rpartition(".")
            setattr(self.unet.get_submodule(parent), attr, unit)

    def restore(self) -> None:
        for name, original in zip(sharing.MODULE_MAP_SD15, self._originals, strict=True):
            parent, _, attr = name.rpartition(".")
            setattr(self.unet.get_submodule(parent), attr, original)

    def forward(self, x, t, context, control=None):
        if self.kwargs_encoder is not None:
            if control is None:
                raise ValueError("this model was built with control: pass the condition image")
            signals = self.kwargs_encoder(control * 2.0 - 1.0)
            for u in self.hookers.layers:
                u.set_control_signals(signals)
        dtype = self.unet.time_embed[0].weight.dtype
        # a fp16/bf16 frozen base (--frozen-dtype): the fp32 trained layers run in its dtype
        amp = torch.autocast(x.device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        try:
            with amp:
                return self.unet(x, t, context)
        finally:
            for u in self.hookers.layers:
                u.set_control_signals(None)


def frame_layout(cfg: LayersStageConfig) -> tuple[list[str], str | None, str | None]:
    """(frames in each UNet group, the eps = 0 frame or None, the control frame or None)."""
    frames = [f.strip() for f in cfg.frames.split(",") if f.strip()]
    if not frames or len(set(frames)) != len(frames) or any(f not in FRAME_IDS for f in frames):
        raise ValueError(f"--frames must list distinct names out of fg, bg, blend; got {cfg.frames!r}")
    cond = None if cfg.condition in (None, "none") else cfg.condition
    if cond is None:
        return frames, None, None
    if cond not in ("fg", "bg") or cond not in frames:
        raise ValueError(f"--condition {cond} must be fg or bg and one of --frames {cfg.frames}")
    if cfg.condition_via == "latent":
        if len(frames) < 2:
            raise ValueError("a condition frame needs at least one other frame to generate")
        return frames, cond, None
    if cfg.condition_via == "control":
        rest = [f for f in frames if f != cond]
        if not rest:
            raise ValueError("with --condition-via control the condition frame leaves the group: add another frame")
        return rest, None, cond
    raise ValueError(f"--condition-via must be latent or control, got {cfg.condition_via!r}")


def _frame_latents(source: LatentSource, batch: dict, frames: list[str], device) -> torch.Tensor:
    """``[B, F, 4, h, w]`` scaled latents of the named frames."""
    out = []
    for f in frames:
        if f == "fg":
            out.append(source.transparent(*(batch[k].to(device) for k in ("fg_alpha", "fg_padded", "fg_premult"))))
        else:
            out.append(source.plain(batch[f].to(device)))
    return torch.stack(out, dim=1)


@stage_entry
def train_layers_stage(cfg: LayersStageConfig, frozen_vae: nn.Module | None = None,
                       unet: nn.Module | None = None) -> dict:  # fmt: skip
    """Run stage 3 (single process or one torchrun rank); returns the summary."""
    frames, eps_zero, control = frame_layout(cfg)
    if cfg.decoder and "fg" not in frames:
        raise UsageError(f"--decoder: the frames sampled here ({', '.join(frames)}) have no alpha; RGBA samples "
                         "need fg among the generated frames")  # fmt: skip
    # --init: the file's LoRA rank (a conflicting --rank refused) from its header, before --out is made
    rank = init_files.sharing_rank(cfg.init, cfg.rank) if cfg.init else cfg.rank or sharing.RANK
    info, _ = start_run(cfg)
    decoder = sampling.load_decoder(cfg.decoder, info) if cfg.decoder else None
    dataset = tdata.stage_dataset(cfg, triplets=True, fg_only=frames == ["fg"] and control is None)
    if info.is_main:
        print(f"[layers] data: {tdata.describe(dataset)}", flush=True)
        if decoder is not None and not cfg.encoder:
            print("[layers] note: --decoder without --encoder: the fg frame learns plain latents (no transparency "
                  "offset), so the alpha of the RGBA samples means nothing; give the vae stage's encoder",
                  flush=True)  # fmt: skip

    def latents(src: LatentSource, batch: dict, device) -> torch.Tensor:
        return _frame_latents(src, batch, frames, device)

    frozen = frozen_parts(cfg, info, dataset, frozen_vae, unet, latents, "layers")
    source, base = frozen.source, frozen.unet
    cond = Conditioning(cfg, frozen, info.device)
    schedule = frozen.schedule
    acp = schedule.alphas_cumprod.to(info.device)
    nf = len(frames)
    zero_at = frames.index(eps_zero) if eps_zero else None

    torch.manual_seed(cfg.seed)  # the same initial modules on every rank
    model = LayerSharingModel(base, nf, control is not None, rank).to(info.device)
    if cfg.init:
        layout = f"--frames {','.join(frames)}" + (
            f" with --condition {control} --condition-via control" if control else ""
        )
        try:
            init_files.load_sharing(cfg.init, model, layout)
        except BaseException:
            model.restore()
            raise
        if info.is_main:
            print(f"[layers] --init {cfg.init}: rank {rank}", flush=True)

    def loss_fn(m, batch, step):
        dev = info.device
        x0 = _frame_latents(source, batch, frames, dev)  # [B, F, 4, h, w]
        b = x0.shape[0]
        indices = [int(i) for i in batch["index"]]
        noise, t = draw_noise_and_timesteps(indices, step, cfg.seed, tuple(x0.shape[1:]))
        if zero_at is not None:
            noise[:, zero_at] = 0.0  # the condition frame: eps = 0, a clean (scaled) latent
        noise, t = noise.to(dev).flatten(0, 1), t.to(dev).repeat_interleave(nf)
        ctx = torch.stack([cond(batch, step, f)[0] for f in frames], dim=1).flatten(0, 1)
        cimg = None
        if control is not None:
            cimg = (batch["fg_premult"] if control == "fg" else batch["bg"]).to(dev)
        x0 = x0.flatten(0, 1)
        out = m(q_sample(x0, t, noise, acp), t, ctx, cimg)
        # eps: the condition frame's target is its eps = 0; v: that frame's v with eps = 0
        per_frame = (out.float() - schedule.target(x0.float(), noise, t)).pow(2).reshape(b, nf, -1).mean(dim=(0, 2))
        logs = {f"mse_{f}": float(v) for f, v in zip(frames, per_frame.detach(), strict=True)}
        return per_frame.mean(), logs

    def sample(path: Path, batch: dict) -> None:
        """A few of the batch's prompts sampled as groups of frames; rows = frames. (With an
        eps = 0 condition frame that frame is sampled too, not held at the condition.)"""
        dev, b = info.device, sampling.first(batch)
        n, h = len(b["index"]), cfg.size // 8
        ctx = torch.stack([cond(b, -1, f)[0] for f in frames], dim=1).flatten(0, 1)
        cimg = None
        if control is not None:
            cimg = (b["fg_premult"] if control == "fg" else b["bg"]).to(dev)
        z = sampling.ddim(lambda x, t: model(x, t, ctx, cimg).float(), (n * nf, 4, h, h), acp, cfg.sample_steps,
                          cfg.seed, dev, schedule.prediction)  # fmt: skip
        rows = z.view(n, nf, *z.shape[1:]).transpose(0, 1).flatten(0, 1)
        pixels = sampling.decode(source.vae, rows, source.scale)
        sampling.save(path, sampling.grid(pixels, nf))
        if decoder is not None:  # the fg row: adjusted latents (with --encoder), decoded to RGBA
            fg = slice(frames.index("fg") * n, (frames.index("fg") + 1) * n)
            rgba = sampling.decode_rgba(decoder, pixels[fg], rows[fg], source.scale)
            sampling.save(sampling.rgba_path(path), sampling.grid(rgba, 1))

    def export(out_dir: Path, step: int, meta: dict) -> Path:
        state = {k: v.detach().to(ckpt.DTYPES[cfg.export_dtype]) for k, v in model.state_dict().items()}
        return ckpt.atomic_save(state, out_dir / SHARING_FILE, {**meta, **layout_meta})

    official = OFFICIAL_NAMES.get((tuple(frames), control)) if eps_zero is None else None
    layout_meta = {"format": "sd15-attention-sharing", "frames": ",".join(frames), "control": control or "",
                   "eps_zero_frame": eps_zero or "", "rank": str(rank),
                   "official_counterpart": official or ""}  # fmt: skip
    parts = StageParts(
        label="layers",
        model=model,
        dataset=dataset,
        loss=loss_fn,
        export=export,
        eval_batch=held_out_batch(cfg, dataset, tdata.SyntheticTriplets),
        sample=sample,
        signature={
            "stage": "layers",
            "frames": frames,
            "control": control,
            "eps_zero": eps_zero,
            "rank": rank,
            **schedule.signature,
        },  # fmt: skip
        metadata={
            **export_metadata(source.scale, frozen.family, schedule, cfg.init),
            **layout_meta,
        },  # fmt: skip
        schedule=schedule,
    )
    try:
        return run_stage(cfg, info, parts)
    finally:
        model.restore()
