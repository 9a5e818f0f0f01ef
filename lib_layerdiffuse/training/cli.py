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

Errors: a command line the trainer refuses (an option's value, an ``--out`` that cannot be
the run's folder) prints one ``error: ...`` line and exits 2; a run it refuses once started
(data, checkpoint, resume state, an ``--out`` in use by another run, a loss that is not
finite) prints one line and exits 1; Ctrl-C prints the step and the state kept, exit 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import signal
import sys
import threading

from .errors import Interrupted, TrainingError, UsageError


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
# AdamW learning rates: above 1 a step moves every weight by about lr, and from about 1e38 the float32 optimizer
# state overflows (a traceback inside torch's AdamW, not a message); no recipe here goes near 1
learning_rate = _float_in(0.0, 1.0, high_open=False, low_open=True)


# ---------------------------------------------------------------------------------------
# The parser: every option of a stage is a field of its config dataclass (.config), whose
# default the option takes; the CLI-only options below are the exceptions.

CLI_ONLY = {"dist_timeout", "frozen_vae", "unet"}  # used by main(), not by the stages


class _HelpFormatter(argparse.HelpFormatter):
    """``--help`` names each option's default (read from the config, like the value itself)."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = not any(action.default is v for v in (None, argparse.SUPPRESS, False, True))  # 0 == False
        if shown and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class _Options:
    """Adds a stage's options with the defaults of its config dataclass ``cls``: an option
    names no default of its own, so the command line and code that builds the dataclass
    directly cannot drift apart (tests/test_training_cli.py checks both ways)."""

    def __init__(self, target, cls):
        self.target, self.cls = target, cls

    def add(self, *flags: str, **kw) -> None:
        dest = kw.get("dest") or flags[0].lstrip("-").replace("-", "_")
        field = self.cls.__dataclass_fields__.get(dest)
        if field is None:
            if dest not in CLI_ONLY:
                raise TypeError(f"{flags[0]}: {self.cls.__name__} has no field {dest!r} to hold it")
        elif "default" in kw:
            raise TypeError(f"{flags[0]}: the default is {self.cls.__name__}.{dest}'s, not the option's")
        elif field.default is dataclasses.MISSING:
            kw["required"] = True
        else:
            kw["default"] = field.default
        self.target.add_argument(*flags, **kw)

    def exclusive(self) -> _Options:
        """A required group of mutually exclusive options (the data source)."""
        return _Options(self.target.add_mutually_exclusive_group(required=True), self.cls)


def _frozen_vae_options(o: _Options) -> None:
    """The frozen models: a single-file checkpoint, user callables, or stand-ins (all stages)."""
    o.add("--checkpoint", metavar="FILE",
          help="single-file SD1.5 or SDXL .safetensors (ldm/sgm keys): the frozen VAE, and for the diffusion and "
               "layers stages the UNet and text encoders")  # fmt: skip
    o.add("--frozen-dtype", choices=["fp32", "fp16", "bf16"],
          help="dtype of the checkpoint's frozen UNet and text encoders (the VAE stays fp32 unless bf16)")  # fmt: skip
    o.add("--frozen-vae", metavar="MODULE:FUNC",
          help="callable returning the frozen VAE (encode -> (mean, std), decode); e.g. an SDVAEAdapter")  # fmt: skip
    o.add("--vae-path", help="stand-in tiny VAE file (default <out>/tiny_vae.safetensors, trained if absent)")
    o.add("--vae-width", type=_int_at_least(4), help="stand-in tiny VAE: base channels")
    o.add("--vae-steps", type=positive_int, help="stand-in tiny VAE: pre-training steps")
    o.add("--vae-lr", type=learning_rate, help="stand-in tiny VAE: pre-training learning rate")


def _runtime_options(o: _Options) -> None:
    """Data loading, export, resume, device and precision options (all stages)."""
    o.add("--num-workers", type=count_int, help="DataLoader workers per process")
    o.add("--export-dtype", choices=["fp16", "fp32", "bf16"], help="dtype of the exported files")
    o.add("--no-resume", dest="resume", action="store_false",
          help="start over: ignore (and overwrite) <out>/train_state.safetensors")  # fmt: skip
    o.add("--device", help="cpu or cuda (default: cuda when available)")
    o.add("--dist-timeout", type=positive_float, default=1800.0, help="seconds a rank waits for a dead peer")
    o.add("--grad-accum", type=positive_int, help="micro-batches per step (batch-size must divide)")
    o.add("--precision", choices=["fp32", "bf16"], help="bf16: autocast the forwards")


def _schedule_options(o: _Options) -> None:
    """Steps, batch, learning rate, logging and saving (all stages)."""
    o.add("--out", help="output folder: exports, train_state, samples, logs")
    o.add("--steps", type=positive_int, help="total optimiser steps (a resumed run continues to this)")
    o.add("--batch-size", type=positive_int, help="per process (layers: groups of frames)")
    o.add("--size", type=_int_at_least(8), help="training side in pixels (the latent is size/8)")
    o.add("--lr", type=learning_rate,
          help="AdamW learning rate (paper: 1e-5); on resume this value replaces the saved one")  # fmt: skip
    o.add("--adam-eps", type=positive_float, help="AdamW eps (larger: gentler steps for tiny gradients)")
    o.add("--seed", type=int, help="seed of every random draw (initialisation, noise, dropout)")
    o.add("--save-every", type=positive_int, help="write the export and state every N steps")
    o.add("--log-every", type=positive_int, help="a metrics.jsonl record (and a log line) every N steps")
    o.add("--eval-count", type=count_int, help="held-out samples evaluated")
    o.add("--trace-dir", help="write per-rank step traces (indices, losses, param digest)")


def _vae_parser(sub) -> None:
    from .config import VAEStageConfig

    o = _Options(sub.add_parser("vae", help="train the latent-transparency encoder and decoder (paper §3.1)",
                                formatter_class=_HelpFormatter), VAEStageConfig)  # fmt: skip
    src = o.exclusive()
    src.add("--data", help="folder of RGBA images (PNG/WebP with alpha, any size)")
    src.add("--synthetic", type=positive_int, metavar="N", help="use N generated RGBA samples instead")
    _schedule_options(o)
    o.add("--disc-lr", type=learning_rate, help="discriminator learning rate (default: --lr)")
    o.add("--lambda-offset", type=positive_float, help="offset scale (folded into the export)")
    o.add("--offset-dropout", type=share, help="drop this share of offsets, in [0, 1) (0.3: robust decoder)")
    o.add("--w-recon", type=float, help="weight of the reconstruction loss (Eq. 6)")
    o.add("--w-identity", type=float, help="weight of the identity loss (Eq. 6)")
    o.add("--w-disc", type=float, help="weight of the adversarial loss (Eq. 6)")
    o.add("--disc-start", type=count_int, help="first step with the adversarial loss")
    o.add("--widths", choices=["full", "small", "tiny"],
          help="full = the official shapes (exportable to the extension); small/tiny: CPU experiments, tests")  # fmt: skip
    o.add("--disc-width", type=_int_at_least(4), help="PatchGAN base channels")
    o.add("--sample-every", type=count_int, help="sample grid PNG every N steps (0: never)")
    _frozen_vae_options(o)
    _runtime_options(o)
    o.add("--grad-checkpointing", action="store_true", help="recompute D's blocks in backward (less memory)")
    o.add("--init-encoder", metavar="FILE",
          help="start the encoder from this file (a published *vae_transparent_encoder.safetensors or an earlier "
               "transparent_encoder.safetensors; widths as --widths)")  # fmt: skip
    o.add("--init-decoder", metavar="FILE",
          help="start the decoder from this file (a published *vae_transparent_decoder.safetensors or an earlier "
               "transparent_decoder.safetensors; widths as --widths)")  # fmt: skip


def _unet_common(o: _Options) -> _Options:
    """Options shared by the diffusion and layers stages; returns the data-source group."""
    src = o.exclusive()
    src.add("--synthetic", type=positive_int, metavar="N", help="use N generated samples")
    _schedule_options(o)
    o.add("--weight-decay", type=_float_in(0.0, None), help="AdamW weight decay")
    o.add("--rank", type=positive_int,
          help="LoRA rank (paper and official files: 256); default: the --init file's, else 256")  # fmt: skip
    o.add("--init", metavar="FILE",
          help="start from this file: a published one (layer_xl_*.safetensors for diffusion, layer_sd15_*.safetensors "
               "for layers) or an earlier export of the same kind; its rank and layout are the run's")  # fmt: skip
    o.add("--prediction", choices=["auto", "eps", "v"],
          help="what the UNet predicts: eps (noise) or v; auto: v when the --checkpoint has a v_pred key, else eps")  # fmt: skip
    o.add("--zero-terminal-snr", choices=["auto", "on", "off"],
          help="the zero-terminal-SNR schedule (Lin et al. 2024, as the WebUI hosts rescale it); auto: on when the "
               "--checkpoint has a ztsnr key")  # fmt: skip
    o.add("--encoder", help="latent-transparency encoder file (a vae-stage transparent_encoder.safetensors)")
    o.add("--latent-scale",
          help="VAE scaling factor, or 'auto' (1/std of the training latents); default: the --checkpoint family's "
               "(SD1.5 0.18215, SDXL 0.13025), 0.18215 with --frozen-vae, auto for the stand-in VAE")  # fmt: skip
    o.add("--unet", metavar="MODULE:FUNC", help="callable returning the base UNet (ldm parameter names)")
    o.add("--unet-preset", help="tiny UNet used without --unet: tiny-sd15 | tiny-sdxl")
    o.add("--context-tokens", type=positive_int, help="tokens of the stand-in prompt embeddings")
    o.add("--sample-every", type=count_int,
          help="sample grid PNG (a short DDIM run of the trained weights) every N steps and at the last (0: never)")  # fmt: skip
    o.add("--sample-steps", type=positive_int, help="DDIM steps of a sample")
    o.add("--decoder", metavar="FILE",
          help="transparent decoder file (a vae-stage transparent_decoder.safetensors at --widths full, or a "
               "published one): samples of the frames with alpha also as RGBA grids (<step>_rgba.png)")  # fmt: skip
    o.add("--cache-embeddings", action="store_true",
          help="with --checkpoint: the text encoders' embeddings of every caption, computed once into "
               "<data>/.layerdiffuse_cache/ (reused by later runs), and the encoders released before training")  # fmt: skip
    o.add("--caption-dropout", type=share,
          help="share of captions replaced by the empty prompt, in [0, 1) (0.1: for classifier-free guidance)")  # fmt: skip
    _frozen_vae_options(o)
    _runtime_options(o)
    return src


def _diffusion_parser(sub) -> None:
    from .config import DiffusionStageConfig

    o = _Options(sub.add_parser("diffusion", formatter_class=_HelpFormatter,
                                help="fine-tune the UNet on adjusted latents (paper §3.2), SDXL patch export"),
                 DiffusionStageConfig)  # fmt: skip
    src = _unet_common(o)
    src.add("--data", help="folder of RGBA images (PNG/WebP with alpha, any size); with --layer-mode fg/, bg/ and "
                           "blend/ of matching names")  # fmt: skip
    o.add("--mode", choices=["lora", "diff"],
          help="LoRA (::lora::) or full offsets (::diff::); default: the --init file's, else lora")  # fmt: skip
    o.add("--layer-mode", choices=["fg2ble", "fgble2bg", "bg2ble", "bgble2fg"],
          help="train an SDXL layer model (widened conv_in + --mode) on triplets; exports "
               "layer_xl_<mode>.safetensors")  # fmt: skip
    o.add("--targets", choices=["attn", "all"],
          help="attn: to_q/to_k/to_v/to_out.0 of every attention; all: every Linear (lora) or tensor (diff); "
               "default: the --init file's tensors, else attn")  # fmt: skip


def _layers_parser(sub) -> None:
    from .config import LayersStageConfig

    o = _Options(sub.add_parser("layers", formatter_class=_HelpFormatter,
                                help="per-frame LoRAs with attention sharing (paper §3.3), SD1.5 layout export"),
                 LayersStageConfig)  # fmt: skip
    src = _unet_common(o)
    src.add("--data", help="folder with fg/ (RGBA), bg/ and blend/ (RGB) images of matching names")
    o.add("--frames", help="frames of a group, in order: fg,bg or fg,bg,blend (joint)")
    o.add("--condition", choices=["none", "fg", "bg"],
          help="fg: a fg-conditioned bg generator (eps_f = 0); bg: the reverse")  # fmt: skip
    o.add("--condition-via", choices=["latent", "control"],
          help="latent: the paper's clean condition frame in the group; control: the official fg2bg/bg2fg layout "
               "(condition image through kwargs_encoder, frame leaves the group)")  # fmt: skip


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
    from .outdir import check_folders

    check_folders(args.out, args.data)  # --out a file, under one, or overlapping --data: before any work
    if getattr(args, "cache_embeddings", False) and not args.checkpoint:
        # here, before the run creates --out and reads the data
        raise UsageError("--cache-embeddings keeps the text encoders' embeddings: it needs --checkpoint")
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


def _hook_module(spec: str, flag: str):
    """The module a ``--frozen-vae``/``--unet`` hook returns, its weights checked finite."""
    from .finite import require_finite

    module = _load_callable(spec, flag)()
    require_finite(module, f"{flag} {spec}")
    return module


def _on_sigterm(signum, frame):
    # torchrun sends SIGTERM to the surviving ranks when one dies; raising (instead of the
    # default silent death) runs the cleanup: a half-written temporary checkpoint is removed
    rank = os.environ.get("RANK", "0")
    print(f"[train] rank {rank}: stopped by SIGTERM (a peer process failed or the job was cancelled); "
          "the last complete checkpoint in --out is intact and resumable", file=sys.stderr, flush=True)  # fmt: skip
    raise SystemExit(128 + signum)


def _config(args):
    """The stage's config dataclass (every option but the CLI-only ones) and its train function."""
    from . import config

    if args.stage == "vae":
        from .vae_stage import train_vae_stage as fn

        cls = config.VAEStageConfig
    elif args.stage == "diffusion":
        from .diffusion_stage import train_diffusion_stage as fn

        cls = config.DiffusionStageConfig
    else:
        from .layers_stage import train_layers_stage as fn

        cls = config.LayersStageConfig
    return cls(**{k: v for k, v in vars(args).items() if k in cls.__dataclass_fields__}), fn


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
        frozen = _hook_module(args.frozen_vae, "--frozen-vae") if args.frozen_vae else None
        if args.stage == "vae":
            train_fn(cfg, frozen_vae=frozen)
        else:
            unet = _hook_module(args.unet, "--unet") if args.unet else None
            train_fn(cfg, frozen_vae=frozen, unet=unet)
    except UsageError as e:
        _error(e)
        return 2
    except (TrainingError, ValueError) as e:
        # the stages raise ValueError/TrainingError with a message meant for the user
        _error(e)
        return 1
    except Interrupted as e:  # Ctrl-C in the training loop: the step and the state kept
        print(e, file=sys.stderr, flush=True)
        return 130
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (loading, resuming, the summary at the end)
        print("interrupted outside the training steps; what was saved in --out is kept (run the same command to "
              "resume or start again)", file=sys.stderr, flush=True)  # fmt: skip
        return 130
    finally:
        dist.cleanup()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0
