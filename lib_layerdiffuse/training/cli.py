"""Command line for training: ``python -m lib_layerdiffuse.training <stage> ...``.

Stages: ``vae`` (paper §3.1, latent-transparency encoder/decoder), ``diffusion`` (§3.2,
UNet fine-tune on adjusted latents, SDXL patch-file export) and ``layers`` (§3.3, per-frame
LoRAs with attention sharing, SD1.5 attention-sharing export).

The same command runs in one process, or distributed under torchrun:

    python -m lib_layerdiffuse.training vae --synthetic 2048 --out runs/vae --steps 2000
    python -m lib_layerdiffuse.training diffusion --synthetic 2048 --out runs/diff \
        --encoder runs/vae/transparent_encoder.safetensors --vae-path runs/vae/tiny_vae.safetensors
    python -m lib_layerdiffuse.training layers --synthetic 2048 --out runs/joint --frames fg,bg,blend
    torchrun --nproc_per_node 2 -m lib_layerdiffuse.training vae --synthetic 2048 --out runs/vae

``--batch-size`` is per process: the global batch is ``batch_size * world_size``.

Errors: a command line the trainer refuses prints one ``error: ...`` line and exits 2; a
run it refuses once started (data, checkpoint, resume state) prints one line and exits 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

from .errors import TrainingError, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing usage and exiting, so
    ``main`` prints a single ``error:`` line (subparsers are built with the same class)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


# ---------------------------------------------------------------------------------------
# Value checks (argparse ``type=``): the message names the flag through argparse


def _int_at_least(low: int):
    def check(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {v}")
        return v

    check.__name__ = "int"  # argparse names the type in its own messages
    return check


positive_int = _int_at_least(1)
count_int = _int_at_least(0)


def _float_in(low: float, high: float | None, high_open: bool = True, low_open: bool = False):
    def check(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        bad_low = v <= low if low_open else v < low
        bad_high = high is not None and (v >= high if high_open else v > high)
        if bad_low or bad_high or v != v:
            lo = "(" if low_open else "["
            hi = "inf)" if high is None else (f"{high})" if high_open else f"{high}]")
            raise argparse.ArgumentTypeError(f"must be in {lo}{low}, {hi}, got {text}")
        return v

    check.__name__ = "float"
    return check


share = _float_in(0.0, 1.0)  # a probability that must leave something: [0, 1)
positive_float = _float_in(0.0, None, low_open=True)


# ---------------------------------------------------------------------------------------
# The parser


def _frozen_vae_options(p) -> None:
    """The frozen models: a single-file checkpoint, user callables, or stand-ins (all stages)."""
    p.add_argument("--checkpoint", metavar="FILE",
                   help="single-file SD1.5 or SDXL .safetensors (ldm/sgm keys): the frozen VAE, and for the "
                        "diffusion and layers stages the UNet and text encoders")  # fmt: skip
    p.add_argument("--frozen-dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="dtype of the checkpoint's frozen UNet and text encoders (the VAE stays fp32 unless bf16)")  # fmt: skip
    p.add_argument("--frozen-vae", metavar="MODULE:FUNC",
                   help="callable returning the frozen VAE (encode -> (mean, std), decode); e.g. an SDVAEAdapter")  # fmt: skip
    p.add_argument("--vae-path", help="stand-in tiny VAE file (default <out>/tiny_vae.safetensors, trained if absent)")
    p.add_argument("--vae-width", type=_int_at_least(4), default=32)
    p.add_argument("--vae-steps", type=positive_int, default=1000, help="pre-training steps of the tiny VAE")
    p.add_argument("--vae-lr", type=positive_float, default=1e-3)


def _runtime_options(p) -> None:
    """Data loading, export, resume, device and precision options (all stages)."""
    p.add_argument("--num-workers", type=count_int, default=0, help="DataLoader workers per process")
    p.add_argument("--export-dtype", choices=["fp16", "fp32", "bf16"], default="fp16")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start over: ignore (and overwrite) <out>/train_state.safetensors")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dist-timeout", type=positive_float, default=1800.0, help="seconds a rank waits for a dead peer")
    p.add_argument("--grad-accum", type=positive_int, default=1,
                   help="micro-batches per step (batch-size must divide)")  # fmt: skip
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast the forwards")


def _schedule_options(p, batch_size: int, eval_count: int) -> None:
    """Steps, batch, learning rate, logging and saving (all stages)."""
    p.add_argument("--out", required=True, help="output folder: exports, train_state, samples, logs")
    p.add_argument("--steps", type=positive_int, default=1000,
                   help="total optimiser steps (a resumed run continues to this)")  # fmt: skip
    p.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help="per process (layers: groups of frames)")  # fmt: skip
    p.add_argument("--size", type=_int_at_least(8), default=64, help="training side in pixels (the latent is size/8)")
    p.add_argument("--lr", type=positive_float, default=1e-5,
                   help="AdamW learning rate (paper: 1e-5); on resume this value replaces the saved one")  # fmt: skip
    p.add_argument("--adam-eps", type=positive_float, default=1e-8,
                   help="AdamW eps (larger: gentler steps for tiny gradients)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=positive_int, default=500, help="write the export and state every N steps")
    p.add_argument("--log-every", type=positive_int, default=10)
    p.add_argument("--eval-count", type=count_int, default=eval_count, help="held-out samples evaluated")
    p.add_argument("--trace-dir", default=None, help="write per-rank step traces (indices, losses, param digest)")


def _vae_parser(sub) -> None:
    p = sub.add_parser("vae", help="train the latent-transparency encoder and decoder (paper §3.1)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="folder of RGBA images (PNG/WebP with alpha, any size)")
    src.add_argument("--synthetic", type=positive_int, metavar="N", help="use N generated RGBA samples instead")
    _schedule_options(p, batch_size=8, eval_count=16)
    p.add_argument("--disc-lr", type=positive_float, default=None, help="discriminator learning rate (default: --lr)")
    p.add_argument("--lambda-offset", type=positive_float, default=1e-2, help="offset scale (folded into the export)")
    p.add_argument("--offset-dropout", type=share, default=0.0,
                   help="drop this share of offsets, in [0, 1) (0.3: robust decoder)")  # fmt: skip
    p.add_argument("--w-recon", type=float, default=1.0)
    p.add_argument("--w-identity", type=float, default=1.0)
    p.add_argument("--w-disc", type=float, default=0.01)
    p.add_argument("--disc-start", type=count_int, default=0, help="first step with the adversarial loss")
    p.add_argument(
        "--widths",
        choices=["full", "small", "tiny"],
        default="full",
        help="full = the official shapes (exportable to the extension); small/tiny: CPU experiments, tests",
    )
    p.add_argument("--disc-width", type=_int_at_least(4), default=64, help="PatchGAN base channels")
    p.add_argument("--sample-every", type=count_int, default=500, help="sample grid PNG every N steps (0: never)")
    _frozen_vae_options(p)
    _runtime_options(p)
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute D's blocks in backward (less memory)")


def _unet_common(p):
    """Options shared by the diffusion and layers stages."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", type=positive_int, metavar="N", help="use N generated samples")
    _schedule_options(p, batch_size=4, eval_count=8)
    p.add_argument("--weight-decay", type=_float_in(0.0, None), default=0.0)
    p.add_argument("--rank", type=positive_int, default=256, help="LoRA rank (paper and official files: 256)")
    p.add_argument("--encoder", help="latent-transparency encoder file (a vae-stage transparent_encoder.safetensors)")
    p.add_argument("--latent-scale", default=None,
                   help="VAE scaling factor, or 'auto' (1/std of the training latents); default: the "
                        "--checkpoint family's (SD1.5 0.18215, SDXL 0.13025), 0.18215 with --frozen-vae, auto for "
                        "the stand-in VAE")  # fmt: skip
    p.add_argument("--unet", metavar="MODULE:FUNC", help="callable returning the base UNet (ldm parameter names)")
    p.add_argument("--unet-preset", default="tiny-sd15", help="tiny UNet used without --unet: tiny-sd15 | tiny-sdxl")
    p.add_argument("--context-tokens", type=positive_int, default=77, help="tokens of the stand-in prompt embeddings")
    p.add_argument("--sample-every", type=count_int, default=500,
                   help="sample grid PNG (a short DDIM run of the trained weights) every N steps and at the last "
                        "(0: never)")  # fmt: skip
    p.add_argument("--sample-steps", type=positive_int, default=20, help="DDIM steps of a sample")
    p.add_argument("--decoder", metavar="FILE",
                   help="transparent decoder file (a vae-stage transparent_decoder.safetensors at --widths full, or "
                        "a published one): samples of the frames with alpha also as RGBA grids (<step>_rgba.png)")  # fmt: skip
    p.add_argument("--caption-dropout", type=share, default=0.0,
                   help="share of captions replaced by the empty prompt, in [0, 1) (0.1: for classifier-free guidance)")  # fmt: skip
    _frozen_vae_options(p)
    _runtime_options(p)
    return src


