"""The retrain pipeline: production retraining that trains only what ships.

    start-run -> data-version (never cached) -> world (renders the world or marks data_root; records the version)
      -> prepare (one seed, read at that version) -> score (the SAFT mask)
      -> for each learning rate of lr_grid: finetune (saft)      [at most `parallelism` at a time]
         (nodes > 1: finetune-trainjob instead, each rate a Kubeflow Trainer TrainJob of nodes x gpu_count)
      -> select (the rate with the best top-1 on the prepared ID validation split)
      -> for each suite dataset: evaluate (zero-shot and the chosen delta) -> collect
      -> if baselines: for each baseline: baseline (full / random) -> gather-runs -> evaluate -> compare
      -> if register_enabled: register + promotion gate -> if promoted and deploy_enabled: deploy (KServe canary)
      -> finish-run

The data version is an input of the world task, whose output every data-reading task takes
(directly, or through prepare's output): a recurring run over new data recomputes from
there on, while one over unchanged data is served from cache.
Compiled into ``pipeline.yaml`` beside this file (``saft pipeline compile --pipeline retrain``).
"""

import json
from types import SimpleNamespace

from kfp import dsl
from kfp.dsl import Dataset

from saft.config import to_mapping
from saft.orchestration.arguments import shared_arguments
from saft.orchestration.cluster import ClusterConfig, policy
from saft.orchestration.stages import begin, check_protocol, evaluate_suite, register_and_finish
from saft.steps.params import PipelineParams

NAME = "saft-retrain"
DESCRIPTION = ("Production retraining: SAFT over a learning-rate grid on a versioned dataset, the rate chosen on ID "
               "validation, evaluated on the OOD suite, registered behind the promotion gate, deployed on promotion.")


def arguments(params: PipelineParams, *, tracking: bool = True, checkpoint_root: str = "") -> dict:
    """``params.yaml`` as this pipeline's arguments (SAFT over ``retrain.lr_grid``; ``retrain.baselines``)."""
    if params.register.method != "saft":
        raise ValueError("the retrain pipeline ships the saft delta: keep register.method: saft")
    r = params.retrain
    baselines = [{"method": m, "lr": params.learning_rates()[m]} for m in r.baselines]
    return {**shared_arguments(params, tracking=tracking, checkpoint_root=checkpoint_root),
            "seed": r.seed, "lr_grid": list(r.lr_grid), "with_baselines": bool(baselines), "baselines": baselines,
            "nodes": params.cluster.nodes,
            "trainjob_settings": json.dumps(to_mapping(params.trainjob), sort_keys=True),
            "deploy_enabled": params.deploy.enabled,
            "deploy_settings": json.dumps(to_mapping(params.deploy), sort_keys=True)}


