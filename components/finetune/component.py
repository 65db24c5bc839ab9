"""Fine-tuning of one method (saft, random or full) for one seed -> delta folder."""

from kfp.dsl import Artifact, Dataset, Input, Model, Output


def finetune(model: str, data: Input[Dataset], data_hash: str, method: str, lr: float, steps: int, batch_size: int,
             warmup_steps: int, weight_decay: float, seed: int, device: str, run: Input[Artifact],
             delta: Output[Model], mask: Input[Model] = None):
    from saft.sparse.trainer import FinetuneConfig
    from saft.steps.tasks import finetune_task, parent_run

    cfg = FinetuneConfig(method=method, steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                         weight_decay=weight_decay, seed=seed)
    finetune_task(model, data.path, mask.path if mask is not None else None, delta.path, cfg, device=device,
                  parent_run_id=parent_run(run.path))
