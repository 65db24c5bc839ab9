"""Evaluation: zero-shot heads, streaming accuracy, metrics records and aggregates, reports."""

from saft.eval.accuracy import top1_accuracy
from saft.eval.head import build_head, cached_head
from saft.eval.metrics import METRICS_SCHEMA, Record, aggregate, metrics_document
from saft.eval.runner import Accuracy, SubsetProjection, evaluate_head

__all__ = [
    "METRICS_SCHEMA", "Accuracy", "Record", "SubsetProjection", "aggregate", "build_head", "cached_head",
    "evaluate_head", "metrics_document", "top1_accuracy",
]
