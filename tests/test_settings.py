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
    assert len(ARG_ORDER) == 16 and ARG_ORDER[12:] == ("layers", "resolution", "true_cfg", "normalize")
    with pytest.raises(SettingsError, match="at most 16 arguments"):
        Settings.from_args([True] * 17)


ORDER = "enabled, method, weight, stop_at (ending_step), fg_image, bg_image, blend_image, resize_mode, output_origin, "


@pytest.mark.parametrize(
    "args,got",
    [
        ("enabled", "got a string: 'enabled'"),  # was split into letters: "enabled must be ..., got 'e'"
        (None, "got null"),
        (True, "got a boolean: True"),
        ([True] * 17, "args has 17 values, but the script takes at most 16 arguments"),
    ],
)
def test_malformed_args_say_what_they_must_be(args, got):
    """The shape is checked before any value: a string is not a list of letters (issue 21, item 5),
    and the message lists the 16 names in order and the named form."""
    with pytest.raises(SettingsError) as info:
        Settings.from_args(args)
    text = str(info.value)
    assert got in text and f"a list of at most 16 values in this order: {ORDER}" in text
    assert "or a list holding one object with those names" in text


def test_request_args_shape():
    """The API request's own ``args`` (hosts/common.py checks them before the host spreads them):
    a bare object is the named form; an object among other values is refused."""
    from lib_layerdiffuse.settings import check_args

    assert check_args({"enabled": True}, request=True) == [{"enabled": True}]
    assert check_args((True, "x"), request=True) == [True, "x"]
    assert check_args([], request=True) == []
    with pytest.raises(SettingsError, match="args holds an object among 2 values: the named form is one object alone"):
        check_args([{"enabled": True}, True], request=True)
    assert check_args([{"enabled": True}, False, "x"]) == [{"enabled": True}, False, "x"]  # UI defaults filled in


# -- Settings > LayerDiffuse values: one check per kind, by the option table ----------------------


def read_options(**values):
    from lib_layerdiffuse.options import DecodeOptions

    return DecodeOptions.read(lambda key, default: values.get(key, default))


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("layerdiffuse_decode_passes", True, "layerdiffuse_decode_passes must be one of 8, 4, 2, 1, got True"),
        ("layerdiffuse_decode_passes", 2.5, "layerdiffuse_decode_passes must be one of 8, 4, 2, 1, got 2.5"),
        ("layerdiffuse_decode_passes", "8", "layerdiffuse_decode_passes must be one of 8, 4, 2, 1, got '8'"),
        ("layerdiffuse_tile_size", 1024.5, "layerdiffuse_tile_size must be a whole number, got 1024.5"),
        ("layerdiffuse_tile_size", False, "layerdiffuse_tile_size must be a number, got False"),
        ("layerdiffuse_tile_size", "1024", "layerdiffuse_tile_size must be a number, got '1024'"),
        ("layerdiffuse_tile_size", 100, "layerdiffuse_tile_size must be between 256 and 4096, got 100"),
        ("layerdiffuse_tile_size", 1000, "layerdiffuse_tile_size must be a multiple of 64, got 1000"),
        ("layerdiffuse_extra_memory_gb", True, "layerdiffuse_extra_memory_gb must be a number, got True"),
        ("layerdiffuse_extra_memory_gb", float("nan"), "layerdiffuse_extra_memory_gb must be between 0 and 64"),
        ("layerdiffuse_tiling", "Always", "layerdiffuse_tiling must be one of auto, always, never, got 'Always'"),
        ("layerdiffuse_tiling", 1, "layerdiffuse_tiling must be one of auto, always, never, got 1"),
        ("layerdiffuse_previews", "false", "layerdiffuse_previews must be true or false (a JSON boolean), got 'false'"),
        ("layerdiffuse_compile", 0, "layerdiffuse_compile must be true or false (a JSON boolean), got 0"),
        ("layerdiffuse_keep_models", None, "layerdiffuse_keep_models must be true or false"),
        ("layerdiffuse_models_dir", 12345, "layerdiffuse_models_dir must be text, the path of a folder, got 12345"),
        ("layerdiffuse_models_dir", "a\0b", "layerdiffuse_models_dir holds a NUL character"),
    ],
)
def test_option_values_are_checked_by_type_and_named(key, value, message):
    """Values stored as sent (override_settings, /sdapi/v1/options, config.json) are refused by
    name when read: ``true`` and 2.5 passes, a 1024.5 tile, the text "false" (issue 21, item 4)."""
    from lib_layerdiffuse.options import BY_KEY

    with pytest.raises(SettingsError) as info:
        read_options(**{key: value})
    text = str(info.value)
    assert text.startswith(message) and f"(Settings > LayerDiffuse > {BY_KEY[key].label})" in text


