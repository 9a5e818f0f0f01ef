"""Memory over many generations: process RSS (CPU) and ``torch.cuda.memory_allocated`` (CUDA).

Runs N SD1.5 generations through :class:`pipeline.Generation` on a full-size SD1.5 UNet
(``ldm_unet``, random weights) with full-size attention-sharing files generated from the
published layouts, the way a host drives it: begin_sampling, a few cond + uncond UNet
calls, end_sampling and the never-silent check, the final latents, close. Memory after
each generation should stay flat: nothing a generation creates outlives it.

    python benchmarks/generation_memory.py [--n 10] [--modes transparent,joint] [--device cuda]
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from safetensors.torch import save_file  # noqa: E402

from lib_layerdiffuse.attention_sharing import AttentionSharing  # noqa: E402
from lib_layerdiffuse.ldm_unet import SD15_CONFIG, UNetModel  # noqa: E402
from lib_layerdiffuse.pipeline import Generation, Host  # noqa: E402
from lib_layerdiffuse.session import ModuleBackend  # noqa: E402
from lib_layerdiffuse.settings import Settings  # noqa: E402
from lib_layerdiffuse.unet import percent_to_sigma, timestep_to_sigma  # noqa: E402

MODES = {
    "transparent": ("(SD1.5) Only Generate Transparent Image (Attention Injection)", "layer_sd15_transparent_attn", 1),
    "joint": ("(SD1.5) Generate Everything Together (need batch size 3)", "layer_sd15_joint", 3),
}


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


class BenchHost(Host):
    """The model side of a host, in small: one UNet, files in a folder, no WebUI."""

    name = "benchmark"

    def __init__(self, unet, folder: Path, device, dtype):
        self.unet, self.folder, self.device, self.dtype = unet, folder, device, dtype
        self.acp = alphas_cumprod()

    def family(self, p):
        return "sd15"

    def unet_backend(self, p):
        return ModuleBackend(self.unet, timestep_to_sigma(self.acp))

    def percent_to_sigma(self, p, percent):
        return percent_to_sigma(self.acp, percent)

    def device_dtype(self, p):
        return self.device, self.dtype

    def latent_format(self, p):
        return 0.18215, 0.0

    def weight_path(self, name):
        return self.folder / f"{name}.safetensors"

    def final_latents(self, p, samples, sampled):
        return samples


def write_files(unet, folder: Path):
    for frames, name in ((1, "layer_sd15_transparent_attn"), (3, "layer_sd15_joint")):
        with torch.device("meta"):
            probe = AttentionSharing(unet, frames, False)
        g = torch.Generator().manual_seed(frames)
        state = {}
        for k, v in probe.state_dict().items():
            fan_in = math.prod(v.shape[1:]) if v.ndim > 1 else 1
            state[k] = (torch.randn(v.shape, generator=g) / math.sqrt(fan_in) * 0.05).half()
        save_file(state, str(folder / f"{name}.safetensors"))


def one_generation(host, mode_key, side, steps):
    label, _, group = MODES[mode_key]
    settings = Settings.from_dict({"enabled": True, "method": label})
    gen = Generation(host, settings, "sd15", group, side * 8, side * 8, ["a"] * group)
    try:
        x = torch.randn(group, 4, side, side, device=host.device, dtype=host.dtype)
        ctx = torch.randn(2 * group, 77, 768, device=host.device, dtype=host.dtype)
        gen.begin_sampling(None, x)
        for t in torch.linspace(999, 0, steps):
            ts = torch.full((2 * group,), float(t), device=host.device)
            eps = host.unet(torch.cat([x, x]), ts, ctx)
            x = x - 0.1 * eps[:group]
        gen.end_sampling()
        gen.check_ran()
        gen.keep_latents(None, 0, x)
    finally:
        gen.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--modes", default="transparent,joint")
    ap.add_argument("--latent", type=int, default=8, help="latent side (8 = 64x64 images)")
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device("meta"):
        unet = UNetModel(**SD15_CONFIG)
    unet = unet.to_empty(device=device).to(dtype).eval()
    for prm in unet.parameters():
        torch.nn.init.normal_(prm, std=0.02)
    print(f"torch {torch.__version__}, {device} {str(dtype).replace('torch.', '')}, SD1.5 UNet, "
          f"latent {args.latent}x{args.latent}, {args.steps} steps, gc thresholds {gc.get_threshold()}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        write_files(unet, Path(tmp))
        host = BenchHost(unet, Path(tmp), device, dtype)
        for mode_key in args.modes.split(","):
            rows = []
            for i in range(args.n):
                t = time.perf_counter()
                with torch.no_grad():
                    one_generation(host, mode_key, args.latent, args.steps)
                cuda = torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
                rows.append((rss_mb(), cuda))
                print(f"  {mode_key:12s} #{i + 1:2d}  RSS {rows[-1][0]:8.0f} MB   CUDA allocated {cuda:8.0f} MB"
                      f"   {time.perf_counter() - t:5.1f} s")  # fmt: skip
            if len(rows) >= 2:
                print(f"  {mode_key}: RSS last - second {rows[-1][0] - rows[1][0]:+.0f} MB; "
                      f"CUDA last - second {rows[-1][1] - rows[1][1]:+.0f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
