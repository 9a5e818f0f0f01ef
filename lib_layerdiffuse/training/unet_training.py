"""What the two UNet stages share (paper §3.2 and §3.3): the noise schedule, per-sample
draws, the text conditioning, the frozen parts and the adjusted-latent source; the loop
itself is :func:`.runner.run`, shared with the VAE stage.

* Noise schedule: SD's DDPM "scaled linear" betas (``linspace(sqrt(8.5e-4), sqrt(1.2e-2),
  1000) ** 2``), ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``, epsilon target (Eq. 7);
  ``--prediction v`` learns ``v`` instead and ``--zero-terminal-snr`` rescales the schedule
  (:class:`NoiseSchedule`; the formulas are in :mod:`lib_layerdiffuse.schedules`).
* Every random draw of a step (timestep, noise) is a function of (seed, step, sample index)
  only, as stage 1's offset dropout: a DDP step on N ranks sees the draws one process sees
  on the combined batch, and a resumed run the draws of an uninterrupted one.
* Conditioning (:class:`Conditioning`): with ``--checkpoint``, the frozen text encoders'
  embeddings of each sample's caption (and each triplet frame's; ``--caption-dropout``
  draws from (seed, step, index, frame)). Without a text encoder each sample (and frame)
  gets a fixed random "prompt embedding" ``[tokens, context_dim]`` drawn from (seed, index,
  frame), and SDXL-style UNets (``adm_in_channels``) a fixed random ``y``.
* Latents: ``LatentSource`` encodes with the frozen VAE (posterior mean and std, unscaled)
  and applies a latent-transparency encoder exported by stage 1 as the extension does,
  ``x_a = mean + std * offset`` (λ_offset is folded into that file), then multiplies by the
  latent scale (SD1.5 0.18215, SDXL 0.13025; ``auto``: 1 / std of the training latents,
  for the stand-in VAE).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist
from safetensors import safe_open
from torch import nn

from .. import ldm_unet, schedules
from . import data as tdata
from . import dist, embeddings
from .base_checkpoint import FAMILY_NAMES, TextConditioner, load_base
from .config import UNetStageConfig
from .errors import TrainingError, UsageError
from .finite import require_finite
from .models import TrainEncoder
from .runner import Stage, autocast_factory, no_sync, run
from .vae_stage import frozen_vae_for

NUM_TIMESTEPS = schedules.NUM_TIMESTEPS
SD15_LATENT_SCALE = 0.18215

# Tiny UNets with the real ldm names (CPU tests, experiments). "tiny-sd15" has the SD1.5
# block layout: its 16 transformers sit where MODULE_MAP_SD15 expects them.
UNET_PRESETS: dict[str, dict] = {
    "tiny-sd15": dict(in_channels=4, model_channels=32, out_channels=4, num_res_blocks=2, channel_mult=(1, 1, 1, 1),
                      transformer_depth=(1, 1, 1, 0), transformer_depth_middle=1, num_heads=2, context_dim=32,
                      use_linear_in_transformer=False),
    "tiny-sdxl": dict(in_channels=4, model_channels=32, out_channels=4, num_res_blocks=(1, 2), channel_mult=(1, 2),
                      transformer_depth=(0, 2), transformer_depth_middle=1, num_head_channels=16, context_dim=32,
                      use_linear_in_transformer=True, adm_in_channels=24),
}  # fmt: skip


scaled_linear_alphas_cumprod = schedules.scaled_linear_alphas_cumprod


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` with one timestep per row."""
    return schedules.q_sample(x0, noise, alphas_cumprod.to(x0.device)[t]).to(x0.dtype)


