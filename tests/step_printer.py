"""Run train.py with each training step, optimiser step and validation batch announced on stdout,
so a test can send a signal at a chosen moment."""

import runpy
import sys
from pathlib import Path

import handclip.eval.evaluator
import handclip.train.module

Module = handclip.train.module.FineTuner
_step, _optimizer_step, _validation_step = Module.training_step, Module.optimizer_step, Module.validation_step


def training_step(self, batch, batch_index):
    print(f"handclip-test-step {self.global_step}", flush=True)
    return _step(self, batch, batch_index)


def optimizer_step(self, *args, **kwargs):
    _optimizer_step(self, *args, **kwargs)
    print(f"handclip-test-stepped {self.global_step}", flush=True)


def validation_step(self, batch, batch_index):
    print(f"handclip-test-validation {self.current_epoch}", flush=True)
    return _validation_step(self, batch, batch_index)


Module.training_step, Module.optimizer_step, Module.validation_step = training_step, optimizer_step, validation_step

_evaluate = handclip.eval.evaluator.Evaluator.__call__


def evaluate(self, backbone, include_test=None):
    print("handclip-test-evaluate", flush=True)
    return _evaluate(self, backbone, include_test)


handclip.eval.evaluator.Evaluator.__call__ = evaluate
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path(str(Path(__file__).resolve().parents[1] / "train.py"), run_name="__main__")
