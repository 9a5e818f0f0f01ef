"""The Qwen-Image-Layered RGBA VAE (lib_layerdiffuse/qwen_vae.py) against diffusers' 3D reference.

tests/data/qwen_vae_refs.safetensors holds random weights of the reference model
(AutoencoderKLQwenImage, input_channels=4, base width 4, diffusers 0.42.1; built by
tests/data/qwen_vae_refs.py) with its single-frame encode mean and decode. The Wan-original
(Comfy / Forge Neo) layout is made here with a renaming written independently of the module's.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tolerance import FP32

from lib_layerdiffuse.errors import WeightFileError
from lib_layerdiffuse.qwen_vae import QwenVAEConfig, expected_shapes, load_vae, read_config

REFS = Path(__file__).parent / "data" / "qwen_vae_refs.safetensors"
NRB = 2  # residual blocks per stage of the fixture (and of the released model)


@pytest.fixture(scope="module")
def refs():
    data = load_file(str(REFS))
    weights = {k[len("weight.") :]: v for k, v in data.items() if k.startswith("weight.")}
    return weights, data


def to_wan(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers names -> the names of Forge Neo's backend/nn/wan_vae.py (WanVAE)."""
    res = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
           "conv2": "residual.6", "conv_shortcut": "shortcut"}  # fmt: skip

    def block(tail: str) -> str:
        for a, b in res.items():
            if tail == a or tail.startswith(a + "."):
                return b + tail[len(a) :]
        return tail  # resample.1.*, time_conv.*

    out = {}
    for key, t in state.items():
        parts = key.split(".")
        if parts[0] == "quant_conv":
            new = "conv1." + parts[-1]
        elif parts[0] == "post_quant_conv":
            new = "conv2." + parts[-1]
        else:
            side, name, rest = parts[0], parts[1], ".".join(parts[2:])
            if name == "conv_in":
                new = f"{side}.conv1.{rest}"
            elif name == "norm_out":
                new = f"{side}.head.0.{rest}"
            elif name == "conv_out":
                new = f"{side}.head.2.{rest}"
            elif name == "down_blocks":
                n, tail = rest.split(".", 1)
                new = f"{side}.downsamples.{n}.{block(tail)}"
            elif name == "mid_block":
                kind, n, tail = rest.split(".", 2)
                index = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(kind, n)]
                new = f"{side}.middle.{index}.{block(tail) if kind == 'resnets' else tail}"
            elif name == "up_blocks":
                i, kind, j, tail = rest.split(".", 3)
                flat = int(i) * (NRB + 2) + (int(j) if kind == "resnets" else NRB + 1)
                new = f"{side}.upsamples.{flat}.{block(tail)}"
            else:
                raise AssertionError(key)
        out[new] = t
    return out


def _run(model, data):
    with torch.no_grad():
        return model.encode_mean(data["in.x"]), model.decode(data["in.z"])


def _assert_matches(mean, image, data):
    ref_mean, ref_image = data["out.mean"], data["out.image"]
    assert mean.shape == ref_mean.shape == (2, 16, 4, 6)
    assert image.shape == ref_image.shape == (2, 4, 32, 48)
    # the acceptance bounds (1e-4 encode, 2e-4 decode), widened with the size of the values as in
    # tests/tolerance.py so another CPU's rounding cannot fail them
    enc_tol = max(1e-4, FP32 * float(ref_mean.abs().max()))
    assert float((mean - ref_mean).abs().max()) <= enc_tol
    assert float((image - ref_image).abs().max()) <= 2e-4
    assert float(image.abs().max()) <= 1.0


def test_diffusers_layout_matches_reference(refs):
    weights, data = refs
    model = load_vae(weights)
    mean, image = _run(model, data)
    _assert_matches(mean, image, data)


def test_wan_layout_matches_reference_and_diffusers_layout(refs):
    weights, data = refs
    wan = to_wan(weights)
    # the names Forge Neo's WanVAE loads
    for key in ("encoder.conv1.weight", "conv1.weight", "conv2.weight", "decoder.head.2.weight",
                "encoder.downsamples.0.residual.2.weight", "decoder.upsamples.3.resample.1.weight",
                "decoder.upsamples.7.time_conv.weight", "decoder.middle.1.to_qkv.weight"):  # fmt: skip
        assert key in wan, key
    mean, image = _run(load_vae(wan), data)
    _assert_matches(mean, image, data)
    mean_d, image_d = _run(load_vae(weights), data)
    assert torch.equal(mean, mean_d) and torch.equal(image, image_d)


