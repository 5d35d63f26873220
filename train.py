"""Train unimodal: `python train.py` runs the CPU demo end to end; `--help` lists every option.

A thin entry into `unimodal.cli` (the same as `unimodal train`).
"""
from unimodal.cli import train_main

if __name__ == "__main__":
    train_main()
