"""The trainer's options: one dataclass per stage, over :class:`RunConfig` for the options
every stage has; the one place each option's default is written. The command line (:mod:`.cli`) reads its defaults from these fields, and code that
runs a stage directly builds the same dataclass (tests/test_training_cli.py checks that both
give the same configuration). No torch import here: ``--help`` and usage errors stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RunConfig:
    """The options every stage has, with their defaults."""

    out: str
    data: str | None = None  # folder of RGBA images (or triplets); or
    synthetic: int = 0  # this many synthetic samples
    steps: int = 1000
    batch_size: int = 4  # per process
    size: int = 64  # pixels; the latent is size / 8
    lr: float = 1e-5  # paper: AdamW 1e-5 (LoRA runs often use 1e-4)
    adam_eps: float = 1e-8
    seed: int = 0
    save_every: int = 500
    sample_every: int = 500  # sample PNG every N steps and at the last (0: never)
    log_every: int = 10
    eval_count: int = 8
    vae_path: str | None = None  # tiny VAE file; default <out>/tiny_vae.safetensors
    vae_width: int = 32
    vae_steps: int = 1000
    vae_lr: float = 1e-3
    num_workers: int = 0
    export_dtype: str = "fp16"
    resume: bool = True
    device: str | None = None
    trace_dir: str | None = None  # per-rank JSON lines of each step (tests, debugging)
    grad_accum: int = 1  # split each per-process batch into this many micro-batches
    precision: str = "fp32"  # fp32 | bf16 (autocast; fp16 would need loss scaling)
    checkpoint: str | None = None  # single-file SD1.5/SDXL: frozen VAE (and UNet, text encoders)
    frozen_dtype: str = "fp32"  # of the frozen UNet and text encoders; only bf16 changes the VAE


@dataclass
class VAEStageConfig(RunConfig):
    batch_size: int = 8  # per process
    eval_count: int = 16
    disc_lr: float | None = None  # default: lr
    lambda_offset: float = 1e-2
    offset_dropout: float = 0.0  # 0.3 for the paper's robust decoder
    w_recon: float = 1.0
    w_identity: float = 1.0
    w_disc: float = 0.01
    disc_start: int = 0
    widths: str = "full"  # full | small | tiny
    disc_width: int = 64
    grad_checkpointing: bool = False  # recompute D's resnet/attention blocks in backward
    init_encoder: str | None = None  # start the encoder from this file (published or an earlier export)
    init_decoder: str | None = None  # start the decoder from this file (published or an earlier export)


@dataclass
class UNetStageConfig(RunConfig):
    weight_decay: float = 0.0
    rank: int | None = None  # LoRA rank: the --init file's, else 256 (paper: 256 on all layers)
    init: str | None = None  # start from this file (a published one or an earlier export of the same kind)
    prediction: str = "auto"  # auto | eps | v (auto: v when the --checkpoint has a v_pred key)
    zero_terminal_snr: str = "auto"  # auto | on | off (auto: on when the --checkpoint has a ztsnr key)
    encoder: str | None = None  # stage-1 export (transparent_encoder.safetensors)
    latent_scale: str | None = None  # a number or "auto"; default see resolve_latent_scale
    unet_preset: str = "tiny-sd15"  # when no --unet hook gives the model
    context_tokens: int = 77
    caption_dropout: float = 0.0  # share of captions replaced by the empty prompt (CFG)
    sample_steps: int = 20  # DDIM steps of a sample
    decoder: str | None = None  # transparent decoder file: RGBA samples of the frames with alpha
    cache_embeddings: bool = False  # keep the captions' text embeddings in a file beside the data


@dataclass
class DiffusionStageConfig(UNetStageConfig):
    mode: str | None = None  # lora | diff; default: the --init file's, else lora
    targets: str | None = None  # attn | all; default: the --init file's tensors, else attn
    layer_mode: str | None = None  # fg2ble | fgble2bg | bg2ble | bgble2fg (SDXL layer models)


@dataclass
class LayersStageConfig(UNetStageConfig):
    frames: str = "fg,bg"  # the frames of a group, in order (fg, bg, blend)
    condition: str = "none"  # none | fg | bg
    condition_via: str = "latent"  # latent (paper: eps = 0) | control (official fg2bg / bg2fg layout)
