"""``--checkpoint FILE`` (single-file SD1.5 / SDXL) and captions.

Full-size layouts are checked on the meta device against the reference manifests'
fingerprints (sha256 over sorted key + shape, as ``tests/test_ldm_unet.py``); everything
that runs uses tiny checkpoints with the real key names (``training_helpers``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from training_helpers import one_thread, tiny_checkpoint_state, write_tiny_checkpoint  # noqa: F401

from lib_layerdiffuse import ldm_unet
from lib_layerdiffuse.training import base_checkpoint as bc
from lib_layerdiffuse.training import checkpoint as ckpt
from lib_layerdiffuse.training import cli, sd_models
from lib_layerdiffuse.training import data as tdata
from lib_layerdiffuse.training.errors import TrainingError
from lib_layerdiffuse.training.models import TrainEncoder, Widths

REFERENCE = Path(__file__).resolve().parent.parent.parent / "shared" / "reference" / "weights"
# (sha256 of sorted key + shape, tensors, elements) of the reference manifests; bigG without
# its logit_scale (a known extra)
FINGERPRINTS = {
    "base_vae_sd15_ldm": ("aca6b7a6cc1fc28e9ffa58fb5a5e4d9ea19d5ebe5905402396d98ba520c07185", 248, 83653863),
    "base_clip_l_sd15": ("b976f3cd24efe551092b495b863866680514cd52c8e47c27d3546d161bb9e928", 196, 123060480),
    "base_clip_l_sdxl": ("1bbd532b450defa10ed423becfc43d88b86087ae416fa17b4e4e98b67217ebf1", 196, 123060480),
    "base_openclip_bigg_sdxl": ("7addeba754974369b300e4bbbaf2319412d1d886e1b0b5bebe3783b6f97e475d", 389, 694659840),
}


def _layout(build, prefix: str) -> dict[str, list[int]]:
    with torch.device("meta"):
        module = build()
    return {prefix + k: list(v.shape) for k, v in module.state_dict().items()}


def _fingerprint(shapes: dict[str, list[int]]) -> tuple[str, int, int]:
    digest = hashlib.sha256("".join(f"{k}{v}" for k, v in sorted(shapes.items())).encode()).hexdigest()
    return digest, len(shapes), sum(math.prod(s) for s in shapes.values())


FULL = {
    "base_vae_sd15_ldm": (sd_models.LDMAutoencoderKL, bc.VAE),
    "base_clip_l_sd15": (sd_models.CLIPTextModel, bc.CLIP_SD15),
    "base_clip_l_sdxl": (sd_models.CLIPTextModel, bc.CLIP_L_SDXL),
    "base_openclip_bigg_sdxl": (sd_models.OpenCLIPTextModel, bc.BIGG_SDXL),
}


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_size_layouts_match_reference(name):
    build, prefix = FULL[name]
    got = _layout(build, prefix)
    assert _fingerprint(got) == FINGERPRINTS[name]
    manifest = REFERENCE / f"{name}.json"
    if manifest.exists():  # the manifests themselves, where this checkout sits beside them
        ref = {k: v["shape"] for k, v in json.loads(manifest.read_text())["tensors"].items()}
        assert {k for k in ref if k not in got} <= {prefix + "logit_scale"}
        assert all(bc.is_known_extra(k) for k in set(ref) - set(got))
        assert {k: ref[k] for k in got} == got


@pytest.mark.parametrize("family, config", [("sd15", ldm_unet.SD15_CONFIG), ("sdxl", ldm_unet.SDXL_CONFIG)])
def test_unet_config_read_from_full_size_shapes(family, config):
    """The widths the loader reads from a file's shapes rebuild the full UNet exactly (meta)."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in ldm_unet.UNetModel(**config).state_dict().items()}
        rebuilt = ldm_unet.UNetModel(**bc.unet_config(shapes, family))
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == shapes
    assert bc.detect_family({bc.UNET + "x", *(p + "text_model.x" for p in [bc.CLIP_SD15])}) == "sd15"


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    torch.set_num_threads(1)
    files = {f: write_tiny_checkpoint(d / f"{f}.safetensors", f) for f in ("sd15", "sdxl")}
    torch.manual_seed(0)
    enc = TrainEncoder(Widths.named("tiny").encoder)
    files["encoder"] = ckpt.atomic_save(ckpt.encoder_export_state(enc, 1e-1, torch.float32), d / "enc.safetensors")
    return files


