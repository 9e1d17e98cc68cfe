"""Evaluation: the re-identification metric, the 10-run protocol, zero-shot prompts, tables, plots."""

from handclip.eval.evaluator import EvalSettings, Evaluator
from handclip.eval.reid import evaluate

__all__ = ["EvalSettings", "Evaluator", "evaluate"]
