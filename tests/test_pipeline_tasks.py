"""The task functions behind the retrain pipeline's components, without kfp: the training
settings dict (epochs, every FinetuneConfig field), learning-rate selection on ID validation,
the registered candidate's own metrics, and the parameters of the retrain section."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from saft.eval.metrics import Record, metrics_document
from saft.sparse.config import FinetuneConfig
from saft.steps.configs import FinetuneStepConfig
from saft.steps.params import ParamsError, finetune_settings, load_params
from saft.orchestration.release_tasks import candidate_metrics
from saft.orchestration.tasks import settings_config, with_epochs

REPO = Path(__file__).resolve().parents[1]


def test_settings_carry_every_finetune_field_and_take_integral_floats() -> None:
    params = load_params(REPO / "params.yaml", ["finetune.grad_accum=2", "finetune.precision=fp32",
                                                "loader.num_workers=2", "finetune.checkpoint_every=7"])
    settings = finetune_settings(params)
    assert "methods" not in settings and "lr" not in settings and settings["epochs"] == 0.0
    # a settings object from the KFP UI or another tool may write every number as a float
    as_kfp = {k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in settings.items()}
    cfg = settings_config(FinetuneStepConfig, json.dumps(as_kfp), model="tiny", method="saft", lr=0.01, seed=3,
                          device="cpu")
    assert (cfg.steps, cfg.grad_accum, cfg.num_workers, cfg.checkpoint_every, cfg.precision) == (100, 2, 2, 7, "fp32")
    assert isinstance(cfg.steps, int) and cfg.lr == 0.01 and cfg.seed == 3
    with pytest.raises(ValueError, match=r"unknown key stepz \(did you mean steps\?\)"):
        settings_config(FinetuneStepConfig, {"stepz": 3}, model="tiny", method="saft", lr=0.01, seed=1, device="cpu")


def test_epochs_set_the_steps_from_the_training_set(tmp_path: Path) -> None:
    assert FinetuneConfig(epochs=10, batch_size=128, grad_accum=4).for_data(16_000).steps == 313  # 16-shot ImageNet
    assert FinetuneConfig(epochs=0.01, batch_size=32).for_data(10).steps == 1
    (tmp_path / "prepare.json").write_text("{}")
    for name in ("classes.json", "templates.json"):
        (tmp_path / name).write_text('["a"]')
    line = {"path": "a/{}.png", "label": 0, "class_name": "a", "sha256": "0" * 64}
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({**line, "path": f"a/{i}.png"}) + "\n"
                                                  for i in range(40)))
    cfg = FinetuneStepConfig(model="tiny", method="full", steps=100, batch_size=8, warmup_steps=10, epochs=1.5)
    logged = []
    tuned = with_epochs(cfg, str(tmp_path), logged.append)
    assert tuned.steps == 8 and tuned.epochs == 0  # 60 images / 8 (the warm-up is capped at the steps)
    assert "1.5 epochs of 40 images at batch 8 x 1 = 8 steps" in logged[0]
    plain = FinetuneStepConfig(model="tiny")
    assert with_epochs(plain, str(tmp_path)) is plain


def test_selection_takes_the_best_validation_top1_and_ties_go_to_the_lower_rate() -> None:
    from saft.steps.select import choose, selection_table

    candidates = [{"lr": 0.01, "val_top1": 0.7}, {"lr": 0.001, "val_top1": 0.7}, {"lr": 0.003, "val_top1": 0.65}]
    assert choose(candidates)["lr"] == 0.001
    assert choose(candidates[2:] + [{"lr": 0.1, "val_top1": 0.71}])["lr"] == 0.1
    doc = {"val_images": 80, "method": "saft", "seed": 1, "zeroshot_val_top1": 0.5, "chosen_lr": 0.001,
           "candidates": [{**c, "final_loss": 1.0} for c in candidates]}
    table = selection_table(doc)
    assert "| 0.001 (chosen) | 70.0 |" in table and table.count("(chosen)") == 1


def test_the_registered_candidate_is_judged_on_its_own_seed() -> None:
    records = [Record("zeroshot", "id-set", "id", 0.5, 10), Record("zeroshot", "ood-set", "ood", 0.6, 10)]
    for seed, (id_, ood) in {1: (0.9, 0.4), 2: (0.7, 0.8)}.items():
        records += [Record("saft", "id-set", "id", id_, 10, seed, 1.0), Record("saft", "ood-set", "ood", ood, 10, seed,
                                                                                1.0)]
    doc = metrics_document(records, {"suite": "s"})
    own = candidate_metrics(doc, "saft", 1)
    saft = next(a for a in own["aggregates"] if a["model"] == "saft")
    assert saft["seeds"] == [1] and saft["ood_mean"]["mean"] == 0.4  # not the mean over seeds (0.6)
    assert own["meta"]["candidate_seed"] == 1 and any(a["model"] == "zeroshot" for a in own["aggregates"])
    with pytest.raises(ValueError, match="no records of saft seed 5"):
        candidate_metrics(doc, "saft", 5)


def test_the_retrain_section_and_the_real_model_recipe() -> None:
    recipe = load_params(REPO / "pipelines" / "retrain" / "params-vit-b-16-imagenet.yaml")
    assert recipe.model == "ViT-B-16@openai" and recipe.finetune.epochs == 10 and recipe.retrain.lr_grid[0] == 1e-5
    assert recipe.finetune.batch_size * recipe.finetune.grad_accum == 512
    for override, message in [("retrain.lr_grid=[]", "distinct positive"), ("retrain.lr_grid=[0.1, 0.1]", "distinct"),
                              ("retrain.baselines=[lora]", "retrain.baselines must be one of full, random"),
                              ("finetune.precision=fp8", "finetune.precision"), ("cluster.parallelism=0", "parallelism")]:
        with pytest.raises(ParamsError, match=message):
            load_params(REPO / "params.yaml", [override])


def test_an_untracked_register_task_registers_nothing_and_says_so(tmp_path: Path, monkeypatch) -> None:
    from saft.orchestration.client import pipeline_arguments
    from saft.orchestration.release_tasks import register_task

    def refuse(*args, **kwargs):
        raise AssertionError("an untracked task touched the registry")

    monkeypatch.setattr("saft.steps.register.register_step", refuse)
    result = register_task("tiny", str(tmp_path), str(tmp_path), [], str(tmp_path / "decision"), method="saft",
                           model_name="saft-tiny", promote=True, ood_tolerance=0.01, id_tolerance=0.01,
                           tracking=False)
    assert result["verdict"] == "skipped" and "tracking is off" in result["reason"]
    assert json.loads((tmp_path / "decision" / "register.json").read_text())["version"] is None
    params = load_params(REPO / "params.yaml")
    for pipeline in ("benchmark", "retrain"):  # the register task is not even scheduled
        assert pipeline_arguments(pipeline, params, tracking=False)["register_enabled"] is False
        assert pipeline_arguments(pipeline, params, tracking=True)["register_enabled"] is True