def test_tiny_checkpoints_load_strict_in_the_frozen_dtype(tiny_files):
    sd = bc.load_base(tiny_files["sd15"], "fp16")
    assert sd.family == "sd15" and sd.latent_scale == 0.18215 and sd.ignored == ()
    assert sd.unet.input_blocks[0][0].weight.dtype == torch.float16
    assert sd.unet.out[0].weight.dtype == torch.float32  # GroupNorm32 normalises in fp32
    assert sd.vae.quant_conv.weight.dtype == torch.float32  # SD VAEs overflow in fp16
    ctx, y = sd.text(["a red glass", "a red glass", "a blue bottle"], 64)
    assert ctx.shape == (3, 77, 32) and y is None and torch.isfinite(ctx).all()
    assert torch.equal(ctx[0], ctx[1]) and not torch.equal(ctx[0], ctx[2])
    eps = sd.unet(torch.randn(1, 4, 16, 16), torch.tensor([10]), ctx[:1].half())
    mean, std = sd.vae.encode(torch.rand(1, 3, 32, 32))
    assert eps.shape == (1, 4, 16, 16) and mean.shape == (1, 4, 4, 4) and (std > 0).all()
    assert sd.vae.decode(mean).shape == (1, 3, 32, 32)

    xl = bc.load_base(tiny_files["sdxl"], "bf16", parts=("text",))
    assert xl.family == "sdxl" and xl.latent_scale == 0.13025 and xl.unet is None and xl.vae is None
    ctx, y = xl.text(["a cat", ""], 48)
    assert ctx.shape == (2, 77, 64) and y.shape == (2, 16 + 6 * 256)
    # y = [bigG pooled, size embeddings of (48, 48), (0, 0), (48, 48)]
    sizes = ldm_unet.timestep_embedding(torch.tensor([48.0, 48, 0, 0, 48, 48]), 256).flatten()
    torch.testing.assert_close(y[0, 16:], sizes)
    assert not torch.equal(y[0, :16], y[1, :16])


@functools.lru_cache(maxsize=2)
def _tiny_state(family: str) -> dict:
    return tiny_checkpoint_state(family)


def _save_variant(path, family, edit):
    state = dict(_tiny_state(family))
    edit(state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.mark.parametrize(
    "edit, words",
    [
        (
            lambda s: s.pop("first_stage_model.decoder.conv_out.bias"),
            "VAE does not load: 1 missing (first_stage_model.decoder.conv_out.bias)",
        ),  # fmt: skip
        (lambda s: s.__setitem__("model.diffusion_model.extra.weight", torch.zeros(1)), "1 unexpected"),
        (
            lambda s: s.__setitem__("cond_stage_model.transformer.text_model.final_layer_norm.weight", torch.ones(7)),
            "of another shape",
        ),  # fmt: skip
        (
            lambda s: s.__setitem__("model.diffusion_model.input_blocks.0.0.weight", torch.zeros(32, 9, 3, 3)),
            "9 input channels",
        ),  # fmt: skip
    ],
)
def test_parts_that_do_not_fit_are_refused(tmp_path, edit, words):
    path = _save_variant(tmp_path / "bad.safetensors", "sd15", edit)
    with pytest.raises(TrainingError, match="does not load|input channels") as e:
        bc.load_base(path)
    assert words in str(e.value)


@pytest.mark.parametrize(
    "keys, words",
    [
        ({"model.diffusion_model.x", "cond_stage_model.model.transformer.x"}, "SD2.x"),
        ({"model.diffusion_model.x", "conditioner.embedders.0.model.x"}, "without the SD1.5 or SDXL text"),
        ({"model.diffusion_model.x", "conditioner.embedders.1.model.x"}, "SDXL refiner"),
        ({"model.diffusion_model.double_blocks.0.x"}, "Flux"),
        ({"model.diffusion_model.joint_blocks.0.x"}, "SD3"),
        ({"down_blocks.0.x", "up_blocks.0.x"}, "diffusers-format"),
        ({"lora_unet_down_blocks_0.alpha"}, "LoRA"),
        ({"first_stage_model.encoder.conv_in.weight"}, "no model.diffusion_model"),
    ],
)
def test_other_families_are_named(keys, words):
    with pytest.raises(TrainingError, match=words):
        bc.detect_family(keys, "m.safetensors")


def test_unreadable_checkpoint_file(tmp_path, capsys):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"PK\x03\x04 a pickle zip")
    with pytest.raises(TrainingError, match="not a readable .safetensors"):
        bc.load_base(bad)
    rc = cli.main(["vae", "--synthetic", "8", "--checkpoint", str(tmp_path / "none.safetensors"),
                   "--out", str(tmp_path / "o"), "--steps", "1", "--widths", "tiny", "--size", "32"])  # fmt: skip
    assert rc == 1 and "no such file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# Captions