def test_option_values_of_the_right_type_are_taken():
    o = read_options(layerdiffuse_decode_passes=4.0, layerdiffuse_tile_size=512.0, layerdiffuse_extra_memory_gb=3,
                     layerdiffuse_tiling="never", layerdiffuse_compile=True, layerdiffuse_models_dir="  ")  # fmt: skip
    assert (o.passes, o.tile_size, o.extra_memory_gb, o.tiling, o.compile, o.models_dir) == (
        4,
        512,
        3.0,
        "never",
        True,
        "",
    )
    assert type(o.passes) is int and type(o.tile_size) is int and type(o.extra_memory_gb) is float
    from lib_layerdiffuse.options import DecodeOptions

    assert read_options() == DecodeOptions()  # the table's defaults pass their own check


def test_the_models_folder_setting_must_name_an_existing_folder(tmp_path, monkeypatch):
    """A named folder is never created (a typo, ".." or a number became a new folder): it must exist
    and be a folder; the message names the setting and says to create it."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingsError) as info:
        read_options(layerdiffuse_models_dir="missing/weights")
    text = str(info.value)
    assert text.startswith("layerdiffuse_models_dir: the folder 'missing/weights' (") and "does not exist" in text
    assert str(tmp_path / "missing" / "weights") in text and "does not exist. Create it" in text
    (tmp_path / "file").write_text("x")
    with pytest.raises(SettingsError, match="layerdiffuse_models_dir: 'file' .* is a file, not a folder"):
        read_options(layerdiffuse_models_dir="file")
    with pytest.raises(SettingsError, match="layerdiffuse_models_dir: 'file/sub' .* cannot be used as a folder"):
        read_options(layerdiffuse_models_dir="file/sub")
    assert list(tmp_path.iterdir()) == [tmp_path / "file"]  # nothing created
    (tmp_path / "weights").mkdir()
    assert read_options(layerdiffuse_models_dir=" weights ").models_dir == "weights"
    assert read_options(layerdiffuse_models_dir="..").models_dir == ".."  # an existing folder the user named


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
        ({"enabled": True, "stop_at": 0}, "Stop At) must be at least 0.001"),
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


# -- bounded layer images: formats, pixels, broken data URLs ---------------------------------


def encoded(image: Image.Image, fmt: str, **kwargs) -> str:
    bio = io.BytesIO()
    image.save(bio, format=fmt, **kwargs)
    return base64.b64encode(bio.getvalue()).decode()


WEBP_EXACT = {"WEBP": {"lossless": True, "exact": True}}  # exact: keep the colour under alpha 0
RGBA_8 = np.random.default_rng(3).integers(0, 256, (8, 8, 4), dtype=np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_accepted_formats_decode(fmt):
    image = Image.fromarray(RGBA_8 if fmt != "JPEG" else RGBA_8[..., :3])
    out = decode_image("fg_image", "data:image/whatever;base64," + encoded(image, fmt, **WEBP_EXACT.get(fmt, {})))
    assert out.shape == (8, 8, 4) and out.dtype == np.uint8
    if fmt != "JPEG":
        np.testing.assert_array_equal(out, RGBA_8)  # alpha kept
    else:
        assert (out[..., 3] == 255).all()


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "ICO", "PPM"])
def test_other_formats_are_refused_by_name(fmt):
    """The decoded format counts, not the data URL's type: a GIF labelled image/png is a GIF."""
    image = Image.fromarray(RGBA_8 if fmt in ("TIFF", "ICO") else RGBA_8[..., :3])
    with pytest.raises(SettingsError, match=rf"fg_image is in {fmt} format; layer images must be PNG, JPEG or WebP"):
        Settings.from_dict({"enabled": True, "fg_image": "data:image/png;base64," + encoded(image, fmt)})


