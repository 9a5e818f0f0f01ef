"""The restricted .pth reader (lib_layerdiffuse/pth.py) and the Flux weight files in weights.py.

Files that would run code are built here by hand (a torch-style zip around a pickle naming
os.system or builtins.exec); each test checks the refusal names what it found and that a marker
file the payload would create never appears.
"""

import collections
import io
import json
import math
import os
import pickle
import zipfile

import pytest
import torch
from safetensors.torch import save_file
from weightgen import make_state_dict, manifest_shapes

from lib_layerdiffuse import pth
from lib_layerdiffuse import weights as W
from lib_layerdiffuse.errors import WeightFileError
from lib_layerdiffuse.vae import TransparentVAEDecoder, TransparentVAEEncoder


def torch_zip(path, pickled: bytes, storages: dict[str, bytes] | None = None, byteorder=b"little"):
    """A zip laid out as torch.save writes it, around any pickle."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickled)
        if byteorder is not None:
            z.writestr("archive/byteorder", byteorder)
        for key, data in (storages or {}).items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", b"3\n")
    return path


class Payload:
    """Unpickling this runs ``func(arg)``."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def os_system_pickle(marker) -> bytes:
    # GLOBAL 'os system' by hand: pickle itself would write posix.system on Linux
    cmd = f"touch {marker}".encode()
    return b"\x80\x02cos\nsystem\nq\x00X" + len(cmd).to_bytes(4, "little") + cmd + b"\x85R."


def test_the_payloads_are_live(tmp_path):
    """Unpickled for real, the payloads below do create their marker (so the refusals matter)."""
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    pickle.loads(os_system_pickle(m1))
    pickle.loads(pickle.dumps(Payload(exec, f"open({str(m2)!r}, 'w').close()"), protocol=2))
    assert m1.exists() and m2.exists()


@pytest.mark.parametrize(
    "build,named",
    [
        (lambda m: os_system_pickle(m), "the pickle imports os.system"),
        (
            lambda m: pickle.dumps(Payload(exec, f"open({str(m)!r}, 'w').close()"), protocol=2),
            "__builtin__.exec",
        ),  # py2 name at protocol 2
        (lambda m: pickle.dumps(Payload(exec, f"open({str(m)!r}, 'w').close()"), protocol=4), "builtins.exec"),
        (lambda m: pickle.dumps({"w": Payload(os.system, f"touch {m}")}, protocol=2), f"{os.system.__module__}.system"),
    ],
    ids=["os.system", "exec-p2", "exec-p4-stack-global", "inside-a-dict"],
)
def test_a_pth_that_would_run_code_is_refused_and_nothing_runs(tmp_path, build, named):
    marker = tmp_path / "marker"
    path = torch_zip(tmp_path / "TransparentVAE.pth", build(marker))
    for call in (pth.read_layout, pth.load, W.read_flux_vae_layout, W.load_flux_decoder):
        with pytest.raises(
            WeightFileError, match=f"TransparentVAE.pth: refused: .*{named}.*nothing in the file was run"
        ):
            call(path)
    with pytest.raises(WeightFileError, match="refused"):
        W.verify_file(path, W.FILES["TransparentVAE"])
    assert not marker.exists()