def _rgba(seed: int, size: int = 40) -> np.ndarray:
    img = np.random.default_rng(seed).integers(0, 255, (size, size, 4), dtype=np.uint8)
    img[:8, :, 3], img[8:, :, 3] = 0, 255
    return img


def _rgba_folder(d: Path, captions: dict[int, str | None], n: int = 4) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(_rgba(i)).save(d / f"img{i}.png")
    for i, text in captions.items():
        if text is not None:
            (d / f"img{i}.txt").write_text(text, encoding="utf-8")
    return d


def test_captions_txt_metadata_and_triplet_fallback(tmp_path):
    d = _rgba_folder(tmp_path / "rgba", {0: "a red glass\n"})
    (d / "metadata.jsonl").write_text(json.dumps({"file_name": "img0.png", "text": "ignored: the .txt wins"}) + "\n"
                                      + json.dumps({"file_name": "img1.png", "text": "a blue bottle"}) + "\n")  # fmt: skip
    ds = tdata.RGBAFolder(d, 32)
    assert ds.captions == ["a red glass", "a blue bottle", None, None] and ds.uncaptioned == 2
    assert ds[2]["caption"] == "" and "2 without a caption" in tdata.describe(ds)
    (d / "metadata.jsonl").write_text("{broken\n")
    with pytest.raises(tdata.NoUsableImagesError, match="metadata.jsonl line 1"):
        tdata.RGBAFolder(d, 32)

    t = tmp_path / "trip"
    for f in tdata.FRAME_NAMES:
        (t / f).mkdir(parents=True)
        for i in range(3):
            img = _rgba(i)
            Image.fromarray(img if f == "fg" else img[..., :3]).save(t / f / f"{i}.png")
    (t / "0.txt").write_text("one caption for all")
    (t / "fg" / "1.txt").write_text("a cat")
    (t / "blend" / "1.txt").write_text("a cat on a sofa")
    ds = tdata.TripletFolder(t, 32)
    assert ds.captions[0] == dict.fromkeys(tdata.FRAME_NAMES, "one caption for all")
    assert ds.captions[1] == {"fg": "a cat", "bg": "a cat on a sofa", "blend": "a cat on a sofa"}
    assert ds.uncaptioned == 1 and ds[2]["caption_bg"] == ""


def test_caption_dropout_is_deterministic_per_sample_and_step(tiny_files):
    from lib_layerdiffuse.training.unet_training import Conditioning, Frozen, UNetStageConfig

    base = bc.load_base(tiny_files["sd15"], parts=("unet", "text"))
    cfg = UNetStageConfig(out="unused", caption_dropout=0.5, size=32)
    cond = Conditioning(cfg, Frozen(None, base.unet, base.text), torch.device("cpu"))
    batch = {"caption": ["x"] * 64, "index": torch.arange(64)}
    a, b = cond.captions(batch, None, 3), cond.captions(batch, None, 3)
    assert a == b and 16 < a.count("") < 48 and cond.captions(batch, None, 4) != a
    assert cond.captions(batch, None, -1) == ["x"] * 64  # the held-out eval never drops
    ctx, y = cond(batch, -1)
    assert ctx.shape == (64, 77, 32) and y is None


def test_changing_a_caption_changes_the_context_the_unet_gets(tmp_path, tiny_files):
    from lib_layerdiffuse.training.diffusion_stage import DiffusionStageConfig, train_diffusion_stage

    def contexts(captions: dict[int, str], name: str) -> list[torch.Tensor]:
        data = _rgba_folder(tmp_path / name, captions, n=2)
        base = bc.load_base(tiny_files["sd15"], parts=("unet",))
        seen = []
        base.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["context"].clone()), with_kwargs=True)
        cfg = DiffusionStageConfig(out=str(tmp_path / f"out_{name}"), data=str(data), checkpoint=str(tiny_files["sd15"]),
                                   encoder=str(tiny_files["encoder"]), steps=1, batch_size=2, size=32, rank=2,
                                   eval_count=0, log_every=1)  # fmt: skip
        train_diffusion_stage(cfg, unet=base.unet)
        return seen

    text = bc.load_base(tiny_files["sd15"], parts=("text",)).text
    a = contexts({0: "a red glass", 1: "a blue bottle"}, "a")[0]
    b = contexts({0: "a red glass", 1: "a green bottle"}, "b")[0]
    want = {c: text([c], 32)[0][0] for c in ("a red glass", "a blue bottle", "a green bottle")}
    rows_a = {min(want, key=lambda c: (want[c] - row).abs().max()) for row in a}
    rows_b = {min(want, key=lambda c: (want[c] - row).abs().max()) for row in b}
    assert rows_a == {"a red glass", "a blue bottle"} and rows_b == {"a red glass", "a green bottle"}
    assert any(torch.equal(ra, rb) for ra in a for rb in b) and not all(
        any(torch.equal(ra, rb) for rb in b) for ra in a
    )