def test_the_pixel_cap_is_checked_before_decoding(monkeypatch):
    """An 8000x8000 PNG of a few dozen KB is refused from its header: no pixel is decoded."""
    from PIL import ImageFile

    from lib_layerdiffuse import settings as S

    big = encoded(Image.new("L", (8000, 8000)), "PNG")
    assert len(big) < 200_000

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(SettingsError, match=r"fg_image is 8000x8000 \(64\.0 MP\), above the limit of 16\.8 MP"):
        Settings.from_dict({"enabled": True, "fg_image": big})
    assert S.MAX_IMAGE_PIXELS == 4096 * 4096
    side = encoded(Image.new("L", (4097, 4096)), "PNG")
    with pytest.raises(SettingsError, match="4097x4096"):
        decode_image("bg_image", side)
    monkeypatch.undo()
    assert decode_image("bg_image", encoded(Image.new("L", (4096, 4096)), "PNG")).shape == (4096, 4096, 4)


def test_a_decompression_bomb_gets_our_message(monkeypatch):
    """20000x20000 (400 MP, above PIL's own error threshold) and a PIL warning turned into
    an error by the host's filters both end in the same clear refusal."""
    import warnings

    bomb = encoded(Image.new("1", (20000, 20000)), "PNG")
    with pytest.raises(SettingsError, match="far above the limit of 16.8 MP"):
        decode_image("blend_image", bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 = 4096 px: PIL warns
    small = encoded(Image.new("L", (64, 64)), "PNG")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(SettingsError, match="far above the limit"):
            decode_image("blend_image", small)


@pytest.mark.parametrize(
    "value,message",
    [
        ("data:image/png;base64,", "fg_image holds no image data"),
        ("data:image/png;base64,%%%garbage%%%", "fg_image is not a base64-encoded image (invalid base64)"),
        ("data:image/png;base64" + "iVBORw0KGgo=", "fg_image is a broken data URL: no comma"),
        ("data:", "fg_image is a broken data URL: no comma"),
        ("data:image/png,iVBORw0KGgo=", "fg_image is a data URL that is not base64"),
        (
            "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"x" * 64).decode(),
            "fg_image is a damaged PNG file",
        ),
        (base64.b64encode(b"hello, not an image").decode(), "fg_image is not a base64-encoded image (the data is not"),
    ],
)
def test_broken_data_urls_name_the_field(value, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings.from_dict({"enabled": True, "fg_image": value})


def test_truncated_image_names_the_field():
    bio = io.BytesIO()
    Image.fromarray(RGBA_8).save(bio, format="PNG")
    half = base64.b64encode(bio.getvalue()[: len(bio.getvalue()) // 2]).decode()
    with pytest.raises(
        SettingsError, match="bg_image: the PNG image could not be decoded, its data is damaged or truncated"
    ):
        decode_image("bg_image", half)


def test_base64_with_line_breaks_is_read():
    text = encoded(Image.fromarray(RGBA_8), "PNG")
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    np.testing.assert_array_equal(decode_image("fg_image", wrapped), RGBA_8)


def test_la_and_palette_images_keep_their_alpha():
    la = Image.fromarray(np.stack([np.full((2, 2), 90, np.uint8), np.array([[0, 255], [64, 255]], np.uint8)], -1), "LA")
    pal = Image.new("P", (2, 2))
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putdata([0, 1, 1, 0])
    for image, kwargs, alpha in ((la, {}, [[0, 255], [64, 255]]), (pal, {"transparency": 0}, [[0, 255], [255, 0]])):
        np.testing.assert_array_equal(decode_image("fg_image", encoded(image, "PNG", **kwargs))[..., 3], alpha)
        bio = io.BytesIO()
        image.save(bio, format="PNG", **kwargs)
        np.testing.assert_array_equal(decode_image("fg_image", Image.open(bio))[..., 3], alpha)


def test_ui_arrays_and_images_share_the_cap_and_are_checked():
    huge = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (4097, 4096, 3))  # no memory behind it
    with pytest.raises(SettingsError, match="fg_image is 4096x4097"):
        decode_image("fg_image", huge)
    with pytest.raises(SettingsError, match="fg_image is 5000x4000"):
        decode_image("fg_image", Image.new("1", (5000, 4000)))
    with pytest.raises(SettingsError, match="fg_image is 5000x4000"):
        decode_image("fg_image", {"image": Image.new("1", (5000, 4000))})
    nan = np.zeros((2, 2, 3), np.float32)
    nan[0, 0, 0] = np.nan
    with pytest.raises(SettingsError, match="NaN or infinite"):
        decode_image("fg_image", nan)
    with pytest.raises(SettingsError, match="an array of <U1"):
        decode_image("fg_image", [[["a", "b", "c"]]])
    with pytest.raises(SettingsError, match="must be an RGB or RGBA image"):
        decode_image("fg_image", [[[1, 2, 3]], [[1, 2]]])  # ragged
