"""Stage 1 (paper §3.1): train the latent-transparency encoder E and decoder D.

Against a frozen VAE (``encode(rgb01) -> (mean, std)``, ``decode(latent) -> rgb01``,
unscaled latents): the user's SD/SDXL VAE through :class:`~.models.SDVAEAdapter`, or,
where none can be downloaded, a :class:`~.models.TinyKLVAE` that this stage first trains
on synthetic RGB and then freezes.

One step, for a batch of RGBA samples (``data.prepare``):

    mean, std = VAE.encode(I)                      I = premultiplied image (frozen, no grad)
    x_eps     = lambda_offset * std * E(I_alpha, I_c)   (Eq. 2 with the paper's scaling)
    x_a       = mean + x_eps
    I_hat     = VAE.decode(x_a)                    (frozen weights, gradient flows to E)
    [a, c]    = D(clamp(I_hat, 0, 1), x_a)         (Eq. 3; 30 % of x_eps dropped if asked)
    L_vae     = 1 * L_recon + 1 * L_identity + 0.01 * L_disc          (Eq. 6)

then one step of the PatchGAN discriminator. Distributed under torchrun: E+D and the
discriminator are DDP-wrapped, the frozen VAE is not; rank 0 alone writes checkpoints,
samples and logs.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.func import functional_call

from .. import rgba as core_rgba
from .. import vae as core_vae
from . import checkpoint as ckpt
from . import data as tdata
from . import dist, init_files
from .base_checkpoint import FAMILY_NAMES, load_base
from .config import VAEStageConfig
from .finite import require_finite
from .models import PatchDiscriminator, TinyKLVAE, TrainDecoder, TrainEncoder, Widths
from .runner import Progress, Stage, autocast_factory, loader, no_sync, run, stage_entry, start_run

TINY_VAE_FILE = "tiny_vae.safetensors"


# ---------------------------------------------------------------------------------------
# Losses (images in [0, 1] in, the paper's units inside: RGB in [-1, 1], alpha in [0, 1])


def to_paper_units(alpha: torch.Tensor, rgb01: torch.Tensor) -> torch.Tensor:
    """``[alpha, 2 * rgb - 1]``: the discriminator's input, in the paper's value ranges."""
    return torch.cat([alpha, rgb01 * 2 - 1], dim=1)


def identity_loss(premult01: torch.Tensor, decoded01: torch.Tensor) -> torch.Tensor:
    """Eq. 1: ``L_identity = ||I - D*_sd(E*_sd(I) + x_eps)||^2`` (mean squared error).

    ``I`` is the premultiplied image; both arguments in [0, 1] units, the error is taken in
    the paper's [-1, 1] RGB (a factor 4 over [0, 1]).
    """
    return F.mse_loss(decoded01 * 2 - 1, premult01 * 2 - 1)


def recon_loss(raw: torch.Tensor, padded01: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Eq. 4: ``L_recon = ||I_c - I_c_hat||^2 + ||I_alpha - I_alpha_hat||^2``.

    raw: D's unclipped ``[B, 4, H, W]`` (alpha first). ``I_c`` is the padded RGB (defined
    everywhere), compared in [-1, 1]; alpha in [0, 1].
    """
    colour = F.mse_loss(raw[:, 1:4] * 2 - 1, padded01 * 2 - 1)
    return colour + F.mse_loss(raw[:, :1], alpha)


def generator_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Eq. 5, generator side: the hinge-GAN ``-E[Disc(D(...))]`` on ``[I_alpha_hat, I_c_hat]``."""
    return -logits_fake.mean()


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Eq. 5, discriminator side: hinge loss ``E[relu(1 - real)] + E[relu(1 + fake)]``."""
    return F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()


def vae_objective(l_recon, l_identity, l_disc, w_recon=1.0, w_identity=1.0, w_disc=0.01) -> torch.Tensor:
    """Eq. 6: ``L_vae = lambda_recon L_recon + lambda_identity L_identity + lambda_disc L_disc`` (1, 1, 0.01)."""
    return w_recon * l_recon + w_identity * l_identity + w_disc * l_disc


