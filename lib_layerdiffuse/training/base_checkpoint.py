"""``--checkpoint FILE``: the frozen VAE, UNet and text encoders of a single-file SD1.5 or
SDXL ``.safetensors`` (ldm/sgm key names, as AUTOMATIC1111, Forge and model sites
distribute them).

* SD1.5: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE),
  ``cond_stage_model.transformer.text_model.*`` (CLIP-L, last layer after its final norm).
* SDXL: the same UNet and VAE prefixes, ``conditioner.embedders.0.transformer.text_model.*``
  (CLIP-L, penultimate layer) and ``conditioner.embedders.1.model.*`` (OpenCLIP bigG,
  penultimate layer; its pooled projection goes into ``y`` with the size/crop conditioning).

The family is read from the keys; other families (SD2.x, the SDXL refiner, SD3, Flux,
inpainting UNets, diffusers folders, LoRA files) are refused by name. Each part loads
strictly: a missing or unexpected key is refused (the message names a few), except the
extras real files carry (:data:`KNOWN_EXTRAS`). The widths are read from the tensor shapes,
so the same code loads the full models and the tiny test checkpoints with the real names
(``tests/training_helpers.py``). Models are built on the meta device and take the file's
tensors (``assign=True``), converted to ``--frozen-dtype``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .. import ldm_unet
from .errors import TrainingError
from .finite import require_finite
from .sd_models import CLIPTextModel, LDMAutoencoderKL, OpenCLIPTextModel, TextConfig, VAEConfig
from .tokenizer import EOS, default_tokenizer

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP_SD15 = "cond_stage_model.transformer."
CLIP_L_SDXL, BIGG_SDXL = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
LATENT_SCALE = {"sd15": 0.18215, "sdxl": 0.13025}
FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}
FROZEN_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SDXL_SIZE_EMBED = 256  # per number of SDXL's size/crop conditioning (ldm timestep embedding)

# Tensors real single-file checkpoints carry that no frozen part uses: the DDPM schedule
# buffers of the ldm/sgm model wrapper, EMA copies, CLIP's position_ids and logit_scale,
# and the VAE's training-loss leftovers.
_SCHEDULE = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
             "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
             "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
             "logvar")  # fmt: skip
# Marker keys of v-prediction / zero-terminal-SNR checkpoints (NoobAI-XL v-pred and others), read
# as the hosts read them: their presence, not their value.
V_PRED_KEY, ZTSNR_KEY = "v_pred", "ztsnr"
KNOWN_EXTRAS = re.compile(
    r"^(?:"
    + "|".join((*_SCHEDULE, V_PRED_KEY, ZTSNR_KEY))
    + r")$|^model_ema\.|\.position_ids$|\.logit_scale$|^logit_scale$|"
    r"^first_stage_model\.loss\."
)


def is_known_extra(key: str) -> bool:
    return bool(KNOWN_EXTRAS.search(key))


def _few(keys: Iterable[str], n: int = 4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def detect_family(keys: Iterable[str], path: str | Path = "the checkpoint") -> str:
    """``"sd15"`` or ``"sdxl"`` from a single-file checkpoint's keys; other files are a
    :class:`TrainingError` that says what they look like."""
    keys = set(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    what = None
    if has(UNET + "double_blocks.") or has("double_blocks."):
        what = "a Flux model"
    elif has(UNET + "joint_blocks."):
        what = "an SD3 model"
    elif not has(UNET) and (has("down_blocks.") or has("unet.") or has("text_model.")):
        what = "a diffusers-format file (convert it to a single-file ldm checkpoint)"
    elif any(k.startswith(("lora_unet_", "lora_te", "lora.")) for k in keys):
        what = "a LoRA file"
    elif not has(UNET):
        what = "not a single-file model (no model.diffusion_model.* UNet keys)"
    elif has("cond_stage_model.model."):
        what = "an SD2.x model (OpenCLIP-H text encoder)"
    elif has(BIGG_SDXL) and not has(CLIP_L_SDXL):
        what = "the SDXL refiner (bigG text encoder only)"
    if what is None:
        if has(CLIP_SD15 + "text_model."):
            family = "sd15"
        elif has(CLIP_L_SDXL + "text_model.") and has(BIGG_SDXL):
            family = "sdxl"
        else:
            what = "a model without the SD1.5 or SDXL text encoder keys"
    if what is not None:
        raise TrainingError(f"{path} is {what}; --checkpoint takes a single-file SD1.5 or SDXL .safetensors "
                            "(model.diffusion_model.*, first_stage_model.*, and cond_stage_model.transformer.* "
                            "or conditioner.embedders.*)")  # fmt: skip
    return family


# ---------------------------------------------------------------------------------------
# Widths from shapes


def _count(keys: set[str], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := rx.match(k))})


def unet_config(shapes: dict[str, tuple[int, ...]], family: str) -> dict:
    """An :class:`~lib_layerdiffuse.ldm_unet.UNetModel` config from the UNet's tensor shapes
    (keys without the prefix); heads follow the family (SD1.5: 8 heads; SDXL: 64 channels each)."""
    keys = set(shapes)
    conv_in = shapes["input_blocks.0.0.weight"]
    mc = conv_in[0]
    widths, depths, res = [], [], []
    n_in = _count(keys, r"^input_blocks\.(\d+)\.")
    level_res, level_depth = 0, 0
    for i in range(1, n_in):
        if f"input_blocks.{i}.0.op.weight" in keys:  # a Downsample ends the level
            res.append(level_res)
            depths.append(level_depth)
            level_res, level_depth = 0, 0
            continue
        out = shapes[f"input_blocks.{i}.0.in_layers.2.weight"][0]
        if level_res == 0:
            widths.append(out)
        level_res += 1
        level_depth = _count(keys, rf"^input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.")
    res.append(level_res)
    depths.append(level_depth)
    to_k = next(s for k, s in shapes.items() if k.endswith("attn2.to_k.weight"))
    proj_in = next(s for k, s in shapes.items() if k.endswith(".proj_in.weight"))
    cfg = dict(
        in_channels=conv_in[1],
        model_channels=mc,
        out_channels=shapes["out.2.weight"][0],
        num_res_blocks=tuple(res),
        channel_mult=tuple(w // mc for w in widths),
        transformer_depth=tuple(depths),
        transformer_depth_middle=_count(keys, r"^middle_block\.1\.transformer_blocks\.(\d+)\."),
        context_dim=to_k[1],
        use_linear_in_transformer=len(proj_in) == 2,
    )
    if family == "sd15":
        cfg["num_heads"] = 8
    else:
        cfg["num_head_channels"] = min(64, mc)
    if "label_emb.0.0.weight" in keys:
        cfg["adm_in_channels"] = shapes["label_emb.0.0.weight"][1]
    return cfg


def vae_config(shapes: dict[str, tuple[int, ...]]) -> VAEConfig:
    keys = set(shapes)
    ch = shapes["encoder.conv_in.weight"][0]
    levels = _count(keys, r"^encoder\.down\.(\d+)\.")
    mult = tuple(shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] // ch for i in range(levels))
    blocks = _count(keys, r"^encoder\.down\.0\.block\.(\d+)\.")
    return VAEConfig(ch=ch, ch_mult=mult, num_res_blocks=blocks, z_channels=shapes["post_quant_conv.weight"][0],
                     groups=32 if ch % 32 == 0 else ch)  # fmt: skip


def clip_config(shapes: dict[str, tuple[int, ...]]) -> TextConfig:
    vocab, width = shapes["text_model.embeddings.token_embedding.weight"]
    return TextConfig(vocab=vocab, tokens=shapes["text_model.embeddings.position_embedding.weight"][0], width=width,
                      layers=_count(set(shapes), r"^text_model\.encoder\.layers\.(\d+)\."), heads=max(1, width // 64),
                      mlp=shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0])  # fmt: skip


def openclip_config(shapes: dict[str, tuple[int, ...]]) -> TextConfig:
    vocab, width = shapes["token_embedding.weight"]
    return TextConfig(vocab=vocab, tokens=shapes["positional_embedding"][0], width=width,
                      layers=_count(set(shapes), r"^transformer\.resblocks\.(\d+)\."), heads=max(1, width // 64),
                      mlp=shapes["transformer.resblocks.0.mlp.c_fc.weight"][0],
                      projection=shapes["text_projection"][1])  # fmt: skip


# ---------------------------------------------------------------------------------------
# Loading


class CheckpointFile:
    """An open single-file checkpoint: its keys, shapes and family; :meth:`load` builds a part."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise TrainingError(f"--checkpoint {self.path}: no such file")
        try:
            self._f = safe_open(str(self.path), framework="pt", device="cpu")
            self.keys = set(self._f.keys())
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
            raise TrainingError(f"--checkpoint {self.path} is not a readable .safetensors file "
                                f"({type(e).__name__}: {str(e)[:200]}); .ckpt pickles are not loaded") from None  # fmt: skip
        self.family = detect_family(self.keys, self.path)
        unknown = [k for k in self.keys if not k.startswith(self._prefixes()) and not is_known_extra(k)]
        self.ignored = sorted(unknown)  # other top-level tensors: reported, not used
        self.v_pred, self.ztsnr = V_PRED_KEY in self.keys, ZTSNR_KEY in self.keys

    def _prefixes(self) -> tuple[str, ...]:
        return (UNET, VAE, CLIP_SD15) if self.family == "sd15" else (UNET, VAE, CLIP_L_SDXL, BIGG_SDXL)

    def shapes(self, prefix: str) -> dict[str, tuple[int, ...]]:
        return {k[len(prefix) :]: tuple(self._f.get_slice(k).get_shape()) for k in self.keys if k.startswith(prefix)}

    def load(self, build, prefix: str, what: str, dtype: torch.dtype, device="cpu") -> nn.Module:
        """``build(shapes)`` on the meta device, then the file's tensors under ``prefix``, strictly."""
        shapes = self.shapes(prefix)
        if not shapes:
            raise TrainingError(f"{self.path} has no {what} ({prefix}*)")
        try:
            with torch.device("meta"):
                module = build(shapes)
        except (KeyError, StopIteration, ValueError, ZeroDivisionError) as e:
            raise TrainingError(f"{self.path}: the {what} tensors ({prefix}*) do not form a "
                                f"{FAMILY_NAMES[self.family]} {what} ({type(e).__name__}: {e})") from None  # fmt: skip
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        missing = set(expected) - set(shapes)
        unexpected = {k for k in set(shapes) - set(expected) if not is_known_extra(prefix + k)}
        wrong = {k for k in set(expected) & set(shapes) if expected[k] != shapes[k]}
        if missing or unexpected or wrong:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing ({_few(prefix + k for k in missing)})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected ({_few(prefix + k for k in unexpected)})")
            if wrong:
                k = sorted(wrong)[0]
                parts.append(f"{len(wrong)} of another shape (e.g. {prefix}{k} {list(shapes[k])}, "
                             f"expected {list(expected[k])})")  # fmt: skip
            raise TrainingError(f"{self.path}: the {FAMILY_NAMES[self.family]} {what} does not load: "
                                + "; ".join(parts))  # fmt: skip
        state = {}
        for k in expected:
            t = self._f.get_tensor(prefix + k)
            state[k] = t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
        require_finite({prefix + k: v for k, v in state.items()}, f"--checkpoint {self.path}")
        module.load_state_dict(state, strict=True, assign=True)
        return module.eval().requires_grad_(False)


