"""Builds tests/data/qwen_vae_refs.safetensors: the reference numbers of tests/test_qwen_vae.py.

Run with a Python that has diffusers (0.42.1 was used; the extension never imports it), from the
repository root:

    python tests/data/qwen_vae_refs.py          # writes the small fixture
    python tests/data/qwen_vae_refs.py --full   # the full-width check (base 96), prints figures only

The reference is diffusers' AutoencoderKLQwenImage with input_channels=4 (the Qwen-Image-Layered
RGBA VAE), run on single frames exactly as QwenImageLayeredPipeline does: encode ``x[:, :, None]``
and take the posterior mean; decode ``z[:, :, None]`` (clamped inside diffusers). The weights are
random, rounded to fp16 to keep the file small; the reference is computed from those values in fp32.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKLQwenImage
from safetensors.torch import save_file

OUT = Path(__file__).with_suffix(".safetensors")
SMALL_BASE = 4  # the released model has 96; the structure is the same


def random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    out = {}
    for i, (key, ref) in enumerate(sorted(model.state_dict().items())):
        g = torch.Generator().manual_seed(seed * 100003 + i)
        t = torch.randn(ref.shape, generator=g)
        if key.endswith(".gamma"):
            t = 1.0 + 0.2 * t
        elif key.endswith(".bias"):
            t = 0.1 * t
        else:
            t = t / math.sqrt(math.prod(ref.shape[1:]))
        out[key] = t.to(torch.float16).to(torch.float32)
    return out


def reference(base: int, seed: int):
    model = AutoencoderKLQwenImage(base_dim=base, input_channels=4).eval()
    state = random_state(model, seed)
    model.load_state_dict(state, strict=True)
    return model, state


@torch.no_grad()
def run(model, x, z):
    mean = model.encode(x[:, :, None]).latent_dist.mean[:, :, 0]
    image = model.decode(z[:, :, None]).sample[:, :, 0]
    return mean, image


def main():
    torch.manual_seed(0)
    if "--full" in sys.argv:
        sys.path.insert(0, str(Path(__file__).parents[2]))
        from lib_layerdiffuse.qwen_vae import load_vae

        model, state = reference(96, seed=1)
        print("full width:", sum(t.numel() for t in state.values()), "parameters,", len(state), "tensors")
        x = torch.rand(1, 4, 64, 96) * 2 - 1
        z = torch.randn(1, 16, 8, 12) * 2
        t0 = time.perf_counter()
        mean, image = run(model, x, z)
        t1 = time.perf_counter()
        ours = load_vae(state)
        print("read config:", ours.config)
        t2 = time.perf_counter()
        with torch.no_grad():
            m2, i2 = ours.encode_mean(x), ours.decode(z)
        t3 = time.perf_counter()
        print(f"encode: max|ref| {mean.abs().max():.4g}, max diff {(m2 - mean).abs().max():.3g}")
        print(f"decode: max|ref| {image.abs().max():.4g}, max diff {(i2 - image).abs().max():.3g}")
        print(f"clamped share of the decode: {(image.abs() == 1).float().mean():.3f}")
        print(f"CPU time, encode+decode: reference {t1 - t0:.2f} s, single-frame {t3 - t2:.2f} s")
        return

    model, state = reference(SMALL_BASE, seed=0)
    g = torch.Generator().manual_seed(7)
    x = torch.rand(2, 4, 32, 48, generator=g) * 2 - 1
    z = torch.randn(2, 16, 4, 6, generator=g) * 2
    mean, image = run(model, x, z)
    tensors = {f"weight.{k}": v.to(torch.float16) for k, v in state.items()}
    tensors.update({"in.x": x, "in.z": z, "out.mean": mean.contiguous(), "out.image": image.contiguous()})
    import diffusers

    save_file(tensors, str(OUT), metadata={"diffusers": diffusers.__version__, "base_dim": str(SMALL_BASE)})
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes); |mean| max {mean.abs().max():.4g}, "
          f"clamped share {(image.abs() == 1).float().mean():.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