# ---------------------------------------------------------------------------------------
# The trained pair


class LatentTransparencyPair(nn.Module):
    """E and D in one module so that one DDP wrapper covers both; the frozen VAE is held
    outside the module tree (not a submodule: never replicated, never in the gradients)."""

    def __init__(self, encoder: TrainEncoder, decoder: TrainDecoder, frozen_vae: nn.Module, lambda_offset: float):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.lambda_offset = lambda_offset
        self._frozen = (frozen_vae,)  # a tuple is not registered as a submodule

    @property
    def frozen_vae(self) -> nn.Module:
        return self._frozen[0]

    def forward(self, alpha, padded, premult, keep: torch.Tensor | None = None):
        vae = self.frozen_vae
        with torch.no_grad():
            mean, std = vae.encode(premult)
        offset = self.encoder(torch.cat([alpha, padded], dim=1))
        x_eps = self.lambda_offset * std * offset
        x_a = mean + x_eps
        decoded = vae.decode(x_a)
        x_in, pixel = x_a, decoded
        if keep is not None and bool((keep < 1).any()):
            # robust decoder (§4, Fig. 15): some samples reach D without their offset
            k = keep.to(x_a.dtype).view(-1, 1, 1, 1)
            drop = (keep < 1).nonzero().flatten()
            with torch.no_grad():
                plain = decoded.detach().clone()
                plain[drop] = vae.decode(mean[drop])
            x_in = mean + x_eps * k
            pixel = decoded * k + plain * (1 - k)
        raw = self.decoder(pixel.clamp(0, 1), x_in)
        return raw, decoded, mean


def keep_mask(indices: list[int], step: int, p: float, seed: int) -> torch.Tensor | None:
    """Per-sample offset keep flags, a function of (seed, step, sample index) only, so a
    DDP step draws the same flags as one process on the combined batch."""
    if p <= 0:
        return None
    flags = []
    for i in indices:
        g = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_000_033 + int(i)) % (2**63))
        flags.append(float(torch.rand(1, generator=g).item() >= p))
    return torch.tensor(flags)


# ---------------------------------------------------------------------------------------
# Helpers


def held_out(cfg: VAEStageConfig, train_set) -> torch.utils.data.Dataset:
    """Held-out synthetic samples (indices never trained on); for folder data, its first images."""
    if isinstance(train_set, tdata.SyntheticRGBA):
        return tdata.SyntheticRGBA(cfg.eval_count, cfg.size, seed=cfg.seed, offset=tdata.HELD_OUT_OFFSET)
    return torch.utils.data.Subset(train_set, range(min(cfg.eval_count, len(train_set))))


