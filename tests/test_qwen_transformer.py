"""qwen_layered.layered_forward on a host's Qwen-Image transformer, against diffusers 0.42.1.

tests/data/qwen_transformer_refs.safetensors holds a tiny QwenImageTransformer2DModel with the
Layered flags (use_additional_t_cond, use_layer3d_rope; 2 blocks, 2 heads of 32, text width 48,
RoPE axes (8, 12, 12)): its weights (float16 values, run in float32), inputs and outputs of three
layered calls as the Layered pipeline makes them, and two plain Qwen-Image calls of the same weights
(computed outside the repository in a side environment). The host's transformer is
tests/qwen_standin.py, a stand-in with Forge Neo's module names and signatures; the plain calls
check the stand-in itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from qwen_standin import QwenImageTransformer2DModel
from safetensors.torch import load_file
from tolerance import FP32, assert_close_rel

from lib_layerdiffuse import qwen_layered as ql
from lib_layerdiffuse.errors import SettingsError

REFS = Path(__file__).parent / "data" / "qwen_transformer_refs.safetensors"
TINY = dict(
    num_layers=2, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=48, axes_dims_rope=(8, 12, 12)
)
CASES = ("case0", "case1", "case2")

pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def refs():
    return load_file(str(REFS))


@pytest.fixture(scope="module")
def model(refs):
    """The stand-in with the reference weights; like the host, it has no addition embedding."""
    weights = {k[len("weight.") :]: v.float() for k, v in refs.items() if k.startswith("weight.")}
    weights.pop(ql.ADDITION_KEY)
    m = QwenImageTransformer2DModel(**TINY).eval().requires_grad_(False)
    m.load_state_dict(weights, strict=True)
    return m


def rope_of(model):
    return lambda ids: model.pe_embedder(ids).squeeze(1).unsqueeze(2)


def run(model, refs, case, addition=None, shapes=None):
    layers, rows, cols = (int(refs[f"{case}.{k}"]) for k in ("layers", "rows", "cols"))
    if addition is None:
        addition = ql.addition_row(refs[f"weight.{ql.ADDITION_KEY}"].float(), model.inner_dim)
    with torch.no_grad():
        return ql.layered_forward(
            model,
            refs[f"{case}.hidden"],
            refs[f"{case}.timestep"],
            context=refs[f"{case}.context"],
            img_shapes=shapes or [(1, rows, cols)] * (layers + 2),
            addition=addition,
            rope=rope_of(model),
        )


@pytest.mark.parametrize("case", CASES)
def test_layered_forward_matches_the_reference(model, refs, case):
    assert_close_rel(run(model, refs, case), refs[f"{case}.out"], FP32)


@pytest.mark.parametrize("case", ("plain", "plain1"))
def test_the_stand_in_is_plain_qwen_image(model, refs, case):
    """The stand-in's own forward (the host's plain text-to-image path) gives diffusers' plain output."""
    rows, cols = int(refs[f"{case}.rows"]), int(refs[f"{case}.cols"])
    tokens = refs[f"{case}.hidden"]
    # unpack_latents needs 2+ frames: unpack the frame twice and keep one -> [1, 16, 1, h, w]
    x = ql.unpack_latents(torch.cat([tokens, tokens], dim=1), rows * 16, cols * 16, 1)[:, :, :1]
    with torch.no_grad():
        out = model(x, refs[f"{case}.timestep"], refs[f"{case}.context"])
    assert_close_rel(ql.pack_latents(out.permute(0, 2, 1, 3, 4)), refs[f"{case}.out"], FP32)


def test_each_layered_difference_is_needed(model, refs):
    """Without the addition embedding, with the other row, or with the condition image at the next frame
    index (as plain Qwen-Image numbers its images) the result is far outside the tolerance."""
    expected = refs["case1.out"]
    scale = float(expected.abs().max())
    weight = refs[f"weight.{ql.ADDITION_KEY}"].float()

    def error(out):
        return float((out - expected).abs().max()) / scale

    assert error(run(model, refs, "case1", addition=torch.zeros(model.inner_dim))) > 100 * FP32
    assert error(run(model, refs, "case1", addition=weight[1])) > 100 * FP32

    original = ql.position_ids

    def plain_numbering(shapes, txt_len):
        image, text = original(shapes, txt_len)
        image[image[:, 0] == -1, 0] = len(shapes) - 1
        return image, text

    ql.position_ids = plain_numbering
    try:
        assert error(run(model, refs, "case1")) > 100 * FP32
    finally:
        ql.position_ids = original


def test_position_ids_are_the_rope_frequencies_positions():
    """Rotating by the ids (the host's rope) is the reference's layer-3D RoPE, for the released axes."""
    from qwen_standin import EmbedND

    shapes = [(1, 3, 5)] * 4 + [(1, 3, 5)]
    image_ids, text_ids = ql.position_ids(shapes, 7)
    rot = EmbedND(dim=128, theta=ql.ROPE_THETA, axes_dim=list(ql.ROPE_AXES))(torch.cat([text_ids, image_ids])[None])[
        0, 0
    ]  # [T + N, 64, 2, 2]: [[cos, -sin], [sin, cos]]
    image, text = ql.rope_frequencies(shapes, 7)
    expected = torch.cat([text, image])
    # angles up to ~60 rad: float32 rounding of the angle, not of the rotation, dominates
    assert torch.allclose(rot[..., 0, 0], expected.real, atol=2e-5)
    assert torch.allclose(rot[..., 1, 0], expected.imag, atol=2e-5)


def test_addition_row_is_checked():
    with pytest.raises(SettingsError, match=r"must be \[2, 8\]"):
        ql.addition_row(torch.zeros(3, 8), 8)
    with pytest.raises(SettingsError, match=r"must be \[2, 8\]"):
        ql.addition_row(torch.zeros(2, 6), 8)
    bad = torch.zeros(2, 8)
    bad[0, 3] = float("nan")
    with pytest.raises(SettingsError, match="NaN"):
        ql.addition_row(bad, 8)
    assert torch.equal(ql.addition_row(torch.arange(16.0).view(2, 8), 8), torch.arange(8.0))


def test_layered_forward_refuses_shapes_that_do_not_fit(model, refs):
    with pytest.raises(SettingsError, match="give 12 image tokens"):
        run(model, refs, "case0", shapes=[(1, 2, 2)] * 3)
