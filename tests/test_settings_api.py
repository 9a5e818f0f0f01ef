"""Settings and script arguments through the WebUI's API paths, on the A1111 stand-ins (tests/fake_a1111.py):
``/sdapi/v1/options`` and ``override_settings`` (both store through ``opts.set``), values already in the
options (``config.json``), the Extras step's switch, the weight folder, and the API's spreading of
``alwayson_scripts[...]["args"]`` over the script's positions (issue 21, items 4 and 5)."""

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import fake_a1111 as fa
import numpy as np
import pytest
from PIL import Image

from lib_layerdiffuse.errors import SettingsError, WeightFileError
from lib_layerdiffuse.options import OPTIONS

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "layerdiffuse_script_under_test_settings_api"
TRANSPARENT = "(SD1.5) Only Generate Transparent Image (Attention Injection)"
ORDER = "enabled, method, weight, stop_at (ending_step), fg_image, bg_image, blend_image, resize_mode, output_origin, "


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("webui")
    models = root / "layer_model"
    models.mkdir()
    with fa.script_under(models, root, SCRIPT) as (fake, mod):
        fake.script_callbacks.ui_settings_callback()
        fake.script_callbacks.app_started_callback(None, None)  # the host starts: API checks installed
        yield SimpleNamespace(fake=fake, mod=mod, host=mod.host, root=root, models=models)


@pytest.fixture
def ctx(env, monkeypatch, tmp_path):
    """Per test: every option at its default, the family injected, output under tmp_path."""
    opts = env.fake.shared.opts
    for option in OPTIONS:
        monkeypatch.setattr(opts, option.key, option.default)
    monkeypatch.setattr(sys.modules["lib_layerdiffuse.hosts.a1111"], "detect_family", lambda unet: "sd15")
    monkeypatch.setattr(env.fake.images, "saved", [])
    monkeypatch.chdir(tmp_path)  # relative folders are relative to the WebUI's working directory
    model = fa.FakeSDModel(fa.tiny_unet().eval())
    return SimpleNamespace(env=env, opts=opts, model=model, out=str(tmp_path / "outputs"), cwd=tmp_path)


def positional(method=TRANSPARENT):
    return [True, method, 1.0, 1.0, None, None, None, "Just Resize", False, "", "", "", 4, 640, 4.0, True]


def generate(ctx):
    p = fa.Txt2Img(ctx.model, ctx.out, batch_size=1)
    return p, fa.process_images(p, ctx.env.mod.LayerDiffuseScript(), positional())


# -- /sdapi/v1/options and override_settings: refused where they are stored -----------------------

BAD = [  # issue 21, item 4: each was stored and used (1 pass, 2 passes, a 1024 tile, the Extras step ran)
    ("layerdiffuse_decode_passes", True, "layerdiffuse_decode_passes must be one of 8, 4, 2, 1, got True"),
    ("layerdiffuse_decode_passes", 2.5, "layerdiffuse_decode_passes must be one of 8, 4, 2, 1, got 2.5"),
    ("layerdiffuse_tile_size", 1024.5, "layerdiffuse_tile_size must be a whole number, got 1024.5"),
    ("layerdiffuse_extras_alpha", "false", "layerdiffuse_extras_alpha must be true or false (a JSON boolean), got 'false'"),
    ("layerdiffuse_models_dir", 12345, "layerdiffuse_models_dir must be text, the path of a folder, got 12345"),
    ("layerdiffuse_models_dir", "missing", "layerdiffuse_models_dir: the folder 'missing' ("),
    ("layerdiffuse_models_dir", "a\0b", "layerdiffuse_models_dir holds a NUL character"),
]  # fmt: skip


@pytest.mark.parametrize("key,value,message", BAD)
def test_options_api_refuses_a_bad_value_by_name_and_stores_nothing(ctx, key, value, message):
    """The whole request is checked before the host stores any of it: 422 naming the value, and
    none of its keys stored, not even the good ones before the bad one."""
    api = ctx.env.fake.api_api.Api(ctx.env.fake.shared)
    before = {k: getattr(ctx.opts, k) for k in ("layerdiffuse_tile_size", "layerdiffuse_tiling", key)}
    request = {"layerdiffuse_tile_size": 512, key: value, "layerdiffuse_tiling": "never"}
    with pytest.raises(ctx.env.fake.api_api.HTTPException) as info:
        api.set_config(request)
    assert info.value.status_code == 422 and info.value.detail.startswith("LayerDiffuse: " + message)
    for k, v in before.items():
        assert getattr(ctx.opts, k) == v and type(getattr(ctx.opts, k)) is type(v)
    assert sorted(os.listdir(ctx.cwd)) == []  # no folder "12345" or "missing" made