def test_a_torch_saved_object_with_code_is_refused(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "x.pth"
    torch.save({"a": torch.zeros(2), "b": Payload(os.system, f"touch {marker}")}, path)
    with pytest.raises(WeightFileError, match=r"x.pth: refused: the pickle imports (posix|os|nt)\.system"):
        pth.load(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "obj,named",
    [
        ({"a": torch.zeros(2, dtype=torch.int64)}, "torch.LongStorage"),
        ({"a": torch.nn.Parameter(torch.zeros(2))}, "torch._utils._rebuild_parameter"),
        ({"a": {"b": torch.zeros(2)}}, r"not a flat dict of tensors .*'a' \(dict\)"),
        ({"a": 3}, r"'a' \(int\)"),
        ([torch.zeros(2)], "holds a list"),
        (collections.Counter(a=1), "collections.Counter"),
    ],
    ids=["int64", "parameter", "nested", "int", "list", "counter"],
)
def test_anything_but_a_flat_dict_of_float_tensors_is_refused(tmp_path, obj, named):
    path = tmp_path / "x.pth"
    torch.save(obj, path)
    with pytest.raises(WeightFileError, match=f"refused: .*{named}"):
        pth.load(path)


class Opaque:
    pass


def test_object_building_opcodes_are_refused(tmp_path):
    path = torch_zip(tmp_path / "x.pth", pickle.dumps(Opaque(), protocol=2))
    with pytest.raises(WeightFileError, match=f"imports {Opaque.__module__}.Opaque"):
        pth.read_layout(path)
    inst = b"(X\x04\x00\x00\x00trueios\nsystem\n."  # INST: import and call in one opcode
    with pytest.raises(WeightFileError, match="INST opcode"):
        pth.read_layout(torch_zip(tmp_path / "y.pth", inst))


def test_a_refusal_never_prints_a_crafted_value(tmp_path):
    """60 levels of (x, x) sharing one memo entry: its repr would be 2**60 long."""
    body = b"X\x01\x00\x00\x00aq\x000"  # "a", memo 0, popped
    for i in range(60):
        body += b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86q" + bytes([i + 1]) + b"0"
    body += b"h\x3c"  # the last one, memo 60
    path = torch_zip(tmp_path / "x.pth", b"\x80\x02" + body + b"Q.")
    with pytest.raises(WeightFileError, match=r"outside object \(a tuple\)"):
        pth.read_layout(path)
    path = torch_zip(tmp_path / "y.pth", b"\x80\x02}X\x01\x00\x00\x00k" + body + b"s.")
    with pytest.raises(WeightFileError, match=r"'k' \(tuple\)"):
        pth.read_layout(path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("protocol", [2, 5])
def test_torch_save_round_trip(tmp_path, dtype, protocol):
    g = torch.Generator().manual_seed(0)
    sd = collections.OrderedDict(
        w=torch.randn(4, 3, generator=g).to(dtype),
        view=torch.randn(3, 5, generator=g).to(dtype)[:, 1:3],  # a view of part of a storage
        t=torch.randn(2, 6, generator=g).to(dtype).t(),
        empty=torch.zeros(0, dtype=dtype),
    )
    sd["shared"] = sd["w"][1]  # two tensors of one storage
    sd._metadata = collections.OrderedDict({"": {"version": 1}})  # as state_dict() carries it
    path = tmp_path / "x.pth"
    torch.save(sd, path, pickle_protocol=protocol)
    out = pth.load(path)
    assert list(out) == list(sd)
    for k, v in sd.items():
        assert out[k].dtype == dtype and torch.equal(out[k], v), k
    assert {k: (list(r.shape), r.dtype_name) for k, r in pth.read_layout(path).items()}["view"][0] == [3, 2]
    assert list(pth.load(path, select=lambda k: k == "t")) == ["t"]


def test_damaged_files(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"a": torch.ones(4)}, good)
    with zipfile.ZipFile(good) as z:
        name = next(n for n in z.namelist() if n.endswith("data.pkl"))
        pkl = z.read(name)
    with pytest.raises(WeightFileError, match="storage archive/data/0 is missing"):
        pth.load(torch_zip(tmp_path / "a.pth", pkl))
    with pytest.raises(WeightFileError, match="has 8 bytes .*expected 16"):
        pth.load(torch_zip(tmp_path / "b.pth", pkl, {"0": b"\0" * 8}))
    with pytest.raises(WeightFileError, match="big-endian"):
        pth.load(torch_zip(tmp_path / "c.pth", pkl, {"0": b"\0" * 16}, byteorder=b"big"))
    assert torch.equal(pth.load(torch_zip(tmp_path / "d.pth", pkl, {"0": b"\0" * 16}))["a"], torch.zeros(4))
    # a tensor reaching past its storage
    over = pkl.replace(b"K\x04\x85", b"K\x05\x85")  # size (4,) -> (5,)
    assert over != pkl
    with pytest.raises(WeightFileError, match="outside its storage"):
        pth.load(torch_zip(tmp_path / "e.pth", over, {"0": b"\0" * 16}))
    with pytest.raises(WeightFileError, match="malformed"):
        pth.load(torch_zip(tmp_path / "f.pth", pkl[:-5], {"0": b"\0" * 16}))
    legacy = tmp_path / "legacy.pth"
    torch.save({"a": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(WeightFileError, match="legacy .*no pickle code ever runs"):
        pth.load(legacy)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"<html>404</html>")
    with pytest.raises(WeightFileError, match="not a torch checkpoint"):
        pth.load(junk)


# --- the Flux files in weights.py ----------------------------------------------------------------


def test_flux_entries_in_the_weight_table():
    vae, lora = W.FILES["TransparentVAE"], W.FILES["layerlora"]
    assert (vae.filename, vae.family, vae.role, vae.sha256) == ("TransparentVAE.pth", "flux", "flux_vae", None)
    assert (lora.filename, lora.family, lora.role) == ("layerlora.safetensors", "flux", "flux_lora")
    assert lora.sha256 == "ffa34d60e92c7bcd6414dc7a8735e27d5138bcda5248b3131329b3f405aadb53"
    base = "https://huggingface.co/RedAIGC/Flux-version-LayerDiffuse/resolve/main/"
    assert vae.url == base + "TransparentVAE.pth" and lora.url == base + "layerlora.safetensors"
    assert W.files_for("flux_vae") == [vae] and W.files_for("decoder", "flux") == []
    pth_manifest = manifest_shapes("flux_transparent_vae_pth")
    assert W.flux_vae_shapes() == {k: v for k, v in pth_manifest.items() if not k.startswith("sd_vae.")}


def flux_state(dtype, seed=7, sd_vae=True):
    """The .pth key set: real values for the encoder; the decoder's tensors are views of one
    shared value each (stride 0), so the file stays small while every key and shape is right."""
    shapes = manifest_shapes("flux_transparent_vae_pth")
    enc = make_state_dict({k: v for k, v in shapes.items() if k.startswith("encoder.")}, seed=seed)
    state = {}
    for i, (k, shape) in enumerate(sorted(shapes.items())):
        if k.startswith("encoder."):
            state[k] = enc[k].to(dtype)
        elif k.startswith("decoder.") or (sd_vae and k.startswith("sd_vae.")):
            state[k] = torch.full((1,), 0.01 * (i % 7) - 0.03, dtype=dtype).expand(shape)
    return state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_pth_of_the_right_keys_loads_and_equals_what_was_saved(tmp_path, dtype):
    state = flux_state(dtype)
    path = tmp_path / "TransparentVAE.pth"
    torch.save(state, path)  # a plain dict, as the test file is written
    assert path.stat().st_size < 10_000_000
    W.verify_file(path, W.FILES["TransparentVAE"])  # all 556 keys and shapes
    enc = W.load_flux_encoder(path, dtype=dtype)
    assert isinstance(enc, TransparentVAEEncoder) and enc.latent_channels == 16 and not enc.training
    sd = enc.state_dict()
    assert len(sd) == 18
    for k, v in sd.items():
        assert v.dtype == dtype and torch.equal(v, state["encoder." + k]), k
    enc32 = W.load_flux_encoder(path)  # cast on load
    torch.testing.assert_close(enc32.blocks[16].weight, state["encoder.blocks.16.weight"].float())
    if dtype != torch.bfloat16:
        return
    # the published dtype: the full decoder too (materialising 104 M values: once only)
    dec = W.load_flux_vae(path, dtype=dtype, parts=("decoder",))["decoder"]
    assert isinstance(dec, TransparentVAEDecoder) and dec.latent_channels == 16
    sd = dec.state_dict()
    assert len(sd) == 538 and all(v.dtype == dtype for v in sd.values())
    for k, v in sd.items():  # each saved decoder tensor is one value repeated
        assert v.shape == state["decoder." + k].shape and v.view(-1)[0] == state["decoder." + k].view(-1)[0], k
    for k in ("latent_conv_in.weight", "conv_out.bias", "mid_block.attentions.0.to_q.weight"):
        assert torch.equal(sd[k], state["decoder." + k]), k


def test_a_pth_missing_keys_is_refused_naming_them(tmp_path):
    state = flux_state(torch.bfloat16)
    del state["decoder.latent_conv_in.weight"], state["encoder.blocks.16.bias"]
    path = tmp_path / "TransparentVAE.pth"
    torch.save(state, path)
    msg = r"2 missing keys \(decoder.latent_conv_in.weight, encoder.blocks.16.bias\)"
    for call in (W.load_flux_decoder, W.load_flux_encoder, lambda p: W.verify_file(p, W.FILES["TransparentVAE"])):
        with pytest.raises(WeightFileError, match=msg):
            call(path)


def test_wrong_prefixes_and_shapes_are_named(tmp_path):
    state = flux_state(torch.bfloat16, sd_vae=False)  # sd_vae. is optional
    torch.save(state, tmp_path / "ok.pth")
    W.verify_file(tmp_path / "ok.pth", W.FILES["TransparentVAE"])
    # the reference's strict=False would load nothing from a file without the prefixes
    bare = {k.split(".", 1)[1]: v for k, v in state.items()}
    torch.save(bare, tmp_path / "bare.pth")
    with pytest.raises(WeightFileError, match=r"556 missing keys .*556 unexpected keys \(blocks.0.bias"):
        W.load_flux_decoder(tmp_path / "bare.pth")
    sd_layout = dict(state)
    sd_layout["decoder.latent_conv_in.weight"] = torch.zeros(64, 4, 1, 1, dtype=torch.bfloat16)  # the SDXL decoder's
    torch.save(sd_layout, tmp_path / "sd.pth")
    with pytest.raises(
        WeightFileError, match=r"decoder.latent_conv_in.weight: expected \[64, 16, 1, 1\], found \[64, 4, 1, 1\]"
    ):
        W.load_flux_decoder(tmp_path / "sd.pth")
    bad = dict(state)
    bad["encoder.blocks.0.bias"] = torch.tensor([float("nan")] * 32)
    torch.save(bad, tmp_path / "nan.pth")
    with pytest.raises(WeightFileError, match="non-finite values: encoder.blocks.0.bias"):
        W.load_flux_encoder(tmp_path / "nan.pth")


def sparse_safetensors(path, real: dict[str, torch.Tensor], zero_shapes: dict[str, list[int]]):
    """A valid bf16 safetensors file whose zero tensors are file holes (nothing written for them)."""
    entries, offset = {}, 0
    for k in sorted({**real, **zero_shapes}):
        shape = list(real[k].shape) if k in real else zero_shapes[k]
        n = 2 * math.prod(shape)
        entries[k] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    header = json.dumps(entries).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        for k, t in real.items():
            f.seek(8 + len(header) + entries[k]["data_offsets"][0])
            f.write(t.to(torch.bfloat16).contiguous().view(torch.uint8).numpy().tobytes())
        f.truncate(8 + len(header) + offset)
    return path


def test_a_safetensors_conversion_loads(tmp_path):
    shapes = W.flux_vae_shapes()
    enc = make_state_dict({k: v for k, v in shapes.items() if k.startswith("encoder.")}, seed=3)
    zeros = {k: v for k, v in shapes.items() if not k.startswith("encoder.")}
    zeros["sd_vae.decoder.conv_in.bias"] = [512]  # ignored
    path = sparse_safetensors(tmp_path / "TransparentVAE.safetensors", enc, zeros)
    W.verify_file(path, W.FILES["TransparentVAE"])
    m = W.load_flux_encoder(path)
    torch.testing.assert_close(m.blocks[0].weight, enc["encoder.blocks.0.weight"].to(torch.bfloat16).float())
    del enc["encoder.blocks.2.weight"]
    sparse_safetensors(path, enc, zeros)
    with pytest.raises(WeightFileError, match=r"1 missing keys \(encoder.blocks.2.weight\)"):
        W.load_flux_encoder(path)


def test_the_lora_file_check(tmp_path):
    info = W.FILES["layerlora"]
    good = tmp_path / "layerlora.safetensors"
    save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8)}, str(good))
    W.verify_file(good, info)
    bad = tmp_path / "other.safetensors"
    save_file({"conv_in.weight": torch.zeros(4, 8)}, str(bad))
    with pytest.raises(WeightFileError, match="should be the FLUX.1 LayerDiffuse LoRA but holds no LoRA keys"):
        W.verify_file(bad, info)
    pickled = tmp_path / "p.safetensors"
    torch.save({"a.lora_A.weight": torch.zeros(2)}, pickled)
    with pytest.raises(WeightFileError, match="pickled PyTorch checkpoint"):
        W.verify_file(pickled, info)


