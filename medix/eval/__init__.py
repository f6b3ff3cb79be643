"""Benchmark evaluation: task loading, greedy generation, the paper's 3-round judge protocol, scores and reports."""

from medix.eval.items import BenchmarkItem
from medix.eval.runner import EvalOutcome, run_evaluation

__all__ = ["BenchmarkItem", "EvalOutcome", "run_evaluation"]