def test_the_options_route_made_before_start_up_is_checked(ctx):
    """The host's ``Api`` registers its bound ``set_config`` before ``app_started``: the route a
    request reaches is checked too, once."""
    fake = ctx.env.fake
    app = fa.app_with_api(fake.shared)
    fake.script_callbacks.app_started_callback(None, app)
    fake.script_callbacks.app_started_callback(None, app)
    route = app.routes[0]
    with pytest.raises(fake.api_api.HTTPException) as info:
        route.dependant.call({"layerdiffuse_tile_size": 512, "layerdiffuse_decode_passes": 3})
    assert info.value.status_code == 422 and "layerdiffuse_decode_passes" in info.value.detail
    assert ctx.opts.layerdiffuse_tile_size == 1024
    route.dependant.call({"layerdiffuse_tile_size": 512})
    assert ctx.opts.layerdiffuse_tile_size == 512


def test_settings_page_keeps_a_refused_value_unchanged_and_applies_the_others(ctx, caplog):
    """ "Apply settings" sets every key in turn and saves after: a bad value of ours is not stored
    (unchanged, by the host's rule) with a warning naming it; the keys before and after it apply."""
    with caplog.at_level("WARNING", logger="layerdiffuse"):
        changed = fa.run_settings(
            ctx.opts, {"layerdiffuse_tile_size": 512, "layerdiffuse_decode_passes": 3, "layerdiffuse_tiling": "never"}
        )
    assert changed == ["layerdiffuse_tile_size", "layerdiffuse_tiling"]
    assert (ctx.opts.layerdiffuse_tile_size, ctx.opts.layerdiffuse_tiling) == (512, "never")
    assert ctx.opts.layerdiffuse_decode_passes == 8
    assert any(
        "layerdiffuse_decode_passes must be one of 8, 4, 2, 1, got 3" in r.getMessage()
        and "not saved" in r.getMessage()
        for r in caplog.records
    )


def test_options_api_stores_good_values_as_used(ctx, tmp_path, monkeypatch):
    monkeypatch.setattr(ctx.env.fake.shared.cmd_opts, "layerdiffuse_models_dir", None)  # no start-up flag
    api = ctx.env.fake.api_api.Api(ctx.env.fake.shared)
    (tmp_path / "weights").mkdir()
    api.set_config({"layerdiffuse_decode_passes": 4.0, "layerdiffuse_tile_size": 512, "layerdiffuse_models_dir": "weights",
                    "layerdiffuse_extras_alpha": False})  # fmt: skip
    o = ctx.opts
    assert (o.layerdiffuse_decode_passes, o.layerdiffuse_tile_size, o.layerdiffuse_models_dir) == (4, 512, "weights")
    assert type(o.layerdiffuse_decode_passes) is int and o.layerdiffuse_extras_alpha is False
    assert ctx.env.host.models_dir() == Path("weights")


@pytest.mark.parametrize("key,value,message", BAD)
def test_override_settings_refuse_a_bad_value_before_the_generation(ctx, key, value, message):
    with pytest.raises(RuntimeError) as info:
        with fa.override_settings(ctx.opts, {key: value}):
            generate(ctx)
    assert str(info.value).startswith("LayerDiffuse: " + message)
    assert ctx.env.fake.images.saved == [] and sorted(os.listdir(ctx.cwd)) == []
    assert getattr(ctx.opts, key) == next(o.default for o in OPTIONS if o.key == key)  # put back


def test_forge_putting_back_a_bad_stored_value_is_not_refused(ctx, monkeypatch):
    """Forge2 and Neo put override_settings back with ``opts.set`` after the generation: a bad value
    stored before (``config.json``) must go back too, not fail the finished request; a new bad value
    is still refused, and generations refuse the stored one when they read it."""
    monkeypatch.setattr(ctx.opts, "layerdiffuse_decode_passes", 2.5)  # from config.json
    assert ctx.opts.set("layerdiffuse_decode_passes", 4, is_api=True, run_callbacks=False)
    assert ctx.opts.set("layerdiffuse_decode_passes", 2.5)  # sysinfo.set_config(stored_opts, save_config=False)
    assert ctx.opts.layerdiffuse_decode_passes == 2.5
    with pytest.raises(
        RuntimeError, match="^LayerDiffuse: layerdiffuse_decode_passes must be one of 8, 4, 2, 1, got 3"
    ):
        ctx.opts.set("layerdiffuse_decode_passes", 3, is_api=True, run_callbacks=False)
    assert ctx.opts.set("layerdiffuse_decode_passes", 3) is False  # the settings page: kept unchanged
    with pytest.raises(SettingsError, match="^layerdiffuse_decode_passes must be one of 8, 4, 2, 1, got 2.5"):
        ctx.env.host.decode_options()


@pytest.mark.parametrize(
    "key,value,message",
    [case for case in BAD if case[0] != "layerdiffuse_extras_alpha"]  # not a generation's setting: see below
    + [("layerdiffuse_tiling", "Always", "layerdiffuse_tiling must be one of auto, always, never, got 'Always'")],
)
def test_a_bad_value_already_in_the_options_refuses_the_generation(ctx, monkeypatch, key, value, message):
    """Values that reached the options without ``opts.set`` (``config.json``) are refused when the
    generation reads them, before sampling, by name; nothing is written, no folder is made."""
    monkeypatch.setattr(ctx.opts, key, value)
    p = fa.Txt2Img(ctx.model, ctx.out, batch_size=1)
    with pytest.raises(RuntimeError) as info:
        fa.process_images(p, ctx.env.mod.LayerDiffuseScript(), positional())
    assert str(info.value).startswith("LayerDiffuse: " + message)
    assert p.unet_rows == [] and ctx.env.fake.images.saved == [] and sorted(os.listdir(ctx.cwd)) == []


