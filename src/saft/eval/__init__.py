"""Evaluation: zero-shot heads, streaming accuracy, metrics records and aggregates, reports."""

from saft.lazy import exports

__getattr__, __dir__ = exports(__name__, {
    "saft.eval.accuracy": ("delta_top1", "top1_accuracy"),
    "saft.eval.head": ("build_head", "cached_head"),
    "saft.eval.metrics": ("METRICS_SCHEMA", "Record", "aggregate", "metrics_document"),
    "saft.eval.runner": ("Accuracy", "SubsetProjection", "evaluate_head"),
})

__all__ = [
    "METRICS_SCHEMA", "Accuracy", "Record", "SubsetProjection", "aggregate", "build_head", "cached_head", "delta_top1",
    "evaluate_head", "metrics_document", "top1_accuracy",
]
