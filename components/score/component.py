"""Phase I of SAFT: the gradient-importance mask (or a random mask of the same density)."""

from kfp.dsl import Dataset, Input, Model, Output


def score(model: str, data: Input[Dataset], kind: str, density: float, rule: str,
          batch_size: int, seed: int, device: str, tracking: bool, mask: Output[Model], prompts: str = "train",
          text_batch: int = 0, loader: str = "{}", include: list = ["*"],
          exclude: list = ["logit_scale", "logit_bias"]):
    """Scores every eligible parameter entry by its downstream-loss gradient and keeps the top density.

    Args:
        model: Model spec: ARCH@TAG (open_clip hub), ARCH@/path/weights, or tiny.
        data: The prepare task's output.
        kind: saft (gradient scores) or random (uniformly random entries).
        density: Fraction of entries selected, e.g. 0.001.
        rule: Score rule: abs_mean, mean_abs or mean_sq.
        batch_size: Images per scoring batch (does not change abs_mean scores).
        seed: Seed of the random mask.
        device: auto, cpu, cuda or cuda:N.
        tracking: Log a nested MLflow run.
        mask: mask.safetensors, mask_stats.json, score.json.
        prompts: Prompt set of the scoring loss: train (the prepared training prompts) or eval (the evaluation ensemble).
        text_batch: Prompts encoded at once (bounds the text side's memory); 0 = 8 per image of the batch.
        loader: JSON of the DataLoader options (num_workers, pin_memory, persistent_workers; params.yaml loader:).
        include: Parameter name patterns (fnmatch) the mask may select.
        exclude: Parameter name patterns the mask never selects.
    """
    from saft.config import to_mapping
    from saft.loader import LoaderSettings
    from saft.steps.configs import ScoreConfig
    from saft.orchestration.parent_run import parent_run
    from saft.orchestration.tasks import score_task, settings_config

    cfg = ScoreConfig(model=model, density=density, rule=rule, kind=kind, batch_size=batch_size, seed=seed,
                      device=device, prompts=prompts, text_batch=text_batch, include=list(include),
                      exclude=list(exclude), **to_mapping(settings_config(LoaderSettings, loader)))
    score_task(data.path, mask.path, cfg, parent_run(tracking))