@dataclass(frozen=True)
class NoiseSchedule:
    """The run's schedule and parameterisation: ``alphas_cumprod`` (rescaled to zero terminal
    SNR or not) and what the UNet predicts (``eps`` or ``v``)."""

    alphas_cumprod: torch.Tensor
    prediction: str = "eps"
    zero_terminal_snr: bool = False

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The UNet's training target for ``x_t = q_sample(x0, t, noise)``."""
        return schedules.target(self.prediction, x0, noise, self.alphas_cumprod.to(x0.device)[t]).to(x0.dtype)

    @property
    def summary(self) -> dict:
        return {"prediction": self.prediction, "zero_terminal_snr": self.zero_terminal_snr}

    @property
    def signature(self) -> dict:
        """Resume-state entries: only where not SD's default, so older states still resume."""
        return {} if self.summary == {"prediction": "eps", "zero_terminal_snr": False} else self.summary


def export_metadata(scale, family: str | None, schedule: NoiseSchedule, init: str | None) -> dict:
    """What both UNet stages' exports record of their run: the latent scale, the base model's family,
    the parameterisation (as metadata text) and the --init file they started from."""
    from . import init_files

    return {
        "latent_scale": repr(scale),
        "base_family": family or "stand-in",
        **{k: str(v).lower() if isinstance(v, bool) else v for k, v in schedule.summary.items()},
        **({"init": init_files.describe(init)} if init else {}),
    }


def noise_schedule(cfg: UNetStageConfig, v_pred: bool = False, ztsnr: bool = False) -> NoiseSchedule:
    """``--prediction`` / ``--zero-terminal-snr`` resolved (``auto``: the checkpoint's ``v_pred``
    / ``ztsnr`` keys, as the hosts read them; False without --checkpoint)."""
    if cfg.prediction not in ("auto", *schedules.PREDICTIONS):
        raise UsageError(f"--prediction must be auto, eps or v, got {cfg.prediction!r}")
    if cfg.zero_terminal_snr not in ("auto", "on", "off"):
        raise UsageError(f"--zero-terminal-snr must be auto, on or off, got {cfg.zero_terminal_snr!r}")
    prediction = ("v" if v_pred else "eps") if cfg.prediction == "auto" else cfg.prediction
    zero = ztsnr if cfg.zero_terminal_snr == "auto" else cfg.zero_terminal_snr == "on"
    acp = scaled_linear_alphas_cumprod()
    if zero:
        acp = schedules.rescale_zero_terminal_snr(acp)
    return NoiseSchedule(acp, prediction, zero)


def _generator(*parts: int) -> torch.Generator:
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p)) % (2**61 - 1)
    return torch.Generator().manual_seed(h)


