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
        settings: JSON of FinetuneConfig fields (steps, batch_size, grad_accum, precision, checkpoint_every, num_workers, warmup_steps, weight_decay, ...) plus epochs (> 0 overrides steps).
        seed: Seed of the batch order.
        device: auto, cpu, cuda or cuda:N.
        checkpoint_root: Folder that outlives the pod (a mounted PVC); "" = no resumable checkpoints.
        tracking: Log a nested MLflow run (curves, delta).
        delta: delta.safetensors, history.json, finetune.json, resume.json.
        mask: The score task's output (saft, random).
    """
    import json

    from saft.steps.pipeline_run import parent_run
    from saft.steps.tasks import config_from_settings, finetune_task

    values = json.loads(settings)
    cfg = config_from_settings(values, method=method, lr=lr, seed=seed)
    finetune_task(model, data.path, mask.path if mask is not None else None, delta.path, cfg, device=device,
                  parent_run_id=parent_run(tracking), epochs=float(values.get("epochs", 0.0)),
                  checkpoint_root=checkpoint_root, prompts=values.get("prompts", "train"))
