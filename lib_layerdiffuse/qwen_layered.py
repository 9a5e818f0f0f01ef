"""Qwen-Image-Layered (image in, N RGBA layers out): the host-free math around the transformer.

Everything here is plain torch/numpy and follows the released model's pipeline
(``QwenImageLayeredPipeline`` and ``QwenEmbedLayer3DRope`` in diffusers 0.42.1, read for facts,
not copied). The RGBA VAE lives in
``lib_layerdiffuse/qwen_vae.py``. Conventions:

- a latent video is ``[B, F, 16, h, w]`` (frame axis before channels) when packed, and the
  unpacked result is ``[B, 16, F, h, w]`` as the pipeline hands it to the VAE;
- there are ``layers + 1`` generated frames (frame 0 is the re-generated composite, dropped
  before decoding) followed by one condition frame (the encoded input image);
- images are ``[1, 4, H, W]`` RGBA (straight alpha) in [-1, 1].

Tests: tests/test_qwen_layered.py and tests/test_qwen_layered_loop.py, against numbers computed from the reference implementation
(tests/data/qwen_layered_refs.safetensors, tests/data/qwen_layered_loop_refs.safetensors).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from .errors import SettingsError
from .qwen_vae import load_vae  # noqa: F401 - the RGBA VAE, named here with the rest of the model side

LATENT_CHANNELS = 16
PATCH = 2  # the transformer sees 2x2 latent patches: 16 * 2 * 2 = 64 channels per token
VAE_SCALE = 8
ROPE_AXES = (16, 56, 56)  # head_dim 128 split over (frame, row, column), the released axes_dims_rope
ROPE_THETA = 10000
RESOLUTIONS = (640, 1024)  # the pipeline's only buckets
TOKENS_PER_MU = 256  # mu = sqrt(condition tokens / 256): 2.5 at 640x640, 4.0 at 1024x1024
# the Qwen-Image (Wan-2.1) VAE's per-channel latent statistics: the pipeline normalises the encoded
# condition image with them and undoes it before decoding (Neo's Wan21 latent format holds the same)
LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)  # fmt: skip
LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)  # fmt: skip
ADDITION_KEY = "time_text_embed.addition_t_embedding.weight"  # the one tensor plain Qwen-Image lacks


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """``[B, F, C, h, w]`` -> ``[B, F*(h/2)*(w/2), C*4]`` tokens, as the pipeline's packing.

    Token order is frame-major, then patch row, then patch column; inside a token the channel
    index is ``c*4 + dy*2 + dx`` for the pixel (dy, dx) of the 2x2 patch.
    """
    if x.ndim != 5:
        raise SettingsError(f"pack_latents expects [B, F, C, h, w], got shape {tuple(x.shape)}.")
    b, f, c, h, w = x.shape
    if h % PATCH or w % PATCH:
        raise SettingsError(f"pack_latents needs an even latent height and width, got {h}x{w}.")
    # axes: b, f, c, row, dy, col, dx -> b, f, row, col, c, dy, dx
    patches = x.reshape(b, f, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 1, 3, 5, 2, 4, 6)
    return patches.reshape(b, f * (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack_latents(tokens: torch.Tensor, height: int, width: int, layers: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for ``layers + 1`` frames -> ``[B, C, layers+1, h, w]``.

    ``height``/``width`` are the image size in pixels; like the pipeline, the latent size is
    ``2 * (pixels // 16)`` (8x VAE times the 2x2 patch).
    """
    h = PATCH * (int(height) // (VAE_SCALE * PATCH))
    w = PATCH * (int(width) // (VAE_SCALE * PATCH))
    frames = int(layers) + 1
    if tokens.ndim != 3 or tokens.shape[2] % (PATCH * PATCH):
        raise SettingsError(f"unpack_latents expects [B, tokens, C*4] tokens, got shape {tuple(tokens.shape)}.")
    b, n, packed = tokens.shape
    if layers < 1 or h < PATCH or w < PATCH or n != frames * (h // PATCH) * (w // PATCH):
        raise SettingsError(
            f"unpack_latents: {n} tokens do not make {frames} frames of a {width}x{height} image "
            f"({frames * max(h // PATCH, 0) * max(w // PATCH, 0)} expected)."
        )
    c = packed // (PATCH * PATCH)
    # axes: b, f, row, col, c, dy, dx -> b, c, f, row, dy, col, dx
    grid = tokens.reshape(b, frames, h // PATCH, w // PATCH, c, PATCH, PATCH).permute(0, 4, 1, 2, 5, 3, 6)
    return grid.reshape(b, c, frames, h, w)


def _axis_angles(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """RoPE angles ``position * theta^(-2i/dim)`` for one axis, ``[len(positions), dim/2]``.

    Computed in float32 exactly as the reference tables are (an angle of several hundred radians
    rounds differently in float64), so the factors agree to float32 precision.
    """
    inv_freq = 1.0 / torch.pow(ROPE_THETA, torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    return positions.to(torch.float32)[:, None] * inv_freq[None, :]


def _centred(n: int) -> torch.Tensor:
    """Qwen-Image's centred positions for a side of ``n`` patches: ``-(n - n//2) .. n//2 - 1``."""
    return torch.arange(n, dtype=torch.int64) - (n - n // 2)


def rope_frequencies(img_shapes: Sequence[Sequence[int]], max_txt_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer-3D RoPE of Qwen-Image-Layered: ``(image, text)`` complex64 factors ``[tokens, 64]``.

    ``img_shapes`` lists ``(1, h/2, w/2)`` per frame: the ``layers + 1`` generated frames first,
    the condition image last. As ``QwenEmbedLayer3DRope`` (axes (16, 56, 56), theta 10000):

    - frame axis: generated frame k sits at position k, the condition image at -1;
    - row/column axes: Qwen-Image's centred positions (see :func:`_centred`);
    - text token j sits at ``start + j`` on all three axes, where ``start`` is the largest of
      ``max(rows // 2, cols // 2)`` over all entries and the number of generated frames.
    """
    image_ids, text_ids = position_ids(img_shapes, max_txt_seq_len, "rope_frequencies")

    def angles(ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([_axis_angles(ids[:, axis], dim) for axis, dim in enumerate(ROPE_AXES)], dim=1)

    image_angles, text_angles = angles(image_ids), angles(text_ids)
    return (
        torch.polar(torch.ones_like(image_angles), image_angles),
        torch.polar(torch.ones_like(text_angles), text_angles),
    )


def position_ids(
    img_shapes: Sequence[Sequence[int]], txt_len: int, caller: str = "position_ids"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer-3D RoPE as integer positions ``(frame, row, column)``: ``(image [N, 3], text [T, 3])``.

    The one place of the layout rules: :func:`rope_frequencies` turns these positions into factors, and a
    host whose transformer takes position ids (Forge Neo's ``pe_embedder``) rotates by them itself
    (``position * theta^(-2i/dim)`` per axis in both). Float32, image tokens in packing order, text after.
    """
    shapes = [tuple(int(v) for v in s) for s in img_shapes]
    if len(shapes) < 2 or any(len(s) != 3 or s[0] != 1 or s[1] < 1 or s[2] < 1 for s in shapes):
        raise SettingsError(
            f"{caller} expects (1, rows, cols) per generated frame and one for the condition image, got {shapes}."
        )
    generated = len(shapes) - 1
    blocks = []
    for index, (_, rows, cols) in enumerate(shapes):
        frame = torch.full((rows * cols,), -1 if index == generated else index, dtype=torch.int64)
        row = _centred(rows).repeat_interleave(cols)
        col = _centred(cols).repeat(rows)
        blocks.append(torch.stack([frame, row, col], dim=1))
    start = max(max(max(rows // 2, cols // 2) for _, rows, cols in shapes), generated)
    text = torch.arange(start, start + int(txt_len)).unsqueeze(1).expand(-1, 3)
    return torch.cat(blocks).to(torch.float32), text.to(torch.float32)


def layered_forward(
    model: torch.nn.Module,
    hidden_states: torch.Tensor,
    timestep: torch.Tensor,
    *,
    context: torch.Tensor,
    img_shapes: Sequence[Sequence[int]],
    addition: torch.Tensor,
    rope: Callable[[torch.Tensor], object],
    context_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One Qwen-Image-Layered transformer call on a host's own Qwen-Image transformer ``model``.

    ``model`` is used module by module as it is (nothing is added to it or changed): ``img_in``,
    ``txt_norm``/``txt_in``, ``time_text_embed(timestep, hidden)``, each of ``transformer_blocks``
    (keyword call, returning ``(text, image)``), ``norm_out(x, temb)``, ``proj_out``. The two
    Layered differences are made here: the timestep embedding gets ``addition`` (row ``is_rgb = 0``
    of the checkpoint's ``addition_t_embedding``, which a plain Qwen-Image model does not load),
    and the rotary embedding is built by the host's ``rope`` from :func:`position_ids` (text first,
    then image tokens, ``[1, T + N, 3]``). ``hidden_states`` are the packed generated frames then
    the condition frame (``[B, N, 64]``), ``context`` the text encoder's states ``[B, T, D]``;
    returns ``[B, N, 64]``.
    """
    image_ids, text_ids = position_ids(img_shapes, context.shape[1])
    if image_ids.shape[0] != hidden_states.shape[1]:
        raise SettingsError(
            f"layered_forward: img_shapes {list(img_shapes)} give {image_ids.shape[0]} image tokens, but "
            f"hidden_states has {hidden_states.shape[1]}."
        )
    pe = rope(torch.cat([text_ids, image_ids]).unsqueeze(0).to(hidden_states.device))
    hidden = model.img_in(hidden_states)
    text = model.txt_in(model.txt_norm(context))
    temb = model.time_text_embed(timestep, hidden)
    temb = temb + addition.to(temb.device, temb.dtype)
    for block in model.transformer_blocks:
        text, hidden = block(
            hidden_states=hidden,
            encoder_hidden_states=text,
            encoder_hidden_states_mask=context_mask,
            temb=temb,
            image_rotary_emb=pe,
        )
    return model.proj_out(model.norm_out(hidden, temb))


def addition_row(weight: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Row ``is_rgb = 0`` of ``addition_t_embedding.weight`` (``[2, width]``): the only row the pipeline
    uses (it passes ``is_rgb = 0`` for every sample). Checked: two rows, finite, the model's width."""
    if weight.ndim != 2 or weight.shape[0] != 2 or (width is not None and weight.shape[1] != width):
        raise SettingsError(
            f"{ADDITION_KEY} must be [2, {width or 'width'}], got {list(weight.shape)}: the checkpoint is damaged or "
            "not Qwen-Image-Layered. Download it again."
        )
    row = weight[0].to(torch.float32)
    if not torch.isfinite(row).all():
        raise SettingsError(
            f"{ADDITION_KEY} holds NaN or infinite values: the checkpoint is damaged. Download it again."
        )
    return row


def normalize_latents(z: torch.Tensor) -> torch.Tensor:
    """The VAE's raw mean ``[B, 16, ...]`` -> the transformer's latent space: ``(z - mean) / std``."""
    return (z - _stat(LATENTS_MEAN, z)) / _stat(LATENTS_STD, z)


def denormalize_latents(z: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`normalize_latents`, before the VAE decodes."""
    return z * _stat(LATENTS_STD, z) + _stat(LATENTS_MEAN, z)


def _stat(values: tuple[float, ...], z: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=z.dtype, device=z.device).view(1, -1, *([1] * (z.ndim - 2)))


def flow_sigmas(steps: int, image_tokens: int) -> torch.Tensor:
    """Flow-matching sigmas ``[steps + 1]`` (float32, trailing 0) for one generation.

    The pipeline starts from ``linspace(1, 0, steps + 1)[:-1]`` and the scheduler
    (FlowMatchEulerDiscreteScheduler: dynamic shifting, linear time shift, no terminal stretch in
    the released scheduler config) maps each sigma to ``mu / (mu + 1/sigma - 1)`` with
    ``mu = sqrt(image_tokens / 256)``, ``image_tokens`` being the condition image's token count.
    """
    steps, image_tokens = int(steps), int(image_tokens)
    if steps < 1 or image_tokens < 1:
        raise SettingsError(f"flow_sigmas needs steps >= 1 and image_tokens >= 1, got {steps} and {image_tokens}.")
    mu = math.sqrt(image_tokens / TOKENS_PER_MU)
    sigma = np.linspace(1.0, 0.0, steps + 1)[:-1].astype(np.float32)
    shifted = mu / (mu + (1.0 / sigma - 1.0))
    return torch.cat([torch.from_numpy(np.asarray(shifted, dtype=np.float32)), torch.zeros(1)])


def true_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float, normalize: bool) -> torch.Tensor:
    """True classifier-free guidance of the Layered pipeline.

    ``uncond + scale * (cond - uncond)``; with ``normalize``, each token of the result is
    rescaled to the norm of the conditional prediction (norms over the last, channel axis).
    """
    combined = uncond + scale * (cond - uncond)
    if not normalize:
        return combined
    ratio = torch.linalg.vector_norm(cond, dim=-1, keepdim=True) / torch.linalg.vector_norm(
        combined, dim=-1, keepdim=True
    )
    return combined * ratio


def bucket_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The pipeline's working size ``(w, h)`` for an input of ``width`` x ``height``.

    Area ``resolution**2`` at the input's aspect ratio, each side rounded (Python's
    round-half-even) to a multiple of 32 and then floored to a multiple of 16, as
    ``calculate_dimensions`` and the pipeline do. Only the 640 and 1024 buckets exist.
    """
    if resolution not in RESOLUTIONS:
        raise SettingsError(f"Qwen-Image-Layered resolution must be 640 or 1024, got {resolution!r}.")
    if width < 1 or height < 1:
        raise SettingsError(f"Qwen-Image-Layered needs an image of at least 1x1 pixels, got {width}x{height}.")
    ratio = width / height
    w = math.sqrt(resolution * resolution * ratio)
    h = w / ratio
    multiple = VAE_SCALE * PATCH
    return round(w / 32) * 32 // multiple * multiple, round(h / 32) * 32 // multiple * multiple


def preprocess(image: np.ndarray) -> torch.Tensor:
    """uint8 ``H x W x 4`` (or ``x 3``, taken as opaque) -> ``[1, 4, H, W]`` float32 in [-1, 1].

    ``v / 255`` in float32, then ``2 x - 1``, as the pipeline's image processor does.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
        raise SettingsError(
            f"Qwen-Image-Layered expects a uint8 HxWx3 or HxWx4 image, got {image.dtype} {tuple(image.shape)}."
        )
    if image.shape[2] == 3:
        image = np.concatenate([image, np.full(image.shape[:2] + (1,), 255, dtype=np.uint8)], axis=2)
    unit = image.astype(np.float32) / 255.0
    return 2.0 * torch.from_numpy(unit).permute(2, 0, 1)[None].contiguous() - 1.0


def postprocess(x: torch.Tensor) -> np.ndarray:
    """``[1, 4, H, W]`` in [-1, 1] -> uint8 ``H x W x 4``.

    ``clamp(x * 0.5 + 0.5, 0, 1) * 255`` rounded half-to-even, as the image processor's PIL output.
    """
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != 4:
        raise SettingsError(f"postprocess expects one [1, 4, H, W] RGBA image, got shape {tuple(x.shape)}.")
    unit = (x.detach().to("cpu", torch.float32) * 0.5 + 0.5).clamp(0, 1)
    return torch.round(unit[0].permute(1, 2, 0) * 255).numpy().astype(np.uint8)


def sample_layers(
    model: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    condition: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    cond: Mapping[str, object],
    uncond: Mapping[str, object] | None = None,
    true_cfg_scale: float = 1.0,
    normalize: bool = False,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """The Layered pipeline's denoising loop around any transformer; returns the final packed latents.

    ``noise`` is the packed noise of the ``layers + 1`` generated frames ``[B, N, 64]`` and
    ``condition`` the packed condition image ``[B, M, 64]``; ``sigmas`` the schedule with its trailing
    0 (:func:`flow_sigmas`). Each step calls ``model(hidden_states, timestep, **cond)`` with the
    generated tokens followed by the condition tokens and ``timestep = sigma`` per sample (the
    pipeline's ``t / 1000``); the host's extra inputs (text, masks, ``img_shapes`` for
    :func:`rope_frequencies`, the ``is_rgb = 0`` embedding) travel in ``cond``/``uncond``. The
    prediction is cut back to the first ``N`` tokens. True CFG (:func:`true_cfg`) runs only when
    ``uncond`` is given and ``true_cfg_scale > 1``, as in the pipeline. Flow-matching Euler step:
    ``x <- x + (sigma_next - sigma) * v`` in float32, cast back to the prediction's dtype.
    ``callback(step, latents)`` is called after each step (progress, interruption by raising).
    """
    if noise.ndim != 3 or condition.ndim != 3 or noise.shape[0] != condition.shape[0]:
        raise SettingsError(
            f"sample_layers needs packed [B, N, 64] noise and condition tokens with the same batch, got "
            f"{tuple(noise.shape)} and {tuple(condition.shape)}."
        )
    if noise.shape[2] != condition.shape[2]:
        raise SettingsError(
            f"sample_layers needs the same token width for noise and condition, got {noise.shape[2]} and "
            f"{condition.shape[2]}."
        )
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).flatten().to(noise.device)
    if sigmas.numel() < 2:
        raise SettingsError(f"sample_layers needs at least 2 sigmas (one step and the final 0), got {sigmas.numel()}.")
    guided = uncond is not None and true_cfg_scale > 1
    latents = noise
    generated = noise.shape[1]
    batch = noise.shape[0]

    def predict(branch: Mapping[str, object], hidden: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        out = model(hidden, timestep, **branch)
        if out.ndim != 3 or out.shape[0] != batch or out.shape[1] < generated or out.shape[2] != noise.shape[2]:
            raise SettingsError(
                f"sample_layers: the model returned {tuple(out.shape)}; expected [{batch}, >= {generated}, "
                f"{noise.shape[2]}] (a prediction for every input token)."
            )
        # the condition image's tokens only steer; the step moves the generated frames alone
        return out[:, :generated]

    for i in range(sigmas.numel() - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        hidden = torch.cat([latents, condition.to(latents.dtype)], dim=1)
        timestep = sigma.expand(batch).to(latents.dtype)
        v = predict(cond, hidden, timestep)
        if guided:
            v = true_cfg(v, predict(uncond, hidden, timestep), true_cfg_scale, normalize)
        latents = (latents.float() + (sigma_next - sigma) * v.float()).to(v.dtype)
        if callback is not None:
            callback(i, latents)
    return latents


def decompose(
    image: np.ndarray,
    *,
    vae: torch.nn.Module,
    transformer: Callable[..., torch.Tensor],
    cond: Mapping[str, object],
    uncond: Mapping[str, object] | None = None,
    layers: int,
    steps: int,
    seed: int,
    true_cfg_scale: float = 1.0,
    normalize: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> list[np.ndarray]:
    """An image at its bucket size (uint8 ``H x W x 4``, or ``x 3`` taken as opaque) -> ``layers``
    straight-alpha RGBA images (uint8 ``H x W x 4``), bottom layer first, as the pipeline returns them.

    The pipeline's steps, once: the image is encoded (mean, normalised) and packed as the condition
    frame; the noise of the ``layers + 1`` generated frames is drawn from a CPU generator seeded
    with ``seed`` (float32 ``[1, layers + 1, 16, h, w]``) and packed; :func:`sample_layers` runs
    ``transformer(hidden, timestep, **branch)`` (``img_shapes`` is added to ``cond``/``uncond``)
    over :func:`flow_sigmas`; frame 0 (the re-generated composite) is dropped and each layer is
    decoded on its own (the VAE treats them as separate images; one at a time keeps the memory
    of one). ``vae`` is :func:`load_vae`'s module, on ``device``; the transformer runs in ``dtype``.
    """
    layers, steps = int(layers), int(steps)
    if layers < 1:
        raise SettingsError(f"Qwen-Image-Layered needs at least 1 layer, got {layers}.")
    x = preprocess(image)
    height, width = x.shape[2:]
    multiple = VAE_SCALE * PATCH
    if height % multiple or width % multiple:
        raise SettingsError(
            f"Qwen-Image-Layered works on multiples of {multiple} pixels, got {width}x{height}: resize the "
            "image to its bucket first (bucket_size)."
        )
    vae_dtype = next(vae.parameters()).dtype
    with torch.no_grad():
        z = normalize_latents(vae.encode_mean(x.to(device, vae_dtype)).float())
        h, w = z.shape[2:]
        noise = torch.randn(
            (1, layers + 1, LATENT_CHANNELS, h, w), generator=torch.Generator("cpu").manual_seed(int(seed))
        )
        shapes = [(1, h // PATCH, w // PATCH)] * (layers + 2)
        branches = [{**b, "img_shapes": shapes} if b is not None else None for b in (cond, uncond)]
        latents = sample_layers(
            transformer,
            pack_latents(noise).to(device, dtype),
            pack_latents(z[:, None]).to(device, dtype),
            flow_sigmas(steps, (h // PATCH) * (w // PATCH)),
            cond=branches[0],
            uncond=branches[1],
            true_cfg_scale=true_cfg_scale,
            normalize=normalize,
            callback=callback,
        )
        frames = denormalize_latents(unpack_latents(latents.float(), height, width, layers))
        del latents
        out = []
        for k in range(1, layers + 1):
            out.append(postprocess(vae.decode(frames[:, :, k].to(device, vae_dtype)).float()))
    return out
