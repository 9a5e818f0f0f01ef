"""Command line for training: ``python -m lib_layerdiffuse.train <stage> ...``.

Stages: ``vae`` (paper §3.1, latent-transparency encoder/decoder), ``diffusion`` (§3.2,
UNet fine-tune on adjusted latents, SDXL patch-file export) and ``layers`` (§3.3, per-frame
LoRAs with attention sharing, SD1.5 attention-sharing export).

The same command runs in one process, or distributed under torchrun:

    python -m lib_layerdiffuse.train vae --synthetic 2048 --out runs/vae --steps 2000
    python -m lib_layerdiffuse.train diffusion --synthetic 2048 --out runs/diff \
        --encoder runs/vae/transparent_encoder.safetensors --vae-path runs/vae/tiny_vae.safetensors
    python -m lib_layerdiffuse.train layers --synthetic 2048 --out runs/joint --frames fg,bg,blend
    torchrun --nproc_per_node 2 -m lib_layerdiffuse.train vae --synthetic 2048 --out runs/vae

``--batch-size`` is per process: the global batch is ``batch_size * world_size``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading


def _frozen_vae_options(p) -> None:
    """The frozen VAE: a user callable, or the stand-in tiny VAE (all stages)."""
    p.add_argument("--frozen-vae", metavar="MODULE:FUNC",
                   help="callable returning the frozen VAE (encode -> (mean, std), decode); e.g. an SDVAEAdapter")  # fmt: skip
    p.add_argument("--vae-path", help="stand-in tiny VAE file (default <out>/tiny_vae.safetensors, trained if absent)")
    p.add_argument("--vae-width", type=int, default=32)
    p.add_argument("--vae-steps", type=int, default=1000, help="pre-training steps of the tiny VAE")
    p.add_argument("--vae-lr", type=float, default=1e-3)


def _runtime_options(p) -> None:
    """Data loading, export, resume, device and precision options (all stages)."""
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers per process")
    p.add_argument("--export-dtype", choices=["fp16", "fp32", "bf16"], default="fp16")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="ignore <out>/train_state.safetensors")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dist-timeout", type=float, default=1800.0, help="seconds a rank waits for a dead peer")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (batch-size must divide)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast the forwards")


def _vae_parser(sub) -> None:
    p = sub.add_parser("vae", help="train the latent-transparency encoder and decoder (paper §3.1)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="folder of RGBA images (PNG/WebP with alpha, any size)")
    src.add_argument("--synthetic", type=int, metavar="N", help="use N generated RGBA samples instead")
    p.add_argument("--out", required=True, help="output folder: exports, train_state, samples, logs")
    p.add_argument("--steps", type=int, default=1000, help="total optimiser steps (a resumed run continues to this)")
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--size", type=int, default=64, help="training side in pixels (multiple of 64 at full width)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate of E and D (paper: 1e-5)")
    p.add_argument("--disc-lr", type=float, default=None, help="discriminator learning rate (default: --lr)")
    p.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW eps (larger: gentler steps for tiny gradients)")
    p.add_argument("--lambda-offset", type=float, default=1e-2, help="offset scale (folded into the export)")
    p.add_argument("--offset-dropout", type=float, default=0.0, help="drop this share of offsets (0.3: robust decoder)")
    p.add_argument("--w-recon", type=float, default=1.0)
    p.add_argument("--w-identity", type=float, default=1.0)
    p.add_argument("--w-disc", type=float, default=0.01)
    p.add_argument("--disc-start", type=int, default=0, help="first step with the adversarial loss")
    p.add_argument(
        "--widths",
        choices=["full", "small", "tiny"],
        default="full",
        help="full = the official shapes (exportable to the extension); small/tiny: CPU experiments, tests",
    )
    p.add_argument("--disc-width", type=int, default=64, help="PatchGAN base channels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--sample-every", type=int, default=500, help="sample grid PNG every N steps (0: never)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-count", type=int, default=16, help="held-out samples evaluated at the end")
    _frozen_vae_options(p)
    _runtime_options(p)
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute D's blocks in backward (less memory)")
    p.add_argument("--trace-dir", default=None, help="write per-rank step traces (indices, losses, param digest)")


def _unet_common(p):
    """Options shared by the diffusion and layers stages."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", type=int, metavar="N", help="use N generated samples")
    p.add_argument("--out", required=True, help="output folder: export, train_state, metrics, summary")
    p.add_argument("--steps", type=int, default=1000, help="total optimiser steps (a resumed run continues to this)")
    p.add_argument("--batch-size", type=int, default=4, help="per process (samples; layers: groups of frames)")
    p.add_argument("--size", type=int, default=64, help="training side in pixels (the latent is size/8)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (paper: 1e-5)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW eps (larger: gentler steps for tiny gradients)")
    p.add_argument("--rank", type=int, default=256, help="LoRA rank (paper and official files: 256)")
    p.add_argument("--encoder", help="latent-transparency encoder file (a vae-stage transparent_encoder.safetensors)")
    p.add_argument("--latent-scale", default=None,
                   help="VAE scaling factor, or 'auto' (1/std of the training latents); default: auto for the "
                        "stand-in VAE, 0.18215 (SD1.5) with --frozen-vae (SDXL: 0.13025)")  # fmt: skip
    p.add_argument("--unet", metavar="MODULE:FUNC", help="callable returning the base UNet (ldm parameter names)")
    p.add_argument("--unet-preset", default="tiny-sd15", help="tiny UNet used without --unet: tiny-sd15 | tiny-sdxl")
    p.add_argument("--context-tokens", type=int, default=77, help="tokens of the stand-in prompt embeddings")
    _frozen_vae_options(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-count", type=int, default=8, help="held-out samples for the start/end eval loss")
    _runtime_options(p)
    p.add_argument("--trace-dir", default=None, help="write per-rank step traces (indices, losses, param digest)")
    return src


def _diffusion_parser(sub) -> None:
    p = sub.add_parser("diffusion", help="fine-tune the UNet on adjusted latents (paper §3.2), SDXL patch export")
    src = _unet_common(p)
    src.add_argument("--data", help="folder of RGBA images (PNG/WebP with alpha, any size)")
    p.add_argument(
        "--mode", choices=["lora", "diff"], default="lora", help="LoRA (::lora::) or full offsets (::diff::)"
    )
    p.add_argument("--targets", choices=["attn", "all"], default="attn",
                   help="attn: to_q/to_k/to_v/to_out.0 of every attention; all: every Linear (lora) or tensor (diff)")  # fmt: skip


def _layers_parser(sub) -> None:
    p = sub.add_parser("layers", help="per-frame LoRAs with attention sharing (paper §3.3), SD1.5 layout export")
    src = _unet_common(p)
    src.add_argument("--data", help="folder with fg/ (RGBA), bg/ and blend/ (RGB) images of matching names")
    p.add_argument("--frames", default="fg,bg", help="frames of a group, in order: fg,bg or fg,bg,blend (joint)")
    p.add_argument("--condition", choices=["none", "fg", "bg"], default="none",
                   help="fg: a fg-conditioned bg generator (eps_f = 0); bg: the reverse")  # fmt: skip
    p.add_argument("--condition-via", choices=["latent", "control"], default="latent",
                   help="latent: the paper's clean condition frame in the group; control: the official "
                        "fg2bg/bg2fg layout (condition image through kwargs_encoder, frame leaves the group)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lib_layerdiffuse.train", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True, metavar="{vae,diffusion,layers}")
    _vae_parser(sub)
    _diffusion_parser(sub)
    _layers_parser(sub)
    return parser


def _load_callable(spec: str, flag: str = "--frozen-vae"):
    mod, _, fn = spec.partition(":")
    if not fn:
        raise SystemExit(f"{flag} needs MODULE:FUNC, got {spec!r}")
    return getattr(importlib.import_module(mod), fn)


def _on_sigterm(signum, frame):
    # torchrun sends SIGTERM to the surviving ranks when one dies; raising (instead of the
    # default silent death) runs the cleanup: a half-written temporary checkpoint is removed
    rank = os.environ.get("RANK", "0")
    print(f"[train] rank {rank}: stopped by SIGTERM (a peer process failed or the job was cancelled); "
          "the last complete checkpoint in --out is intact and resumable", file=sys.stderr, flush=True)  # fmt: skip
    raise SystemExit(128 + signum)


def _config(args):
    """The stage's config dataclass and its train function."""
    if args.stage == "vae":
        from .training.vae_stage import VAEStageConfig as cls
        from .training.vae_stage import train_vae_stage as fn
    elif args.stage == "diffusion":
        from .training.diffusion_stage import DiffusionStageConfig as cls
        from .training.diffusion_stage import train_diffusion_stage as fn
    else:
        from .training.layers_stage import LayersStageConfig as cls
        from .training.layers_stage import train_layers_stage as fn
    kwargs = {k: v for k, v in vars(args).items() if k in cls.__dataclass_fields__}
    kwargs["synthetic"] = args.synthetic or 0  # None when --data was given
    return cls(**kwargs), fn


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .training import dist

    cfg, train_fn = _config(args)
    if args.stage == "diffusion" and not cfg.encoder:
        print("train diffusion: --encoder is required (the transparent_encoder.safetensors of a vae-stage run): "
              "the fine-tune learns the adjusted latents mean + std * offset", file=sys.stderr)  # fmt: skip
        return 2
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        dist.init(cfg.device, timeout_s=args.dist_timeout)
        frozen = _load_callable(args.frozen_vae)() if args.frozen_vae else None
        if args.stage == "vae":
            train_fn(cfg, frozen_vae=frozen)
        else:
            unet = _load_callable(args.unet, "--unet")() if args.unet else None
            train_fn(cfg, frozen_vae=frozen, unet=unet)
    finally:
        dist.cleanup()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
