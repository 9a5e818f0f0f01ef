"""Steps per second of the latent-transparency VAE stage, 1 process and N under torchrun.

    python benchmarks/train_vae.py                       # tiny widths, 32 px, 1 and 2 CPU processes
    python benchmarks/train_vae.py --widths full --size 64 --procs 1
    python benchmarks/train_vae.py --device cuda --procs 1   # on a GPU machine

Each run trains a throw-away stand-in VAE for 1 step, then times ``--steps`` steps of
E + D + discriminator (the first step, with its warm-up, included). ``--batch-size`` is
per process, so N processes see N times the samples per step. Under torchrun each
process gets ``--threads`` threads (default 1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run(procs: int, args, tmp: Path) -> dict:
    out = tmp / f"p{procs}"
    cli = ["vae", "--synthetic", str(max(64, args.batch_size * procs * args.steps)), "--out", str(out),
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--size", str(args.size),
           "--widths", args.widths, "--disc-width", str(args.disc_width), "--vae-steps", "1", "--vae-width", "8",
           "--sample-every", "0", "--save-every", str(10**9), "--eval-count", "0", "--log-every", str(args.steps),
           "--export-dtype", "fp16", "--no-resume"]  # fmt: skip
    if args.device:
        cli += ["--device", args.device]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    if procs == 1:
        cmd = [sys.executable, "-m", "lib_layerdiffuse.train", *cli]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               "-m", "lib_layerdiffuse.train", *cli]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(res.stdout[-2000:] + res.stderr[-2000:])
    line = [x for x in res.stdout.splitlines() if x.startswith("[vae] {")][-1]
    return json.loads(line[len("[vae] ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", choices=["tiny", "full"], default="tiny")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--disc-width", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--device", default=None)
    args = p.parse_args()
    import torch

    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else f"CPU, {os.cpu_count()} cores"
    print(
        f"VAE stage, widths={args.widths}, {args.size}px, batch {args.batch_size}/process, {args.steps} steps, {name}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.procs:
            s = run(n, args, Path(tmp))
            sps = s["steps_run"] / s["seconds"]
            print(f"  {n} process(es): {sps:.2f} steps/s, {sps * args.batch_size * n:.1f} samples/s")


if __name__ == "__main__":
    main()
