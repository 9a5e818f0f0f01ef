"""The one training loop every stage runs (#16 item 4): set-up, resume, DDP wrapping,
precision, the step loop, checkpoints, logging, samples and the summary.

A stage builds a :class:`Stage` (its modules, optimizers, one optimisation step, export,
samples and evaluation) and calls :func:`run`; everything else lives here once. Rank 0
alone writes files; collectives (log averaging, barriers) run on every rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from ..fileio import atomic_write
from . import checkpoint as ckpt
from . import data as tdata
from . import dist, outdir, plots
from .errors import Interrupted, TrainingError, UsageError
from .finite import first_nonfinite_fast

# ---------------------------------------------------------------------------------------
# Set-up and small helpers


def start_run(cfg) -> tuple[dist.DistInfo, Path]:
    """Initialise this process (``dist.init``); rank 0 checks and creates ``cfg.out``, takes its
    lock and removes a killed run's temporary files (:func:`.outdir.open_out`) while the others
    wait. A refusal there ends every rank with rank 0's error. The lock is released when the
    stage function returns or raises (:func:`stage_entry`)."""
    info = dist.init(cfg.device)
    outdir.check_folders(cfg.out, cfg.data)  # every rank: a refusal before any collective
    failure: list = [None]
    if info.is_main:
        try:
            outdir.open_out(cfg.out, cfg.data)
        except TrainingError as e:
            failure = [(type(e) is UsageError, str(e))]
    if info.distributed:  # the others learn of rank 0's refusal instead of waiting for it
        torch.distributed.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        usage, message = failure[0]
        raise (UsageError if usage else TrainingError)(
            message if info.is_main else "rank 0 refused the run (its error)"
        )
    return info, Path(cfg.out)


def stage_entry(fn):
    """A stage function's call is its run's lifetime: the ``--out`` lock that :func:`start_run`
    takes is released when it returns or raises (the OS drops it if the process dies)."""

    @functools.wraps(fn)
    def wrapper(cfg, *args, **kwargs):
        try:
            return fn(cfg, *args, **kwargs)
        finally:
            outdir.release(cfg.out)

    return wrapper


def loader(dataset, batches: tdata.StepBatches, num_workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        persistent_workers=False,
        worker_init_fn=outdir.close_inherited_locks if num_workers else None,
    )


def no_sync(module: nn.Module, sync: bool):
    """DDP's no_sync for all but the last micro-batch: gradients are all-reduced once per step."""
    return module.no_sync() if not sync and isinstance(module, DDP) else contextlib.nullcontext()


def autocast_factory(precision: str, device: torch.device):
    """A context-manager factory for the forward passes: fp32 (none) or bf16 autocast."""
    if precision == "fp32":
        return contextlib.nullcontext
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"precision must be fp32 or bf16, got {precision!r} (fp16 would need a loss scaler)")


def param_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for p in module.parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or this process's peak resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------------------------
# Progress and records


