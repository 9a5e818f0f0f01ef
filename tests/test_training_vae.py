"""Training stage 1 (latent-transparency VAE): data, losses, checkpoints, export, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from training_helpers import one_thread, read_trace  # noqa: F401  (one_thread: autouse fixture)

from lib_layerdiffuse import rgba as core_rgba
from lib_layerdiffuse import vae as core_vae
from lib_layerdiffuse import weights
from lib_layerdiffuse.training import checkpoint as ckpt
from lib_layerdiffuse.training import data as tdata
from lib_layerdiffuse.training import dist
from lib_layerdiffuse.training.models import TinyKLVAE, TrainDecoder, TrainEncoder, Widths
from lib_layerdiffuse.training.vae_stage import (
    LatentTransparencyPair,
    VAEStageConfig,
    identity_loss,
    pretrain_tiny_vae,
    recon_loss,
    train_vae_stage,
)

TINY = dict(widths="tiny", disc_width=8, size=32, batch_size=4, lr=1e-3, log_every=5, eval_count=4, vae_width=8)


@pytest.fixture(scope="session")
def tiny_vae_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tinyvae") / "tiny_vae.safetensors"
    torch.set_num_threads(1)
    cfg = VAEStageConfig(out=str(path.parent), synthetic=64, vae_steps=15, **TINY)
    pretrain_tiny_vae(cfg, dist.DistInfo(), path)
    return path


def _trace(out):
    return read_trace(out / "trace")


# ---------------------------------------------------------------------------------------
# Data


def _png(path, arr):
    Image.fromarray(arr).save(path)


def test_folder_dataset_filters_and_prepares(tmp_path):
    rng = np.random.default_rng(0)
    good = rng.integers(0, 256, (50, 70, 4), dtype=np.uint8)
    good[:10, :, 3] = 0  # transparent rows
    good[10:, :, 3] = 255
    opaque = good.copy()
    opaque[..., 3] = 255
    empty = good.copy()
    empty[..., 3] = 0
    _png(tmp_path / "good.png", good)
    _png(tmp_path / "opaque.png", opaque)
    _png(tmp_path / "empty.png", empty)
    _png(tmp_path / "rgb.png", good[..., :3])
    (tmp_path / "notes.txt").write_text("x")
    ds = tdata.RGBAFolder(tmp_path, 32)
    assert [p.name for p in ds.paths] == ["good.png"]
    assert ds.rejected == {"no transparent pixel": 1, "no visible pixel": 1, "no alpha channel (mode RGB)": 1}
    item = ds[0]
    assert item["rgba"].shape == (4, 32, 32) and item["padded"].shape == (3, 32, 32)
    assert item["alpha"].shape == (1, 32, 32) and item["premult"].shape == (3, 32, 32)
    straight = item["rgba"].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(item["padded"].permute(1, 2, 0).numpy(), core_rgba.pad_rgb(straight), atol=1e-6)
    np.testing.assert_allclose(item["premult"].permute(1, 2, 0).numpy(), core_rgba.flatten_on_grey(straight), atol=1e-6)
    assert 0 < float(item["alpha"].mean()) < 1


def test_folder_without_usable_images_is_a_clear_error(tmp_path):
    opaque = np.full((16, 16, 4), 255, np.uint8)
    _png(tmp_path / "a.png", opaque)
    _png(tmp_path / "b.png", opaque[..., :3])
    with pytest.raises(tdata.NoUsableImagesError) as e:
        tdata.RGBAFolder(tmp_path, 32)
    msg = str(e.value)
    assert str(tmp_path) in msg and "2 of them PNG" in msg and "1 no transparent pixel" in msg and "no alpha" in msg
    with pytest.raises(tdata.NoUsableImagesError, match="does not exist"):
        tdata.RGBAFolder(tmp_path / "missing", 32)


def test_synthetic_is_deterministic_and_transparent():
    a, b = tdata.synthetic_rgba(7, 48, seed=3), tdata.synthetic_rgba(7, 48, seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, tdata.synthetic_rgba(8, 48, seed=3))
    alphas = np.stack([tdata.synthetic_rgba(i, 48)[..., 3] for i in range(16)])
    assert all(x.min() < 1 and x.max() > 0 for x in alphas)
    assert ((alphas > 0.05) & (alphas < 0.95)).mean() > 0.02  # soft edges, glass, glow, hair


def test_step_batches_shard_disjoint_and_resume():
    n, b = 37, 4
    shards = [tdata.StepBatches(n, b, r, 2, seed=5, start=0, stop=8) for r in range(2)]
    per_epoch = shards[0].per_epoch
    assert per_epoch == 4
    epoch0 = [sum((s.indices(k) for k in range(per_epoch)), []) for s in shards]
    assert not set(epoch0[0]) & set(epoch0[1])
    assert len(set(epoch0[0]) | set(epoch0[1])) == 32
    full = list(shards[1])
    resumed = list(tdata.StepBatches(n, b, 1, 2, seed=5, start=5, stop=8))
    assert resumed == full[5:] and full[4] != full[0]  # a new epoch is reshuffled
    # fewer samples than one global batch: the indices run over 2 copies (read through Repeated)
    small = [tdata.StepBatches(5, 4, r, 2, seed=0, start=0, stop=3) for r in range(2)]
    assert small[0].repeats == 2 and small[0].per_epoch == 1
    steps = [list(s) for s in small]
    assert all(len(b) == 4 and set(b) <= set(range(10)) for s in steps for b in s)
    first = steps[0][0] + steps[1][0]
    assert len(set(first)) == 8  # no position twice in a global step
    assert tdata.StepBatches(37, 4, 0, 2, seed=0).repeats == 1
    with pytest.raises(ValueError, match="no samples"):
        tdata.StepBatches(0, 4, 0, 1, seed=0)


# ---------------------------------------------------------------------------------------
# Models, losses, frozen VAE


def test_full_width_training_modules_match_core_layout():
    # meta device: shapes only, no memory or init time for the 104M decoder
    with torch.device("meta"):
        assert weights.expected_shapes(TrainDecoder()) == weights.expected_shapes(core_vae.TransparentVAEDecoder())
        assert weights.expected_shapes(TrainEncoder()) == weights.expected_shapes(core_vae.TransparentVAEEncoder())
    assert Widths.named("full").is_full and not Widths.named("tiny").is_full


def test_losses_and_frozen_vae_gets_no_gradient():
    torch.manual_seed(0)
    w = Widths.named("tiny")
    vae = dist.freeze(TinyKLVAE(8))
    pair = LatentTransparencyPair(TrainEncoder(w.encoder), TrainDecoder(w.decoder, 3), vae, 1e-2)
    with torch.no_grad():  # make the offset path live (it is zero-initialised, as the official)
        pair.encoder.last_conv.weight.normal_(0, 0.1)
    items = [tdata.SyntheticRGBA(4, 32)[i] for i in range(4)]
    b = {k: torch.stack([it[k] for it in items]) for k in ("alpha", "padded", "premult")}
    raw, decoded, mean = pair(b["alpha"], b["padded"], b["premult"], keep=torch.tensor([1.0, 0.0, 1.0, 0.0]))
    (recon_loss(raw, b["padded"], b["alpha"]) + identity_loss(b["premult"], decoded)).backward()
    assert all(p.grad is None for p in vae.parameters())
    assert all(p.grad is not None for p in pair.parameters())
    assert "frozen_vae" not in dict(pair.named_modules()) and len(list(pair.parameters())) == len(
        list(pair.encoder.parameters())
    ) + len(list(pair.decoder.parameters()))
    with pytest.raises(ValueError, match="frozen"):
        dist.wrap(vae, dist.DistInfo())
    assert float(identity_loss(b["premult"], b["premult"])) == 0.0


# ---------------------------------------------------------------------------------------
# Training runs


def test_losses_decrease_and_outputs(tmp_path, tiny_vae_file):
    out = tmp_path / "run"
    cfg = VAEStageConfig(out=str(out), synthetic=64, steps=40, vae_path=str(tiny_vae_file), sample_every=40,
                         save_every=40, trace_dir=str(out / "trace"), offset_dropout=0.3, **TINY)  # fmt: skip
    summary = train_vae_stage(cfg)
    tr = _trace(out)
    assert [t["step"] for t in tr] == list(range(40))
    first = np.mean([t["recon"] for t in tr[:5]])
    last = np.mean([t["recon"] for t in tr[-5:]])
    assert last < 0.6 * first, (first, last)
    assert np.mean([t["loss"] for t in tr[-5:]]) < np.mean([t["loss"] for t in tr[:5]])
    assert summary["step"] == 40 and np.isfinite(summary["alpha_psnr"])
    assert (out / "samples" / "step_0000040.png").is_file()
    assert (out / ckpt.ENCODER_FILE).is_file() and (out / ckpt.DECODER_FILE).is_file()
    assert ckpt.read_metadata(out / ckpt.STATE_FILE)["step"] == "40"
    assert not list(out.glob(".*.tmp"))


def test_resume_continues_step_count_and_losses(tmp_path, tiny_vae_file):
    kw = {**TINY, "synthetic": 32, "vae_path": str(tiny_vae_file), "sample_every": 0, "save_every": 3, "eval_count": 0}
    a = tmp_path / "a"
    train_vae_stage(VAEStageConfig(out=str(a), steps=5, trace_dir=str(a / "trace"), **kw))
    b = tmp_path / "b"
    train_vae_stage(VAEStageConfig(out=str(b), steps=3, trace_dir=str(b / "trace"), **kw))
    assert ckpt.read_metadata(b / ckpt.STATE_FILE)["step"] == "3"
    summary = train_vae_stage(VAEStageConfig(out=str(b), steps=5, trace_dir=str(b / "trace"), **kw))
    ta, tb = _trace(a), _trace(b)
    assert [t["step"] for t in tb] == [0, 1, 2, 3, 4] and summary["steps_run"] == 2
    for x, y in zip(ta, tb, strict=True):
        assert x["indices"] == y["indices"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-7)
    assert ta[-1]["params"] == tb[-1]["params"]
    assert ckpt.read_metadata(b / ckpt.STATE_FILE)["step"] == "5"


def test_grad_accum_checkpointing_and_bf16(tmp_path, tiny_vae_file):
    from safetensors.torch import load_file

    # adam_eps 1e-4: with the default 1e-8, Adam turns the rounding of a near-zero gradient into up
    # to +-lr (see SMOOTH_ADAM_EPS in test_training_dist.py); grad_accum sums in another order
    kw = {**TINY, "synthetic": 16, "vae_path": str(tiny_vae_file), "sample_every": 0, "eval_count": 0, "steps": 2,
          "adam_eps": 1e-4}  # fmt: skip
    states = {}
    for name, extra in {"plain": {}, "accum": {"grad_accum": 2}, "ckpt": {"grad_checkpointing": True}}.items():
        train_vae_stage(VAEStageConfig(out=str(tmp_path / name), **kw, **extra))
        states[name] = load_file(str(tmp_path / name / ckpt.STATE_FILE))
    for name in ("accum", "ckpt"):  # same step, within float tolerance
        for k, v in states["plain"].items():
            if k.startswith("model."):
                torch.testing.assert_close(states[name][k], v, rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")
    summary = train_vae_stage(VAEStageConfig(out=str(tmp_path / "bf16"), precision="bf16", **kw))
    assert np.isfinite(summary["last_loss"])


def test_atomic_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "x.safetensors"
    ckpt.atomic_save({"a": torch.ones(3)}, path)

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_save({"a": torch.zeros(3)}, path)
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(path))["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_full_size_export_loads_strict_and_folds_lambda(tmp_path):
    torch.manual_seed(0)
    enc, dec = TrainEncoder(), TrainDecoder()
    with torch.no_grad():  # zero-initialised layers made nonzero so the check means something
        enc.last_conv.weight.normal_(0, 0.05)
        enc.last_conv.bias.normal_(0, 0.05)
        dec.latent_conv_in.weight.normal_(0, 0.1)
    lam = 1e-2
    e_path, d_path = ckpt.export(enc, dec, tmp_path, lam, dtype="fp32")
    loaded_e = weights.load_encoder(e_path)
    loaded_d = weights.load_decoder(d_path)
    rgba = torch.from_numpy(tdata.synthetic_rgba(0, 64)).permute(2, 0, 1)[None]
    feed = torch.cat([rgba[:, 3:], torch.from_numpy(core_rgba.pad_rgb(rgba[0].permute(1, 2, 0).numpy()))
                      .permute(2, 0, 1)[None]], 1)  # fmt: skip
    with torch.no_grad():
        offset = core_vae.encode_offset(loaded_e, rgba)
        torch.testing.assert_close(offset, lam * enc(feed), rtol=1e-4, atol=1e-7)
        mean, std = torch.randn(1, 4, 8, 8), torch.rand(1, 4, 8, 8)
        # the extension's mean + std * offset equals the trainer's mean + lambda * std * E
        torch.testing.assert_close(core_vae.apply_offset(mean, std, offset), mean + lam * std * enc(feed))
        pixel = rgba[:, :3]
        # the same weights in other buffers (the loader assigns the file's tensors): the kernels may
        # round differently; measured |diff| 2.1e-6 at most (default, avx2), atol ~10x that with rtol
        torch.testing.assert_close(loaded_d(pixel, mean), dec(pixel, mean), rtol=1e-4, atol=2e-5)
    meta = ckpt.read_metadata(e_path)
    assert meta["lambda_offset_folded"] == "0.01"


def test_cli_runs_and_refuses_diffusion_without_encoder(tmp_path, tiny_vae_file, capsys):
    from lib_layerdiffuse.training import cli as train

    assert train.main(["diffusion", "--synthetic", "4", "--out", str(tmp_path / "d")]) == 2
    assert "--encoder is required" in capsys.readouterr().err
    out = tmp_path / "cli"
    rc = train.main(["vae", "--synthetic", "16", "--out", str(out), "--steps", "2", "--batch-size", "2",
                     "--size", "32", "--widths", "tiny", "--disc-width", "8", "--vae-path", str(tiny_vae_file),
                     "--sample-every", "0", "--eval-count", "2", "--log-every", "1"])  # fmt: skip
    assert rc == 0
    assert json.loads((out / "summary.json").read_text())["step"] == 2
    assert "step 2/2" in capsys.readouterr().out
    assert train.main(["vae", "--out", str(out)]) == 2  # no data source


def test_repeated_copies_are_distinct_samples():
    """A copy of a sample carries its own index, so the draws keyed by it (noise, timestep,
    dropouts) differ from the original's; the image is the same."""
    from lib_layerdiffuse.training.unet_training import draw_noise_and_timesteps

    ds = tdata.SyntheticRGBA(3, 16, seed=0)
    rep = tdata.Repeated(ds, 2)
    assert len(rep) == 6
    a, b = rep[1], rep[4]
    assert a["index"] == 1 and b["index"] == 4 and torch.equal(a["premult"], b["premult"])
    noise, t = draw_noise_and_timesteps([a["index"], b["index"]], step=0, seed=0, shape=(4, 2, 2))
    assert not torch.equal(noise[0], noise[1])


def test_metrics_of_a_discarded_run_are_dropped(tmp_path):
    from lib_layerdiffuse.training.runner import _keep_records_up_to

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (10, 20, 30)) + '{"step": 4')
    _keep_records_up_to(path, 20)  # a resume from step 20: the killed run's step 30 and torn line go
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [10, 20]
    _keep_records_up_to(path, 0)  # a fresh start (--no-resume) into the same folder
    assert path.read_text() == ""