def test_cli_stages_on_tiny_checkpoints(tmp_path, tiny_files, capsys):
    data = _rgba_folder(tmp_path / "rgba", {0: "a red glass", 1: "a blue bottle"})
    common = ["--steps", "2", "--batch-size", "2", "--size", "32", "--eval-count", "0", "--log-every", "1"]
    out = tmp_path / "vae"
    rc = cli.main(["vae", "--checkpoint", str(tiny_files["sd15"]), "--data", str(data), "--out", str(out),
                   "--widths", "tiny", "--disc-width", "8", "--sample-every", "2", *common])  # fmt: skip
    assert rc == 0 and (out / ckpt.DECODER_FILE).is_file() and list((out / "samples").glob("*.png"))
    assert "frozen VAE of the SD1.5 checkpoint" in capsys.readouterr().out

    out = tmp_path / "transparent_attn"
    rc = cli.main(["layers", "--checkpoint", str(tiny_files["sd15"]), "--data", str(data), "--frames", "fg",
                   "--out", str(out), "--rank", "2", "--sample-steps", "2", *common])  # fmt: skip
    assert rc == 0 and (out / "samples" / "step_0000002.png").is_file()  # always at the last step
    printed = capsys.readouterr().out
    assert "4 images from" in printed and "2 without a caption (trained on the empty prompt)" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["official_counterpart"] == "layer_sd15_transparent_attn" and summary["base_family"] == "sd15"

    out = tmp_path / "xl"
    rc = cli.main(["diffusion", "--checkpoint", str(tiny_files["sdxl"]), "--data", str(data), "--encoder",
                   str(tiny_files["encoder"]), "--frozen-dtype", "fp16", "--rank", "4", "--out", str(out),
                   "--caption-dropout", "0.1", "--sample-every", "1", "--sample-steps", "2", *common])  # fmt: skip
    assert rc == 0 and (out / "unet_patch.safetensors").is_file()
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_0000001.png", "step_0000002.png"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["base_family"] == "sdxl" and summary["latent_scale"] == "0.13025"
    assert np.isfinite(summary["last_loss"])