def test_download_path_checks_a_flux_vae_by_its_layout(tmp_path, monkeypatch):
    """hosts/common.WebUIHost.weight_path: temporary name, checked (keys and shapes), renamed;
    a file that would run code is refused and deleted."""
    import sys
    import types

    from lib_layerdiffuse.hosts import common

    served = {}

    def load_file_from_url(url, *, model_dir, progress=True, file_name=None, hash_prefix=None):
        served["url"] = url
        dst = os.path.join(model_dir, file_name)
        with open(dst, "wb") as f:
            f.write(served["data"])
        return dst

    modules = types.ModuleType("modules")
    modules.modelloader = types.SimpleNamespace(load_file_from_url=load_file_from_url)
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.modelloader", modules.modelloader)

    class Host(common.WebUIHost):
        def models_dir(self):
            (tmp_path / "models").mkdir(exist_ok=True)
            return tmp_path / "models"

    marker = tmp_path / "marker"
    evil = torch_zip(tmp_path / "evil.pth", os_system_pickle(marker))
    served["data"] = evil.read_bytes()
    with pytest.raises(WeightFileError, match="refused: the pickle imports os.system"):
        Host().weight_path("TransparentVAE")
    assert os.listdir(tmp_path / "models") == [] and not marker.exists()
    buf = io.BytesIO()
    torch.save(flux_state(torch.bfloat16), buf)
    served["data"] = buf.getvalue()
    path = Host().weight_path("TransparentVAE")
    assert path.name == "TransparentVAE.pth" and os.listdir(tmp_path / "models") == ["TransparentVAE.pth"]
    assert served["url"] == W.FILES["TransparentVAE"].url
