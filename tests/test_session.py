"""Random sequences of generations across modes and families on trees with the real ldm names:
after each one, failed or not, every UNet tensor equals its original bit for bit."""

import random

import pytest
import torch
from test_patches import PREFIX, attn_keys, diff_state, lora_state
from unet_tree import build_tree, same_bits, snapshot
from weightgen import make_state_dict

from lib_layerdiffuse import modes as M
from lib_layerdiffuse.attention_sharing import AttentionSharing, AttentionSharingUnit
from lib_layerdiffuse.errors import LayerDiffuseError, PatchError
from lib_layerdiffuse.session import ModuleBackend, UNetSession


class Boom(Exception):
    pass


@pytest.fixture(scope="module")
def trees():
    torch.manual_seed(0)
    return {"sd15": build_tree("sd15"), "sdxl": build_tree("sdxl").half()}


def file_for(mode, unet):
    """A small file in the mode's layout, shaped for the tiny tree."""
    if mode.apply == "attention_sharing":
        with torch.device("meta"):
            probe = AttentionSharing(unet, mode.group, mode.control is not None)
        return make_state_dict({k: list(v.shape) for k, v in probe.state_dict().items()}, seed=1)
    if mode.apply == "lora":
        return lora_state(unet, attn_keys(unet))
    keys = [
        PREFIX + k for k, _ in unet.named_parameters() if not k.endswith(("to_q.weight", "to_k.weight", "to_v.weight"))
    ]
    return diff_state(unet, keys, conv_in_channels=4 + mode.concat_channels)


def session_for(unet, mode, state, weight=1.0):
    """A session on the A1111-style module backend; Stop At at sigma 1 (see ``run_generation``)."""
    return UNetSession(
        ModuleBackend(unet, lambda t: float(torch.as_tensor(t).max())), mode, state, weight=weight, sigma_end=1.0
    )


def run_generation(session, unet, fail_at):
    """What a host does between install and restore, in small."""
    if session.mode.concat:
        session.condition = torch.randn(1, session.mode.concat_channels, 4, 4)
    session.install()
    if fail_at == "after_install":
        raise Boom()
    assert session.step(5.0)  # a UNet call above Stop At
    if session.mode.concat:
        unet.get_submodule("input_blocks.0.0")(torch.randn(2, 4, 4, 4, dtype=next(unet.parameters()).dtype))
    if session.sharing is not None:
        unit = session.sharing.units[1]
        rows = 2 * session.mode.group
        if session.mode.control is not None:
            session.sharing.set_control(torch.rand(1, 3, 32, 32))
        unit(torch.randn(rows, 16, 8), torch.randn(rows, 5, 8))
    else:
        lin = unet.get_submodule(attn_keys(unet, 1)[0][len(PREFIX) : -len(".weight")])
        lin(torch.randn(2, lin.in_features, dtype=lin.weight.dtype))
    if fail_at == "mid_sampling":
        raise Boom()
    assert not session.step(0.5) and session.stopped  # Stop At: the backend's disable
    if fail_at == "after_stop":
        raise Boom()


def test_random_sequences_restore_bit_exactly(trees):
    rng = random.Random(1234)
    originals = {f: snapshot(t) for f, t in trees.items()}
    modules = {f: {n: m for n, m in t.named_modules()} for f, t in trees.items()}
    counts = {"ok": 0, "raised": 0, "refused": 0}
    for _ in range(30):
        mode = rng.choice([m for m in M.MODES if m.family in trees])  # Flux: tests/test_hosts_forge.py
        family = mode.family if rng.random() < 0.85 else ("sdxl" if mode.family == "sd15" else "sd15")
        unet = trees[family]
        fail_at = rng.choice([None, None, "after_install", "mid_sampling", "after_stop"])
        try:
            M.check_family(mode, family)
            session = session_for(unet, mode, file_for(mode, trees[mode.family]), weight=rng.uniform(0, 2))
        except LayerDiffuseError as e:
            assert family != mode.family and "checkpoint" in str(e)
            counts["refused"] += 1
        else:
            try:
                run_generation(session, unet, fail_at)
                counts["ok"] += 1
            except Boom:
                counts["raised"] += 1
            finally:
                session.restore()
        for f, t in trees.items():
            assert same_bits(snapshot(t), originals[f]), f"{f} changed after {mode.key} ({fail_at})"
            assert {n: m for n, m in t.named_modules()} == modules[f]
            assert not any(m._forward_hooks for m in t.modules())
            assert not any(isinstance(m, AttentionSharingUnit) for m in t.modules())
    assert counts["ok"] and counts["raised"] and counts["refused"]