def _diffusion_parser(sub) -> None:
    p = sub.add_parser("diffusion", help="fine-tune the UNet on adjusted latents (paper §3.2), SDXL patch export")
    src = _unet_common(p)
    src.add_argument("--data", help="folder of RGBA images (PNG/WebP with alpha, any size); with --layer-mode "
                                    "fg/, bg/ and blend/ of matching names")  # fmt: skip
    p.add_argument(
        "--mode", choices=["lora", "diff"], default="lora", help="LoRA (::lora::) or full offsets (::diff::)"
    )
    p.add_argument("--layer-mode", choices=["fg2ble", "fgble2bg", "bg2ble", "bgble2fg"], default=None,
                   help="train an SDXL layer model (widened conv_in + --mode) on triplets; exports "
                        "layer_xl_<mode>.safetensors")  # fmt: skip
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
    parser = _Parser(prog="python -m lib_layerdiffuse.train", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True, metavar="{vae,diffusion,layers}")
    _vae_parser(sub)
    _diffusion_parser(sub)
    _layers_parser(sub)
    return parser


def check_args(args) -> None:
    """Checks across options (:class:`UsageError`); single values are checked by their ``type``."""
    if args.batch_size % args.grad_accum:
        raise UsageError(f"--batch-size {args.batch_size} must be a multiple of --grad-accum {args.grad_accum} "
                         "(each step splits the batch into that many micro-batches)")  # fmt: skip
    if args.size % 8:
        raise UsageError(f"--size {args.size} must be a multiple of 8 (the latent is size / 8)")
    if args.stage == "vae":
        from .models import Widths

        multiple = Widths.named(args.widths).multiple
        if args.size % multiple:
            raise UsageError(f"--size {args.size} must be a multiple of {multiple} for --widths {args.widths}")
    elif args.stage == "diffusion" and not args.encoder:
        raise UsageError("diffusion: --encoder is required (the transparent_encoder.safetensors of a vae-stage "
                         "run): the fine-tune learns the adjusted latents mean + std * offset")  # fmt: skip
    if args.stage != "vae" and args.latent_scale not in (None, "auto"):
        try:
            ok = float(args.latent_scale) > 0
        except ValueError:
            ok = False
        if not ok:
            raise UsageError(f"--latent-scale must be a positive number or 'auto', got {args.latent_scale!r}")


