"""Weight table and loading: real safetensors files in the official layouts, and every bad file."""

import shutil

import pytest
import torch
from safetensors.torch import save_file
from weightgen import make_state_dict, manifest_shapes

from lib_layerdiffuse import weights as W
from lib_layerdiffuse.vae import TransparentVAEDecoder, TransparentVAEEncoder


def test_qwen_layered_vae_entry():
    info = W.FILES[W.QWEN_VAE_FILE]
    assert (info.family, info.role, info.sha256) == ("qwen_layered", "qwen_vae", None)
    assert info.url == (
        "https://huggingface.co/Comfy-Org/Qwen-Image-Layered_ComfyUI/resolve/main/split_files/vae/"
        "qwen_image_layered_vae.safetensors"
    )


def test_table_has_the_14_official_files():
    # the Flux pair: tests/test_pth_reader.py; the Qwen-Image-Layered VAE: below
    sd = {k: f for k, f in W.FILES.items() if f.family in ("sd15", "sdxl")}
    assert len(sd) == 14 and len(W.FILES) == 17
    roles = [f.role for f in sd.values()]
    assert roles.count("decoder") == 2 and roles.count("encoder") == 2
    assert roles.count("attention_sharing") == 4 and roles.count("unet_patch") == 6
    for f in sd.values():
        assert (
            f.url
            == f"https://huggingface.co/LayerDiffusion/layerdiffusion-v1/resolve/{W.REVISION}/{f.name}.safetensors"
        )
        assert f.family in ("sd15", "sdxl")
        assert f.family == ("sd15" if "sd15" in f.name else "sdxl")
    assert sum(f.sha256 is not None for f in sd.values()) == 12
    assert [f.name for f in W.files_for("decoder", "sd15")] == ["layer_sd15_vae_transparent_decoder"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_load_decoder_full_size(decoder_file, decoder_state, dtype):
    m = W.load_decoder(decoder_file, dtype=dtype)
    assert isinstance(m, TransparentVAEDecoder) and not m.training
    assert all(p.dtype == dtype and not p.requires_grad for p in m.parameters())
    sd = m.state_dict()
    assert sd.keys() == decoder_state.keys()
    for k in ("conv_in.weight", "latent_conv_in.weight", "mid_block.attentions.0.to_q.weight"):
        torch.testing.assert_close(sd[k].float(), decoder_state[k].half().float().to(dtype).float())


def test_loaded_decoder_runs(decoder_file):
    m = W.load_decoder(decoder_file)
    with torch.no_grad():
        y = m(torch.rand(1, 3, 64, 64), torch.randn(1, 4, 8, 8))
    assert y.shape == (1, 4, 64, 64) and torch.isfinite(y).all()


def test_load_encoder(encoder_file, encoder_state):
    m = W.load_encoder(encoder_file, dtype=torch.float16)
    assert isinstance(m, TransparentVAEEncoder)
    torch.testing.assert_close(m.blocks[16].weight, encoder_state["blocks.16.weight"].half())


def test_sd15_manifests_load_the_same(tmp_path):
    path = tmp_path / "layer_sd15_vae_transparent_encoder.safetensors"
    save_file(make_state_dict(manifest_shapes("layer_sd15_vae_transparent_encoder"), seed=5), str(path))
    assert isinstance(W.load_encoder(path), TransparentVAEEncoder)


# --- bad files ------------------------------------------------------------------------


@pytest.fixture
def enc_state(encoder_state):
    return dict(encoder_state)


def save(tmp_path, name, state):
    path = tmp_path / name
    save_file(state, str(path))
    return path


def test_missing_file(tmp_path):
    with pytest.raises(W.WeightFileError, match="not found: .*nothing.safetensors"):
        W.load_encoder(tmp_path / "nothing.safetensors")


def test_pickle_is_refused_and_never_unpickled(tmp_path, enc_state):
    path = tmp_path / "vae_transparent_encoder.safetensors"
    torch.save(enc_state, path)
    with pytest.raises(W.WeightFileError, match="pickled PyTorch checkpoint.*safetensors only.*huggingface.co"):
        W.load_encoder(path)
    raw = tmp_path / "evil.ckpt"
    raw.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    with pytest.raises(W.WeightFileError, match="pickled"):
        W.load_encoder(raw)


def test_not_safetensors(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"<html>404 Not Found</html>" * 10)
    with pytest.raises(W.WeightFileError, match="is not a safetensors file"):
        W.load_decoder(path)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(W.WeightFileError, match="3 bytes, no safetensors header"):
        W.load_decoder(tiny)
    bad_json = tmp_path / "badjson.safetensors"
    bad_json.write_bytes((10).to_bytes(8, "little") + b"{not json " + b"\x00" * 10)
    with pytest.raises(W.WeightFileError, match="unreadable header"):
        W.load_decoder(bad_json)


def test_truncated_file(tmp_path, enc_state):
    path = save(tmp_path, "vae_transparent_encoder.safetensors", enc_state)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(W.WeightFileError, match=r"truncated.*interrupted.*vae_transparent_encoder.safetensors"):
        W.load_encoder(path)


def test_truncated_decoder_full_size(tmp_path, decoder_file):
    path = tmp_path / "vae_transparent_decoder.safetensors"
    with open(decoder_file, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(50_000_000))
    with pytest.raises(W.WeightFileError, match="truncated"):
        W.load_decoder(path)


def test_missing_keys_are_named(tmp_path, enc_state):
    del enc_state["blocks.16.weight"], enc_state["blocks.2.bias"]
    path = save(tmp_path, "enc.safetensors", enc_state)
    with pytest.raises(W.WeightFileError, match=r"2 missing keys \(blocks.16.weight, blocks.2.bias\)"):
        W.load_encoder(path)


def test_unexpected_keys_are_named(tmp_path, enc_state):
    enc_state["blocks.18.weight"] = torch.zeros(3)
    path = save(tmp_path, "enc.safetensors", enc_state)
    with pytest.raises(W.WeightFileError, match=r"1 unexpected keys \(blocks.18.weight\)"):
        W.load_encoder(path)


def test_shape_mismatch_is_named(tmp_path, enc_state):
    enc_state["blocks.0.weight"] = torch.zeros(32, 3, 3, 3)
    path = save(tmp_path, "enc.safetensors", enc_state)
    with pytest.raises(W.WeightFileError, match=r"blocks.0.weight: expected \[32, 4, 3, 3\], found \[32, 3, 3, 3\]"):
        W.load_encoder(path)


def test_integer_dtype_is_refused(tmp_path, enc_state):
    enc_state["blocks.0.bias"] = torch.zeros(32, dtype=torch.int32)
    path = save(tmp_path, "enc.safetensors", enc_state)
    with pytest.raises(W.WeightFileError, match="unsupported tensor dtypes"):
        W.load_encoder(path)


def test_unet_patch_file_given_as_decoder(tmp_path):
    state = {
        "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight::lora::0": torch.zeros(640, 4),
        "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight::lora::1": torch.zeros(4, 640),
    }
    path = save(tmp_path, "layer_xl_transparent_attn.safetensors", state)
    with pytest.raises(
        W.WeightFileError,
        match="is an SDXL UNet patch file, not a transparent VAE decoder.*vae_transparent_decoder.safetensors",
    ):
        W.load_decoder(path)


def test_attention_sharing_file_given_as_decoder(tmp_path):
    shapes = manifest_shapes("layer_sd15_transparent_attn")
    keys = sorted(shapes)[:6]
    path = save(tmp_path, "layer_sd15_transparent_attn.safetensors", make_state_dict({k: shapes[k] for k in keys}))
    with pytest.raises(W.WeightFileError, match="SD1.5 attention-sharing UNet file, not a transparent VAE decoder"):
        W.load_decoder(path)


def test_encoder_given_as_decoder_and_back(tmp_path, encoder_file, decoder_file):
    with pytest.raises(W.WeightFileError, match="is a transparent VAE encoder, not a transparent VAE decoder"):
        W.load_decoder(encoder_file)
    with pytest.raises(W.WeightFileError, match="is a transparent VAE decoder, not a transparent VAE encoder"):
        W.load_encoder(decoder_file)


def test_corrupt_data_after_valid_header(tmp_path, enc_state):
    """A header that promises fp32 data is honoured; a flipped dtype claim is caught by the reader."""
    path = save(tmp_path, "enc.safetensors", enc_state)
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + n].replace(b'"F32"', b'"F64"', 1)  # now sizes disagree with offsets
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data[:8]) + bytes(header) + bytes(data[8 + n :]))
    with pytest.raises(W.WeightFileError, match="could not be read"):
        W.load_encoder(bad)