def test_sharing_changes_output_while_installed_and_calls_are_counted(trees):
    unet = trees["sd15"]
    mode = M.resolve("JOINT_SD15")
    session = session_for(unet, mode, file_for(mode, unet))
    attn = unet.get_submodule("input_blocks.1.1.transformer_blocks.0.attn1")
    h = torch.randn(3, 16, 8)
    plain = attn(h)
    try:
        session.install()
        shared = unet.get_submodule("input_blocks.1.1.transformer_blocks.0.attn1")(h)
        assert session.sharing.state.calls == 1 and not torch.allclose(shared, plain)
        assert not session.ran  # no UNet call went through the backend yet
        session.backend._before_call(unet, (h, torch.full((3,), 5.0)), {})  # the UNet pre-hook (tree has no forward)
        assert session.calls == 1 and session.ran
    finally:
        session.restore()
    assert session.sharing.state.calls == 1 and attn is unet.get_submodule(
        "input_blocks.1.1.transformer_blocks.0.attn1"
    )


def test_wrong_file_for_the_mode(trees):
    unet = trees["sd15"]
    mode = M.resolve("JOINT_SD15")
    bad = file_for(M.resolve("FG_TO_BG_SD15"), unet)
    with pytest.raises(PatchError, match="does not fit '.*Generate Everything Together.*Delete layer_sd15_joint"):
        session_for(unet, mode, bad)
    xl = trees["sdxl"]
    layer = M.resolve("FG_TO_BLEND")
    no_conv_in = lora_state(xl, attn_keys(xl, 4))
    before = snapshot(xl)
    with pytest.raises(PatchError, match="holds no conv_in patch; .* needs one for 8 "):
        session_for(xl, layer, no_conv_in)  # refused before anything is installed
    assert same_bits(snapshot(xl), before)


def test_empty_patch_file_is_refused(trees):
    with pytest.raises(PatchError, match="layer_xl_transparent_attn.safetensors holds no patches"):
        session_for(trees["sdxl"], M.resolve("FG_ONLY_ATTN"), {})


def test_a_module_backend_refuses_a_host_lora_mode(trees):
    """A1111 has no Flux and no host LoRA route: the Flux mode is refused, nothing installed."""
    from lib_layerdiffuse.session import ModuleBackend, UNetSession

    unet = trees["sdxl"]
    with pytest.raises(LayerDiffuseError, match="needs a host that loads LoRA files"):
        UNetSession(ModuleBackend(unet, lambda t: t), M.resolve("FG_ONLY_FLUX"), lora="layerlora.safetensors")


def test_sharing_files_of_another_rank_load_at_their_rank():
    """A trained attention-sharing file (``layers --rank 4``) is loaded at its own rank; a file
    mixing ranks is refused naming the file."""
    from test_attention_sharing_rank import _state

    from lib_layerdiffuse.session import load_sharing

    mode = M.resolve("(SD1.5) Only Generate Transparent Image (Attention Injection)")
    unet = build_tree("sd15")
    state = _state(1, False, rank=4)
    sharing = load_sharing(unet, mode, state, "mine.safetensors")
    assert {u.to_q_lora[0].down.out_features for u in sharing.units} == {4}
    key = "hookers.layers.3.to_v_lora.0.up.weight"
    state[key] = torch.zeros(state[key].shape[0], 8)
    with pytest.raises(PatchError, match=r"mine.safetensors: this attention-sharing file mixes LoRA ranks \[4, 8\]"):
        load_sharing(unet, mode, state, "mine.safetensors")