def format_seconds(t: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    t = max(0, int(round(t)))
    if t < 60:
        return f"{t} s"
    if t < 3600:
        return f"{t // 60} min {t % 60:02d} s"
    return f"{t // 3600} h {t % 3600 // 60:02d} min"


class Progress:
    """Rank 0's progress: on a terminal one line redrawn in place (a bar, step, the step's
    logs, steps/s, ETA; at most 10 redraws a second), otherwise (a log file, a pipe) a line
    every ``log_every`` steps with the logs averaged over the ranks. Silent on other ranks."""

    BAR = 24  # characters

    def __init__(self, total: int, start: int, enabled: bool, log_every: int, label: str, stream=None):
        self.enabled, self.log_every, self.label, self.total = enabled, max(1, log_every), label, total
        self.stream = stream if stream is not None else sys.stdout
        self.t0, self.s0 = time.perf_counter(), start
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(enabled and callable(isatty) and isatty())
        self.drawn, self.last_draw, self.width = False, 0.0, 0

    def _rate_eta(self, done: int) -> tuple[float, float]:
        rate = (done - self.s0) / max(time.perf_counter() - self.t0, 1e-9)
        return rate, (self.total - done) / max(rate, 1e-9)

    def update(self, step: int, logs: dict[str, float]) -> None:
        if not self.enabled:
            return
        done = step + 1
        text = " ".join(f"{k}={v:.4g}" for k, v in logs.items())
        if self.tty:
            now = time.perf_counter()
            if now - self.last_draw >= 0.1 or done == self.total:
                self.last_draw = now
                rate, eta = self._rate_eta(done)
                filled = self.BAR * done // max(self.total, 1)
                line = (f"[{self.label}] {'#' * filled}{'.' * (self.BAR - filled)} {done}/{self.total} {text} "
                        f"{rate:.2f} steps/s ETA {format_seconds(eta)}")  # fmt: skip
                line = line[: shutil.get_terminal_size().columns - 1]  # a wrapped line would not redraw in place
                self.stream.write("\r" + line + " " * max(0, self.width - len(line)))
                self.stream.flush()
                self.drawn, self.width = True, len(line)
            return
        if logs and (done % self.log_every == 0 or done == self.total):
            rate, eta = self._rate_eta(done)
            print(f"[{self.label}] step {done}/{self.total} {text} ({rate:.2f} steps/s, ETA {format_seconds(eta)})",
                  file=self.stream, flush=True)  # fmt: skip

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


class TensorBoard:
    """Rank 0's TensorBoard event log under ``<out>/tensorboard`` where the ``tensorboard``
    package is importable (it is not a dependency); nothing otherwise."""

    def __init__(self, folder: Path, enabled: bool):
        self.writer = None
        if enabled and importlib.util.find_spec("tensorboard") is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(folder))
            except Exception as e:  # a broken install (e.g. protobuf) or folder: the run goes on without
                print(f"[train] warning: no TensorBoard logs ({type(e).__name__}: {e})", flush=True)

    def add(self, step: int, logs: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in logs.items():
                self.writer.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _keep_records_up_to(path: Path, step: int) -> None:
    """Drop the records of ``metrics.jsonl`` after ``step`` (all of them for a fresh start): they
    belong to a run that was discarded (``--no-resume``) or killed after its last checkpoint,
    and the loss curve would join them to this run's."""
    if not path.exists():
        return
    text = "".join(json.dumps(r) + "\n" for r in plots.read_metrics(path) if r["step"] <= step)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _write_line(f, record: dict) -> None:
    f.write(json.dumps(record) + "\n")
    f.flush()


class StepRecords:
    """What the loop records per step: the per-rank trace (``cfg.trace_dir``), the progress
    bar and, on rank 0, ``<out>/metrics.jsonl`` (logs averaged over the ranks every
    ``cfg.log_every`` steps and at the last one)."""

    def __init__(self, cfg, info: dist.DistInfo, out: Path, start: int, label: str):
        self.cfg, self.info = cfg, info
        self.trace = None
        if cfg.trace_dir:
            Path(cfg.trace_dir).mkdir(parents=True, exist_ok=True)
            self.trace = open(Path(cfg.trace_dir) / f"rank{info.rank}.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self.bar = Progress(cfg.steps, start, info.is_main, cfg.log_every, label)
        self.metrics = None
        if info.is_main:
            path = out / "metrics.jsonl"
            _keep_records_up_to(path, start)  # a fresh start or a resume: no records of a discarded run
            self.metrics = open(path, "a", encoding="utf-8")  # noqa: SIM115
        self.tensorboard = TensorBoard(out / "tensorboard", info.is_main)
        self.last_logs: dict[str, float] = {}

    def write_trace(self, record: dict) -> None:
        _write_line(self.trace, record)

    def log(self, step: int, logs: dict[str, float]) -> None:
        done = step + 1
        want_log = done % self.cfg.log_every == 0 or done == self.cfg.steps
        if want_log:  # a collective: every rank takes part
            self.last_logs = dist.mean_across_ranks(logs, self.info)
            if self.metrics is not None:
                _write_line(self.metrics, {"step": done, **self.last_logs})
            self.tensorboard.add(done, self.last_logs)
        # the bar shows every step (this rank's logs between the averaged ones); lines only the averaged
        self.bar.update(step, self.last_logs if want_log else logs)

    def close(self) -> None:
        self.bar.close()
        self.tensorboard.close()
        if self.trace is not None:
            self.trace.close()
        if self.metrics is not None:
            self.metrics.close()


def run_summary(step: int, start: int, t0: float, info: dist.DistInfo, last_logs: dict[str, float]) -> dict:
    """The summary entries every stage reports; ``step`` is the last step run (``start - 1``: none)."""
    return {"step": max(step + 1, start), "steps_run": max(step + 1 - start, 0), "seconds": time.perf_counter() - t0,
            "world_size": info.world_size, "peak_mem_mb": peak_memory_mb(info.device),
            **{f"last_{k}": v for k, v in last_logs.items()}}  # fmt: skip


def write_curve(out: Path, label: str) -> None:
    """Rank 0, at the end of every run (also one that failed): ``<out>/loss.png`` from
    ``metrics.jsonl``. A curve that cannot be drawn is a warning, never the run's error."""
    try:
        plots.write_loss_curve(out / "metrics.jsonl", out / "loss.png", f"{label}: {out}")
    except Exception as e:  # noqa: BLE001  (drawing must not hide the run's own result or error)
        print(f"[{label}] warning: loss.png not written ({type(e).__name__}: {e})", file=sys.stderr, flush=True)


def write_summary(out: Path, label: str, summary: dict) -> None:
    """Rank 0: ``<out>/summary.json`` and the summary line on stdout."""
    text = json.dumps(summary, indent=1)
    atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    print(f"[{label}] " + json.dumps(summary), flush=True)


# ---------------------------------------------------------------------------------------
# The loop


def _diverged(done: int, what: str, saved: int | None, out: Path) -> TrainingError:
    kept = f"the last saved state is step {saved} in {out}" if saved is not None else "no state was saved yet"
    return TrainingError(f"stopped at step {done}: {what}; nothing of this step was written, {kept}. Lower --lr "
                         "(or raise --adam-eps), check the data and weights, then rerun (a resume repeats the "
                         "same steps)")  # fmt: skip


@dataclass
class Stage:
    """What a stage gives the loop.

    ``step(batch, step) -> (logs, payload)`` runs one optimisation step (forward, backward,
    optimizer steps) on the CPU batch; ``payload`` goes to ``sample``. ``prepare()`` runs
    after the resume state is loaded (DDP wrapping, gradient checkpointing, the start
    evaluation) and returns summary entries. ``finish()`` runs on rank 0 after the last
    step and returns summary entries (the end evaluation).
    """

    label: str
    dataset: torch.utils.data.Dataset
    modules: dict[str, nn.Module]  # unwrapped; saved in the resume state
    optimizers: dict[str, torch.optim.Optimizer]
    lrs: dict[str, float]  # this run's learning rate per optimizer (replaces a resumed one)
    step: Callable[[dict, int], tuple[dict[str, float], Any]]
    export: Callable[[Path, int, dict], Any]  # (out dir, steps done, metadata); rank 0
    signature: dict = dataclasses.field(default_factory=dict)  # must match to resume
    metadata: dict = dataclasses.field(default_factory=dict)  # written into every file and the summary
    prepare: Callable[[], dict] | None = None
    sample: Callable[[Path, int, dict, Any], Any] | None = None  # (path, steps done, batch, payload); rank 0
    finish: Callable[[], dict] | None = None
    digest: nn.Module | None = None  # the module whose parameters the trace fingerprints


def run(cfg, info: dist.DistInfo, stage: Stage) -> dict:
    """Optimise ``stage`` for ``cfg.steps`` steps, resuming from ``<out>/train_state.safetensors``
    (``cfg.resume``); rank 0 writes the export and state every ``cfg.save_every`` steps and at
    the last one, samples every ``cfg.sample_every`` steps (where the config has it) and at the
    last one, ``metrics.jsonl`` and ``summary.json``. Returns the summary."""
    out = Path(cfg.out)
    signature = json.dumps(stage.signature, sort_keys=True)
    state_path = out / ckpt.STATE_FILE
    start = 0
    if cfg.resume and state_path.exists():
        meta = ckpt.read_state_metadata(state_path)
        if meta.get("signature") != signature:
            raise TrainingError(f"{state_path} was written by another set-up ({meta.get('signature')}), not "
                                f"{signature}; use another --out, or --no-resume to start over")  # fmt: skip
        start, lines = ckpt.resume(state_path, stage.modules, stage.optimizers, cfg.steps, stage.lrs, stage.label)
        if info.is_main:
            print("\n".join(lines), flush=True)
    meta_common = {"signature": signature, "config": json.dumps(dataclasses.asdict(cfg)),
                   **{k: str(v) for k, v in stage.metadata.items()}}  # fmt: skip
    summary_start = stage.prepare() if stage.prepare is not None else {}
    batches = tdata.StepBatches(len(stage.dataset), cfg.batch_size, info.rank, info.world_size, cfg.seed, start,
                                cfg.steps)  # fmt: skip
    dataset = tdata.Repeated(stage.dataset, batches.repeats) if batches.repeats > 1 else stage.dataset
    if batches.repeats > 1 and info.is_main:
        print(f"[{stage.label}] note: {len(stage.dataset)} samples are fewer than one step's "
              f"{info.world_size} x {cfg.batch_size}; each epoch repeats them {batches.repeats} times",
              flush=True)  # fmt: skip
    records = StepRecords(cfg, info, out, start, stage.label)
    sample_every = getattr(cfg, "sample_every", 0)
    saved = start if start > 0 else None  # the step of the last state in --out

    def broken_weights() -> str | None:
        # what an optimizer step changes: the trained parameters (and buffers, e.g. norm statistics);
        # the frozen weights were checked as they were loaded (finite.py)
        return first_nonfinite_fast(
            (f"{n}.{k}", v)
            for n, m in stage.modules.items()
            for k, v in [*((k, p) for k, p in m.named_parameters() if p.requires_grad), *m.named_buffers()]
        )

    def save(done: int) -> None:
        if info.is_main:
            stage.export(out, done, {**meta_common, "step": str(done)})
            ckpt.save_state(state_path, stage.modules, stage.optimizers, done, meta_common)

    step, completed = start - 1, start
    t0 = time.perf_counter()
    try:
        for step, batch in zip(range(start, cfg.steps), loader(dataset, batches, cfg.num_workers), strict=True):
            logs, payload = stage.step(batch, step)
            done = step + 1
            bad = {k: v for k, v in logs.items() if not math.isfinite(v)}
            # the weights after this step's update, before anything of it is sampled or saved
            broken = None if bad else broken_weights()
            if dist.any_across_ranks(bool(bad) or broken is not None, info):  # a collective: every rank stops here
                if broken is not None:
                    raise _diverged(done, f"its update left the weights no longer finite ({broken})", saved, out)
                if not bad:
                    raise _diverged(done, "another rank's loss or weights are not finite", saved, out)
                raise _diverged(done, f"the loss is not finite ({' '.join(f'{k}={v}' for k, v in bad.items())})",
                                saved, out)  # fmt: skip
            if records.trace is not None:
                records.write_trace({"step": step, "rank": info.rank, "indices": [int(i) for i in batch["index"]],
                                     **logs, "params": param_digest(stage.digest or next(iter(stage.modules.values())))})  # fmt: skip
            records.log(step, logs)
            if done % cfg.save_every == 0 or done == cfg.steps:
                save(done)
                saved = done
            want_sample = sample_every > 0 and (done % sample_every == 0 or done == cfg.steps)  # 0: never
            if info.is_main and stage.sample is not None and want_sample:
                stage.sample(out / "samples" / f"step_{done:07d}.png", done, batch, payload)
            completed = done
    except KeyboardInterrupt:
        kept = f"last saved state: step {saved}" if saved is not None else "no state saved yet"
        raise Interrupted(f"interrupted at step {completed} ({kept}); run the same command to resume") from None
    finally:
        records.close()
        if info.is_main:
            write_curve(out, stage.label)
    summary = {**run_summary(step, start, t0, info, records.last_logs),
               **{k: str(v) for k, v in stage.metadata.items()}, **summary_start}  # fmt: skip
    if info.is_main:
        if stage.finish is not None:
            summary.update(stage.finish())
        write_summary(out, stage.label, summary)
    dist.barrier()
    return summary