def test_extras_refuses_a_switch_that_is_no_boolean(ctx, monkeypatch):
    """The text "false" turned the Extras step on (any non-empty text is truthy); it is refused by
    name before any step changes the image."""
    step = ctx.env.mod.LayerDiffuseExtrasAlpha()
    image = Image.fromarray(np.full((8, 8, 4), 128, np.uint8), "RGBA")
    pp = SimpleNamespace(image=image, info={})
    monkeypatch.setattr(ctx.opts, "layerdiffuse_extras_alpha", "false")
    with pytest.raises(RuntimeError, match=r"^LayerDiffuse: layerdiffuse_extras_alpha must be true or false"):
        step.process_firstpass(pp)
    assert pp.image is image
    monkeypatch.setattr(ctx.opts, "layerdiffuse_extras_alpha", False)
    step.process_firstpass(pp)
    assert pp.image is image and "_layerdiffuse_alpha" not in vars(pp)
    monkeypatch.setattr(ctx.opts, "layerdiffuse_extras_alpha", True)
    step.process_firstpass(pp)
    assert pp.image.mode == "RGB"  # the step ran: the host's steps get the padded colour


# -- the weight folder ---------------------------------------------------------------------------


def test_models_folder_sources(ctx, monkeypatch, tmp_path):
    """The setting names an existing folder (never created); empty means models/layer_model, which is
    created; the start-up flag is created when missing, as before (it names its folder on purpose)."""
    host, paths = ctx.env.host, ctx.env.fake.paths
    monkeypatch.setattr(ctx.env.fake.shared.cmd_opts, "layerdiffuse_models_dir", None)
    monkeypatch.setattr(paths, "models_path", str(tmp_path / "models"))
    assert host.models_dir() == tmp_path / "models" / "layer_model" and (tmp_path / "models" / "layer_model").is_dir()
    monkeypatch.setattr(ctx.opts, "layerdiffuse_models_dir", "typo")
    with pytest.raises(SettingsError, match="layerdiffuse_models_dir: the folder 'typo'"):
        host.models_dir()
    assert not (tmp_path / "typo").exists()
    monkeypatch.setattr(ctx.opts, "layerdiffuse_models_dir", "")
    flag = tmp_path / "flag" / "weights"
    monkeypatch.setattr(ctx.env.fake.shared.cmd_opts, "layerdiffuse_models_dir", str(flag))
    assert host.models_dir() == flag and flag.is_dir()
    monkeypatch.setattr(ctx.env.fake.shared.cmd_opts, "layerdiffuse_models_dir", "bad\0flag")
    with pytest.raises(WeightFileError, match="--layerdiffuse-models-dir 'bad.*flag' cannot"):
        host.models_dir()


# -- script arguments as the API hands them over --------------------------------------------------


def api_args(ctx, value):
    """The script's positional arguments from a request's ``alwayson_scripts: {"LayerDiffuse": {"args": value}}``."""
    script = ctx.env.mod.LayerDiffuseScript()
    defaults = [c.value for c in script.ui(False)]
    return fa.api_script_args(ctx.env.fake.api_api.Api(ctx.env.fake.shared), script, value, defaults)


@pytest.mark.parametrize(
    "value,got",
    [
        ([*positional(), "a 17th value"], "args has 17 values, but the script takes at most 16 arguments"),
        ("enabled", "got a string: 'enabled'"),
        (None, "got null"),
        ([{"enabled": True}, True], "args holds an object among 2 values"),
    ],
)
def test_api_refuses_malformed_args(ctx, value, got):
    """The API dropped a 13th value silently and split a string into letters before the script saw
    them: the request is refused with 422, saying what the arguments must be (issue 21, item 5)."""
    with pytest.raises(ctx.env.fake.api_api.HTTPException) as info:
        api_args(ctx, value)
    assert info.value.status_code == 422
    detail = info.value.detail
    assert detail.startswith("LayerDiffuse: ") and got in detail
    assert f"args must be a list of at most 16 values in this order: {ORDER}" in detail


def test_api_passes_good_args(ctx):
    assert api_args(ctx, positional()) == positional()
    named = {"enabled": True, "method": TRANSPARENT}
    assert api_args(ctx, named)[0] == named  # a bare object is the named form
    assert api_args(ctx, [named])[0] == named
    short = api_args(ctx, [True])
    assert short[0] is True and len(short) == 16  # UI defaults after
    assert ctx.env.mod.Settings.from_args(api_args(ctx, named)).enabled


def test_the_checks_are_installed_once(ctx):
    api, opts = ctx.env.fake.api_api, ctx.opts
    check, setter = api.Api.init_script_args, opts.set
    ctx.env.fake.script_callbacks.app_started_callback(None, None)
    ctx.env.fake.script_callbacks.ui_settings_callback()
    assert api.Api.init_script_args is check and opts.set is setter
