"""The training CLI under ``torchrun --nproc_per_node 2`` on CPU (gloo): DDP for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import (
    one_thread,  # noqa: F401  (autouse fixture)
    write_tiny_checkpoint,
    write_triplet_folder,
)
from training_helpers import read_trace as _trace

from lib_layerdiffuse.training import checkpoint as ckpt
from lib_layerdiffuse.training import cli, dist
from lib_layerdiffuse.training.vae_stage import VAEStageConfig, pretrain_tiny_vae, train_vae_stage

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(widths="tiny", disc_width=8, size=32, lr=1e-3, vae_width=8, sample_every=0, eval_count=0, save_every=1)

# Adam's first step is lr * g / (|g| + eps): with the default eps (1e-8) an element whose
# gradient is near 0 turns the all-reduce's rounding into up to +-lr. eps 1e-4 keeps the step
# a smooth function of the gradient (d step / d g <= lr / eps), so the DDP step and the
# one-process step can be compared to float tolerance.
SMOOTH_ADAM_EPS = 1e-4
# DDP sums two half-batch gradients (all-reduce), one process sums the whole batch: another
# order of the same fp32 sums. Worst |DDP - one process| over the stepped parameters of the vae
# run, measured under ATEN_CPU_CAPABILITY=default / avx2: 1.9e-7 / 3.1e-7 (the layers run: see
# PROPORTIONAL_ADAM_EPS). DDP_ATOL is 40x the worst and still 1/15 of the smallest steps compared.
DDP_ATOL = 2e-5

# The checkpoint run's gradients are ~2e-3: Adam eps 1e-2 keeps each step proportional to the
# gradient (an all-reduce that summed instead of averaging would double the steps, not go
# unseen as under Adam's usual scale invariance). Worst |DDP - one process| after its two steps,
# measured under ATEN_CPU_CAPABILITY=default / avx2: 5.1e-7 / 4.1e-7, against steps of 3e-4
# (the tiny UNet is 64 channels wide: with 32, its GroupNorm32 at the 1x1 level normalises
# single values and the near-zero gradients there made the difference 100x larger).
PROPORTIONAL_ADAM_EPS = 1e-2

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")


def _torchrun(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lib_layerdiffuse.training", *args]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _cli(cfg: dict) -> list[str]:
    out = []
    for k, v in cfg.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def test_torchrun_two_ranks_match_one_process_and_resume(tmp_path):
    vae_path = tmp_path / "tiny_vae.safetensors"
    pretrain_tiny_vae(VAEStageConfig(out=str(tmp_path), synthetic=32, vae_steps=3, batch_size=4, **TINY),
                      dist.DistInfo(), vae_path)  # fmt: skip
    common = {"synthetic": 32, "vae_path": vae_path, "adam_eps": SMOOTH_ADAM_EPS, **TINY}

    # DDP: 2 ranks x batch 2, one step
    ddp_out, ddp_trace = tmp_path / "ddp", tmp_path / "ddp_trace"
    args = ["vae", *_cli({**common, "out": ddp_out, "batch_size": 2, "trace_dir": ddp_trace})]
    res = _torchrun([*args, "--steps", "1"], tmp_path)
    r0, r1 = _trace(ddp_trace, 0), _trace(ddp_trace, 1)
    assert len(r0) == len(r1) == 1  # both ranks finished their step
    assert not set(r0[0]["indices"]) & set(r1[0]["indices"])  # disjoint shards
    assert r0[0]["params"] == r1[0]["params"]  # identical parameters after the step
    # rank 0 alone wrote: one state file, the two exports, no temporaries; one log line per step
    assert sorted(p.name for p in ddp_out.iterdir() if p.name != "tensorboard") == sorted(
        [ckpt.STATE_FILE, ckpt.ENCODER_FILE, ckpt.DECODER_FILE, "metrics.jsonl", "summary.json", "loss.png"]
    )  # tensorboard/: only where that package is installed
    assert res.stdout.count("[vae] step 1/1") == 1

    # one process, batch 4 = the combined batch, same seed
    one_out, one_trace = tmp_path / "one", tmp_path / "one_trace"
    one = VAEStageConfig(
        out=str(one_out), steps=1, batch_size=4, trace_dir=str(one_trace), **{**common, "vae_path": str(vae_path)}
    )
    train_vae_stage(one)
    s = _trace(one_trace, 0)
    assert sorted(s[0]["indices"]) == sorted(r0[0]["indices"] + r1[0]["indices"])
    assert s[0]["loss"] == pytest.approx((r0[0]["loss"] + r1[0]["loss"]) / 2, rel=1e-5)
    a, b = load_file(str(ddp_out / ckpt.STATE_FILE)), load_file(str(one_out / ckpt.STATE_FILE))
    for k in a:
        if k.startswith("model."):
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=DDP_ATOL, msg=lambda m, k=k: f"{k}: {m}")

    # resume both to step 2: the DDP run continues the count and reproduces the next loss
    _torchrun([*args, "--steps", "2"], tmp_path)
    r0, r1 = _trace(ddp_trace, 0), _trace(ddp_trace, 1)
    assert [t["step"] for t in r0] == [t["step"] for t in r1] == [0, 1]
    assert ckpt.read_metadata(ddp_out / ckpt.STATE_FILE)["step"] == "2"
    one.steps = 2
    train_vae_stage(one)
    s = _trace(one_trace, 0)
    assert [t["step"] for t in s] == [0, 1]
    assert s[1]["loss"] == pytest.approx((r0[1]["loss"] + r1[1]["loss"]) / 2, rel=1e-4)


def test_torchrun_layers_on_a_checkpoint_two_ranks(tmp_path):
    """#16's acceptance run on a tiny SD1.5 file: ``layers --checkpoint C --data T`` under
    torchrun (gloo). The loader reads the widths from the tensor shapes, so a full-size file
    takes the same path. Both ranks end every step with bit-identical trained parameters (the
    sharing units in DDP, base UNet and text encoders frozen), and the two steps equal one
    process on the combined batch."""
    from lib_layerdiffuse.training.layers_stage import SHARING_FILE, LayersStageConfig, train_layers_stage

    ckpt_file = write_tiny_checkpoint(tmp_path / "sd15.safetensors", "sd15", unet={"model_channels": 64})
    data = write_triplet_folder(tmp_path / "triplets")
    common = {"checkpoint": ckpt_file, "data": data, "frames": "fg,bg", "steps": 2, "size": 32, "rank": 2,
              "lr": 1e-3, "adam_eps": PROPORTIONAL_ADAM_EPS, "caption_dropout": 0.3, "eval_count": 0, "save_every": 1,
              "sample_steps": 2, "export_dtype": "fp32"}  # fmt: skip
    ddp_out, ddp_trace = tmp_path / "ddp", tmp_path / "ddp_trace"
    args = ["layers", "--cache-embeddings", *_cli({**common, "out": ddp_out, "batch_size": 1, "trace_dir": ddp_trace})]
    res = _torchrun(args, tmp_path)  # rank 0 fills the embedding cache while rank 1 waits
    r0, r1 = _trace(ddp_trace, 0), _trace(ddp_trace, 1)
    assert [t["step"] for t in r0] == [t["step"] for t in r1] == [0, 1]  # both ranks finished
    for a, b in zip(r0, r1, strict=True):
        assert not set(a["indices"]) & set(b["indices"])  # disjoint shards
        assert a["params"] == b["params"]  # identical trained parameters after every step
    assert r0[0]["params"] != r0[1]["params"]  # and the steps changed them
    assert "SD1.5 checkpoint" in res.stdout and "2 without a caption" in res.stdout and "5 encoded" in res.stdout
    assert sorted(p.name for p in ddp_out.iterdir() if p.name != "tensorboard") == sorted(
        [ckpt.STATE_FILE, SHARING_FILE, "metrics.jsonl", "summary.json", "samples", "loss.png"]
    )  # tensorboard/: only where that package is installed
    assert [p.name for p in (ddp_out / "samples").iterdir()] == ["step_0000002.png"]  # rank 0 only, last step
    assert res.stdout.count("[layers] step 2/2") == 1

    # one process on the combined batch: the same two steps
    one_out, one_trace = tmp_path / "one", tmp_path / "one_trace"
    cfg = LayersStageConfig(out=str(one_out), batch_size=2, trace_dir=str(one_trace), sample_every=0, cache_embeddings=True,
                            **{**common, "checkpoint": str(ckpt_file), "data": str(data)})  # fmt: skip
    train_layers_stage(cfg)
    s = _trace(one_trace, 0)
    for j in range(2):
        assert sorted(s[j]["indices"]) == sorted(r0[j]["indices"] + r1[j]["indices"])
        assert s[j]["loss"] == pytest.approx((r0[j]["loss"] + r1[j]["loss"]) / 2, rel=1e-5)
    a, b = load_file(str(ddp_out / SHARING_FILE)), load_file(str(one_out / SHARING_FILE))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=DDP_ATOL, msg=lambda m, k=k: f"{k}: {m}")


def _worker_pid(out_dir: Path, rank: int) -> int | None:
    """PID of the torchrun worker with RANK=rank that writes to out_dir (read from /proc)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(out_dir).encode() in cmd and f"RANK={rank}".encode() in env and b"lib_layerdiffuse.training" in cmd:
            return int(proc.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find the worker")
def test_killing_one_rank_ends_the_job_and_leaves_a_loadable_checkpoint(tmp_path):
    import signal
    import time

    vae_path = tmp_path / "tiny_vae.safetensors"
    pretrain_tiny_vae(VAEStageConfig(out=str(tmp_path), synthetic=32, vae_steps=2, batch_size=4, **TINY),
                      dist.DistInfo(), vae_path)  # fmt: skip
    out = tmp_path / "run"
    args = [
        "vae",
        *_cli({"synthetic": 32, "vae_path": vae_path, **TINY, "out": out, "batch_size": 2}),
        "--steps",
        "100000",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lib_layerdiffuse.training", *args]  # fmt: skip
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        state = out / ckpt.STATE_FILE
        while not (state.exists() and int(ckpt.read_metadata(state)["step"]) >= 2):
            assert job.poll() is None and time.time() < deadline, "the job did not reach step 2"
            time.sleep(0.5)
        pid = _worker_pid(out, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        output, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert "rank" in output.lower() and ("SIGKILL" in output or "Signal 9" in output or "-9" in output), output[-2000:]
    # the last complete checkpoint is whole and loadable
    step = int(ckpt.read_metadata(state)["step"])
    assert step >= 2
    assert any(k.startswith("model.") for k in load_file(str(state)))
    # A rank killed mid-write leaves its temporary file (rank 0 may be stopped while it writes
    # loss.png): the next run on this --out removes every one of ours, whatever its age. One of
    # each kind, named as a writer that is still alive would name it (this process's PID):
    planted = [
        out / f".{name}.{os.getpid()}.abcd1234.tmp"
        for name in (ckpt.STATE_FILE, ckpt.ENCODER_FILE, ckpt.DECODER_FILE, "metrics.jsonl", "loss.png", "summary.json")
    ]
    planted.append(out / "loss.png.tmp")  # the name older versions wrote loss.png through
    for p in planted:
        p.write_bytes(b"half a file")
    resume = ["vae", *_cli({"synthetic": 32, "vae_path": vae_path, **TINY, "out": out, "batch_size": 2}),
              "--steps", str(step + 1)]  # fmt: skip
    assert cli.main(resume) == 0
    assert not [p.name for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert int(ckpt.read_metadata(state)["step"]) == step + 1
