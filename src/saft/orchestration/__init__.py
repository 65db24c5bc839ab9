"""Kubeflow Pipelines: components, the DAG, compilation, local runs and cluster submission.

Top of the layer stack: it knows the steps (``saft.steps``), nothing below knows it.
"""