def test_sha256(tmp_path, encoder_file):
    import hashlib

    copy = tmp_path / "copy.safetensors"
    shutil.copy(encoder_file, copy)
    assert W.sha256_of(copy) == hashlib.sha256(copy.read_bytes()).hexdigest()


def test_verify_file_by_role(tmp_path, encoder_file):
    W.verify_file(encoder_file, W.FILES["vae_transparent_encoder"])
    with pytest.raises(W.WeightFileError, match="is a transparent VAE encoder, not a transparent VAE decoder"):
        W.verify_file(encoder_file, W.FILES["vae_transparent_decoder"])
    shapes = manifest_shapes("layer_sd15_transparent_attn")
    few_units = save(
        tmp_path, "a.safetensors", make_state_dict({k: shapes[k] for k in sorted(shapes) if ".layers.3." in k})
    )
    with pytest.raises(W.WeightFileError, match=r"units \[3\]\.\.\., expected 0\.\.31"):
        W.verify_file(few_units, W.FILES["layer_sd15_transparent_attn"])
    with pytest.raises(W.WeightFileError, match="should be an SDXL UNet patch file but is an SD1.5 attention-sharing"):
        W.verify_file(few_units, W.FILES["layer_xl_transparent_attn"])
    patch = save(tmp_path, "p.safetensors", {"diffusion_model.x.weight::diff::0": torch.zeros(2)})
    W.verify_file(patch, W.FILES["layer_xl_transparent_conv"])
    bad = save(
        tmp_path, "b.safetensors", {"diffusion_model.x.weight::diff::0": torch.zeros(2), "y::loha::0": torch.zeros(2)}
    )
    with pytest.raises(W.WeightFileError, match="not LayerDiffuse patch keys"):
        W.verify_file(bad, W.FILES["layer_xl_transparent_conv"])