def _load_callable(spec: str, flag: str = "--frozen-vae"):
    mod, _, fn = spec.partition(":")
    if not fn:
        raise UsageError(f"{flag} needs MODULE:FUNC, got {spec!r}")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise TrainingError(f"{flag} {spec}: cannot load it ({e})") from None


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
        from .vae_stage import VAEStageConfig as cls
        from .vae_stage import train_vae_stage as fn
    elif args.stage == "diffusion":
        from .diffusion_stage import DiffusionStageConfig as cls
        from .diffusion_stage import train_diffusion_stage as fn
    else:
        from .layers_stage import LayersStageConfig as cls
        from .layers_stage import train_layers_stage as fn
    kwargs = {k: v for k, v in vars(args).items() if k in cls.__dataclass_fields__}
    kwargs["synthetic"] = args.synthetic or 0  # None when --data was given
    return cls(**kwargs), fn


def _error(message: str) -> None:
    rank = os.environ.get("RANK")
    prefix = f"error (rank {rank}): " if rank not in (None, "", "0") else "error: "
    print(prefix + str(message).strip(), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run one stage; returns the exit code (0 done, 1 refused at run time, 2 bad command line)."""
    try:
        args = build_parser().parse_args(argv)
        check_args(args)
    except UsageError as e:
        _error(e)
        return 2
    from . import dist

    cfg, train_fn = _config(args)
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
    except UsageError as e:
        _error(e)
        return 2
    except (TrainingError, ValueError) as e:
        # the stages raise ValueError/TrainingError with a message meant for the user
        _error(e)
        return 1
    finally:
        dist.cleanup()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0
