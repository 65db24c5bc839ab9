"""Serve the promoted version: the champion onto KServe, by canary (saft.steps.deploy)."""

from kfp.dsl import Artifact, Input, Output


def deploy(decision: Input[Artifact], model_name: str, settings: str, image: str, tracking: bool,
           deployment: Output[Artifact]):
    """Runs only when the gate promoted the candidate: renders its InferenceService and, unless dry_run, rolls it out.

    The rollout creates the service, or sends canary_percent of the traffic to the new version,
    promotes it to 100% when ready and healthy, or rolls back; the outcome goes to the
    version's saft.deploy.* tags.

    Args:
        decision: The register task's decision (the promoted version number).
        model_name: Registered model name.
        settings: JSON of params.yaml's deploy section (dry_run, namespace, image, cpu, memory, gpu_count, canary_percent, ready_timeout_s).
        image: The pipeline's image, the predictor's when settings name none.
        tracking: Log a nested MLflow run.
        deployment: deploy.json and inferenceservice.json.
    """
    from saft.orchestration.parent_run import parent_run
    from saft.orchestration.release_tasks import deploy_task

    deploy_task(decision.path, deployment.path, model_name=model_name, settings=settings, image=image,
                parent_run_id=parent_run(tracking))
