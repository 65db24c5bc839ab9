"""The benchmark's unit: one method for one seed, its learning rate chosen on ID validation."""

from kfp.dsl import Dataset, Input, Model, Output


def train_method(model: str, data: Input[Dataset], method: str, lr_grids: str, wiseft_alphas: list, settings: str,
                 device: str, checkpoint_root: str, tracking: bool, density: float, score_rule: str,
                 score_batch_size: int, score_prompts: str, score_text_batch: int, score_include: list,
                 score_exclude: list, loader: str, trained: Output[Model]):
    """Scores the method's mask (saft, random), fine-tunes at every rate of its grid, keeps the best on ID validation.

    Every method gets the same loss, data, schedule and selection: a grid of several rates
    trains one delta per rate and keeps the one with the best top-1 on the prepared ID
    validation split (ties to the lower rate); a grid of one rate trains once. Full
    fine-tuning given WiSE-FT's alphas also chooses WiSE-FT's mixing weight on that split.
    The seed (of the random mask and the batch order) is the prepared data's own: this task
    runs in a loop nested in the loop over seeds, whose item kfp.local does not pass down.

    Args:
        model: Model spec: ARCH@TAG (open_clip hub), ARCH@/path/weights, or tiny.
        data: The prepare task's output.
        method: saft, random, full, lora or lpft.
        lr_grids: JSON of each method's learning-rate grid, e.g. {"saft": [0.001, 0.003]} (one rate: no choice to make).
        wiseft_alphas: WiSE-FT's mixing weights scored on ID validation after full fine-tuning ([] = no WiSE-FT; other methods ignore them).
        settings: JSON of the finetune settings (params.yaml finetune: and loader: sections, FinetuneStepConfig fields but model, method, lr, seed and device).
        device: auto, cpu, cuda or cuda:N.
        checkpoint_root: Folder that outlives the pod (a mounted PVC); "" = no resumable checkpoints.
        tracking: Log nested MLflow runs (score, each finetune, select, wiseft).
        density: Mask density (saft, random).
        score_rule: Score rule of the SAFT mask: abs_mean, mean_abs or mean_sq.
        score_batch_size: Images per scoring batch.
        score_prompts: Prompt set of the scoring loss: train or eval.
        score_text_batch: Prompts encoded at once while scoring; 0 = 8 per image of the batch.
        score_include: Parameter name patterns (fnmatch) the mask may select.
        score_exclude: Parameter name patterns the mask never selects.
        loader: JSON of the DataLoader options of scoring (params.yaml loader:).
        trained: The chosen run (delta.safetensors, history.json, finetune.json), lr-<rate>/ and select/ when a grid was searched, wiseft/ (full with WiSE-FT), mask/ (saft, random).
    """
    import json
    import os

    from saft.config import to_mapping
    from saft.loader import LoaderSettings
    from saft.steps.configs import FinetuneStepConfig, ScoreConfig
    from saft.orchestration.parent_run import parent_run
    from saft.orchestration.tasks import score_task, settings_config
    from saft.orchestration.tune import check_grid, tune_task

    grids = json.loads(lr_grids)
    if method not in grids:
        raise ValueError(f"train-method: lr_grids names no grid for {method} (it has {', '.join(sorted(grids))})")
    lrs = check_grid(method, grids[method])
    with open(os.path.join(data.path, "prepare.json"), encoding="utf-8") as fh:
        seed = int(json.load(fh)["seed"])
    cfg = settings_config(FinetuneStepConfig, settings, model=model, method=method, lr=lrs[0], seed=seed,
                          device=device)
    parent = parent_run(tracking)
    mask_dir = None
    if cfg.needs_mask:
        mask_dir = os.path.join(trained.path, "mask")
        score_task(data.path, mask_dir, ScoreConfig(
            model=model, density=density, rule=score_rule, kind=method, batch_size=score_batch_size, seed=seed,
            device=device, prompts=score_prompts, text_batch=score_text_batch, include=list(score_include),
            exclude=list(score_exclude), **to_mapping(settings_config(LoaderSettings, loader))), parent)
    tune_task(data.path, mask_dir, trained.path, cfg, lrs, wiseft_alphas=list(wiseft_alphas) if method == "full" else [],
              parent_run_id=parent, checkpoint_root=checkpoint_root)
