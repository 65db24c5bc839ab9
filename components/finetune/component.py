"""Phase II of SAFT (or a baseline): one method at one learning rate -> a delta."""

from kfp.dsl import Dataset, Input, Model, Output


def finetune(model: str, data: Input[Dataset], method: str, lr: float, settings: str,
             seed: int, device: str, checkpoint_root: str, tracking: bool, delta: Output[Model],
             mask: Input[Model] = None):
    """Fine-tunes the masked entries (saft, random) or every parameter (full) and writes the delta.

    Checkpoints go to a folder under checkpoint_root keyed by the model, settings, data and
    mask: a retried task (new pod, fresh output folder) resumes from its last checkpoint.

    Args:
        model: Model spec the mask was scored on.
        data: The prepare task's output.
        method: saft, random or full.
        lr: Learning rate.
        settings: JSON of the finetune settings (params.yaml finetune: and loader: sections, FinetuneStepConfig fields but model, method, lr, seed and device).
        seed: Seed of the batch order.
        device: auto, cpu, cuda or cuda:N.
        checkpoint_root: Folder that outlives the pod (a mounted PVC); "" = no resumable checkpoints.
        tracking: Log a nested MLflow run (curves, delta).
        delta: delta.safetensors, history.json, finetune.json, resume.json.
        mask: The score task's output (saft, random).
    """
    from saft.steps.configs import FinetuneStepConfig
    from saft.orchestration.parent_run import parent_run
    from saft.orchestration.tasks import finetune_task, settings_config

    cfg = settings_config(FinetuneStepConfig, settings, model=model, method=method, lr=lr, seed=seed, device=device)
    finetune_task(data.path, mask.path if mask is not None else None, delta.path, cfg,
                  parent_run_id=parent_run(tracking), checkpoint_root=checkpoint_root)
