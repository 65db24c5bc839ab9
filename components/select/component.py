"""Choose the learning rate: each candidate delta scored on the ID validation split."""

from typing import List, NamedTuple

from kfp.dsl import Dataset, Input, Markdown, Model, Output


def select(model: str, data: Input[Dataset], candidates: Input[List[Model]], batch_size: int,
           device: str, tracking: bool, chosen: Output[Model],
           table: Output[Markdown]) -> NamedTuple("Outputs", [("lr", float), ("val_top1", float)]):
    """Scores every candidate (one per learning rate) on the prepared val manifest and keeps the best.

    A tie goes to the lower rate. The evaluation suite is never looked at.

    Args:
        model: Model spec the candidates were trained on.
        data: The prepare task's output (its val.jsonl).
        candidates: The finetune outputs of the learning-rate grid.
        batch_size: Images per evaluation batch.
        device: auto, cpu, cuda or cuda:N.
        tracking: Log a nested MLflow run.
        chosen: The chosen candidate as <method>-seed<N>/ plus selection.json and selection.png.
        table: Validation top-1 per learning rate.

    Returns:
        lr: The chosen learning rate.
        val_top1: Its validation top-1.
    """
    from collections import namedtuple

    from saft.orchestration.parent_run import parent_run
    from saft.steps.select import selection_table
    from saft.orchestration.tasks import select_task

    doc = select_task(model, data.path, [c.path for c in candidates], chosen.path, batch_size=batch_size,
                      device=device, parent_run_id=parent_run(tracking))
    with open(table.path, "w", encoding="utf-8") as fh:
        fh.write(selection_table(doc) + "\n")
    return namedtuple("Outputs", ["lr", "val_top1"])(doc["chosen_lr"], doc["chosen"]["val_top1"])
