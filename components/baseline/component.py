"""A comparison run: full fine-tuning, or a random mask of SAFT's density."""

from kfp.dsl import Dataset, Input, Model, Output


def baseline(model: str, data: Input[Dataset], method: str, lr: float, settings: str,
             seed: int, density: float, device: str, checkpoint_root: str, tracking: bool, delta: Output[Model]):
    """Trains one baseline with the same settings as SAFT (random: draws its mask first).

    Args:
        model: Model spec.
        data: The prepare task's output.
        method: full or random.
        lr: Learning rate of the baseline.
        settings: JSON of the finetune settings, as for finetune.
        seed: Seed of the batch order (and of the random mask).
        density: Mask density of the random baseline (SAFT's).
        device: auto, cpu, cuda or cuda:N.
        checkpoint_root: Folder that outlives the pod; "" = no resumable checkpoints.
        tracking: Log nested MLflow runs.
        delta: delta.safetensors, history.json, finetune.json.
    """
    from saft.steps.configs import FinetuneStepConfig
    from saft.orchestration.parent_run import parent_run
    from saft.orchestration.tasks import baseline_task, settings_config

    cfg = settings_config(FinetuneStepConfig, settings, model=model, method=method, lr=lr, seed=seed, device=device)
    baseline_task(data.path, delta.path, cfg, density=density, parent_run_id=parent_run(tracking),
                  checkpoint_root=checkpoint_root)
