"""The run's data as Lightning sees it: the train stream (resumable exactly) and the val stream."""
from __future__ import annotations

import os

import lightning as L

from unimodal.data_pipelines.loader import DataConfig, StreamDataset, make_loader
from unimodal.tokenizers.vocab import Tokenizers


class StreamDataModule(L.LightningDataModule):
    """Train stream and val stream. The train stream resumes exactly: the checkpoint holds
    its layout and the batches this rank had taken (``state_dict``); a resumed run with the
    same layout replays the interrupted epoch up to there (loader.py's docstring), one
    with another layout (world size, workers, batch, shards) says so in one line and
    reads a re-split stream from the same position."""

    def __init__(self, cfg: DataConfig, toks: Tokenizers, tasks: list[str], val_batches: int):
        super().__init__()
        self.cfg, self.toks, self.tasks, self.val_batches = cfg, toks, tasks, val_batches
        self.train_ds: StreamDataset | None = None
        self.restored: dict | None = None

    def batches_taken(self) -> int:
        t = self.trainer
        return t.global_step * t.accumulate_grad_batches if t is not None else 0

    def state_dict(self) -> dict:
        if self.train_ds is None:
            return {}
        return {"layout": self.train_ds.layout(), "batches": self.batches_taken()}

    def load_state_dict(self, state: dict) -> None:
        self.restored = state or None

    def train_dataloader(self):
        loader = make_loader(self.cfg, self.toks, self.tasks)
        ds = self.train_ds = loader.dataset
        ds.set_start(self.batches_taken())
        if ds.start.value and self.trainer.is_global_zero:
            old = (self.restored or {}).get("layout")
            if old is None:
                print("resume: the checkpoint holds no data-stream state (written before exact resume); "
                      "the stream continues from the same position but not with the same batches", flush=True)
            elif old != ds.layout():
                changed = ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in ds.layout().items() if old.get(k) != v)
                print(f"resume: the data stream is re-split ({changed}): from step {self.trainer.global_step} "
                      f"on, this run reads other batches than an uninterrupted one would", flush=True)
        mine = ds.urls[ds.rank::ds.world_size]
        if ds.world_size > 1 or os.environ.get("UNIMODAL_VERBOSE"):
            print(f"rank {ds.rank}/{ds.world_size}: reads {len(mine)} of {len(ds.urls)} shards: "
                  f"{', '.join(os.path.basename(u) for u in mine)}", flush=True)
        return loader

    def val_dataloader(self):
        from dataclasses import replace
        from torch.utils.data import DataLoader
        vcfg = replace(self.cfg, split="val", seed=(self.cfg.seed or 0) + 1_000_003,
                       batches_per_epoch=self.val_batches, num_workers=0, shuffle_buffer=50)
        # split by samples: every rank reads every val shard and keeps its every
        # world_size-th sample, so one val shard validates any world size. A split that
        # cannot feed validation is a DataError (one line), never validation quietly off.
        ds = StreamDataset(vcfg, self.toks, self.tasks, split_by="samples")
        return DataLoader(ds, batch_size=None, num_workers=0)
