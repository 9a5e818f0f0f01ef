"""SDXL layer models (``diffusion --layer-mode fg2ble|fgble2bg|bg2ble|bgble2fg``): the
widened conv_in plus a LoRA, exported like the official ``layer_xl_*.safetensors``.

Tiny SDXL-shaped checkpoints (``training_helpers``), 32 px triplets, one or two steps.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from training_helpers import one_thread, write_tiny_checkpoint  # noqa: F401

from lib_layerdiffuse import patches as core_patches
from lib_layerdiffuse.training import base_checkpoint as bc
from lib_layerdiffuse.training import checkpoint as ckpt
from lib_layerdiffuse.training import cli
from lib_layerdiffuse.training.diffusion_stage import LAYER_MODES, UNetDelta
from lib_layerdiffuse.training.models import TrainEncoder, Widths


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("xl")
    torch.set_num_threads(1)
    out = {"sdxl": write_tiny_checkpoint(d / "sdxl.safetensors", "sdxl")}
    torch.manual_seed(0)
    enc = TrainEncoder(Widths.named("tiny").encoder)
    out["encoder"] = ckpt.atomic_save(ckpt.encoder_export_state(enc, 1e-1, torch.float32), d / "enc.safetensors")
    t = d / "triplets"
    rng = np.random.default_rng(0)
    for f in ("fg", "bg", "blend"):
        (t / f).mkdir(parents=True)
    for i in range(4):
        img = rng.integers(0, 255, (40, 40, 4), dtype=np.uint8)
        img[:8, :, 3], img[8:, :, 3] = 0, 255
        Image.fromarray(img).save(t / "fg" / f"{i}.png")
        Image.fromarray(img[..., :3]).save(t / "bg" / f"{i}.png")
        Image.fromarray(img[::-1, :, :3].copy()).save(t / "blend" / f"{i}.png")
        (t / f"{i}.txt").write_text(f"triplet {i}")
    out["triplets"] = t
    return out


def test_mode_table_matches_the_extension():
    from lib_layerdiffuse import modes

    by_file = {m.unet_file: m for m in modes.MODES if m.unet_file and m.unet_file.startswith("layer_xl_")}
    for name, spec in LAYER_MODES.items():
        mode = by_file[f"layer_xl_{name}"]
        assert tuple(spec.concat) == tuple(mode.concat)


def test_layer_mode_export_loads_as_the_extension_merges_it(tmp_path, files):
    out = tmp_path / "fg2ble"
    rc = cli.main(["diffusion", "--checkpoint", str(files["sdxl"]), "--data", str(files["triplets"]),
                   "--layer-mode", "fg2ble", "--encoder", str(files["encoder"]), "--rank", "4", "--out", str(out),
                   "--steps", "2", "--batch-size", "2", "--size", "32", "--eval-count", "2", "--lr", "1e-2",
                   "--export-dtype", "fp32"])  # fmt: skip
    assert rc == 0
    state = load_file(str(out / "layer_xl_fg2ble.safetensors"))
    assert state["diffusion_model.input_blocks.0.0.weight::diff::0"].shape == (32, 8, 3, 3)
    assert any("::lora::0" in k for k in state)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layer_mode"] == "fg2ble" and summary["base_family"] == "sdxl"

    # the extension's merge (core patches) on the base UNet = the trained model's weights
    base = bc.load_base(files["sdxl"], parts=("unet",)).unet
    merged = core_patches.compute_patched_tensors(
        {core_patches.PREFIX + n: p for n, p in base.named_parameters()}, core_patches.parse_patch_state(state), 1.0
    )
    conv_in = merged[core_patches.PREFIX + "input_blocks.0.0.weight"]
    # what the extension's session checks before sampling a concat mode
    from lib_layerdiffuse.weights import load_unet_file

    loaded = core_patches.parse_patch_state(load_unet_file(out / "layer_xl_fg2ble.safetensors"))
    core_patches.check_conv_in(loaded, base.input_blocks[0][0].weight, 4, 4, "layer_xl_fg2ble.safetensors", "fg2ble")
    assert conv_in.shape == (32, 8, 3, 3)
    delta = UNetDelta(base, "lora", 4, "attn", conv_in_channels=8)
    train_state = load_file(str(out / ckpt.STATE_FILE))
    delta.load_state_dict({k[len("model.model.") :]: v for k, v in train_state.items() if k.startswith("model.model.")})
    eff = delta.effective()
    torch.testing.assert_close(eff["input_blocks.0.0.weight"], conv_in, rtol=0, atol=0)
    for k, v in merged.items():
        torch.testing.assert_close(eff[k[len(core_patches.PREFIX) :]], v, rtol=0, atol=0)


@pytest.mark.parametrize("mode, channels", [("bgble2fg", 12), ("bg2ble", 8)])
def test_other_layer_modes_train_one_step(tmp_path, files, mode, channels):
    out = tmp_path / mode
    rc = cli.main(["diffusion", "--checkpoint", str(files["sdxl"]), "--data", str(files["triplets"]),
                   "--layer-mode", mode, "--encoder", str(files["encoder"]), "--rank", "2", "--out", str(out),
                   "--steps", "1", "--batch-size", "2", "--size", "32", "--eval-count", "0", "--sample-steps", "2"])  # fmt: skip
    assert rc == 0
    # rows: the condition frames, then the generated one; two samples side by side
    with Image.open(out / "samples" / "step_0000001.png") as im:
        assert im.size == (2 * 32, (channels // 4) * 32)
    state = load_file(str(out / f"layer_xl_{mode}.safetensors"))
    assert state["diffusion_model.input_blocks.0.0.weight::diff::0"].shape == (32, channels, 3, 3)


def test_layer_mode_refusals(tmp_path, files, capsys):
    base = ["diffusion", "--encoder", str(files["encoder"]), "--out", str(tmp_path / "o"), "--steps", "1",
            "--size", "32", "--layer-mode"]  # fmt: skip
    assert cli.main([*base, "fg2bg", "--data", str(files["triplets"])]) == 2
    assert "invalid choice" in capsys.readouterr().err
    sd15 = write_tiny_checkpoint(tmp_path / "sd15.safetensors", "sd15")
    assert cli.main([*base, "fg2ble", "--data", str(files["triplets"]), "--checkpoint", str(sd15)]) == 1
    assert "SDXL" in capsys.readouterr().err
    assert cli.main([*base, "fg2ble", "--data", str(files["triplets"] / "fg"), "--checkpoint", str(files["sdxl"])]) == 1
    assert "needs the sub-folders fg/, bg/ and blend/" in capsys.readouterr().err
