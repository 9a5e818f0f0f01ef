"""v-prediction, zero terminal SNR and ``--init`` in the trainer (issue 23 items 3 and 4).

Tiny checkpoints with the real key names (``training_helpers``), tiny UNet presets, 1-2
steps at 32 px: what is checked is the parameterisation, the summary and the files, not
the quality of the training.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from training_helpers import one_thread, tiny_checkpoint_state, write_rgba_folder  # noqa: F401
from weightgen import make_state_dict

from lib_layerdiffuse import schedules
from lib_layerdiffuse.training import checkpoint as ckpt
from lib_layerdiffuse.training import cli, sampling
from lib_layerdiffuse.training.config import LayersStageConfig
from lib_layerdiffuse.training.diffusion_stage import PATCH_FILE, UNetDelta
from lib_layerdiffuse.training.layers_stage import SHARING_FILE, LayerSharingModel
from lib_layerdiffuse.training.models import TrainDecoder, TrainEncoder, Widths
from lib_layerdiffuse.training.unet_training import build_unet, noise_schedule

# ---------------------------------------------------------------------------------------
# The formulas


def test_v_target_matches_the_formula_on_a_small_case():
    x0 = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    eps = torch.tensor([[0.25, 1.0], [-1.0, 2.0]])
    abar = torch.tensor([0.64, 0.09])  # sqrt: 0.8 / 0.3; sqrt(1 - abar): 0.6 / 0.953939...
    want = torch.tensor([[0.8 * 0.25 - 0.6 * 1.0, 0.8 * 1.0 - 0.6 * -2.0],
                         [0.3 * -1.0 - 0.91**0.5 * 0.5, 0.3 * 2.0 - 0.91**0.5 * 3.0]])  # fmt: skip
    assert torch.allclose(schedules.v_target(x0, eps, abar), want, atol=1e-6)
    assert torch.equal(schedules.target("eps", x0, eps, abar), eps)
    # and back: x_t and v give x0 and eps again
    x_t = schedules.q_sample(x0, eps, abar)
    got_x0, got_eps = schedules.x0_and_eps("v", x_t, schedules.v_target(x0, eps, abar), abar)
    assert torch.allclose(got_x0, x0, atol=1e-6) and torch.allclose(got_eps, eps, atol=1e-6)


def test_zero_terminal_snr_rescale_keeps_the_first_and_zeroes_the_last():
    acp = schedules.scaled_linear_alphas_cumprod()
    z = schedules.rescale_zero_terminal_snr(acp)
    assert z[0] == pytest.approx(float(acp[0]), rel=1e-6)
    assert float(z[-1]) == pytest.approx(schedules.HOST_TERMINAL_ABAR, rel=1e-6)  # as the hosts: sigma finite
    assert float(schedules.rescale_zero_terminal_snr(acp, terminal=0.0)[-1]) == 0.0
    assert bool((z[1:] < z[:-1]).all())  # still strictly decreasing
    # sqrt(abar) is an affine map of the original's: shift and scale (Lin et al. 2024 Algorithm 1)
    s, s0 = z[:-1].double().sqrt(), acp[:-1].double().sqrt()
    a = (s0 - acp[-1].double().sqrt()) * (acp[0].double().sqrt() / (acp[0].double().sqrt() - acp[-1].double().sqrt()))
    assert torch.allclose(s, a, atol=1e-6)


@pytest.mark.parametrize("terminal", [schedules.HOST_TERMINAL_ABAR, 0.0])
def test_v_loss_and_preview_are_finite_at_every_timestep_of_a_ztsnr_schedule(terminal):
    acp = schedules.rescale_zero_terminal_snr(schedules.scaled_linear_alphas_cumprod(), terminal=terminal)
    t = torch.arange(1000)
    x0, eps = torch.randn(1000, 4, 2, 2), torch.randn(1000, 4, 2, 2)
    x_t = schedules.q_sample(x0, eps, acp[t])
    v = schedules.v_target(x0, eps, acp[t])
    assert bool(torch.isfinite(v).all()) and bool(torch.isfinite(x_t).all())
    x0_hat, eps_hat = schedules.x0_and_eps("v", x_t, torch.randn_like(v), acp[t])  # an untrained model's v
    assert bool(torch.isfinite(x0_hat).all()) and bool(torch.isfinite(eps_hat).all())
    # at the last step x_t is pure noise and the v target is -x0: what the model learns to recover
    assert torch.allclose(v[-1], -x0[-1], atol=1e-3)
    # the DDIM preview from t = 999 (abar ~ 0) down: finite for v and eps alike
    for prediction in ("v", "eps"):
        z = sampling.ddim(lambda x, t: torch.randn_like(x), (2, 4, 2, 2), acp, 1000, 0, "cpu", prediction)
        assert bool(torch.isfinite(z).all()), prediction


def test_auto_reads_the_checkpoint_keys_and_explicit_values_win():
    cfg = LayersStageConfig(out="o")
    assert noise_schedule(cfg, v_pred=True, ztsnr=True).summary == {"prediction": "v", "zero_terminal_snr": True}
    assert noise_schedule(cfg).summary == {"prediction": "eps", "zero_terminal_snr": False}
    cfg = LayersStageConfig(out="o", prediction="eps", zero_terminal_snr="off")
    assert noise_schedule(cfg, v_pred=True, ztsnr=True).summary == {"prediction": "eps", "zero_terminal_snr": False}
    cfg = LayersStageConfig(out="o", prediction="v", zero_terminal_snr="on")
    s = noise_schedule(cfg)
    assert s.summary == {"prediction": "v", "zero_terminal_snr": True}
    assert float(s.alphas_cumprod[-1]) == pytest.approx(schedules.HOST_TERMINAL_ABAR, rel=1e-6)


# ---------------------------------------------------------------------------------------
# Stage runs: summary.json and the exported files' metadata


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("vpred")
    out = {}
    for name, keys in (("eps", ()), ("vpred", ("v_pred", "ztsnr"))):
        state = tiny_checkpoint_state("sd15")
        for k in keys:  # NoobAI-style marker keys: presence is what counts
            state[k] = torch.tensor([])
        save_file({k: v.half() if v.is_floating_point() and v.numel() else v for k, v in state.items()},
                  str(d / f"{name}.safetensors"))  # fmt: skip
        out[name] = d / f"{name}.safetensors"
    out["data"] = write_rgba_folder(d / "data", {i: f"image {i}" for i in range(4)})
    torch.manual_seed(0)
    enc = TrainEncoder(Widths.named("tiny").encoder)
    out["encoder"] = ckpt.atomic_save(ckpt.encoder_export_state(enc, 1e-1, torch.float32), d / "enc.safetensors")
    return out


def _layers(files, out, *extra, checkpoint="vpred"):
    return cli.main(["layers", "--checkpoint", str(files[checkpoint]), "--data", str(files["data"]), "--frames", "fg",
                     "--out", str(out), "--steps", "1", "--batch-size", "2", "--size", "32", "--eval-count", "2",
                     "--sample-steps", "3", "--sample-every", "1", *extra])  # fmt: skip


def test_layers_on_a_vpred_ztsnr_checkpoint_trains_v(tmp_path, files, capsys):
    assert _layers(files, tmp_path / "v", "--rank", "2") == 0
    summary = json.loads((tmp_path / "v" / "summary.json").read_text())
    assert summary["prediction"] == "v" and summary["zero_terminal_snr"] is True
    assert all(summary[k] == summary[k] for k in ("eval_loss_start", "eval_loss_end"))  # not NaN
    assert ckpt.read_metadata(tmp_path / "v" / SHARING_FILE)["prediction"] == "v"
    assert "prediction v, zero terminal SNR on (from the checkpoint's keys)" in capsys.readouterr().out
    # explicit off wins over the key
    assert _layers(files, tmp_path / "off", "--rank", "2", "--zero-terminal-snr", "off") == 0
    summary = json.loads((tmp_path / "off" / "summary.json").read_text())
    assert summary["prediction"] == "v" and summary["zero_terminal_snr"] is False


def test_prediction_v_on_an_eps_checkpoint(tmp_path, files):
    assert _layers(files, tmp_path / "e", "--rank", "2", checkpoint="eps") == 0
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["prediction"] == "eps" and summary["zero_terminal_snr"] is False
    assert _layers(files, tmp_path / "v", "--rank", "2", "--prediction", "v", checkpoint="eps") == 0
    summary = json.loads((tmp_path / "v" / "summary.json").read_text())
    assert summary["prediction"] == "v" and summary["zero_terminal_snr"] is False
    # a state written with eps does not resume as v
    assert _layers(files, tmp_path / "e", "--rank", "2", "--prediction", "v", "--steps", "2", checkpoint="eps") == 1


# ---------------------------------------------------------------------------------------
# --init


def _random_file(state_shapes: dict, path, seed=3):
    state = make_state_dict({k: list(v) for k, v in state_shapes.items()}, seed=seed, dtype=torch.float16)
    save_file(state, str(path))
    return state


def _assert_fp16_equal(exported: dict, init: dict):
    assert set(exported) == set(init)
    for k, v in init.items():
        assert exported[k].shape == v.shape, k
        # one AdamW step at lr 1e-12 moves a value by ~1e-12: the fp16 export rounds back to the file's value
        assert torch.equal(exported[k], v), k


def test_layers_init_exports_the_file_after_a_tiny_step(tmp_path, files):
    model = LayerSharingModel(build_unet("tiny-sd15", 0), 1, False, 3)
    try:
        init = _random_file({k: v.shape for k, v in model.state_dict().items()}, tmp_path / "init.safetensors")
    finally:
        model.restore()
    assert (
        _layers(
            files,
            tmp_path / "o",
            "--init",
            str(tmp_path / "init.safetensors"),
            "--lr",
            "1e-12",
            "--checkpoint",
            str(files["eps"]),
        )
        == 0
    )  # fmt: skip  (no --rank: the file's, 3)
    _assert_fp16_equal(load_file(str(tmp_path / "o" / SHARING_FILE)), init)
    assert ckpt.read_metadata(tmp_path / "o" / SHARING_FILE)["rank"] == "3"


def test_a_conflicting_rank_is_refused_naming_both(tmp_path, files, capsys):
    model = LayerSharingModel(build_unet("tiny-sd15", 0), 1, False, 3)
    try:
        _random_file({k: v.shape for k, v in model.state_dict().items()}, tmp_path / "init.safetensors")
    finally:
        model.restore()
    assert _layers(files, tmp_path / "o", "--init", str(tmp_path / "init.safetensors"), "--rank", "4") == 2
    err = capsys.readouterr().err
    assert "--rank 4" in err and "rank 3" in err and "init.safetensors" in err
    assert not (tmp_path / "o").exists()  # refused before the run's folder is made


def test_layers_init_of_other_frames_or_kind_is_refused(tmp_path, files, capsys):
    model = LayerSharingModel(build_unet("tiny-sd15", 0), 2, False, 3)
    try:
        _random_file({k: v.shape for k, v in model.state_dict().items()}, tmp_path / "joint.safetensors")
    finally:
        model.restore()
    assert _layers(files, tmp_path / "o", "--init", str(tmp_path / "joint.safetensors")) == 1
    assert "does not fit --frames fg" in capsys.readouterr().err
    assert _layers(files, tmp_path / "p", "--init", str(files["encoder"])) == 1
    assert "not an SD1.5 attention-sharing UNet file" in capsys.readouterr().err
    model = LayerSharingModel(build_unet("tiny-sd15", 0), 1, False, 3)
    try:
        bad = _random_file({k: v.shape for k, v in model.state_dict().items()}, tmp_path / "nan.safetensors")
    finally:
        model.restore()
    bad["hookers.layers.5.temporal_o.weight"][0] = float("nan")
    save_file(bad, str(tmp_path / "nan.safetensors"))
    assert _layers(files, tmp_path / "q", "--init", str(tmp_path / "nan.safetensors")) == 1
    err = capsys.readouterr().err
    assert "NaN" in err and "hookers.layers.5.temporal_o.weight" in err


@pytest.mark.parametrize("mode", ["lora", "diff"])
def test_diffusion_init_exports_the_file_after_a_tiny_step(tmp_path, files, mode, capsys):
    delta = UNetDelta(build_unet("tiny-sdxl", 0), mode, 5, "attn")
    shapes = {k: v.shape for k, v in delta.export_state(torch.float32).items()}
    init = _random_file(shapes, tmp_path / "init.safetensors")
    run = ["diffusion", "--synthetic", "4", "--unet-preset", "tiny-sdxl", "--encoder", str(files["encoder"]),
           "--vae-width", "8", "--vae-steps", "2", "--steps", "1", "--batch-size", "2", "--size", "32",
           "--eval-count", "0", "--sample-every", "0", "--init", str(tmp_path / "init.safetensors")]  # fmt: skip
    assert cli.main([*run, "--out", str(tmp_path / "o"), "--lr", "1e-12", "--prediction", "v"]) == 0
    _assert_fp16_equal(load_file(str(tmp_path / "o" / PATCH_FILE)), init)
    meta = ckpt.read_metadata(tmp_path / "o" / PATCH_FILE)
    assert meta["mode"] == mode and meta["targets"] == "attn" and meta["prediction"] == "v"
    assert meta["rank"] == ("5" if mode == "lora" else "256")  # diff files carry no rank
    other = "diff" if mode == "lora" else "lora"
    assert cli.main([*run, "--out", str(tmp_path / "m"), "--mode", other]) == 2
    assert f"--mode {other} conflicts with --init" in capsys.readouterr().err
    assert cli.main([*run, "--out", str(tmp_path / "r"), "--rank", "8"]) == 2
    err = capsys.readouterr().err
    if mode == "lora":
        assert "--rank 8" in err and "rank 5" in err
    else:  # a diff file has no rank to conflict with: --rank is refused, not recorded
        assert "--rank 8 has no meaning with --init" in err and not (tmp_path / "r").exists()
    assert cli.main([*run, "--out", str(tmp_path / "t"), "--targets", "all"]) == 2
    assert "--targets all conflicts with --init" in capsys.readouterr().err
    # refused from the file's header and the UNet's layout, before --out is made or anything trained
    assert not (tmp_path / "t").exists()
    assert cli.main([*run, "--out", str(tmp_path / "l"), "--layer-mode", "fg2ble"]) == 2
    err = capsys.readouterr().err
    assert "has no conv_in" in err and "--layer-mode" in err and "[tiny-vae]" not in err, err
    assert not (tmp_path / "l").exists()


def test_vae_init_exports_the_pair_after_a_tiny_step(tmp_path):
    widths = Widths.named("tiny")
    torch.manual_seed(1)
    enc, dec = TrainEncoder(widths.encoder), TrainDecoder(widths.decoder, widths.decoder_attn_from)
    src = tmp_path / "src"
    ckpt.export(enc, dec, src, 0.1, "fp16")
    run = ["vae", "--synthetic", "4", "--widths", "tiny", "--disc-width", "8", "--vae-width", "8", "--vae-steps", "2",
           "--steps", "1", "--batch-size", "2", "--size", "32", "--eval-count", "0", "--sample-every", "0",
           "--lambda-offset", "0.1", "--init-encoder", str(src / ckpt.ENCODER_FILE),
           "--init-decoder", str(src / ckpt.DECODER_FILE)]  # fmt: skip
    assert cli.main([*run, "--out", str(tmp_path / "o"), "--lr", "1e-12"]) == 0
    for name in (ckpt.ENCODER_FILE, ckpt.DECODER_FILE):
        want, got = load_file(str(src / name)), load_file(str(tmp_path / "o" / name))
        assert set(got) == set(want)
        for k in want:  # the encoder's last conv goes through / lambda and * lambda: one fp16 ulp at most
            assert torch.allclose(got[k].float(), want[k].float(), rtol=1e-3, atol=0), (name, k)
    small = Widths.named("small")
    run[4] = "small"
    assert cli.main([*run, "--out", str(tmp_path / "w")]) == 1 and small.encoder != widths.encoder


def test_init_paths_that_are_no_file_are_worded_for_the_trainer(tmp_path, files, capsys):
    # the extension's advice ("remove it and put the weight file there") is for its own models
    # folder, not a folder the user named; the --widths hint is for shape mismatches alone
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    assert _layers(files, tmp_path / "o", "--init", str(folder)) == 1
    err = capsys.readouterr().err
    assert f"--init {folder}" in err and "is a directory" in err and "remove" not in err.lower(), err
    assert (folder / "keep.txt").exists() and not (tmp_path / "o").exists()
    vae = ["vae", "--synthetic", "4", "--widths", "tiny", "--disc-width", "8", "--vae-width", "8", "--steps", "1",
           "--batch-size", "2", "--size", "32", "--eval-count", "0", "--sample-every", "0"]  # fmt: skip
    missing = tmp_path / "missing.safetensors"
    for flag in ("--init-encoder", "--init-decoder"):
        assert cli.main([*vae, "--out", str(tmp_path / "v"), flag, str(missing)]) == 1
        err = capsys.readouterr().err
        assert f"{flag} {missing}" in err and "widths" not in err, err
        assert cli.main([*vae, "--out", str(tmp_path / "v"), flag, str(folder)]) == 1
        err = capsys.readouterr().err
        assert "is a directory" in err and "remove" not in err.lower() and "widths" not in err, err
    assert not (tmp_path / "v").exists()
    # a file of other widths: the hint says which option to match
    widths = Widths.named("small")
    ckpt.export(TrainEncoder(widths.encoder), TrainDecoder(widths.decoder, widths.decoder_attn_from), tmp_path / "s",
                0.1, "fp16")  # fmt: skip
    assert (
        cli.main([*vae, "--out", str(tmp_path / "v"), "--init-decoder", str(tmp_path / "s" / ckpt.DECODER_FILE)]) == 1
    )
    assert "--widths" in capsys.readouterr().err


@pytest.mark.parametrize(("made", "run_mode", "refused"), [
    ("fg2ble", "bg2ble", True),  # the same conv_in width: only the file's own word tells them apart
    ("fg2ble", "fg2ble", False),
    ("", "fg2ble", True),  # a transparent-model export given to a layer run
])  # fmt: skip
def test_diffusion_init_of_another_layer_mode_is_refused(tmp_path, made, run_mode, refused, capsys):
    from lib_layerdiffuse.training import init_files
    from lib_layerdiffuse.training.errors import UsageError

    path = tmp_path / "export.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"layer_mode": made})
    published = tmp_path / f"layer_xl_{made or 'transparent_attn'}.safetensors"
    save_file({"x": torch.zeros(1)}, str(published))  # a published file: its name says its mode
    for file in (path, published):
        if refused:
            with pytest.raises(UsageError, match=f"made for .*this run trains --layer-mode {run_mode}"):
                init_files.check_layer_mode(str(file), run_mode)
        else:
            init_files.check_layer_mode(str(file), run_mode)
    unknown = tmp_path / "my_patch.safetensors"  # no metadata, no published name: the shapes decide
    save_file({"x": torch.zeros(1)}, str(unknown))
    init_files.check_layer_mode(str(unknown), run_mode)