# --- fail closed: nesting, non-files, non-finite values, load errors with the key names ---------


def test_deeply_nested_header_is_a_weight_file_error(tmp_path):
    """10000 nested brackets made json raise a bare RecursionError."""
    for nested in (b"[" * 10000 + b"]" * 10000, b'{"a":' * 10000 + b"1" + b"}" * 10000):
        header = b'{"x": ' + nested + b"}"
        path = tmp_path / "nested.safetensors"
        path.write_bytes(len(header).to_bytes(8, "little") + header)
        with pytest.raises(W.WeightFileError, match="nested.safetensors is not a safetensors file .*nests too deeply"):
            W.read_header(path)
        with pytest.raises(W.WeightFileError, match="nests too deeply"):
            W.load_decoder(path)


def test_directory_or_broken_link_where_a_weight_file_belongs(tmp_path):
    folder = tmp_path / "vae_transparent_decoder.safetensors"
    folder.mkdir()
    with pytest.raises(W.WeightFileError, match=r"is a directory, not a weight file; remove it .*huggingface\.co"):
        W.load_decoder(folder)
    link = tmp_path / "layer_sd15_vae_transparent_encoder.safetensors"
    link.symlink_to(tmp_path / "gone.safetensors")
    with pytest.raises(W.WeightFileError, match=r"is a broken link \(to .*gone\.safetensors, which does not exist\)"):
        W.load_encoder(link)
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    with pytest.raises(W.WeightFileError, match="loop.safetensors is a broken link"):
        W.read_header(loop)
    to_dir = tmp_path / "to_dir.safetensors"
    to_dir.symlink_to(folder)
    with pytest.raises(W.WeightFileError, match="is a link to a directory"):
        W.read_header(to_dir)
    assert W.not_a_file(tmp_path / "absent") is None
    with pytest.raises(W.WeightFileError, match="not found"):
        W.read_header(tmp_path / "absent")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused_naming_the_first_key(tmp_path, enc_state, bad):
    enc_state["blocks.4.weight"] = enc_state["blocks.4.weight"].clone()
    enc_state["blocks.4.weight"].view(-1)[7] = bad
    enc_state["blocks.2.bias"] = enc_state["blocks.2.bias"].clone()
    enc_state["blocks.2.bias"][0] = bad
    path = save(tmp_path, "vae_transparent_encoder.safetensors", {k: v.half() for k, v in enc_state.items()})
    kind = r"1 NaN and 0 infinite" if bad != bad else r"0 NaN and 1 infinite"
    with pytest.raises(
        W.WeightFileError,
        match=rf"holds non-finite values: blocks\.2\.bias has {kind} of 32 values \(1 more tensors too\).*huggingface",
    ):
        W.load_encoder(path)


def test_non_finite_decoder_is_refused(tmp_path, decoder_state):
    state = {k: v.half() for k, v in decoder_state.items()}
    key = sorted(state)[-1]
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    path = save(tmp_path, "dec.safetensors", state)
    with pytest.raises(W.WeightFileError, match=rf"dec\.safetensors holds non-finite values: {key} .*good copy"):
        W.load_decoder(path)


def test_check_finite_helper():
    W.check_finite({"a": torch.ones(3), "steps": torch.tensor([1, 2], dtype=torch.int64)}, "x.safetensors")
    big = torch.zeros((1 << 24) + 5, dtype=torch.bfloat16)
    big[-1] = float("inf")
    with pytest.raises(W.WeightFileError, match=r"x\.safetensors holds non-finite values: w has 0 NaN and 1 infinite"):
        W.check_finite({"w": big, "a": torch.ones(2)}, "x.safetensors")


def test_load_errors_name_the_keys(tmp_path, enc_state, monkeypatch):
    """torch's "Error(s) in loading state_dict for ...:" line names no key; the message that
    reaches the user names them (here with the header check skipped to reach load_state_dict)."""
    del enc_state["blocks.16.weight"]
    enc_state["blocks.99.weight"] = torch.zeros(2)
    path = save(tmp_path, "enc.safetensors", enc_state)
    monkeypatch.setattr(W, "check_state", lambda *a, **k: None)
    with pytest.raises(W.WeightFileError) as info:
        W.load_encoder(path)
    text = str(info.value)
    assert "blocks.16.weight" in text and "blocks.99.weight" in text and "Error(s)" not in text
    assert "does not fit a transparent VAE encoder: 1 missing keys" in text
    lin = torch.nn.Linear(2, 3)
    assert W.state_mismatch(lin, lin.state_dict()) == ""
    assert W.state_mismatch(lin, {"weight": torch.zeros(3, 3), "extra": torch.zeros(1)}) == (
        "1 missing keys (bias); 1 unexpected keys (extra); 1 shape mismatches (weight: expected [3, 2], found [3, 3])"
    )
