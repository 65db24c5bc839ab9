"""Register the candidate delta in MLflow and apply the OOD-aware promotion gate."""

from typing import NamedTuple

from kfp.dsl import Artifact, Dataset, Input, Model, Output


def register(model: str, results: Input[Dataset], deltas: Input[Model], method: str, model_name: str,
             promote: bool, ood_tolerance: float, id_tolerance: float, baseline: bool, tracking: bool,
             decision: Output[Artifact], data: Input[Dataset] = None, gate: str = "auto",
             hm_tolerance: float = 0.01) -> NamedTuple("Outputs", [("verdict", str)]):
    """Registers the delta (with its base reference and data version) and moves champion only past the gate.

    With several seeds the lowest seed's delta is registered, and the gate judges that
    delta's own metrics (not the mean over seeds): its OOD mean and ID top-1 may not drop
    more than the tolerances against zero-shot and against the current champion.
    Safe to retry: a candidate is never registered twice, an alias never moved twice.

    Args:
        model: Model spec the delta was trained on.
        results: The collect task's results (metrics.json).
        deltas: Folder holding the candidate (<method>-seed<N>/).
        method: Name of the candidate in the metrics (saft).
        model_name: Registered model name.
        promote: Apply the promotion gate.
        ood_tolerance: Largest allowed OOD-mean drop, as a fraction.
        id_tolerance: Largest allowed ID drop, as a fraction.
        baseline: No champion yet: register and promote the zero-shot base first.
        tracking: False: nothing is registered (the decision says so).
        decision: register.json.
        data: The prepare task's output (class names and templates served with the model); absent: the data-seed<N>/ folders gather_deltas put into deltas.

        gate: Gate metric: auto (hm on a base-to-new suite, else id_ood), id_ood or hm.
        hm_tolerance: Largest allowed drop of the base-to-new harmonic mean, as a fraction (gate hm).

    Returns:
        verdict: promoted, rejected, registered, skipped or not registered.
    """
    from collections import namedtuple

    from saft.orchestration.parent_run import parent_run
    from saft.orchestration.release_tasks import register_task

    result = register_task(model, results.path, deltas.path, [data.path] if data is not None else [], decision.path, method=method,
                           model_name=model_name, promote=promote, ood_tolerance=ood_tolerance,
                           id_tolerance=id_tolerance, baseline=baseline, parent_run_id=parent_run(tracking),
                           gate=gate, hm_tolerance=hm_tolerance, tracking=tracking)
    return namedtuple("Outputs", ["verdict"])(str(result["verdict"]))
