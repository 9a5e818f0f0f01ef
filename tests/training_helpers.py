"""Helpers shared by the training tests (test_training_vae, _stages, _dist)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    # the test machine is shared: one thread per process is faster than two contended ones
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def read_trace(folder: Path, rank: int = 0) -> list[dict]:
    """The step records rank ``rank`` wrote under ``--trace-dir folder``."""
    return [json.loads(line) for line in (Path(folder) / f"rank{rank}.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------
# Tiny single-file checkpoints with the real ldm/sgm key names (widths scaled down)

TINY_CLIP = dict(width=32, layers=2, heads=1, mlp=64)
TINY_BIGG = dict(width=32, layers=3, heads=1, mlp=64, projection=16)
TINY_VAE = dict(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)
TINY_UNET_SD15 = dict(in_channels=4, model_channels=32, out_channels=4, num_res_blocks=2, channel_mult=(1, 1, 1, 1),
                      transformer_depth=(1, 1, 1, 0), transformer_depth_middle=1, num_heads=8, context_dim=32,
                      use_linear_in_transformer=False)  # fmt: skip
TINY_UNET_SDXL = dict(in_channels=4, model_channels=32, out_channels=4, num_res_blocks=(1, 1), channel_mult=(1, 2),
                      transformer_depth=(0, 2), transformer_depth_middle=1, num_head_channels=32, context_dim=64,
                      use_linear_in_transformer=True, adm_in_channels=16 + 6 * 256)  # fmt: skip


def tiny_checkpoint_state(family: str = "sd15", seed: int = 0, extras: bool = True, unet: dict | None = None) -> dict:
    """A tiny SD1.5- or SDXL-shaped single-file state (fp32): every part with its real prefix
    and names, random weights (norms at 1), plus the extras real files carry. ``unet``
    overrides entries of the tiny UNet config."""
    from lib_layerdiffuse import ldm_unet
    from lib_layerdiffuse.training import sd_models as m

    torch.manual_seed(seed)
    unet_cfg = {**(TINY_UNET_SD15 if family == "sd15" else TINY_UNET_SDXL), **(unet or {})}
    parts = {"model.diffusion_model.": ldm_unet.UNetModel(**unet_cfg),
             "first_stage_model.": m.LDMAutoencoderKL(m.VAEConfig(**TINY_VAE))}  # fmt: skip
    if family == "sd15":
        parts["cond_stage_model.transformer."] = m.CLIPTextModel(m.TextConfig(**TINY_CLIP))
    else:
        parts["conditioner.embedders.0.transformer."] = m.CLIPTextModel(m.TextConfig(**TINY_CLIP))
        parts["conditioner.embedders.1.model."] = m.OpenCLIPTextModel(m.TextConfig(**TINY_BIGG))
    state = {}
    for prefix, module in parts.items():
        for k, v in module.state_dict().items():
            parent = k.split(".")[-2] if "." in k else ""
            if "norm" in parent or parent in ("ln_1", "ln_2", "ln_final"):
                v = torch.ones_like(v) if k.endswith("weight") else torch.zeros_like(v)
            elif v.dim() > 1:  # fan-in scaled, so activations keep their size through the layers
                v = torch.randn(v.shape) / math.prod(v.shape[1:]) ** 0.5
            else:
                v = torch.randn(v.shape) * 0.02
            state[prefix + k] = v.contiguous()
    if extras:
        clip = "cond_stage_model.transformer." if family == "sd15" else "conditioner.embedders.0.transformer."
        state[clip + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
        state["alphas_cumprod"] = torch.linspace(1, 0.01, 1000)
        state["model_ema.decay"] = torch.tensor(0.9999)
        if family == "sdxl":
            state["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6)
    return state


def write_tiny_checkpoint(path: Path, family: str = "sd15", dtype=torch.float16, seed: int = 0, **kw) -> Path:
    from safetensors.torch import save_file

    state = tiny_checkpoint_state(family, seed, **kw)
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, str(path))
    return Path(path)


def write_rgba_folder(d: Path, captions: dict[int, str], n: int = 4, size: int = 40) -> Path:
    """``n`` RGBA PNGs (top rows transparent, the rest opaque noise) with ``NAME.txt`` captions."""
    import numpy as np
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = np.random.default_rng(i).integers(0, 255, (size, size, 4), dtype=np.uint8)
        img[: size // 5, :, 3], img[size // 5 :, :, 3] = 0, 255
        Image.fromarray(img).save(d / f"img{i}.png")
        if captions.get(i) is not None:
            (d / f"img{i}.txt").write_text(captions[i], encoding="utf-8")
    return d


def write_triplet_folder(d: Path, n: int = 4, size: int = 40) -> Path:
    """``fg/`` (RGBA), ``bg/`` and ``blend/`` (RGB) PNGs of matching names; captions: one for all
    frames on sample 0, per frame on sample 1, none on the rest."""
    import numpy as np
    from PIL import Image

    for f in ("fg", "bg", "blend"):
        (d / f).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng(100 + i)
        fg = rng.integers(0, 255, (size, size, 4), dtype=np.uint8)
        fg[: size // 5, :, 3], fg[size // 5 :, :, 3] = 0, 255
        Image.fromarray(fg).save(d / "fg" / f"{i}.png")
        for f in ("bg", "blend"):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f / f"{i}.png")
    (d / "0.txt").write_text("a glass on a table", encoding="utf-8")
    for f, text in (("fg", "a cat"), ("bg", "a sofa"), ("blend", "a cat on a sofa")):
        (d / f / "1.txt").write_text(text, encoding="utf-8")
    return d


def vae_nan_from_call_3():
    """``--frozen-vae training_helpers:vae_nan_from_call_3``: a finite stand-in VAE whose
    latents turn NaN from its third ``encode`` on (the third step of a vae-stage run without
    evaluation): a run whose loss becomes NaN although every weight is finite."""
    from lib_layerdiffuse.training.models import TinyKLVAE

    class NaNFromCall3(TinyKLVAE):
        calls = 0

        def encode(self, rgb01):
            self.calls += 1
            mean, std = super().encode(rgb01)
            return (mean * float("nan"), std) if self.calls >= 3 else (mean, std)

    torch.manual_seed(0)
    return NaNFromCall3(8)


class _NaNGradient(torch.autograd.Function):
    """The identity whose backward is NaN: a finite loss whose update breaks the weights."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def vae_nan_gradient_from_step_2():
    """``--frozen-vae training_helpers:vae_nan_gradient_from_step_2``: a finite stand-in VAE
    whose ``decode`` passes NaN gradients back from the second training step on: the loss of
    step 2 is finite but its optimizer step makes the trained weights NaN."""
    from lib_layerdiffuse.training.models import TinyKLVAE

    class NaNGradientFromStep2(TinyKLVAE):
        calls = 0

        def decode(self, latents):
            out = super().decode(latents)
            if not out.requires_grad:  # samples, evaluation, the robust decoder's plain half
                return out
            self.calls += 1
            return _NaNGradient.apply(out) if self.calls >= 2 else out

    torch.manual_seed(0)
    return NaNGradientFromStep2(8)
