"""Settings from UI values, API arguments (positional and named) and infotext."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from lib_layerdiffuse.settings import ARG_ORDER, Settings, SettingsError, decode_image


def b64(arr, fmt="PNG"):
    bio = io.BytesIO()
    Image.fromarray(arr).save(bio, format=fmt)
    return base64.b64encode(bio.getvalue()).decode()


def test_defaults_and_positional_official_order():
    s = Settings.from_args([])
    assert not s.enabled and s.method.startswith("(SDXL) Only Generate") and s.weight == 1.0 and s.stop_at == 1.0
    s = Settings.from_args([True, "(SD1.5) Generate Everything Together (need batch size 3)", 0.5, 0.7, None, None, None,
                            "Just Resize", False, "fg", "bg", "blend"])  # fmt: skip
    assert s.enabled and s.mode.key == "JOINT_SD15" and s.weight == 0.5 and s.stop_at == 0.7
    assert s.resize_mode == "Just Resize" and (s.fg_additional_prompt, s.blend_additional_prompt) == ("fg", "blend")
    assert len(ARG_ORDER) == 12
    with pytest.raises(SettingsError, match="at most 12 arguments"):
        Settings.from_args([True] * 13)


def test_named_form_ignores_trailing_ui_defaults():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 3] = 128
    s = Settings.from_args([{"enabled": True, "method": "BG_TO_FG_SD15", "ending_step": 0.25, "bg_image": b64(rgba),
                             "weight": None}, False, "x", 1.0])  # fmt: skip
    assert s.stop_at == 0.25 and s.weight == 1.0 and s.mode.key == "BG_TO_FG_SD15"
    assert s.bg_image.shape == (8, 8, 4) and (s.bg_image[..., 3] == 128).all()


@pytest.mark.parametrize(
    "values,message",
    [
        ({"weight": "heavy"}, "weight must be a number between 0.0 and 2.0, got 'heavy'"),
        ({"weight": 3}, "weight must be between 0.0 and 2.0, got 3.0"),
        ({"stop_at": -0.1}, "stop_at must be between 0.0 and 1.0"),
        ({"method": "magic"}, "Unknown LayerDiffuse method 'magic'"),
        ({"resize_mode": "Stretch"}, "resize_mode must be one of Just Resize, Crop and Resize, Resize and Fill"),
        ({"fg_image": "not base64!!"}, "fg_image is not a base64-encoded image"),
        ({"fg_image": [1, 2, 3]}, "fg_image must be an RGB or RGBA image"),
        ({"colour": 1}, "unknown setting 'colour'"),
        ({"fg_additional_prompt": 5}, "fg_additional_prompt must be text"),
    ],
)
def test_invalid_values_are_named(values, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings.from_dict({"enabled": True, **values})


@pytest.mark.parametrize(
    "values,message",
    [
        ({"enable": True}, "unknown setting 'enable' (did you mean 'enabled'?)"),
        ({"enabled": "true", "method": "magic"}, "enabled must be true or false (a JSON boolean), got 'true'"),
        ({"enabled": 1}, "enabled must be true or false (a JSON boolean), got 1"),
        ({"enabled": True, "stop_at": 0}, "Stop At) must be above 0"),
    ],
)
def test_keys_and_enabled_are_always_checked(values, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        Settings.from_dict(values)


def test_disabled_reads_no_other_value():
    """A disabled request with values that would be refused when enabled (a broken image, an
    unknown method, a weight out of range) generates as if LayerDiffuse were not there."""
    s = Settings.from_args([False, "Make It Transparent", 5, 0, "not base64!!", None, None, "Stretch"])
    assert s == Settings()
    assert Settings.from_dict({"enabled": False, "fg_image": "not base64!!"}) == Settings()


def test_images_from_every_source():
    rgb = np.full((4, 5, 3), 7, np.uint8)
    assert decode_image("x", rgb)[..., 3].min() == 255
    assert decode_image("x", Image.fromarray(rgb)).shape == (4, 5, 4)
    assert decode_image("x", "data:image/png;base64," + b64(rgb)).shape == (4, 5, 4)
    assert decode_image("x", {"image": rgb}).shape == (4, 5, 4)
    assert decode_image("x", np.ones((2, 2, 4), np.float32))[0, 0, 0] == 255
    assert Settings.from_dict({"enabled": True, "resize_mode": 2}).resize_mode == "Resize and Fill"


def test_infotext_round_trip_and_legacy_labels():
    s = Settings.from_dict({"enabled": True, "method": "FG_TO_BG_SD15", "fg_image": np.zeros((4, 4, 4), np.uint8),
                            "bg_additional_prompt": "a room, dusk"})  # fmt: skip
    info = s.infotext()
    assert info["layerdiffusion_method"] == "(SD1.5) From Foreground to Background (need batch size 2)"
    assert info["layerdiffusion_fg_image"] is True and info["layerdiffusion_bg_image"] is False
    assert info["layerdiffusion_bg_additional_prompt"] == "a room, dusk"
    back = Settings.from_infotext({k: str(v) for k, v in info.items()})
    assert back.enabled and back.mode.key == "FG_TO_BG_SD15" and back.bg_additional_prompt == "a room, dusk"
    legacy = Settings.from_infotext({"layerdiffusion_enabled": "True", "layerdiffusion_method": "From Foreground to Blending",
                                     "layerdiffusion_weight": "0.8", "layerdiffusion_ending_step": "0.5"})  # fmt: skip
    assert legacy.method == "(SDXL) From Foreground to Blending" and legacy.weight == 0.8 and legacy.stop_at == 0.5
