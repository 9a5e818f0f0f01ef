"""SD1.5 attention-sharing files of other LoRA ranks than the official 256 (trained with
``layers --rank R``): the rank is read from the file's shapes, one rank for every unit."""

import pytest
import torch
from tolerance import assert_close_rel
from unet_tree import build_tree
from weightgen import make_state_dict, manifest_shapes

from lib_layerdiffuse.attention_sharing import RANK, AttentionSharing, file_rank
from lib_layerdiffuse.errors import LayerDiffuseError


def _state(frames: int, control: bool, rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        probe = AttentionSharing(build_tree("sd15"), frames, control, rank)
    return make_state_dict({k: list(v.shape) for k, v in probe.state_dict().items()}, seed=seed)


@pytest.mark.parametrize("manifest", ["layer_sd15_transparent_attn", "layer_sd15_joint", "layer_sd15_fg2bg"])
def test_official_layouts_have_the_official_rank(manifest):
    assert file_rank(manifest_shapes(manifest)) == RANK == 256


@pytest.mark.reference
def test_a_rank_4_file_equals_its_zero_padded_rank_256_form():
    """The same LoRA products at rank 4 and zero-padded to 256: the units compute the same."""
    state = _state(2, True, rank=4)
    assert file_rank(state) == 4
    padded = {}
    for k, v in state.items():
        if k.endswith("down.weight"):
            v = torch.cat([v, v.new_zeros(RANK - 4, v.shape[1])])
        elif k.endswith("up.weight") and "_lora." in k:
            v = torch.cat([v, v.new_zeros(v.shape[0], RANK - 4)], dim=1)
        padded[k] = v
    assert file_rank(padded) == RANK
    torch.manual_seed(0)
    unet, image = build_tree("sd15"), torch.rand(1, 3, 32, 32)
    outs = []
    for s in (state, padded):
        sharing = AttentionSharing(unet, 2, True, rank=file_rank(s))
        sharing.load_state_dict(s, strict=True)
        sharing.set_control(image)
        with torch.no_grad():
            outs.append([u(torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(i))) for i, u in
                         enumerate(sharing.units)])  # fmt: skip
    for a, b in zip(*outs, strict=True):
        # zero rows and columns take other matmul shapes and kernels: the same maths, not the same sums
        assert_close_rel(a, b)


def test_mixed_ranks_are_refused_by_name():
    state = _state(1, False, rank=4)
    key = "hookers.layers.7.to_k_lora.0.down.weight"
    state[key] = torch.zeros(8, state[key].shape[1])
    with pytest.raises(LayerDiffuseError, match=rf"mixes LoRA ranks \[4, 8\] .*{key} rank 8"):
        file_rank(state)
    state[key] = torch.zeros(0, state[key].shape[1])
    state = {k: v for k, v in state.items() if "down" in k and k != key or k == key}
    with pytest.raises(LayerDiffuseError, match="mixes LoRA ranks \\[0, 4\\]"):
        file_rank(state)
    assert file_rank({"hookers.layers.0.temporal_i.weight": torch.zeros(8, 8)}) == RANK  # no LoRA: the layout check
