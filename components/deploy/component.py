"""Serve the promoted version (a placeholder until the serving step lands)."""

from kfp.dsl import Artifact, Input, Output


def deploy(decision: Input[Artifact], model_name: str, tracking: bool, deployment: Output[Artifact]):
    """Runs only when the gate promoted the candidate; records that nothing is deployed yet.

    Args:
        decision: The register task's decision.
        model_name: Registered model name (the champion alias points at the promoted version).
        tracking: Log a nested MLflow run.
        deployment: deploy.json.
    """
    from saft.steps.pipeline_run import parent_run
    from saft.steps.tasks import deploy_task

    deploy_task(decision.path, deployment.path, model_name=model_name, parent_run_id=parent_run(tracking))
