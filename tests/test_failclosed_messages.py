"""Fail closed on messages: the load errors of attention-sharing files can name their keys
(weights.state_mismatch, for session.load_sharing), and UNet-side files with a nested header
or non-finite values get WeightFileErrors."""

import pytest
import torch
from safetensors.torch import save_file
from unet_tree import build_tree

from lib_layerdiffuse import modes as M
from lib_layerdiffuse import weights as W
from lib_layerdiffuse.attention_sharing import AttentionSharing


def test_state_mismatch_names_the_keys_torch_leaves_out():
    """torch's RuntimeError starts "Error(s) in loading state_dict for AttentionSharing:" and
    its first line names no key; state_mismatch says which keys are missing or unexpected."""
    mode = M.resolve("FG_TO_BG_SD15")
    sharing = AttentionSharing(build_tree("sd15"), frames=mode.group, use_control=mode.control is not None)
    state = dict(sharing.state_dict())
    gone = sorted(state)[0]
    del state[gone]
    state["hookers.bogus"] = torch.zeros(1)
    with pytest.raises(RuntimeError) as info:
        sharing.load_state_dict(state, strict=True)
    assert str(info.value).splitlines()[0] == "Error(s) in loading state_dict for AttentionSharing:"
    detail = W.state_mismatch(sharing, state)
    assert detail == f"1 missing keys ({gone}); 1 unexpected keys (hookers.bogus)"
    assert W.state_mismatch(sharing, dict(sharing.state_dict())) == ""


def test_unet_files_with_a_nested_header_are_refused(tmp_path):
    header = b'{"x": ' + b"[" * 10000 + b"]" * 10000 + b"}"
    path = tmp_path / "layer_xl_transparent_attn.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(W.WeightFileError, match="nests too deeply.*huggingface.co"):
        W.load_unet_file(path)


def test_check_finite_on_a_unet_patch_state(tmp_path):
    """The helper the UNet-file checks call: a NaN in a patch written with safetensors."""
    key = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight::lora::0"
    state = {key: torch.zeros(8, 4, dtype=torch.float16), "diffusion_model.out.2.bias::diff::0": torch.ones(4)}
    state[key][3, 1] = float("nan")
    path = tmp_path / "layer_xl_transparent_attn.safetensors"
    save_file(state, str(path))
    loaded = W.load_unet_file(path)
    with pytest.raises(W.WeightFileError, match=rf"holds non-finite values: {key.replace('.', '[.]')} has 1 NaN"):
        W.check_finite(loaded, path)
