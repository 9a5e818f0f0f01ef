"""Reference numbers for tests/test_qwen_decompose.py: diffusers 0.42.1's QwenImageLayeredPipeline.__call__ end to
end (image in, RGBA layers out) on the tiny models of tests/data/qwen_transformer_refs.safetensors (transformer) and
tests/data/qwen_vae_refs.safetensors (RGBA VAE, base width 4).

Run: python tests/data/qwen_decompose_refs.py \
         tests/data/qwen_decompose_refs.safetensors   (in an environment with diffusers==0.42.1, not the project's)

What is changed around the pipeline, and why it stays faithful:
- no text encoder: prompt_embeds / prompt_embeds_mask (all ones, which the pipeline turns into mask None) and the
  negative ones are given; prompt is a non-empty placeholder string so the auto-caption branch is not taken (it is
  never tokenised because prompt_embeds is given). text_encoder is a dummy module with only `.dtype` (the pipeline
  casts the image to text_encoder.dtype), tokenizer/processor are None.
- the module-level calculate_dimensions is replaced by one returning the input image's own size (the 640/1024
  buckets are tested elsewhere); the image has exactly that size, so the pipeline's resize is the identity (checked).
- noise: `latents=` takes packed latents as they are (prepare_latents only casts them); we give
  torch.randn((1, layers+1, 16, h, w), generator=cpu Generator(seed)) packed with the pipeline's own _pack_latents,
  exactly what lib_layerdiffuse.qwen_layered.decompose draws.
- the final packed latents (before unpacking and decoding) are read through callback_on_step_end at the last step.
"""

import os
import sys

import diffusers
import numpy as np
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageLayeredPipeline,
    QwenImageTransformer2DModel,
)
from diffusers.pipelines.qwenimage import pipeline_qwenimage_layered as layered_module
from PIL import Image
from safetensors.torch import load_file, save_file

DATA = os.path.dirname(os.path.abspath(__file__))
TRANSFORMER = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=48,
    axes_dims_rope=(8, 12, 12),
    use_additional_t_cond=True,
    use_layer3d_rope=True,
)
# (name, layers, width, height, steps, true_cfg_scale, negative?, cfg_normalize, seed, text len, negative text len)
CASES = [
    ("a", 2, 64, 48, 3, 4.0, False, False, 1, 5, 0),
    ("b", 3, 32, 32, 2, 4.0, True, True, 7, 5, 6),
    ("c", 2, 32, 32, 2, 4.0, True, False, 7, 5, 6),
]


class DummyTextEncoder(torch.nn.Module):
    """Never called: the pipeline only reads its dtype (to cast the image) and device (to place tensors)."""

    @property
    def dtype(self):
        return torch.float32

    @property
    def device(self):
        return torch.device("cpu")