def draw_noise_and_timesteps(indices: list[int], step: int, seed: int, shape: tuple[int, ...],
                             num_timesteps: int = NUM_TIMESTEPS) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-sample ``noise [B, *shape]`` and ``t [B]`` from (seed, step, index) alone (CPU)."""
    noise, ts = [], []
    for i in indices:
        g = _generator(seed, 7, step + 1, i)
        ts.append(int(torch.randint(0, num_timesteps, (1,), generator=g)))
        noise.append(torch.randn(shape, generator=g))
    return torch.stack(noise), torch.tensor(ts, dtype=torch.long)


def sample_context(indices: list[int], frame: int, tokens: int, dim: int, seed: int) -> torch.Tensor:
    """The fixed stand-in prompt embedding of each sample and frame: ``[B, tokens, dim]``."""
    return torch.stack([torch.randn(tokens, dim, generator=_generator(seed, 11, i, frame)) for i in indices])


def sample_y(indices: list[int], dim: int, seed: int) -> torch.Tensor:
    """The fixed stand-in SDXL ``y`` vector of each sample: ``[B, dim]``."""
    return torch.stack([torch.randn(dim, generator=_generator(seed, 13, i)) for i in indices])


def unet_context_dim(unet: nn.Module) -> int:
    for name, m in unet.named_modules():
        if name.endswith("attn2") and hasattr(m, "to_k"):
            return m.to_k.in_features
    raise ValueError("the UNet has no cross-attention (attn2) module: cannot tell its context width")


def build_unet(preset: str, seed: int) -> nn.Module:
    if preset not in UNET_PRESETS:
        raise ValueError(f"unknown --unet-preset {preset!r}; choose from {sorted(UNET_PRESETS)} or pass --unet")
    torch.manual_seed(seed + 2)
    return ldm_unet.UNetModel(**UNET_PRESETS[preset])


def layout_unet(cfg: UNetStageConfig, unet: nn.Module | None) -> nn.Module | None:
    """The base UNet's layout without its weights, for refusals before ``--out`` is made: the
    ``--unet`` hook's module, else one built on the meta device from ``--checkpoint``'s header
    or ``--unet-preset``. None where it cannot be built so: loading the model reports why."""
    if unet is not None:
        return unet
    from .base_checkpoint import UNET, CheckpointFile, unet_config

    try:
        if cfg.checkpoint:
            file = CheckpointFile(cfg.checkpoint)
            with torch.device("meta"):
                return ldm_unet.UNetModel(**unet_config(file.shapes(UNET), file.family))
        with torch.device("meta"):
            return ldm_unet.UNetModel(**UNET_PRESETS[cfg.unet_preset])
    except (TrainingError, KeyError, StopIteration, ValueError, ZeroDivisionError):
        return None


# ---------------------------------------------------------------------------------------
# Latents


def load_transparent_encoder(path: str | Path, device) -> TrainEncoder:
    """A stage-1 export (or a published encoder file) as a frozen fp32 encoder; widths read
    from the file. The file's output is the offset applied as ``mean + std * offset``."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        state = {k: f.get_tensor(k).float() for k in f.keys()}
    require_finite(state, f"--encoder {path}")
    convs = sorted(int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.endswith(".weight"))
    if len(convs) != 9 or any(c != 2 * i for i, c in enumerate(convs)):
        raise ValueError(f"{path} is not a latent-transparency encoder file (blocks.0 .. blocks.16 convs expected)")
    widths = tuple(state[f"blocks.{c}.weight"].shape[0] for c in convs[:-1])
    enc = TrainEncoder(widths)
    enc.load_state_dict(state, strict=True)
    return dist.freeze(enc.to(device))


class LatentSource:
    """Frozen VAE (+ frozen transparency encoder) -> scaled diffusion latents, no gradients."""

    def __init__(self, vae: nn.Module, encoder: nn.Module | None, scale: float = 1.0):
        self.vae, self.encoder, self.scale = vae, encoder, scale

    @torch.no_grad()
    def transparent(self, alpha: torch.Tensor, padded: torch.Tensor, premult: torch.Tensor) -> torch.Tensor:
        """The adjusted latent ``scale * (mean + std * E(alpha, padded))`` of an RGBA batch;
        without an encoder, ``scale * mean`` of the premultiplied image."""
        mean, std = self.vae.encode(premult)
        if self.encoder is not None:
            mean = mean + std * self.encoder(torch.cat([alpha, padded], dim=1))
        return self.scale * mean

    @torch.no_grad()
    def plain(self, rgb01: torch.Tensor) -> torch.Tensor:
        mean, _ = self.vae.encode(rgb01)
        return self.scale * mean


def resolve_latent_scale(value: str | float | None, have_user_vae: bool, latents_fn: Callable[[], torch.Tensor],
                         info: dist.DistInfo) -> float:  # fmt: skip
    """A number; ``auto`` = 1 / std of ``latents_fn()`` (unscaled latents), the same on every
    rank (rank 0's value is broadcast). Default: auto for the stand-in VAE, SD1.5's 0.18215
    for a user VAE (pass 0.13025 for SDXL)."""
    if value is None:
        value = SD15_LATENT_SCALE if have_user_vae else "auto"
    if str(value) != "auto":
        return float(value)
    t = torch.tensor([1.0 / float(latents_fn().float().std())], dtype=torch.float64, device=info.device)
    if info.distributed:
        torch_dist.broadcast(t, src=0)
    return float(t.item())


