"""SDXL patch files: grammar, the official merge numbers, installation on a module tree and bit-exact restore."""

import logging

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close_rel
from unet_tree import PREFIX, build_tree, same_bits, snapshot

from lib_layerdiffuse import patches as P
from lib_layerdiffuse.errors import LayerDiffuseError

R = 4  # LoRA rank in tests


def attn_keys(tree, n=None):
    keys = [
        PREFIX + k
        for k, _ in tree.named_parameters()
        if k.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight"))
    ]
    return keys[:n] if n else keys


def lora_state(tree, keys, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = {PREFIX + k: v for k, v in tree.named_parameters()}
    out = {}
    for k in keys:
        o, i = params[k].shape
        out[f"{k}::lora::0"] = torch.randn(o, R, generator=g)
        out[f"{k}::lora::1"] = torch.randn(R, i, generator=g)
    return out


def diff_state(tree, keys, seed=1, conv_in_channels=4):
    g = torch.Generator().manual_seed(seed)
    params = {PREFIX + k: v for k, v in tree.named_parameters()}
    out = {}
    for k in keys:
        shape = list(params[k].shape)
        if k == PREFIX + "input_blocks.0.0.weight":
            shape[1] = conv_in_channels
        out[f"{k}::diff::0"] = torch.randn(shape, generator=g)
    return out


@pytest.fixture
def xl():
    torch.manual_seed(0)
    return build_tree("sdxl")


def test_grammar_errors():
    t = torch.zeros(2)
    with pytest.raises(P.PatchError, match="not of the form"):
        P.parse_patch_state({"a.weight": t})
    with pytest.raises(P.PatchError, match="not of the form"):
        P.parse_patch_state({"a.weight::lora::x": t})
    with pytest.raises(P.PatchError, match="patch type 'loha'"):
        P.parse_patch_state({"a.weight::loha::0": t})
    with pytest.raises(P.PatchError, match=r"lacks slot\(s\) \[1\]"):
        P.parse_patch_state({"a.weight::lora::0": t})
    with pytest.raises(P.PatchError, match="both 'lora' and 'diff'"):
        P.parse_patch_state({"a.weight::lora::0": t, "a.weight::lora::1": t, "a.weight::diff::0": t})
    parsed = P.parse_patch_state({"a.weight::lora::0": t, "a.weight::lora::1": t, "b.bias::diff::0": t})
    assert parsed["a.weight"].kind == "lora" and parsed["b.bias"].slots[0] is t


@pytest.mark.reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_official_merge_numbers(dtype):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 5, generator=g).to(dtype)
    up, down, delta = torch.randn(6, R, generator=g), torch.randn(R, 5, generator=g), torch.randn(6, 5, generator=g)
    lora = P.Patch("lora", {0: up, 1: down})
    got = P.patched_tensor(base, lora, 0.7)
    assert got.dtype == dtype
    torch.testing.assert_close(got, (base.float() + 0.7 * (up @ down)).to(dtype), atol=0, rtol=0)
    got = P.patched_tensor(base, P.Patch("diff", {0: delta}), 1.3)
    torch.testing.assert_close(got, (base.float() + 1.3 * delta).to(dtype), atol=0, rtol=0)


@pytest.mark.reference
@pytest.mark.parametrize("channels", [8, 12])
def test_widened_conv_in(channels):
    base = torch.randn(320, 4, 3, 3)
    delta = torch.randn(320, channels, 3, 3)
    got = P.patched_tensor(base, P.Patch("diff", {0: delta}), 0.5)
    assert got.shape == (320, channels, 3, 3)
    torch.testing.assert_close(got[:, :4], base + 0.5 * delta[:, :4])
    torch.testing.assert_close(got[:, 4:], 0.5 * delta[:, 4:], atol=0, rtol=0)
    with pytest.raises(P.PatchError, match="does not fit"):
        P.patched_tensor(base, P.Patch("diff", {0: torch.randn(320, 3, 3, 3)}), 1.0)
    with pytest.raises(P.PatchError, match="does not fit"):
        P.patched_tensor(torch.randn(4, 4), P.Patch("diff", {0: torch.randn(4, 5)}), 1.0)


def test_compute_patched_tensors_and_missing_keys(xl, caplog):
    keys = attn_keys(xl, 6)
    state = lora_state(xl, keys)
    state["diffusion_model.not_in_model.weight::diff::0"] = torch.zeros(3)
    params = {PREFIX + k: v for k, v in xl.named_parameters()}
    with caplog.at_level(logging.WARNING, logger="layerdiffuse"):
        out = P.compute_patched_tensors(params, P.parse_patch_state(state), 1.0, "x.safetensors")
    assert set(out) == set(keys)
    assert "not_in_model.weight" in caplog.text and "1 keys not in the model" in caplog.text
    k = keys[0]
    up, down = state[k + "::lora::0"], state[k + "::lora::1"]
    torch.testing.assert_close(out[k], params[k] + up @ down)


def test_mostly_missing_is_refused_naming_the_family():
    sd15 = build_tree("sd15")
    xl_keys = [f"{PREFIX}input_blocks.7.1.transformer_blocks.{i}.attn1.to_q.weight::diff::0" for i in range(1, 10)]
    state = {k: torch.zeros(8, 8) for k in xl_keys}
    with pytest.raises(
        P.PatchError, match="9 of its 9 keys do not exist.*another model family. Load an SDXL checkpoint"
    ):
        P.ModulePatcher(sd15).install(P.parse_patch_state(state), 1.0, "layer_xl_transparent_conv.safetensors")