def build(cfg: ClusterConfig, c):
    """The pipeline function for ``cfg`` and the components ``c`` (compile it, run it locally, submit it)."""
    # params_json is the run's own (a default would restate every default of params.yaml)
    d = {**arguments(PipelineParams()), "checkpoint_root": cfg.checkpoint_root, "params_json": "{}"}

    @dsl.pipeline(name=NAME, description=DESCRIPTION)
    def retrain(
        model: str = d["model"], seed: int = d["seed"], device: str = d["device"],
        data_root: str = d["data_root"], dataset: str = d["dataset"], split: str = d["split"],
        shots: int = d["shots"], val_shots: int = d["val_shots"], data_version: str = d["data_version"],
        data_rev: str = d["data_rev"], data_repo: str = d["data_repo"],
        pool_per_class: int = d["pool_per_class"], test_per_class: int = d["test_per_class"],
        train_templates: list = d["train_templates"], data_subset: str = d["data_subset"],
        templates: list = d["templates"], skip_corrupt: bool = d["skip_corrupt"],
        density: float = d["density"], score_rule: str = d["score_rule"], score_batch_size: int = d["score_batch_size"],
        score_prompts: str = d["score_prompts"], score_text_batch: int = d["score_text_batch"], loader: str = d["loader"],
        score_include: list = d["score_include"], score_exclude: list = d["score_exclude"],
        settings: str = d["settings"], lr_grid: list = d["lr_grid"], checkpoint_root: str = d["checkpoint_root"],
        with_baselines: bool = d["with_baselines"], baselines: list = d["baselines"],
        suite: str = d["suite"], eval_data_root: str = d["eval_data_root"], alphas: list = d["alphas"],
        eval_batch_size: int = d["eval_batch_size"], eval_reference: str = d["eval_reference"], eval_templates: str = d["eval_templates"],
        eval_allow_train_overlap: bool = d["eval_allow_train_overlap"],
        register_enabled: bool = d["register_enabled"], register_model_name: str = d["register_model_name"],
        promote: bool = d["promote"], ood_tolerance: float = d["ood_tolerance"],
        id_tolerance: float = d["id_tolerance"], register_baseline: bool = d["register_baseline"],
        register_gate: str = d["register_gate"], hm_tolerance: float = d["hm_tolerance"],
        deploy_enabled: bool = d["deploy_enabled"], deploy_settings: str = d["deploy_settings"],
        tracking: bool = d["tracking"], params_json: str = d["params_json"],
        gpu_type: str = d["gpu_type"], gpu_count: int = d["gpu_count"],
        nodes: int = d["nodes"], trainjob_settings: str = d["trainjob_settings"],
    ) -> Dataset:
        p = SimpleNamespace(**locals())
        on = policy(cfg, gpu_type, gpu_count)

        world = begin(c, on, p, NAME)
        checked = check_protocol(c, on, p, world)
        prep = on(c.prepare(world=world.outputs["world"], data_root=data_root, dataset=dataset, split=split,
                            shots=shots, val_shots=val_shots, seed=seed, data_rev=data_rev,
                            data_repo=data_repo, tracking=tracking, train_templates=train_templates, templates=templates, skip_corrupt=skip_corrupt,
                            subset=data_subset).after(checked), "prepare")
        data = prep.outputs["data"]
        mask = on(c.score(model=model, data=data, kind="saft", density=density, rule=score_rule,
                          batch_size=score_batch_size, seed=seed, device=device, tracking=tracking,
                          prompts=score_prompts, text_batch=score_text_batch, loader=loader, include=score_include,
                          exclude=score_exclude), "score")
        def select(deltas, display=None):
            return on(c.select(model=model, data=data, candidates=dsl.Collected(deltas), batch_size=eval_batch_size,
                               device=device, tracking=tracking), "select", display)

        def in_one_pod():  # each rate in one pod (gpu_count > 1: one process per GPU under torchrun)
            with dsl.ParallelFor(lr_grid, parallelism=cfg.parallelism) as lr:
                tuned = on(c.finetune(model=model, data=data, method="saft", lr=lr, settings=settings, seed=seed,
                                      device=device, checkpoint_root=checkpoint_root, tracking=tracking,
                                      mask=mask.outputs["mask"]), "finetune")
            return select(tuned.outputs["delta"]).outputs["chosen"]

        if cfg.kubernetes:
            with dsl.If(nodes > 1, "multi-node"):  # each rate a TrainJob across nodes; the launcher holds no GPU
                with dsl.ParallelFor(lr_grid, parallelism=cfg.parallelism) as lr:
                    job = on(c.finetune_trainjob(model=model, data=data, mask=mask.outputs["mask"], lr=lr,
                                                 settings=settings, seed=seed, nodes=nodes, gpus_per_node=gpu_count,
                                                 shared_root=checkpoint_root, pvc=cfg.checkpoint_pvc,
                                                 trainjob=trainjob_settings, image=cfg.image, tracking=tracking),
                             "finetune_trainjob")
                across_nodes = select(job.outputs["delta"], "select-multi-node").outputs["chosen"]
            with dsl.Else("one-node"):
                one_pod = in_one_pod()
            candidate = dsl.OneOf(across_nodes, one_pod)
        else:  # kfp.local has no Kubeflow Trainer (and no artifact dsl.OneOf): the one-pod path only
            candidate = in_one_pod()
        collected = evaluate_suite(c, on, p, world, candidate, cfg.parallelism)
        results = collected.outputs["results"]
        with dsl.If(with_baselines == True, "baselines"):  # noqa: E712 (a pipeline condition)
            with dsl.ParallelFor(baselines, parallelism=cfg.parallelism) as b:
                base = on(c.baseline(model=model, data=data, method=b.method, lr=b.lr, settings=settings, seed=seed,
                                     density=density, device=device, checkpoint_root=checkpoint_root,
                                     tracking=tracking), "baseline")
            gathered = on(c.gather_runs(runs=dsl.Collected(base.outputs["delta"])), "gather_runs")
            scored = on(c.evaluate(model=model, world=world.outputs["world"], suite=suite, data_root=eval_data_root,
                                   dataset="", alphas=alphas, batch_size=eval_batch_size, device=device,
                                   tracking=tracking, deltas=gathered.outputs["deltas"], zeroshot=False,
                                   loader=loader, reference=eval_reference, template_set=eval_templates,
                                   allow_train_overlap=eval_allow_train_overlap,
                                   subset=data_subset),
                        "evaluate", "evaluate-baselines")
            on(c.compare(results=results, candidate=candidate, baseline_metrics=scored.outputs["metrics"],
                         baselines=gathered.outputs["deltas"], tracking=tracking), "compare")
        register_and_finish(c, on, p, results, candidate, data=data, deploy_image=cfg.image)
        return results

    return retrain