def stack_items(dataset, indices) -> dict:
    """Items as a batch, as the DataLoader collates them (tensors stacked, captions a list)."""
    items = [dataset[i] for i in indices]

    def collate(values):
        if isinstance(values[0], torch.Tensor):
            return torch.stack(values)
        return list(values) if isinstance(values[0], str) else torch.tensor(values)

    return {k: collate([it[k] for it in items]) for k in items[0]}


def held_out_batch(cfg: UNetStageConfig, train_set, synthetic_cls) -> dict | None:
    """The fixed held-out batch (``cfg.eval_count`` samples; None at 0): synthetic samples at
    indices never trained on (``synthetic_cls``, index shifted by ``HELD_OUT_OFFSET``), or
    the first samples of a data folder."""
    if cfg.eval_count <= 0:
        return None
    if cfg.data is None:
        held = synthetic_cls(cfg.eval_count, cfg.size, seed=cfg.seed, offset=tdata.HELD_OUT_OFFSET)
        batch = stack_items(held, range(cfg.eval_count))
        batch["index"] = batch["index"] + tdata.HELD_OUT_OFFSET
        return batch
    return stack_items(train_set, range(min(cfg.eval_count, len(train_set))))


# ---------------------------------------------------------------------------------------
# Configuration shared by both stages


def split_batch(batch: dict, k: int) -> list[dict]:
    n = len(batch["index"])
    if n % k:
        raise ValueError(f"--batch-size {n} is not a multiple of --grad-accum {k}")
    m = n // k
    return [{key: v[j * m : (j + 1) * m] for key, v in batch.items()} for j in range(k)]


@dataclass
class Frozen:
    """What a UNet stage holds frozen: latent source, base UNet, text conditioning (or None)."""

    source: LatentSource
    unet: nn.Module
    text: TextConditioner | None = None
    family: str | None = None  # sd15 | sdxl with --checkpoint
    schedule: NoiseSchedule | None = None  # --prediction / --zero-terminal-snr resolved


