"""Evaluation: zero-shot heads and accuracy of base and base + delta models."""

from saft.eval.accuracy import top1_accuracy

__all__ = ["top1_accuracy"]
