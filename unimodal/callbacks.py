"""Lightning callbacks of a training run that are about the run's life, not the model."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.plugins.io import TorchCheckpointIO

from unimodal.config import ConfigError
from unimodal.tokenizers.files import atomic_write

# SIGUSR1: SLURM's warning before a time limit or preemption (`#SBATCH --signal=SIGUSR1@90`);
# SIGTERM: what schedulers, torchrun and `kill` send to stop a process.
SIGNALS = tuple(s for s in (getattr(signal, "SIGUSR1", None), signal.SIGTERM) if s is not None)


class Preemption(L.Callback):
    """SIGTERM (anywhere) or SIGUSR1 (SLURM's warning): checkpoint at the step the signal
    arrived, requeue the job under SLURM, stop.

    The handler only records the signal; the step in progress finishes, then every rank
    (the flag is summed across ranks, so a signal that reached one rank stops them all at
    the same step) writes ``last.ckpt``, the one ``--ckpt_path=last`` resumes from, and the
    run ends without evaluating. Under SLURM, rank 0 then calls ``scontrol requeue``; the
    requeued job (scripts/slurm.sbatch) resumes from that checkpoint, not one ``ckpt_every``
    earlier. Lightning's own SLURM handler, which wrote ``hpc_ckpt_N.ckpt`` that nothing
    resumed from, is replaced (training.run passes ``SLURMEnvironment(auto_requeue=False)``).
    """

    def __init__(self, last: Path):
        self.last = Path(last)
        self.received: int | None = None
        self.stopped: dict | None = None  # {"signal", "step", "requeued"} once it acted
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def on_train_start(self, trainer, pl_module) -> None:
        for s in SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)

    def on_train_end(self, trainer, pl_module) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        got = self.received or 0
        if trainer.world_size > 1:
            got = int(trainer.strategy.reduce(torch.tensor(float(got), device=pl_module.device), reduce_op="max"))
        if not got or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        name = signal.Signals(got).name
        trainer.save_checkpoint(self.last, weights_only=False)
        requeued = False
        if got == getattr(signal, "SIGUSR1", None) and os.environ.get("SLURM_JOB_ID") and trainer.is_global_zero:
            job = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ["SLURM_JOB_ID"])
            task = os.environ.get("SLURM_ARRAY_TASK_ID")
            target = f"{job}_{task}" if task else job
            try:
                r = subprocess.run(["scontrol", "requeue", target], capture_output=True, text=True, timeout=60)
                requeued, why = r.returncode == 0, (r.stderr or r.stdout).strip()[:200]
            except (OSError, subprocess.TimeoutExpired) as e:
                requeued, why = False, str(e)
            if not requeued:
                print(f"scontrol requeue {target} failed ({why}); resubmit the job by hand", flush=True)
        self.stopped = {"signal": name, "step": trainer.global_step, "requeued": requeued}
        if trainer.is_global_zero:
            print(f"received {name} at step {trainer.global_step}: wrote {self.last}"
                  f"{'; requeued the job' if requeued else ''}; resume with --ckpt_path=last", flush=True)
        trainer.should_stop = True


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temp file, fsynced, then renamed: a kill never leaves a
    truncated checkpoint. Loads with weights_only=True: nothing in one is ever unpickled.

    A write that fails (full disk, unwritable folder) removes its temp file, leaves the
    previous checkpoint of that name as it was, and stops the run with a ConfigError:
    one ``error:`` line from the CLI, no traceback."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        try:
            with atomic_write(path, "wb", durable=True) as f:
                torch.save(checkpoint, f)
        except (OSError, RuntimeError) as e:  # torch's zip writer reports a failed write as RuntimeError
            why = e.strerror if isinstance(e, OSError) and e.strerror else \
                (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"cannot write checkpoint {path}: {why[:200]}; the run stops here, the "
                              f"previous {path.name} (if any) is untouched: free space or fix the "
                              f"folder, then resume with --ckpt_path=last") from e

    def load_checkpoint(self, path, map_location=None, weights_only=True):
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


class LaunchTimer(Timer):
    """Lightning's Timer, for the time this launch has trained: Lightning's own restores the
    elapsed time from the checkpoint, so a requeued job with a time limit stopped again at
    once, and looped."""

    def load_state_dict(self, state_dict) -> None:
        pass


class EpochCallback(L.Callback):
    """Tells the stream where it stands (a shared value the workers read, as open_clip
    shares its epoch)."""

    def on_train_epoch_start(self, trainer, pl_module):
        dm = trainer.datamodule
        if dm is not None and dm.train_ds is not None:
            # by batches taken, not by Lightning's epoch number: resumed on an epoch's last
            # batch, Lightning runs one batch in the next epoch, then starts another
            dm.train_ds.set_start(dm.batches_taken())


class PrintCallback(L.Callback):
    """One plain line per log interval: step, loss, lr, tokens/s, MFU, data counters; and
    every optimiser step's loss, exactly (``repr``), to ``loss_file`` (rank 0's batches).
    A resumed run appends: the last line of a step is the one its checkpoint followed."""

    def __init__(self, every: int, loss_file: Path | None = None):
        self.every = every
        self.t0 = None
        self.loss_file = loss_file
        self._sum, self._n = 0.0, 0

    def on_train_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()
        # opened once per launch, line-buffered: every step's line is on disk when it ends
        self._losses = open(self.loss_file, "a", buffering=1) if self.loss_file and trainer.is_global_zero else None

    def on_train_end(self, trainer, pl_module):
        if self._losses is not None:
            self._losses.close()
            self._losses = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if getattr(self, "_losses", None) is not None and isinstance(outputs, dict):
            self._sum, self._n = self._sum + float(outputs["loss"]), self._n + 1
            if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
                self._losses.write(f"{step}\t{self._sum / self._n!r}\n")
                self._sum, self._n = 0.0, 0
        if not trainer.is_global_zero or step % self.every or step == getattr(self, "_last", -1):
            return
        self._last = step
        m = trainer.callback_metrics
        fmt = lambda k, f: (f.format(float(m[k])) if k in m else "-")  # noqa: E731
        st = batch.stats or {}
        bad = getattr(pl_module, "nonfinite_steps", 0)
        print(f"step {step:>6} | loss {fmt('train/loss', '{:.4f}')} | lr {fmt('train/lr', '{:.2e}')} | "
              f"tok/s {fmt('perf/tokens_per_s', '{:,.0f}')} | mfu {fmt('perf/mfu', '{:.3f}')} | "
              f"pack {batch.efficiency:.2f} | skipped {st.get('skipped', 0)} | "
              f"{f'non-finite steps {bad} | ' if bad else ''}{time.perf_counter() - self.t0:.0f}s", flush=True)
