"""One dataset of the evaluation suite (or all of it) for the base model and every delta."""

from kfp.dsl import Artifact, Dataset, Input, Model, Output


def evaluate(model: str, world: Input[Dataset], suite: str, data_root: str, dataset: str,
             alphas: list, batch_size: int, device: str, tracking: bool, deltas: Input[Model],
             metrics: Output[Artifact], zeroshot: bool = True, loader: str = "{}",
             reference: str = "", subset: str = "all", template_set: str = "default",
             allow_train_overlap: bool = False):
    """Top-1 of zero-shot and of base + alpha * delta for each delta, on one suite dataset.

    Args:
        model: Model spec the deltas were trained on.
        world: The world task's output (its suite when suite is empty).
        suite: Built-in suite name or suite YAML file; "" = the embedded world's synthshift.
        data_root: Root the suite's datasets live under.
        dataset: The suite dataset to score ("" = every dataset of the suite; a base-to-new group: both its halves).
        alphas: Delta scales to evaluate, e.g. [1.0] or [0.5, 1.0].
        batch_size: Images per batch.
        device: auto, cpu, cuda or cuda:N.
        tracking: Log a nested MLflow run.
        deltas: A folder of <method>-seed<N>/ finetune outputs.
        metrics: metrics.json (saft-metrics/1) and report.
        zeroshot: Score the base model too.
        loader: JSON of the DataLoader options (num_workers, pin_memory, persistent_workers; params.yaml loader:).
        reference: Effective-robustness reference fit: "" = the suite's own, none, a shipped name or a YAML file; every part of one suite must use the same.
        subset: The training subset (base: an empty suite is the world's synthshift-b2n).
        template_set: Prompt set where a dataset offers several, e.g. simple for ImageNet.
        allow_train_overlap: Score evaluation images that are also training images of a delta (refused by default).
    """
    from saft.orchestration.parent_run import parent_run
    from saft.orchestration.eval_tasks import evaluate_task

    evaluate_task(model, world.path, suite, data_root, dataset, deltas.path, metrics.path, alphas=alphas,
                  batch_size=batch_size, device=device, parent_run_id=parent_run(tracking), zeroshot=zeroshot,
                  loader=loader, reference=reference, subset=subset, template_set=template_set,
                  allow_train_overlap=allow_train_overlap)