def test_widths_and_counts_read_from_shapes(refs):
    weights, _ = refs
    model = load_vae(weights)
    assert model.config == QwenVAEConfig(4, 4, 16, (1, 2, 4, 4), 2, (False, True, True))
    assert model.encoder.conv_in.weight.dtype == torch.float32  # the fp16 file is computed in fp32
    # the released VAE: the parameter count of qwen-layered.md section 3 (126,897,716)
    released = expected_shapes(QwenVAEConfig(4, 96, 16, (1, 2, 4, 4), 2, (False, True, True)))
    assert sum(math.prod(s) for s in released.values()) == 126_897_716
    assert released["encoder.conv_in.weight"] == [96, 4, 3, 3, 3]
    assert released["decoder.conv_out.weight"] == [4, 96, 3, 3, 3]
    # other widths, counts and channel numbers are read back, in both layouts
    for cfg in (
        QwenVAEConfig(4, 96, 16, (1, 2, 4, 4), 2, (False, True, True)),
        QwenVAEConfig(3, 8, 4, (1, 2, 2), 1, (False, True)),
        QwenVAEConfig(4, 6, 16, (1, 3, 4, 4), 3, (False, True, True)),
    ):
        state = {k: torch.empty(s, device="meta") for k, s in expected_shapes(cfg).items()}
        assert read_config(state) == cfg
    small = QwenVAEConfig(3, 8, 4, (1, 2, 2), 1, (False, True))
    state = {k: torch.randn(s) * 0.1 for k, s in expected_shapes(small).items()}
    model = load_vae(state)
    assert model.config == small
    with torch.no_grad():
        assert model.encode_mean(torch.zeros(1, 3, 16, 24)).shape == (1, 4, 4, 6)
        assert model.decode(torch.zeros(1, 4, 4, 6)).shape == (1, 3, 16, 24)


@pytest.mark.parametrize("layout", ["diffusers", "wan"])
def test_refuses_missing_unexpected_wrong_shape_and_nan(refs, layout):
    weights, _ = refs
    state = dict(weights) if layout == "diffusers" else to_wan(weights)
    name = {
        "diffusers": (
            "decoder.up_blocks.1.upsamplers.0.time_conv.weight",
            "decoder.mid_block.attentions.0.proj.weight",
        ),
        "wan": ("decoder.upsamples.7.time_conv.weight", "decoder.middle.1.proj.weight"),
    }[layout]

    missing = dict(state)
    del missing[name[0]]
    with pytest.raises(WeightFileError, match=r"1 missing keys \(" + name[0].replace(".", r"\.")) as e:
        load_vae(missing, source="qwen_image_layered_vae.safetensors")
    assert "qwen_image_layered_vae.safetensors" in str(e.value)

    extra = dict(state)
    extra["decoder.extra.weight"] = torch.zeros(3)
    with pytest.raises(WeightFileError, match=r"1 unexpected keys \(decoder\.extra\.weight\)"):
        load_vae(extra)

    shaped = dict(state)
    shaped[name[1]] = torch.zeros(8, 16, 1, 1)
    pattern = name[1].replace(".", r"\.") + r": expected \[16, 16, 1, 1\], found \[8, 16, 1, 1\]"
    with pytest.raises(WeightFileError, match=pattern):
        load_vae(shaped)

    nan = dict(state)
    bad = nan[name[1]].clone()
    bad[0, 0] = float("nan")
    nan[name[1]] = bad
    with pytest.raises(WeightFileError, match=r"non-finite values: " + name[1].replace(".", r"\.") + " has 1 NaN"):
        load_vae(nan)

    gone = dict(state)
    del gone["encoder.conv_in.weight" if layout == "diffusers" else "encoder.conv1.weight"]
    with pytest.raises(WeightFileError, match=r"the key encoder\.conv(_in|1)\.weight is missing"):
        load_vae(gone)