def frozen_parts(cfg: UNetStageConfig, info: dist.DistInfo, dataset, frozen_vae: nn.Module | None,
                 unet: nn.Module | None, latents: Callable[[LatentSource, dict, torch.device], torch.Tensor],
                 label: str) -> Frozen:  # fmt: skip
    """The frozen VAE, transparency encoder, base UNet and text encoders, on the device.

    From ``--checkpoint`` (the ``--frozen-vae``/``--unet`` hooks win where given), else the
    hooks, else the stand-ins (tiny VAE trained/loaded like stage 1, a tiny UNet preset,
    random prompt embeddings). The latent scale: ``--latent-scale``, else the checkpoint
    family's, else :func:`resolve_latent_scale` (``auto`` measures ``latents(source, batch,
    device)`` on the first 32 samples)."""
    text, family, have_vae = None, None, frozen_vae is not None
    v_pred = ztsnr = False
    if cfg.cache_embeddings and not cfg.checkpoint:
        raise UsageError("--cache-embeddings keeps the text encoders' embeddings: it needs --checkpoint")
    if cfg.checkpoint:
        parts = (["vae"] if frozen_vae is None else []) + (["unet"] if unet is None else [])
        cache = None
        if cfg.cache_embeddings:  # a file that already holds every caption: the encoders are not even loaded
            cache = embeddings.cache_path(cfg.data, cfg.out, embeddings.encoder_id(cfg.checkpoint, cfg.frozen_dtype))
        # without a cache every rank encodes its captions; filling a cache is rank 0's alone
        if cache is None or (info.is_main and not embeddings.holds(cache, dataset)):
            parts.append("text")
        base = load_base(cfg.checkpoint, cfg.frozen_dtype, parts, info.device)
        frozen_vae = base.vae if frozen_vae is None else frozen_vae
        unet = base.unet if unet is None else unet
        text, family, v_pred, ztsnr = base.text, base.family, base.v_pred, base.ztsnr
        if info.is_main:
            print(f"[{label}] {FAMILY_NAMES[family]} checkpoint {cfg.checkpoint} (frozen {cfg.frozen_dtype})"
                  + (f"; ignored {len(base.ignored)} other tensors" if base.ignored else ""), flush=True)  # fmt: skip
        if cache is not None:  # every rank takes part (rank 0 fills the file, the others wait)
            base.text = None
            text, counts = embeddings.build(text, family, dataset, cache, info)
            if info.is_main:
                print(f"[{label}] " + embeddings.describe(counts, cache), flush=True)
        if cfg.latent_scale is None:
            cfg = dataclasses.replace(cfg, latent_scale=str(base.latent_scale))
    vae = frozen_vae if frozen_vae is not None else frozen_vae_for(cfg, info)
    vae = dist.freeze(vae.to(info.device))
    encoder = load_transparent_encoder(cfg.encoder, info.device) if cfg.encoder else None
    if unet is None:
        unet = build_unet(cfg.unet_preset, cfg.seed)
    source = LatentSource(vae, encoder)

    def first_latents():
        b = stack_items(dataset, range(min(32, len(dataset))))
        return latents(source, b, info.device)

    source.scale = resolve_latent_scale(cfg.latent_scale, have_vae or cfg.checkpoint is not None, first_latents, info)
    schedule = noise_schedule(cfg, v_pred, ztsnr)
    if info.is_main:
        print(f"[{label}] prediction {schedule.prediction}, zero terminal SNR {'on' if schedule.zero_terminal_snr else 'off'}"
              + (" (from the checkpoint's keys)" if "auto" in (cfg.prediction, cfg.zero_terminal_snr) and cfg.checkpoint
                 else ""), flush=True)  # fmt: skip
    return Frozen(source, dist.freeze(unet.to(info.device)), text, family, schedule)


def _dropped(seed: int, step: int, index: int, frame: int, p: float) -> bool:
    """Caption dropout draw: a function of (seed, step, sample, frame) only, like the noise."""
    return p > 0 and step >= 0 and float(torch.rand(1, generator=_generator(seed, 17, step + 1, index, frame))) < p


