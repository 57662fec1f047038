"""Evaluation: the two-stage pipeline, recalls and what a run writes."""
from .config import EvalConfig
from .pipeline import run_eval, run_rerank
from .recalls import DEFAULT_RECALL_VALUES, compute_recalls
from .resources import InsufficientDiskError

__all__ = ["DEFAULT_RECALL_VALUES", "EvalConfig", "InsufficientDiskError", "compute_recalls", "run_eval", "run_rerank"]
