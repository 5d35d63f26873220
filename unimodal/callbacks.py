"""Lightning callbacks of a training run that are about the run's life, not the model."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import lightning as L
import torch

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
