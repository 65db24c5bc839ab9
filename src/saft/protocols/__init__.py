"""Benchmark protocols over the steps: ``saft benchmark synthshift`` and ``saft benchmark fewshot``.

A protocol composes the steps (prepare, score, finetune, evaluate) into a published
comparison: learning-rate grids chosen on validation, seeds, shot counts. It sits above
``saft.steps`` and below nothing: the library layers (``saft.world``, ``saft.eval``,
``saft.sparse``) know nothing of it.
"""
