"""Training stages 2 and 3: diffusion fine-tune (§3.2) and attention-sharing LoRAs (§3.3).

Tiny UNets (ldm names), a stand-in tiny VAE and a tiny stage-1 encoder export; every run
is a few dozen steps at 32 px on one thread.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tolerance import assert_close_rel
from training_helpers import one_thread, read_trace  # noqa: F401  (one_thread: autouse fixture)

from lib_layerdiffuse import attention_sharing as sharing
from lib_layerdiffuse import modes
from lib_layerdiffuse import patches as core_patches
from lib_layerdiffuse.session import load_sharing
from lib_layerdiffuse.training import checkpoint as ckpt
from lib_layerdiffuse.training import data as tdata
from lib_layerdiffuse.training import dist
from lib_layerdiffuse.training.diffusion_stage import (
    PATCH_FILE,
    DiffusionStageConfig,
    UNetDelta,
    train_diffusion_stage,
)
from lib_layerdiffuse.training.layers_stage import (
    SHARING_FILE,
    LayerSharingModel,
    LayersStageConfig,
    frame_layout,
    train_layers_stage,
)
from lib_layerdiffuse.training.models import TrainEncoder, Widths
from lib_layerdiffuse.training.unet_training import (
    build_unet,
    draw_noise_and_timesteps,
    load_transparent_encoder,
    scaled_linear_alphas_cumprod,
)
from lib_layerdiffuse.training.vae_stage import VAEStageConfig, pretrain_tiny_vae

COMMON = dict(size=32, rank=4, context_tokens=8, vae_width=8, log_every=5, save_every=1000, eval_count=4)


@pytest.fixture(scope="module")
def frozen_files(tmp_path_factory):
    """A stand-in VAE (15 steps) and a tiny stage-1 encoder export with a live offset."""
    d = tmp_path_factory.mktemp("frozen")
    torch.set_num_threads(1)
    vae = d / "tiny_vae.safetensors"
    cfg = VAEStageConfig(out=str(d), synthetic=64, vae_steps=15, widths="tiny", size=32, batch_size=4, vae_width=8,
                         log_every=100)  # fmt: skip
    pretrain_tiny_vae(cfg, dist.DistInfo(), vae)
    torch.manual_seed(0)
    enc = TrainEncoder(Widths.named("tiny").encoder)
    with torch.no_grad():
        enc.last_conv.weight.normal_(0, 0.1)
    encoder = ckpt.atomic_save(ckpt.encoder_export_state(enc, 1e-1, torch.float32), d / "enc.safetensors")
    return {"vae_path": str(vae), "encoder": str(encoder)}


def _trace(out):
    return read_trace(out / "trace")


def _model_state(out) -> dict:
    state = load_file(str(out / ckpt.STATE_FILE))
    prefix = "model.model."  # checkpoint.save_state's "model." + the stage's module name "model"
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------
# Pieces


def test_schedule_draws_and_encoder_file(frozen_files):
    acp = scaled_linear_alphas_cumprod()
    assert acp.shape == (1000,) and acp[0] == pytest.approx(0.99915) and acp[-1] == pytest.approx(0.0047, abs=2e-4)
    n1, t1 = draw_noise_and_timesteps([3, 9], 5, 0, (4, 2, 2))
    n2, t2 = draw_noise_and_timesteps([9], 5, 0, (4, 2, 2))  # per sample: batch composition does not matter
    assert torch.equal(n1[1], n2[0]) and t1[1] == t2[0]
    assert not torch.equal(draw_noise_and_timesteps([9], 6, 0, (4, 2, 2))[0], n2)
    enc = load_transparent_encoder(frozen_files["encoder"], "cpu")
    assert [m.out_channels for m in enc.blocks if isinstance(m, torch.nn.Conv2d)][:8] == list(
        Widths.named("tiny").encoder
    )
    assert all(not p.requires_grad for p in enc.parameters())


def test_synthetic_and_folder_triplets(tmp_path):
    item = tdata.SyntheticTriplets(3, 32, seed=1)[2]
    fg = item["fg_rgba"].permute(1, 2, 0).numpy()
    blend = tdata.blend_over(fg, item["bg"].permute(1, 2, 0).numpy())
    np.testing.assert_allclose(item["blend"].permute(1, 2, 0).numpy(), blend, atol=1e-6)
    assert 0 < float(item["fg_alpha"].mean()) < 1 and item["bg"].shape == (3, 32, 32)

    with pytest.raises(tdata.NoUsableImagesError, match="fg/, bg/ and blend/"):
        tdata.TripletFolder(tmp_path, 32)
    for d in tdata.FRAME_NAMES:
        (tmp_path / d).mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "opaque", "lonely"):
        rgba = rng.integers(0, 256, (40, 48, 4), dtype=np.uint8)
        rgba[:8, :, 3] = 0
        rgba[8:, :, 3] = 255 if name != "opaque" else 255
        if name == "opaque":
            rgba[..., 3] = 255
        Image.fromarray(rgba).save(tmp_path / "fg" / f"{name}.png")
        if name != "lonely":
            Image.fromarray(rgba[..., :3]).save(tmp_path / "bg" / f"{name}.jpg")
            Image.fromarray(rgba[..., :3]).save(tmp_path / "blend" / f"{name}.png")
    ds = tdata.TripletFolder(tmp_path, 32)
    assert ds.names == ["a", "b"]
    assert ds.rejected == {"fg no transparent pixel": 1, "no matching bg/blend file": 1}
    it = ds[1]
    assert it["fg_premult"].shape == it["bg"].shape == it["blend"].shape == (3, 32, 32) and it["index"] == 1


def test_frame_layouts():
    def lay(**kw):
        return frame_layout(LayersStageConfig(out="x", **kw))

    assert lay(frames="fg,bg,blend") == (["fg", "bg", "blend"], None, None)
    assert lay(frames="fg,bg", condition="fg") == (["fg", "bg"], "fg", None)
    assert lay(frames="fg,bg,blend", condition="fg", condition_via="control") == (["bg", "blend"], None, "fg")
    assert lay(frames="fg,bg,blend", condition="bg", condition_via="control") == (["fg", "blend"], None, "bg")
    for bad in (dict(frames="fg,fg"), dict(frames="fg,cat"), dict(frames="bg", condition="fg"),
                dict(frames="fg", condition="fg", condition_via="control")):  # fmt: skip
        with pytest.raises(ValueError):
            lay(**bad)


def test_tiny_sd15_preset_has_the_32_attention_modules():
    unet = build_unet("tiny-sd15", 0)
    assert all(isinstance(unet.get_submodule(n), torch.nn.Module) for n in sharing.MODULE_MAP_SD15)
    assert len(sharing.MODULE_MAP_SD15) == 32
    with pytest.raises(ValueError, match="SD1.5"):
        LayerSharingModel(build_unet("tiny-sdxl", 0), 2, False, 4)


# ---------------------------------------------------------------------------------------
# Stage 2: diffusion fine-tune


def _diffusion(tmp_path, frozen_files, **kw):
    cfg = dict(COMMON, synthetic=32, batch_size=4, lr=1e-2, export_dtype="fp32", trace_dir=str(tmp_path / "trace"))
    cfg.update(frozen_files)
    cfg.update(kw)
    return DiffusionStageConfig(out=str(tmp_path), **cfg)


def _check_patch_reproduces(out, cfg: DiffusionStageConfig):
    base = build_unet(cfg.unet_preset, cfg.seed)  # the same base the run built
    mode = cfg.mode or "lora"  # the config's None: lora (no --init)
    delta = UNetDelta(base, mode, cfg.rank, cfg.targets or "attn")
    delta.load_state_dict(_model_state(out), strict=True)
    trained = delta.effective()
    state = load_file(str(out / PATCH_FILE))
    suffix = {"lora": ("::lora::0", "::lora::1"), "diff": ("::diff::0",)}[mode]
    assert set(state) == {f"diffusion_model.{n}{s}" for n in delta.names for s in suffix}
    if mode == "lora":
        k = f"diffusion_model.{delta.names[0]}"
        w = dict(base.named_parameters())[delta.names[0]]
        assert state[k + "::lora::0"].shape == (w.shape[0], cfg.rank) and state[k + "::lora::1"].shape == (
            cfg.rank,
            w.shape[1],
        )
    params = {core_patches.PREFIX + n: p.detach() for n, p in base.named_parameters()}
    patched = core_patches.compute_patched_tensors(params, core_patches.parse_patch_state(state), 1.0)
    assert len(patched) == len(trained)
    for n, w in trained.items():
        assert torch.equal(patched[core_patches.PREFIX + n], w.detach()), n  # bit for bit
    assert any(not torch.equal(w, dict(base.named_parameters())[n]) for n, w in trained.items())  # it trained
    # the patched UNet computes what the trained one does
    x, t = torch.randn(2, 4, 4, 4), torch.tensor([10, 900])
    ctx = torch.randn(2, cfg.context_tokens, 32)
    y = torch.randn(2, base.adm_in_channels) if base.adm_in_channels else None
    with torch.no_grad():
        want = delta(x, t, ctx, y)
        for n, p in base.named_parameters():
            if core_patches.PREFIX + n in patched:
                p.copy_(patched[core_patches.PREFIX + n])
        got = base(x, t, ctx) if y is None else base(x, t, ctx, y)
    # Same weights bit for bit (above), but two forwards over different buffers (functional_call's
    # substitutes vs the module's own parameters): BLAS kernels may take another summation path
    # for other addresses on some CPUs. |got - want| measured: 0 under ATEN_CPU_CAPABILITY=default
    # and avx2, 3.3e-7 on an AVX-512 CPU; the tolerance is ~15x that, the training's effect ~1.
    torch.testing.assert_close(got, want, rtol=0, atol=5e-6)


def test_diffusion_lora_loss_decreases_and_patch_reproduces(tmp_path, frozen_files):
    cfg = _diffusion(tmp_path, frozen_files, steps=30)
    summary = train_diffusion_stage(cfg)
    tr = _trace(tmp_path)
    assert [t["step"] for t in tr] == list(range(30))
    assert summary["eval_loss_end"] < 0.97 * summary["eval_loss_start"], summary
    meta = ckpt.read_metadata(tmp_path / PATCH_FILE)
    assert meta["mode"] == "lora" and meta["step"] == "30" and float(meta["latent_scale"]) > 0
    _check_patch_reproduces(tmp_path, cfg)


def test_diffusion_diff_mode_sdxl_style_unet(tmp_path, frozen_files):
    cfg = _diffusion(tmp_path, frozen_files, steps=20, mode="diff", targets="all", unet_preset="tiny-sdxl", lr=1e-3)
    summary = train_diffusion_stage(cfg)
    assert summary["eval_loss_end"] < 0.9 * summary["eval_loss_start"], summary
    _check_patch_reproduces(tmp_path, cfg)


def test_diffusion_resume_continues(tmp_path, frozen_files):
    kw = dict(batch_size=2, eval_count=0, save_every=3)
    a, b = tmp_path / "a", tmp_path / "b"
    train_diffusion_stage(_diffusion(a, frozen_files, steps=5, **kw))
    train_diffusion_stage(_diffusion(b, frozen_files, steps=3, **kw))
    assert ckpt.read_metadata(b / ckpt.STATE_FILE)["step"] == "3"
    summary = train_diffusion_stage(_diffusion(b, frozen_files, steps=5, **kw))
    ta, tb = _trace(a), _trace(b)
    assert [t["step"] for t in tb] == [0, 1, 2, 3, 4] and summary["steps_run"] == 2
    for x, y in zip(ta, tb, strict=True):
        assert x["indices"] == y["indices"] and x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    assert ta[-1]["params"] == tb[-1]["params"]
    with pytest.raises(ValueError, match="another set-up"):
        train_diffusion_stage(_diffusion(b, frozen_files, steps=6, mode="diff", **kw))


# ---------------------------------------------------------------------------------------
# Stage 3: layers


def _layers(tmp_path, frozen_files, **kw):
    cfg = dict(COMMON, synthetic=32, batch_size=2, lr=1e-2, export_dtype="fp32", trace_dir=str(tmp_path / "trace"))
    cfg.update(frozen_files)
    cfg.update(kw)
    return LayersStageConfig(out=str(tmp_path), **cfg)


def _check_sharing_export(out, cfg: LayersStageConfig, frames: int, control: bool):
    """The export loads strict into the core's AttentionSharing and samples like the trained model.

    Not bit for bit: the core multiplies by its cached contiguous merged weights, the trained
    units by a transposed view (another matmul path, another summation order). Measured
    |got - want| on values up to ~1: 5.1e-7 (ATEN_CPU_CAPABILITY=default) to 5.8e-6 (avx2 on an
    AVX-512 CPU), with control 2.7e-6: tests/tolerance.py's rule is 13x that or more.
    """
    state = load_file(str(out / SHARING_FILE))
    assert all(k.startswith("hookers.layers.") or (control and k.startswith("kwargs_encoder.")) for k in state)
    assert any(k.startswith("kwargs_encoder.") for k in state) == control
    assert {int(k.split(".")[2]) for k in state if k.startswith("hookers.")} == set(range(32))
    trained = LayerSharingModel(build_unet(cfg.unet_preset, cfg.seed), frames, control, cfg.rank).eval()
    trained.load_state_dict(_model_state(out), strict=True)
    base = build_unet(cfg.unet_preset, cfg.seed).eval()
    official = ckpt.read_metadata(out / SHARING_FILE)["official_counterpart"]
    if official:  # through the extension's own loader, as the mode that loads that file name
        mode = next(m for m in modes.MODES if m.unet_file == official)
        core = load_sharing(base, mode, state, f"{official}.safetensors")  # at the file's rank (cfg.rank here)
    else:
        core = sharing.AttentionSharing(base, frames, control, rank=sharing.file_rank(state))
        core.load_state_dict(state, strict=True)
    assert core.units[0].to_q_lora[0].down.weight.shape[0] == cfg.rank
    x, t = torch.randn(2 * frames, 4, 4, 4), torch.tensor([500] * 2 * frames)
    ctx = torch.randn(2 * frames, cfg.context_tokens, 32)
    image = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        want = trained(x, t, ctx, image.expand(2, -1, -1, -1) if control else None)
        core.install()
        try:
            if control:
                core.set_control(image)
            got = base(x, t, ctx)
        finally:
            core.restore()
    assert_close_rel(got, want)
    return state


def test_layers_joint_loss_decreases_and_export_loads(tmp_path, frozen_files):
    cfg = _layers(tmp_path, frozen_files, steps=30, frames="fg,bg")
    summary = train_layers_stage(cfg)
    tr = _trace(tmp_path)
    assert np.mean([t["loss"] for t in tr[-5:]]) < np.mean([t["loss"] for t in tr[:5]])
    assert summary["eval_loss_end"] < 0.97 * summary["eval_loss_start"], summary
    assert "last_mse_fg" in summary and "last_mse_bg" in summary
    state = _check_sharing_export(tmp_path, cfg, 2, False)
    # the trained parts moved: LoRA ups and the temporal output start at zero
    assert float(state["hookers.layers.0.to_q_lora.1.up.weight"].abs().max()) > 0
    assert float(state["hookers.layers.31.temporal_o.weight"].abs().max()) > 0


def test_layers_fg2bg_control_layout(tmp_path, frozen_files):
    cfg = _layers(tmp_path, frozen_files, steps=2, batch_size=1, frames="fg,bg,blend", condition="fg",
                  condition_via="control", eval_count=0)  # fmt: skip
    train_layers_stage(cfg)
    meta = ckpt.read_metadata(tmp_path / SHARING_FILE)
    assert meta["frames"] == "bg,blend" and meta["control"] == "fg"
    assert meta["official_counterpart"] == "layer_sd15_fg2bg"
    state = _check_sharing_export(tmp_path, cfg, 2, True)
    assert float(state["hookers.layers.5.control_convs.1.2.weight"].abs().max()) > 0


def test_layers_eps_zero_condition_and_resume(tmp_path, frozen_files):
    kw = dict(batch_size=2, frames="fg,bg", condition="fg", eval_count=0, save_every=2)
    a, b = tmp_path / "a", tmp_path / "b"
    train_layers_stage(_layers(a, frozen_files, steps=3, **kw))
    train_layers_stage(_layers(b, frozen_files, steps=2, **kw))
    summary = train_layers_stage(_layers(b, frozen_files, steps=3, **kw))
    ta, tb = _trace(a), _trace(b)
    assert [t["step"] for t in tb] == [0, 1, 2] and summary["steps_run"] == 1
    assert tb[2]["loss"] == pytest.approx(ta[2]["loss"], rel=1e-5) and ta[2]["params"] == tb[2]["params"]
    # the condition frame's target is eps = 0: the base model starts far from it, the bg not
    assert ckpt.read_metadata(b / SHARING_FILE)["eps_zero_frame"] == "fg"
    assert all(np.isfinite(t["mse_fg"]) and np.isfinite(t["mse_bg"]) for t in ta)


def test_cli_diffusion_and_layers(tmp_path, frozen_files, capsys):
    from lib_layerdiffuse.training import cli as train

    common = ["--synthetic", "8", "--steps", "2", "--batch-size", "2", "--size", "32", "--rank", "2",
              "--context-tokens", "4", "--vae-path", frozen_files["vae_path"], "--log-every", "1",
              "--eval-count", "2"]  # fmt: skip
    rc = train.main(["diffusion", "--out", str(tmp_path / "d"), "--encoder", frozen_files["encoder"], *common])
    assert rc == 0 and (tmp_path / "d" / PATCH_FILE).is_file()
    rc = train.main(["layers", "--out", str(tmp_path / "l"), "--frames", "fg,bg,blend", *common])
    assert rc == 0 and (tmp_path / "l" / SHARING_FILE).is_file()
    assert json.loads((tmp_path / "l" / "summary.json").read_text())["official_counterpart"] == "layer_sd15_joint"
    printed = capsys.readouterr().out
    assert "[diffusion] step 2/2" in printed and "[layers] step 2/2" in printed