def load_vae(ckpt: CheckpointFile, dtype: torch.dtype, device="cpu") -> LDMAutoencoderKL:
    return ckpt.load(lambda s: LDMAutoencoderKL(vae_config(s)), VAE, "VAE", dtype, device)


def load_unet(ckpt: CheckpointFile, dtype: torch.dtype, device="cpu") -> ldm_unet.UNetModel:
    def build(shapes):
        cfg = unet_config(shapes, ckpt.family)
        if cfg["in_channels"] != 4:
            raise TrainingError(f"{ckpt.path}: the UNet takes {cfg['in_channels']} input channels (an inpainting or "
                                "instruct model?); --checkpoint needs a base text-to-image model (4)")  # fmt: skip
        return ldm_unet.UNetModel(**cfg)

    unet = ckpt.load(build, UNET, "UNet", dtype, device)
    for m in unet.modules():
        if isinstance(m, nn.GroupNorm):
            m.float()  # ldm_unet's GroupNorm32 normalises in fp32: its affine parameters must be fp32 too
    return unet


class TextConditioner:
    """Prompts -> the UNet's conditioning, as the family's WebUIs and training code build it.

    ``__call__(prompts, size) -> (context [B, 77, C], y [B, adm] or None)`` in fp32:
    SD1.5: CLIP-L's last layer after ``final_layer_norm``; SDXL: CLIP-L's and bigG's
    penultimate layers concatenated (768 + 1280), ``y`` = bigG's pooled projection and the
    ldm timestep embeddings (256 each) of original size (h, w), crop (0, 0) and target size
    (h, w), all ``size`` here (square centre crops). Embeddings are cached per prompt.
    """

    def __init__(self, family: str, clip: CLIPTextModel | None, bigg: OpenCLIPTextModel | None = None,
                 cache: int = 4096):  # fmt: skip
        self.family, self.clip, self.bigg = family, clip, bigg
        self._tokenizer = None  # built at the first encode (a cached conditioner never needs it)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._cache_size = cache

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = default_tokenizer()
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        return self.clip.text_model.final_layer_norm.weight.device

    def to(self, device) -> TextConditioner:
        self.clip.to(device)
        if self.bigg is not None:
            self.bigg.to(device)
        self._cache.clear()
        return self

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        dev = self.device
        ids = self.tokenizer(prompts, pad=EOS).to(dev)
        if self.family == "sd15":
            ctx = self.clip(ids, "last").float()
            return [(c, None) for c in ctx]
        ctx_l = self.clip(ids, "penultimate").float()
        ctx_g, pooled = self.bigg(self.tokenizer(prompts, pad=0).to(dev))  # open_clip pads with 0
        ctx = torch.cat([ctx_l, ctx_g.float()], dim=-1)
        return list(zip(ctx, pooled.float(), strict=True))

    def __call__(self, prompts: list[str], size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        todo = sorted({p for p in prompts if p not in self._cache})
        if todo:
            if len(self._cache) + len(todo) > self._cache_size:
                self._cache.clear()
            self._cache.update(zip(todo, self._encode(todo), strict=True))
        ctx = torch.stack([self._cache[p][0] for p in prompts])
        if self.family == "sd15":
            return ctx, None
        pooled = torch.stack([self._cache[p][1] for p in prompts])
        numbers = torch.tensor([size, size, 0, 0, size, size], dtype=torch.float32, device=pooled.device)
        sizes = ldm_unet.timestep_embedding(numbers, SDXL_SIZE_EMBED).flatten()
        return ctx, torch.cat([pooled, sizes.expand(len(prompts), -1)], dim=1)


def load_text(ckpt: CheckpointFile, dtype: torch.dtype, device="cpu") -> TextConditioner:
    if ckpt.family == "sd15":
        clip = ckpt.load(lambda s: CLIPTextModel(clip_config(s)), CLIP_SD15, "text encoder (CLIP-L)", dtype, device)
        return TextConditioner("sd15", clip)
    clip = ckpt.load(lambda s: CLIPTextModel(clip_config(s)), CLIP_L_SDXL, "text encoder (CLIP-L)", dtype, device)
    bigg = ckpt.load(lambda s: OpenCLIPTextModel(openclip_config(s)), BIGG_SDXL, "text encoder (OpenCLIP bigG)",
                     dtype, device)  # fmt: skip
    return TextConditioner("sdxl", clip, bigg)


@dataclass
class BaseModels:
    """The frozen parts a stage asked for (None where not asked)."""

    family: str
    latent_scale: float
    vae: LDMAutoencoderKL | None = None
    unet: ldm_unet.UNetModel | None = None
    text: TextConditioner | None = None
    ignored: tuple[str, ...] = ()
    v_pred: bool = False  # the checkpoint has a v_pred key (a v-prediction model)
    ztsnr: bool = False  # the checkpoint has a ztsnr key (trained on the zero-terminal-SNR schedule)


def load_base(path: str | Path, frozen_dtype: str = "fp32", parts: Iterable[str] = ("vae", "unet", "text"),
              device="cpu") -> BaseModels:  # fmt: skip
    """Open ``path``, check its family and load the asked ``parts`` strictly.

    The UNet and text encoders take ``frozen_dtype``; the VAE stays fp32 unless bf16 is
    asked (SD VAEs, SDXL's above all, overflow in fp16)."""
    if frozen_dtype not in FROZEN_DTYPES:
        raise TrainingError(f"--frozen-dtype must be one of {', '.join(FROZEN_DTYPES)}, got {frozen_dtype!r}")
    dtype = FROZEN_DTYPES[frozen_dtype]
    ckpt = CheckpointFile(path)
    parts = set(parts)
    out = BaseModels(ckpt.family, LATENT_SCALE[ckpt.family], ignored=tuple(ckpt.ignored), v_pred=ckpt.v_pred,
                     ztsnr=ckpt.ztsnr)  # fmt: skip
    if "vae" in parts:
        out.vae = load_vae(ckpt, torch.bfloat16 if dtype == torch.bfloat16 else torch.float32, device)
    if "unet" in parts:
        out.unet = load_unet(ckpt, dtype, device)
    if "text" in parts:
        out.text = load_text(ckpt, dtype, device)
    return out
