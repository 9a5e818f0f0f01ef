"""The mode table: labels, legacy labels, batch and family rules, layer inputs."""

import pytest

from lib_layerdiffuse import modes as M
from lib_layerdiffuse import weights as W
from lib_layerdiffuse.conditioning import check_inputs

OFFICIAL = [
    "(SD1.5) Only Generate Transparent Image (Attention Injection)",
    "(SD1.5) From Foreground to Background (need batch size 2)",
    "(SD1.5) From Background to Foreground (need batch size 2)",
    "(SD1.5) Generate Everything Together (need batch size 3)",
    "(SDXL) Only Generate Transparent Image (Attention Injection)",
    "(SDXL) Only Generate Transparent Image (Conv Injection)",
    "(SDXL) From Foreground to Blending",
    "(SDXL) From Foreground and Blending to Background",
    "(SDXL) From Background to Blending",
    "(SDXL) From Background and Blending to Foreground",
]


def test_labels_and_default():
    # the official ten, then ours
    assert M.LABELS == [
        *OFFICIAL,
        "(FLUX) Only Generate Transparent Image",
        "(Qwen-Image-Layered) Decompose Into Layers",
    ]
    assert M.DEFAULT.label == "(SDXL) Only Generate Transparent Image (Attention Injection)"


def test_legacy_and_enum_names_resolve():
    assert M.resolve("Only Generate Transparent Image (Conv Injection)").key == "FG_ONLY_CONV"
    assert M.resolve("From Background and Blending to Foreground").key == "BG_BLEND_TO_FG"
    assert M.resolve("JOINT_SD15").group == 3
    assert M.resolve(" " + OFFICIAL[1] + " ").key == "FG_TO_BG_SD15"
    with pytest.raises(ValueError, match="Unknown LayerDiffuse method 'nope'. Valid methods: .*Conv Injection"):
        M.resolve("nope")


def test_every_file_is_in_the_weight_table():
    for m in M.MODES:
        if m.apply == "decompose":  # the loaded model itself; only its RGBA VAE is ours
            assert m.unet_file == "" and W.FILES[W.QWEN_VAE_FILE].family == m.family
            continue
        assert W.FILES[m.unet_file].family == m.family
        for f in (m.decoder_file, m.encoder_file):
            # the Flux decoder and encoder are one file (role flux_vae)
            assert f is None or (
                W.FILES[f].family == m.family and W.FILES[f].role in ("decoder", "encoder", "flux_vae")
            )


@pytest.mark.parametrize(
    "key,decoded",
    [
        ("FG_ONLY_ATTN_SD15", [0, 1, 2, 3]),
        ("FG_TO_BG_SD15", []),
        ("BG_TO_FG_SD15", [0, 2]),
        ("JOINT_SD15", [0, 3]),
        ("FG_ONLY_ATTN", [0, 1, 2, 3]),
        ("FG_ONLY_CONV", [0, 1, 2, 3]),
        ("FG_TO_BLEND", []),
        ("FG_BLEND_TO_BG", []),
        ("BG_TO_BLEND", []),
        ("BG_BLEND_TO_FG", [0, 1, 2, 3]),
    ],
)
def test_which_images_are_decoded(key, decoded):
    m = M.resolve(key)
    n = 4 if m.group != 3 else 6
    assert [i for i in range(n) if m.is_decoded(i)] == decoded


def test_frames_and_inputs():
    j = M.resolve("JOINT_SD15")
    assert [j.frame_name(i) for i in range(4)] == ["foreground", "background", "blended", "foreground"]
    assert M.resolve("FG_BLEND_TO_BG").concat == ("fg", "blend") and M.resolve("FG_BLEND_TO_BG").concat_channels == 8
    assert M.resolve("BG_TO_FG_SD15").control == "bg" and M.resolve("BG_TO_FG_SD15").prompts == ("fg", "blend")
    assert not M.resolve("FG_ONLY_ATTN_SD15").uses_weight and M.resolve("FG_ONLY_CONV").uses_weight
    assert not j.uses_resize  # the official shows Resize Mode for JOINT, where it does nothing


def test_batch_rule():
    M.check_batch(M.resolve("JOINT_SD15"), 6)
    with pytest.raises(ValueError, match="multiple of 3, but it is 4. Set Batch size to 3"):
        M.check_batch(M.resolve("JOINT_SD15"), 4)
    with pytest.raises(ValueError, match=r"groups of 2 images \(background, blended\)"):
        M.check_batch(M.resolve("FG_TO_BG_SD15"), 1)
    M.check_batch(M.resolve("FG_TO_BLEND"), 5)  # SDXL layer modes: any batch size


def test_family_refusals_name_both():
    with pytest.raises(ValueError, match=r"needs an SD1.5 checkpoint, but the loaded model is SDXL.*\(SDXL\) method"):
        M.check_family(M.resolve("JOINT_SD15"), "sdxl")
    with pytest.raises(ValueError, match=r"needs an SDXL checkpoint, but the loaded model is SD1.5.*\(SD1.5\) method"):
        M.check_family(M.resolve("FG_ONLY_ATTN"), "sd15")
    with pytest.raises(ValueError, match=r"loaded model is FLUX.1-dev. Load an SDXL checkpoint or pick a \(FLUX\)"):
        M.check_family(M.resolve("FG_ONLY_ATTN"), "flux")
    with pytest.raises(ValueError, match=r"loaded model is Chroma.*supports SD1.5, SDXL and FLUX.1-dev"):
        M.check_family(M.resolve("FG_ONLY_FLUX"), "Chroma")
    with pytest.raises(ValueError, match="unrecognised architecture"):
        M.check_family(M.resolve("FG_ONLY_ATTN"), None)


def test_required_images_and_size():
    mode = M.resolve("BG_BLEND_TO_FG")
    with pytest.raises(ValueError, match="needs a Background and a Blending image"):
        check_inputs(mode, {}, 64, 64)
    with pytest.raises(ValueError, match="needs a Blending image"):
        check_inputs(mode, {"bg": object()}, 64, 64)
    with pytest.raises(ValueError, match="multiples of 8, got 60x64"):
        check_inputs(mode, {"bg": object(), "blend": object()}, 64, 60)
    check_inputs(mode, {"bg": object(), "blend": object()}, 64, 64)