def build():
    tw = load_file(f"{DATA}/qwen_transformer_refs.safetensors")
    transformer = QwenImageTransformer2DModel(**TRANSFORMER)
    transformer.load_state_dict({k[7:]: v.float() for k, v in tw.items() if k.startswith("weight.")}, strict=True)
    vw = load_file(f"{DATA}/qwen_vae_refs.safetensors")
    vae = AutoencoderKLQwenImage(base_dim=4, input_channels=4)
    vae.load_state_dict({k[7:]: v.float() for k, v in vw.items() if k.startswith("weight.")}, strict=True)
    # Qwen-Image-Layered's scheduler_config.json (docs: shared/reference/qwen-layered.md section 4); the other
    # fields keep their defaults: shift_terminal None, no karras/exponential/beta sigmas, not inverted, not
    # stochastic; base/max_shift are unused because the pipeline passes mu
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, time_shift_type="linear"
    )
    pipe = QwenImageLayeredPipeline(
        scheduler=scheduler,
        vae=vae.eval(),
        text_encoder=DummyTextEncoder(),
        tokenizer=None,
        processor=None,
        transformer=transformer.eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_image(width, height):
    """Deterministic RGBA uint8 with smooth colour ramps, a hard-edged square and alpha from 0 to 255."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 255 * x / (width - 1)
    g = 255 * y / (height - 1)
    b = 127.5 + 127.5 * np.sin(x / 3.0 + y / 5.0)
    a = 255 * (0.5 + 0.5 * np.cos((x - width / 2) / 6.0) * np.cos((y - height / 3) / 7.0))
    inside = (abs(x - width / 3) < width / 6) & (abs(y - height / 2) < height / 5)
    a = np.where(inside, 255.0, a)
    a[:2] = 0  # fully transparent rows
    r = np.where(inside, 230.0, r)
    return np.stack([r, g, b, a], axis=-1).round().clip(0, 255).astype(np.uint8)


def embeds(tag, length):
    g = torch.Generator().manual_seed(sum(map(ord, tag)) * 1009 + length)
    return torch.randn(1, length, 48, generator=g), torch.ones(1, length, dtype=torch.long)


def run_case(pipe, case):
    name, layers, width, height, steps, scale, has_neg, normalize, seed, t_len, n_len = case
    image = make_image(width, height)
    pil = Image.fromarray(image, "RGBA")
    # the pipeline's resize must be the identity at this size (PIL returns a copy for an equal size)
    assert np.array_equal(np.asarray(pipe.image_processor.resize(pil, height, width)), image)
    pe, pm = embeds(name + "pos", t_len)
    ne, nm = embeds(name + "neg", n_len) if has_neg else (None, None)
    h, w = 2 * (height // 16), 2 * (width // 16)
    noise = torch.randn((1, layers + 1, 16, h, w), generator=torch.Generator("cpu").manual_seed(seed))
    packed = QwenImageLayeredPipeline._pack_latents(noise, 1, 16, h, w, layers + 1)
    seen = {}

    def grab(p, i, t, kwargs):
        seen["latents"] = kwargs["latents"].clone()
        seen["steps"] = i + 1
        return {}

    original = layered_module.calculate_dimensions
    layered_module.calculate_dimensions = lambda area, ratio: (width, height)
    try:
        out = pipe(
            image=pil,
            prompt="placeholder (embeds given)",
            prompt_embeds=pe,
            prompt_embeds_mask=pm,
            negative_prompt_embeds=ne,
            negative_prompt_embeds_mask=nm,
            true_cfg_scale=scale,
            layers=layers,
            num_inference_steps=steps,
            latents=packed,
            output_type="pil",
            cfg_normalize=normalize,
            resolution=640,
            callback_on_step_end=grab,
            callback_on_step_end_tensor_inputs=["latents"],
        )
    finally:
        layered_module.calculate_dimensions = original
    assert seen["steps"] == steps
    images = out.images[0]
    assert len(images) == layers and all(im.mode == "RGBA" and im.size == (width, height) for im in images)
    result = np.stack([np.asarray(im) for im in images])
    sigmas = pipe.scheduler.sigmas.clone()
    tensors = {
        f"{name}.image": torch.from_numpy(image),
        f"{name}.prompt_embeds": pe,
        f"{name}.prompt_embeds_mask": pm,
        f"{name}.seed": torch.tensor(seed),
        f"{name}.steps": torch.tensor(steps),
        f"{name}.layers": torch.tensor(layers),
        f"{name}.true_cfg_scale": torch.tensor(scale),
        f"{name}.cfg_normalize": torch.tensor(int(normalize)),
        f"{name}.out_layers": torch.from_numpy(result.copy()),
        f"{name}.out_latents": seen["latents"].contiguous(),
        f"{name}.sigmas": sigmas,
    }
    if has_neg:
        tensors[f"{name}.negative_prompt_embeds"] = ne
        tensors[f"{name}.negative_prompt_embeds_mask"] = nm
    return tensors


def run_all(threads, mkldnn):
    torch.set_num_threads(threads)
    pipe = build()
    out = {}
    with torch.backends.mkldnn.flags(enabled=mkldnn):
        for case in CASES:
            out.update(run_case(pipe, case))
    return out


def main(path):
    ref = run_all(1, False)
    save_file(ref, path, metadata={"diffusers": diffusers.__version__})
    back = load_file(path)
    assert all(torch.equal(back[k], v) for k, v in ref.items())
    for name, *_ in CASES:
        lat = ref[f"{name}.out_latents"]
        lay = ref[f"{name}.out_layers"]
        alpha = lay[..., 3].float()
        print(
            f"{name}: layers {tuple(lay.shape)}, latents {tuple(lat.shape)} max|.| {float(lat.abs().max()):.3f}, "
            f"sigmas {[round(float(s), 5) for s in ref[f'{name}.sigmas']]}, "
            f"alpha min/mean/max {alpha.min():.0f}/{alpha.mean():.1f}/{alpha.max():.0f}, "
            f"rgb-channel saturated share {float(((lay == 0) | (lay == 255)).float().mean()):.3f}"
        )
    # the reference's own noise: 2 threads and oneDNN on
    other = run_all(2, True)
    torch.set_num_threads(1)
    for name, *_ in CASES:
        a, b = ref[f"{name}.out_layers"].int(), other[f"{name}.out_layers"].int()
        d = (a - b).abs()
        la, lb = ref[f"{name}.out_latents"], other[f"{name}.out_latents"]
        print(
            f"{name} 2 threads + oneDNN: uint8 values differing {int((d > 0).sum())}/{d.numel()}, max "
            f"{int(d.max())}; latents max|diff|/max|ref| {float((la - lb).abs().max() / la.abs().max()):.2e}"
        )
    import os

    print("file size", os.path.getsize(path))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else f"{DATA}/qwen_decompose_refs.safetensors")
