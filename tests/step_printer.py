"""Run train.py with each training step announced on stdout, so a test can interrupt at a chosen step."""

import runpy
import sys
from pathlib import Path

import handclip.train.module

_step = handclip.train.module.FineTuner.training_step


def training_step(self, batch, batch_index):
    print(f"handclip-test-step {self.global_step}", flush=True)
    return _step(self, batch, batch_index)


handclip.train.module.FineTuner.training_step = training_step
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path(str(Path(__file__).resolve().parents[1] / "train.py"), run_name="__main__")