class Conditioning:
    """A batch's UNet conditioning ``(context, y)``, on the device in the UNet's dtype.

    With a text encoder (``--checkpoint``): the captions (``caption`` or ``caption_<frame>``;
    ``--caption-dropout`` replaces a share with the empty prompt). Without: the fixed random
    stand-in embeddings (:func:`sample_context`, :func:`sample_y`)."""

    def __init__(self, cfg: UNetStageConfig, frozen: Frozen, device):
        self.cfg, self.text, self.device = cfg, frozen.text, device
        self.dtype = next(frozen.unet.parameters()).dtype
        self.ctx_dim = unet_context_dim(frozen.unet)
        self.adm = getattr(frozen.unet, "adm_in_channels", None)

    def captions(self, batch: dict, frame: str | None, step: int) -> list[str]:
        caps = batch["caption" if frame is None else f"caption_{frame}"]
        fid = 0 if frame is None else tdata.FRAME_NAMES.index(frame)
        indices = [int(i) for i in batch["index"]]
        p, seed = self.cfg.caption_dropout, self.cfg.seed
        return ["" if _dropped(seed, step, i, fid, p) else c for c, i in zip(caps, indices, strict=True)]

    def __call__(self, batch: dict, step: int, frame: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.text is not None:
            ctx, y = self.text(self.captions(batch, frame, step), self.cfg.size)
        else:
            indices = [int(i) for i in batch["index"]]
            fid = 0 if frame is None else tdata.FRAME_NAMES.index(frame)
            ctx = sample_context(indices, fid, self.cfg.context_tokens, self.ctx_dim, self.cfg.seed)
            y = sample_y(indices, self.adm, self.cfg.seed) if self.adm else None
        if ctx.shape[-1] != self.ctx_dim or (y is not None and y.shape[-1] != self.adm):
            raise TrainingError(f"the text encoders give context {ctx.shape[-1]} / y {None if y is None else y.shape[-1]}"
                                f", the UNet takes {self.ctx_dim} / {self.adm}: they come from different models")  # fmt: skip
        ctx = ctx.to(self.device, self.dtype)
        return ctx, None if y is None else y.to(self.device, self.dtype)


# ---------------------------------------------------------------------------------------
# The loop


@dataclass
class StageParts:
    label: str
    model: nn.Module  # the trained module, unwrapped, on the device; every parameter trains
    dataset: torch.utils.data.Dataset
    loss: Callable  # (module (maybe DDP), batch dict on CPU, step) -> (loss tensor, {name: float})
    export: Callable  # (out dir, step_done, metadata) -> Path; rank 0 only
    eval_batch: dict | None = None  # fixed held-out batch; evaluated with step -1 draws
    signature: dict = dataclasses.field(default_factory=dict)  # must match to resume
    metadata: dict = dataclasses.field(default_factory=dict)  # written into every file
    sample: Callable | None = None  # (png path, CPU batch) -> None; rank 0, see .sampling
    schedule: NoiseSchedule | None = None  # its prediction / zero-terminal-SNR go into summary.json


def evaluate(parts: StageParts) -> float | None:
    if parts.eval_batch is None:
        return None
    was = parts.model.training
    parts.model.eval()
    with torch.no_grad():
        loss, _ = parts.loss(parts.model, parts.eval_batch, -1)
    parts.model.train(was)
    return float(loss)


def _sampler(parts: StageParts):
    def sample(path: Path, done: int, batch: dict, payload) -> None:
        was = parts.model.training
        parts.model.eval()
        try:
            with torch.no_grad():
                parts.sample(path, batch)
        finally:
            parts.model.train(was)

    return sample


def run_stage(cfg: UNetStageConfig, info: dist.DistInfo, parts: StageParts) -> dict:
    """Optimise ``parts.model`` with AdamW in :func:`.runner.run` (the one training loop):
    micro-batches of ``cfg.grad_accum``, the held-out loss at start and end. Returns the summary."""
    model = parts.model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    amp = autocast_factory(cfg.precision, info.device)
    wrapped: dict[str, nn.Module] = {}

    def prepare() -> dict:  # after the resume state is loaded
        start = {"eval_loss_start": evaluate(parts) if info.is_main else None}
        if parts.schedule is not None:  # JSON string and bool (the metadata's values are strings)
            start.update(parts.schedule.summary)
        wrapped["model"] = dist.wrap(model, info)
        return start

    def step(batch: dict, step: int):
        model_t = wrapped["model"]
        micro = split_batch(batch, cfg.grad_accum)
        logs: dict[str, float] = {}
        opt.zero_grad(set_to_none=True)
        for j, mb in enumerate(micro):
            with no_sync(model_t, j == len(micro) - 1):
                with amp():
                    loss, mlogs = parts.loss(model_t, mb, step)
                (loss.float() / len(micro)).backward()
            for k, v in {"loss": float(loss.detach()), **mlogs}.items():
                logs[k] = logs.get(k, 0.0) + v / len(micro)
        opt.step()
        return logs, None

    stage = Stage(label=parts.label, dataset=parts.dataset, modules={"model": model}, optimizers={"opt": opt},
                  lrs={"opt": cfg.lr}, step=step, export=parts.export, signature=parts.signature,
                  metadata=parts.metadata, prepare=prepare, finish=lambda: {"eval_loss_end": evaluate(parts)},
                  sample=None if parts.sample is None else _sampler(parts), digest=model)  # fmt: skip
    return run(cfg, info, stage)