@pytest.mark.reference
def test_lora_hooks_equal_merged_weights_and_touch_nothing(xl):
    keys = attn_keys(xl)
    state = lora_state(xl, keys)
    before = snapshot(xl)
    patcher = P.ModulePatcher(xl)
    patcher.install(P.parse_patch_state(state), 0.8)
    assert same_bits(snapshot(xl), before)  # hooks, no weight touched (A1111's LoRA backup stays clean)
    name = keys[5][len(PREFIX) : -len(".weight")]
    lin = xl.get_submodule(name)
    x = torch.randn(3, 5, lin.in_features)
    merged = P.patched_tensor(
        lin.weight, P.Patch("lora", {0: state[keys[5] + "::lora::0"], 1: state[keys[5] + "::lora::1"]}), 0.8
    )
    assert_close_rel(lin(x), F.linear(x, merged, lin.bias))
    assert patcher.calls == 1
    patcher.disable()  # Stop At
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), atol=0, rtol=0)
    patcher.restore()
    assert same_bits(snapshot(xl), before)
    assert not lin._forward_hooks


@pytest.mark.reference
@pytest.mark.parametrize("channels", [8, 12])
def test_conv_in_as_extra_convolution(xl, channels):
    keys = [PREFIX + "input_blocks.0.0.weight", PREFIX + "input_blocks.0.0.bias"] + [
        PREFIX + k for k, _ in list(xl.named_parameters())[5:40]
    ]
    state = diff_state(xl, keys, conv_in_channels=channels)
    before = snapshot(xl)
    conv = xl.get_submodule("input_blocks.0.0")
    widened = P.patched_tensor(conv.weight, P.Patch("diff", {0: state[keys[0] + "::diff::0"]}), 0.9)
    bias = P.patched_tensor(conv.bias, P.Patch("diff", {0: state[keys[1] + "::diff::0"]}), 0.9)
    patcher = P.ModulePatcher(xl)
    try:
        patcher.install(P.parse_patch_state(state), 0.9)
        assert conv.weight.shape == (8, 4, 3, 3)  # no widened Parameter in A1111
        cond = torch.randn(1, channels - 4, 6, 5)
        patcher.concat.condition = cond
        for batch in (1, 2, 6):  # cond and uncond rows alike, any batch size
            x = torch.randn(batch, 4, 6, 5)
            expected = F.conv2d(torch.cat([x, cond.repeat(batch, 1, 1, 1)], 1), widened, bias, padding=1)
            # two convolutions summed vs one over the concatenation: other sums
            assert_close_rel(conv(x), expected)
    finally:
        patcher.restore()
    assert same_bits(snapshot(xl), before)
    assert not conv._forward_hooks


def test_concat_without_condition_is_an_error(xl):
    key = PREFIX + "input_blocks.0.0.weight"
    patcher = P.ModulePatcher(xl)
    patcher.install(P.parse_patch_state(diff_state(xl, [key], conv_in_channels=8)), 1.0)
    try:
        with pytest.raises(LayerDiffuseError, match="condition latent of this mode was not set"):
            xl.get_submodule("input_blocks.0.0")(torch.randn(1, 4, 4, 4))
    finally:
        patcher.restore()


def test_failed_install_restores_itself(xl):
    keys = [PREFIX + k for k, _ in list(xl.named_parameters())[:30]]
    state = diff_state(xl, keys)
    state[keys[20] + "::diff::0"] = torch.zeros(3, 3)  # a bad shape in the middle of the file
    before = snapshot(xl)
    patcher = P.ModulePatcher(xl)
    with pytest.raises(P.PatchError, match="does not fit"):
        patcher.install(P.parse_patch_state(state), 1.0)
    assert same_bits(snapshot(xl), before) and not patcher.installed


def test_install_twice_is_refused(xl):
    patcher = P.ModulePatcher(xl)
    state = P.parse_patch_state(lora_state(xl, attn_keys(xl, 2)))
    patcher.install(state, 1.0)
    with pytest.raises(LayerDiffuseError, match="already installed"):
        patcher.install(state, 1.0)
    patcher.restore()
    patcher.restore()  # idempotent


def test_a1111_lora_backup_is_reset_and_given_back(xl):
    """A module that A1111's built-in LoRA already patched: we merge on clean weights, then put its state back."""
    key = attn_keys(xl, 1)[0]
    mod = xl.get_submodule(key[len(PREFIX) : -len(".weight")])
    clean = mod.weight.detach().clone()
    with torch.no_grad():
        mod.weight += 1.0  # A1111 merged a user LoRA lazily ...
    mod.network_weights_backup = clean.clone()  # ... and keeps the clean weight as its backup
    mod.network_bias_backup = None
    mod.network_current_names = ("user_lora",)
    before = snapshot(xl)
    state = diff_state(xl, [key])
    patcher = P.ModulePatcher(xl)
    patcher.install(P.parse_patch_state(state), 1.0)
    torch.testing.assert_close(mod.weight, clean + state[key + "::diff::0"])  # merged on the clean weight
    assert mod.network_weights_backup is None and mod.network_current_names == ()
    patcher.restore()
    assert same_bits(snapshot(xl), before)
    assert torch.equal(mod.network_weights_backup, clean) and mod.network_current_names == ("user_lora",)