def test_decoder_rgba_samples_beside_the_rgb_ones(tmp_path, tiny_files, decoder_file, capsys, monkeypatch):
    from lib_layerdiffuse import vae as core_vae

    calls = []

    def spy(decoder, pixel, latent, *a, **kw):
        out = real(decoder, pixel, latent, *a, **kw)
        calls.append((pixel.clone(), latent.clone(), out))
        return out

    real = core_vae.decode_rgba
    monkeypatch.setattr(core_vae, "decode_rgba", spy)
    data = _rgba_folder(tmp_path / "rgba", {0: "a red glass"})
    out = tmp_path / "attn"
    rc = cli.main(["layers", "--checkpoint", str(tiny_files["sd15"]), "--data", str(data), "--frames", "fg",
                   "--encoder", str(tiny_files["encoder"]), "--decoder", str(decoder_file), "--out", str(out),
                   "--steps", "1", "--batch-size", "2", "--size", "32", "--rank", "2", "--eval-count", "0",
                   "--sample-steps", "2"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "without --encoder" not in captured.out
    rgb = np.asarray(Image.open(out / "samples" / "step_0000001.png"))
    rgba = np.asarray(Image.open(out / "samples" / "step_0000001_rgba.png"))
    assert rgb.shape == rgba.shape == (32, 64, 4) and (rgb[..., 3] == 255).all()
    # the extension's decode (8 passes) ran on the RGB row shown and the unscaled latents
    ((pixel, latent, got),) = calls
    assert pixel.shape == (2, 3, 32, 32) and latent.shape == (2, 4, 4, 4)
    shown = torch.from_numpy(rgb[..., :3].astype(np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(torch.cat(list(pixel), dim=2), shown, atol=1 / 255, rtol=0)
    want = torch.cat(list(torch.cat([got[:, 1:4], got[:, :1]], dim=1)), dim=2).permute(1, 2, 0).numpy()
    assert np.abs(rgba / 255.0 - want).max() <= 1 / 255 + 1e-6 and 0 < rgba[..., 3].std()
    # without the stage-1 encoder the fg frame has no transparency offset: the run says so
    rc = cli.main(["layers", "--checkpoint", str(tiny_files["sd15"]), "--data", str(data), "--frames", "fg",
                   "--decoder", str(decoder_file), "--out", str(tmp_path / "plain"), "--steps", "1",
                   "--batch-size", "2", "--size", "32", "--rank", "2", "--eval-count", "0", "--sample-steps", "1"])  # fmt: skip
    assert rc == 0 and "--decoder without --encoder" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, rc, words",
    [
        (["--layer-mode", "fg2ble"], 2, "generates the blend, an image without alpha"),
        (["--decoder-is", "encoder"], 1, "is a transparent VAE encoder"),
        (["--decoder-is", "missing"], 1, "not found"),
    ],
)
def test_decoder_refused_at_start_up(tmp_path, tiny_files, decoder_file, capsys, extra, rc, words):
    decoder = {"encoder": str(tiny_files["encoder"]), "missing": str(tmp_path / "none.safetensors")}
    args = ["--decoder", str(decoder_file)]
    if extra[0] == "--decoder-is":
        args, extra = ["--decoder", decoder[extra[1]]], []
    got = cli.main(["diffusion", "--checkpoint", str(tiny_files["sdxl"]), "--synthetic", "4", "--out",
                    str(tmp_path / "o"), "--encoder", str(tiny_files["encoder"]), *args, *extra])  # fmt: skip
    captured = capsys.readouterr()
    assert got == rc and words in captured.err and "--decoder" in captured.err
    assert "checkpoint" not in captured.out  # refused before the checkpoint (or the data) loads


def test_cache_embeddings_per_dataset_and_text_encoder(tmp_path, tiny_files, capsys, monkeypatch):
    """--cache-embeddings: every caption's embedding computed once into the data folder's cache,
    keyed by the text encoders' file and the caption; later runs load no text encoder."""
    from lib_layerdiffuse.training import embeddings

    ckpt_file = tmp_path / "sd15.safetensors"
    ckpt_file.write_bytes(tiny_files["sd15"].read_bytes())
    data = _rgba_folder(tmp_path / "rgba", {0: "a red glass", 1: "a blue bottle"})
    common = ["layers", "--checkpoint", str(ckpt_file), "--data", str(data), "--frames", "fg", "--steps", "1",
              "--batch-size", "2", "--size", "32", "--rank", "2", "--eval-count", "0", "--sample-every", "0",
              "--cache-embeddings", "--no-resume", "--out"]  # fmt: skip

    def run(name: str) -> str:
        assert cli.main([*common, str(tmp_path / name)]) == 0, capsys.readouterr().err
        return capsys.readouterr().out

    out = run("a")
    (cache,) = (data / embeddings.CACHE_DIR).iterdir()
    assert "embeddings: 3 captions, 0 from the cache" in out and "3 encoded" in out  # two captions and ""
    # the cached embeddings are the encoders' own (another batch composition: float tolerance)
    text = bc.load_base(ckpt_file, parts=("text",)).text
    cached = embeddings.CachedText("sd15", cache, "cpu")
    for caption in ("a red glass", "a blue bottle", ""):
        torch.testing.assert_close(cached([caption], 32)[0], text([caption], 32)[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(TrainingError, match="not in the embedding cache"):
        cached(["never seen"], 32)

    # a second run loads no text encoder at all; a changed caption is the only one encoded
    loaded = []
    real_load_text = bc.load_text
    monkeypatch.setattr(bc, "load_text", lambda *a, **kw: loaded.append(1) or real_load_text(*a, **kw))
    assert "3 from the cache" in run("b") and loaded == []
    (data / "img1.txt").write_text("a green bottle")
    out = run("c")
    assert "3 captions, 2 from the cache" in out and "1 encoded" in out and loaded == [1]
    # another text encoder file (here: the same file, touched) gets its own cache
    os.utime(ckpt_file, ns=(1, 1))
    assert "0 from the cache" in run("d") and len(list((data / embeddings.CACHE_DIR).iterdir())) == 2
