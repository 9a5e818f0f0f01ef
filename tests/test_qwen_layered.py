"""lib_layerdiffuse/qwen_layered.py against the reference Qwen-Image-Layered implementation.

tests/data/qwen_layered_refs.safetensors holds numbers diffusers 0.42.1 produced (its
QwenImageLayeredPipeline packing, calculate_dimensions and image processor, QwenEmbedLayer3DRope,
FlowMatchEulerDiscreteScheduler with the Layered settings) in a side environment outside the
repository; the "meta" metadata entry records the configurations. diffusers is not needed here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lib_layerdiffuse import qwen_layered as ql
from lib_layerdiffuse.errors import SettingsError

REFS_PATH = Path(__file__).parent / "data" / "qwen_layered_refs.safetensors"


@pytest.fixture(scope="module")
def refs():
    return load_file(str(REFS_PATH))


@pytest.fixture(scope="module")
def meta():
    with safe_open(str(REFS_PATH), "pt") as f:
        return json.loads(f.metadata()["meta"])


def test_refs_come_from_the_pinned_reference(meta):
    assert meta["diffusers"] == "0.42.1"


def test_pack_latents_is_the_reference_permutation(refs):
    assert torch.equal(ql.pack_latents(refs["pack_in"]), refs["pack_out"])


def test_unpack_latents_is_the_reference_inverse(refs, meta):
    height, width, layers = meta["unpack"]
    out = ql.unpack_latents(refs["unpack_in"], height, width, layers)
    assert out.shape == (1, 16, layers + 1, height // 8, width // 8)
    assert torch.equal(out, refs["unpack_out"])


def test_pack_unpack_round_trip_with_a_condition_frame_appended():
    x = torch.randn(2, 4, 16, 6, 10)  # 3 layers + composite, 48x80 pixels
    tokens = ql.pack_latents(x)
    assert tokens.shape == (2, 4 * 3 * 5, 64)
    assert torch.equal(ql.unpack_latents(tokens, 48, 80, 3), x.permute(0, 2, 1, 3, 4))
    # the condition frame packs on its own and lands after the generated tokens (the pipeline's concat)
    cond = torch.randn(2, 1, 16, 6, 10)
    joint = ql.pack_latents(torch.cat([x, cond], dim=1))
    assert torch.equal(joint, torch.cat([tokens, ql.pack_latents(cond)], dim=1))


def test_packing_refuses_shapes_it_cannot_split():
    with pytest.raises(SettingsError, match="even"):
        ql.pack_latents(torch.zeros(1, 2, 16, 5, 4))
    with pytest.raises(SettingsError, match="frames"):
        ql.unpack_latents(torch.zeros(1, 30, 64), 32, 48, 3)


def _rope_max_diffs(refs, meta, name):
    layers, hpx, wpx, txt, step = meta[name]
    shapes = [(1, hpx // 16, wpx // 16)] * (layers + 2)
    image, text = ql.rope_frequencies(shapes, txt)
    assert image.dtype == text.dtype == torch.complex64
    assert image.shape == ((layers + 2) * (hpx // 16) * (wpx // 16), 64)
    assert text.shape == (txt, 64)
    image, text = torch.view_as_real(image), torch.view_as_real(text)
    if step:
        image, text = image[refs[f"{name}_img_idx"]], text[refs[f"{name}_txt_idx"]]
    return (image - refs[f"{name}_img"]).abs().max().item(), (text - refs[f"{name}_txt"]).abs().max().item()


@pytest.mark.parametrize("name", ["r1", "r2", "r3", "r4"])
def test_rope_matches_the_layer3d_reference(refs, meta, name):
    # r1: 2 layers square; r2: 4 layers non-square; r3: 1 layer 640x384, 600 text tokens (large angles);
    # r4: 9 layers on a tiny image, where the text start is set by the frame count
    image_diff, text_diff = _rope_max_diffs(refs, meta, name)
    assert image_diff <= 1e-6
    assert text_diff <= 1e-6


def test_rope_frame_positions():
    # one row/column so only the frame axis varies: generated frames 0, 1, 2, condition image -1
    image, text = ql.rope_frequencies([(1, 1, 1)] * 4, 3)
    first = image[:, 0]  # the lowest-index frame frequency is 1 rad per position
    expected = torch.polar(torch.ones(4), torch.tensor([0.0, 1.0, 2.0, -1.0]))
    assert torch.allclose(first, expected, atol=1e-6)
    # text starts after the 3 generated frames on every axis
    assert torch.allclose(text[:, 0], torch.polar(torch.ones(3), torch.tensor([3.0, 4.0, 5.0])), atol=1e-6)


def test_flow_sigmas_match_the_scheduler(refs, meta):
    worst = 0.0
    for steps, tokens in meta["sigmas"]:
        ours = ql.flow_sigmas(steps, tokens)
        ref = refs[f"sig_{steps}_{tokens}"]
        assert ours.shape == (steps + 1,) and ours[-1] == 0
        worst = max(worst, (ours - ref).abs().max().item())
    assert worst <= 1e-6


def test_flow_sigmas_known_shift():
    # 640x640 has 1600 condition tokens: mu = 2.5, sigma 0.5 -> 2.5 / 3.5
    sigmas = ql.flow_sigmas(2, 1600)
    assert sigmas.tolist() == pytest.approx([1.0, 2.5 / 3.5, 0.0], abs=1e-7)


@pytest.mark.parametrize("normalize", [False, True])
def test_true_cfg_matches_the_pipeline(refs, normalize):
    out = ql.true_cfg(refs["cfg_cond"], refs["cfg_uncond"], 4.0, normalize)
    ref = refs["cfg_norm" if normalize else "cfg_plain"]
    assert (out - ref).abs().max().item() <= 1e-6
    if normalize:
        assert torch.allclose(out.norm(dim=-1), refs["cfg_cond"].norm(dim=-1), rtol=1e-5)


def test_buckets_match_the_pipeline(refs):
    rows = refs["buckets"].tolist()
    assert len(rows) >= 20
    for w, h, res, bw, bh in rows:
        assert ql.bucket_size(w, h, res) == (bw, bh), (w, h, res)


@pytest.mark.parametrize(
    ("size", "resolution", "bucket"),
    [
        ((1000, 1000), 640, (640, 640)),
        ((1920, 1080), 640, (864, 480)),
        ((800, 600), 640, (736, 544)),
        ((2000, 1000), 640, (896, 448)),
        ((1920, 1080), 1024, (1376, 768)),
        ((800, 600), 1024, (1184, 896)),
    ],
)
def test_buckets_documented_examples(size, resolution, bucket):
    assert ql.bucket_size(*size, resolution) == bucket


@pytest.mark.parametrize("resolution", [512, 768, 0, 1023])
def test_bucket_refuses_other_resolutions(resolution):
    with pytest.raises(SettingsError, match="640 or 1024"):
        ql.bucket_size(800, 600, resolution)


def test_preprocess_matches_the_image_processor(refs):
    image = refs["pre_in"].numpy()
    out = ql.preprocess(image)
    assert out.shape == (1, 4) + image.shape[:2] and out.dtype == torch.float32
    assert torch.equal(out, refs["pre_out"])


def test_preprocess_takes_rgb_as_opaque():
    rgb = np.random.default_rng(3).integers(0, 256, size=(8, 16, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((8, 16, 1), 255, np.uint8)], axis=2)
    assert torch.equal(ql.preprocess(rgb), ql.preprocess(rgba))
    with pytest.raises(SettingsError, match="uint8"):
        ql.preprocess(rgb.astype(np.float32))


def test_postprocess_matches_the_image_processor(refs):
    out = ql.postprocess(refs["post_in"])
    assert out.dtype == np.uint8
    assert np.array_equal(out, refs["post_out"].numpy())


def test_pre_post_round_trip_is_lossless():
    image = np.random.default_rng(5).integers(0, 256, size=(16, 32, 4), dtype=np.uint8)
    assert np.array_equal(ql.postprocess(ql.preprocess(image)), image)
