"""The SAFT mask (gradient scores) or a random mask of the same density."""

from kfp.dsl import Artifact, Dataset, Input, Model, Output


def score(model: str, data: Input[Dataset], data_hash: str, kind: str, density: float, rule: str, batch_size: int,
          seed: int, device: str, run: Input[Artifact], mask: Output[Model]):
    # data_hash is unused in the body: as an input it makes the cache key follow the data.
    from saft.steps.score import ScoreConfig
    from saft.steps.tasks import parent_run, score_task

    cfg = ScoreConfig(model=model, density=density, rule=rule, kind=kind, batch_size=batch_size, seed=seed,
                      device=device)
    score_task(data.path, mask.path, cfg, parent_run(run.path))