def pretrain_tiny_vae(cfg: VAEStageConfig, info: dist.DistInfo, path: Path) -> TinyKLVAE:
    """Train the stand-in KL VAE on synthetic RGB (premultiplied and padded views), save it
    (rank 0) and return it frozen. Uses its own synthetic stream (seed + 1)."""
    torch.manual_seed(cfg.seed + 1)
    vae = TinyKLVAE(cfg.vae_width).to(info.device)
    model = dist.wrap(vae, info)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    n = max(cfg.synthetic, 256 * info.world_size)
    ds = tdata.SyntheticRGBA(n, cfg.size, seed=cfg.seed + 1)
    batches = tdata.StepBatches(len(ds), cfg.batch_size, info.rank, info.world_size, cfg.seed + 1, 0, cfg.vae_steps)
    bar = Progress(cfg.vae_steps, 0, info.is_main, cfg.log_every, "tiny-vae")
    for step, batch in enumerate(loader(ds, batches, cfg.num_workers)):
        x = torch.cat([batch["premult"], batch["padded"]]).to(info.device)
        g = torch.Generator().manual_seed(cfg.seed * 7919 + step * 1000 + info.rank)
        noise = torch.randn((x.shape[0], 4, x.shape[2] // 8, x.shape[3] // 8), generator=g).to(info.device)
        loss, rec = model(x, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(step, dist.mean_across_ranks({"loss": loss.item(), "mse": rec.item()}, info))
    bar.close()
    if info.is_main:
        ckpt.atomic_save(vae.state_dict(), path, {"width": str(cfg.vae_width), "steps": str(cfg.vae_steps)})
    dist.barrier()
    return dist.freeze(vae)


def load_tiny_vae(path: Path, device) -> TinyKLVAE:
    meta = ckpt.read_metadata(path)
    from safetensors.torch import load_file

    vae = TinyKLVAE(int(meta.get("width", 32)))
    state = load_file(str(path))
    require_finite(state, f"the stand-in VAE {path}")
    vae.load_state_dict(state, strict=True)
    return dist.freeze(vae.to(device))


def frozen_vae_for(cfg: VAEStageConfig, info: dist.DistInfo) -> nn.Module:
    path = Path(cfg.vae_path) if cfg.vae_path else Path(cfg.out) / TINY_VAE_FILE
    if path.exists():
        return load_tiny_vae(path, info.device)
    pretrain_tiny_vae(cfg, info, path)
    return load_tiny_vae(path, info.device)  # every rank reads rank 0's file: identical weights


def save_sample_grid(path: Path, batch: dict, raw: torch.Tensor, decoded: torch.Tensor, n: int = 4) -> Path:
    """Rows: target RGBA, D's RGBA, frozen VAE decode; RGBA shown over the checkerboard."""
    n = min(n, raw.shape[0])
    rows = [[], [], []]
    for i in range(n):
        target = batch["rgba"][i].permute(1, 2, 0).numpy()
        rows[0].append(core_rgba.checkerboard_preview(target))
        rows[1].append(core_rgba.checkerboard_preview(core_rgba.from_decoder(raw[i])))
        rows[2].append(decoded[i].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy())
    grid = np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)
    grid = np.concatenate([grid, np.ones_like(grid[..., :1])], axis=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    return core_rgba.write_png(path, grid)


@torch.no_grad()
def evaluate(pair: LatentTransparencyPair, dataset, device, batch_size: int = 8) -> dict[str, float]:
    """Alpha PSNR, colour PSNR (alpha-weighted, visible pixels), L_identity and the frozen
    VAE's own reconstruction error ``||I - D_sd(E_sd(I))||^2`` (both in [-1, 1] units)."""
    pair.eval()
    se_a = se_c = w_c = ident = own = 0.0
    count = 0
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        b = {k: torch.stack([it[k] for it in items]).to(device) for k in ("alpha", "padded", "premult")}
        raw, decoded, mean = pair(b["alpha"], b["padded"], b["premult"])
        y = raw.clamp(0, 1)
        se_a += float(((y[:, :1] - b["alpha"]) ** 2).sum()) / b["alpha"][0].numel()
        wa = b["alpha"]
        se_c += float((((y[:, 1:] - b["padded"]) ** 2) * wa).sum())
        w_c += float(wa.sum()) * 3
        ident += float(identity_loss(b["premult"], decoded)) * len(items)
        own += float(identity_loss(b["premult"], pair.frozen_vae.decode(mean))) * len(items)
        count += len(items)
    pair.train()
    mse_a, mse_c = se_a / count, se_c / max(w_c, 1e-9)
    return {
        "alpha_psnr": 10 * math.log10(1 / max(mse_a, 1e-12)),
        "colour_psnr": 10 * math.log10(1 / max(mse_c, 1e-12)),
        "identity": ident / count,
        "vae_own_error": own / count,
    }


# ---------------------------------------------------------------------------------------
# One optimisation step


def _checkpointed(forward, *args):
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False)


def enable_gradient_checkpointing(module: nn.Module) -> int:
    """Recompute every resnet and attention block of ``module`` in the backward pass
    (activation memory for compute). Whole up blocks are not checkpointed: they pop their
    skips from a shared list, which a recomputation would pop twice. Returns the count."""
    n = 0
    for m in module.modules():
        if isinstance(m, (core_vae.ResnetBlock, core_vae.SelfAttention)):
            m.forward = functools.partial(_checkpointed, m.forward)
            n += 1
    return n


def _step(cfg, info, pair_t, disc, disc_t, opt_g, opt_d, alpha, padded, premult, keep, use_disc, amp):
    """E+D step then discriminator step over ``cfg.grad_accum`` micro-batches.

    Returns (averaged logs, raw and decoded of the first micro-batch on the CPU)."""
    k = cfg.grad_accum
    if alpha.shape[0] % k:
        raise ValueError(f"--batch-size {alpha.shape[0]} is not a multiple of --grad-accum {k}")
    micro = alpha.shape[0] // k
    parts = list(zip(alpha.split(micro), padded.split(micro), premult.split(micro), strict=True))
    keeps = keep.to(info.device).split(micro) if keep is not None else [None] * k
    logs = {"loss": 0.0, "recon": 0.0, "identity": 0.0, "adv": 0.0}
    fakes, first = [], None
    opt_g.zero_grad(set_to_none=True)
    for j, ((a, p, m), kp) in enumerate(zip(parts, keeps, strict=True)):
        with no_sync(pair_t, j == k - 1):
            with amp():
                raw, decoded, _ = pair_t(a, p, m, kp)
            raw, decoded = raw.float(), decoded.float()  # losses in fp32
            l_id = identity_loss(m, decoded)
            l_rec = recon_loss(raw, p, a)
            fake = to_paper_units(raw[:, :1], raw[:, 1:4])
            if use_disc:
                # the discriminator's weights as constants: gradients reach E and D only
                frozen_params = {n: v.detach() for n, v in disc.named_parameters()}
                with amp():
                    logits = functional_call(disc, frozen_params, (fake,))
                l_adv = generator_adversarial_loss(logits.float())
            else:
                l_adv = raw.new_zeros(())
            loss = vae_objective(l_rec, l_id, l_adv, cfg.w_recon, cfg.w_identity, cfg.w_disc)
            (loss / k).backward()
        for name, v in (("loss", loss), ("recon", l_rec), ("identity", l_id), ("adv", l_adv)):
            logs[name] += v.item() / k
        fakes.append(fake.detach())
        if first is None:
            first = (raw.detach().cpu(), decoded.detach().cpu())
    opt_g.step()
    if use_disc:
        opt_d.zero_grad(set_to_none=True)
        logs["disc"] = 0.0
        for j, ((a, p, _), f) in enumerate(zip(parts, fakes, strict=True)):
            with no_sync(disc_t, j == k - 1):
                real = to_paper_units(a, p)
                with amp():
                    logits = disc_t(torch.cat([real, f])).float()  # one forward per backward (DDP)
                l_d = discriminator_loss(logits[: real.shape[0]], logits[real.shape[0] :])
                (l_d / k).backward()
            logs["disc"] += l_d.item() / k
        opt_d.step()
    return logs, first[0], first[1]


# ---------------------------------------------------------------------------------------
# The stage


@stage_entry
def train_vae_stage(cfg: VAEStageConfig, frozen_vae: nn.Module | None = None) -> dict:
    """Run the stage (single process, or one rank of a torchrun job). Returns a summary."""
    widths = Widths.named(cfg.widths)
    if cfg.size % widths.multiple:
        raise ValueError(f"--size {cfg.size} must be a multiple of {widths.multiple} for the {cfg.widths} decoder")
    inits = [(p, f, r, c) for p, f, r, c in ((cfg.init_encoder, "--init-encoder", "encoder", TrainEncoder),
                                             (cfg.init_decoder, "--init-decoder", "decoder", TrainDecoder)) if p]  # fmt: skip
    for path, flag, role, cls in inits:  # the headers, before --out is made
        with torch.device("meta"):
            module = cls(widths.encoder) if role == "encoder" else cls(widths.decoder, widths.decoder_attn_from)
        init_files.check_vae_file(path, flag, role, module)
    info, out = start_run(cfg)
    dataset = tdata.stage_dataset(cfg)
    if info.is_main:
        print(f"[vae] data: {tdata.describe(dataset)}", flush=True)

    if frozen_vae is None and cfg.checkpoint:
        base = load_base(cfg.checkpoint, cfg.frozen_dtype, ("vae",), info.device)
        frozen_vae = base.vae
        if info.is_main:
            print(f"[vae] frozen VAE of the {FAMILY_NAMES[base.family]} checkpoint {cfg.checkpoint}", flush=True)
    if frozen_vae is None:
        frozen_vae = frozen_vae_for(cfg, info)
    frozen_vae = dist.freeze(frozen_vae.to(info.device))

    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    encoder, decoder = TrainEncoder(widths.encoder), TrainDecoder(widths.decoder, widths.decoder_attn_from)
    for path, flag, role, _ in inits:
        if role == "encoder":  # a file's last conv holds lambda_offset (checkpoint.encoder_export_state)
            init_files.load_vae_file(path, flag, role, encoder, cfg.lambda_offset)
        else:
            init_files.load_vae_file(path, flag, role, decoder)
        if info.is_main:
            print(f"[vae] {flag} {path}", flush=True)
    pair = LatentTransparencyPair(encoder, decoder, frozen_vae, cfg.lambda_offset).to(info.device)
    disc = PatchDiscriminator(4, cfg.disc_width).to(info.device)
    opt_g = torch.optim.AdamW(pair.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr or cfg.lr, eps=cfg.adam_eps)
    amp = autocast_factory(cfg.precision, info.device)
    wrapped: dict[str, nn.Module] = {}
    eval_set = held_out(cfg, dataset) if cfg.eval_count > 0 else None

    def prepare() -> dict:  # after the resume state is loaded
        if cfg.grad_checkpointing:
            enable_gradient_checkpointing(decoder)
        wrapped["pair"], wrapped["disc"] = dist.wrap(pair, info), dist.wrap(disc, info)
        return {}

    def step(batch: dict, step: int):
        alpha, padded, premult = (batch[k].to(info.device) for k in ("alpha", "padded", "premult"))
        keep = keep_mask([int(i) for i in batch["index"]], step, cfg.offset_dropout, cfg.seed)
        use_disc = cfg.w_disc > 0 and step >= cfg.disc_start
        logs, raw, decoded = _step(cfg, info, wrapped["pair"], disc, wrapped["disc"], opt_g, opt_d, alpha, padded,
                                   premult, keep, use_disc, amp)  # fmt: skip
        return logs, (raw, decoded)

    def export(out_dir: Path, done: int, meta: dict) -> None:
        ckpt.export(encoder, decoder, out_dir, cfg.lambda_offset, cfg.export_dtype, meta)

    stage = Stage(
        label="vae",
        dataset=dataset,
        modules={"pair": pair, "disc": disc},
        optimizers={"g": opt_g, "d": opt_d},
        lrs={"g": cfg.lr, "d": cfg.disc_lr or cfg.lr},
        step=step,
        export=export,
        signature={"stage": "vae", "widths": widths.as_dict()},
        metadata={
            "widths": json.dumps(widths.as_dict()),
            **{flag.lstrip("-"): init_files.describe(path) for path, flag, _, _ in inits},
        },  # fmt: skip
        prepare=prepare,
        sample=lambda path, done, batch, payload: save_sample_grid(path, batch, *payload),
        finish=lambda: evaluate(pair, eval_set, info.device) if eval_set is not None else {},
        digest=pair,
    )
    return run(cfg, info, stage)
