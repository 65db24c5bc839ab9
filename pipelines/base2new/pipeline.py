"""The base-to-new pipeline: one SAFT training per dataset, each scored on its own base and new classes.

    start-run -> data-version -> world -> protocol (a base/new suite, subset base)
      -> base2new-trainings (one item per dataset of the suite)
      -> for each dataset: prepare (subset base: the first half of its classes) -> score (saft)
         -> finetune (saft) -> evaluate (zero-shot and that delta on the dataset's base and new halves)
      -> collect-base2new (base, new and HM per dataset, and the HM of the averaged base and new)
      -> finish-run

The CoOp/CoCoOp protocol (the built-in ``base2new`` suite of 11 datasets), as ``saft run``
runs it with ``data.subset: base`` (saft.orchestration.plan); on the embedded world (``evaluate.suite``
empty) the suite is ``synthshift-b2n``, one dataset, trained on the world's pool. Nothing is
registered: there is a model per dataset and no single candidate. One seed (the first of
``seeds``). Compiled into ``pipeline.yaml`` beside this file (``saft pipeline compile --pipeline
base2new``).
"""

from types import SimpleNamespace

from kfp import dsl
from kfp.dsl import Dataset

from saft.orchestration.arguments import shared_arguments
from saft.orchestration.cluster import ClusterConfig, policy
from saft.orchestration.stages import begin, check_protocol
from saft.steps.params import PipelineParams

NAME = "saft-base2new"
DESCRIPTION = ("Base-to-new generalization: SAFT trained per dataset on its base classes, scored on its base and new "
               "classes, with the harmonic mean per dataset and averaged.")
# shared arguments this pipeline has no use for: each dataset trains on its own training split,
# and nothing is registered
UNUSED = frozenset({"split", "register_enabled", "register_model_name", "promote", "ood_tolerance", "id_tolerance",
                    "register_baseline", "hm_tolerance"})


def arguments(params: PipelineParams, *, tracking: bool = True, checkpoint_root: str = "") -> dict:
    """``params.yaml`` as this pipeline's arguments (SAFT at its learning rate, the first seed, subset base)."""
    if params.data.subset != "base":
        raise ValueError("the base2new pipeline trains on the base half of each dataset's classes: set "
                         "data.subset: base")
    shared = shared_arguments(params, tracking=tracking, checkpoint_root=checkpoint_root)
    return {**{k: v for k, v in shared.items() if k not in UNUSED}, "seed": params.seeds[0],
            "lr_saft": params.learning_rates()["saft"]}


def build(cfg: ClusterConfig, c):
    """The pipeline function for ``cfg`` and the components ``c`` (compile it, run it locally, submit it)."""
    defaults = PipelineParams()
    defaults.data.subset = "base"
    # params_json is the run's own (a default would restate every default of params.yaml)
    d = {**arguments(defaults), "checkpoint_root": cfg.checkpoint_root, "params_json": "{}"}

    @dsl.pipeline(name=NAME, description=DESCRIPTION)
    def base2new(
        model: str = d["model"], seed: int = d["seed"], device: str = d["device"],
        data_root: str = d["data_root"], dataset: str = d["dataset"],
        shots: int = d["shots"], val_shots: int = d["val_shots"], data_version: str = d["data_version"],
        data_rev: str = d["data_rev"], data_repo: str = d["data_repo"],
        pool_per_class: int = d["pool_per_class"], test_per_class: int = d["test_per_class"],
        train_templates: list = d["train_templates"], data_subset: str = d["data_subset"],
        templates: list = d["templates"], skip_corrupt: bool = d["skip_corrupt"],
        density: float = d["density"], score_rule: str = d["score_rule"], score_batch_size: int = d["score_batch_size"],
        score_prompts: str = d["score_prompts"], score_text_batch: int = d["score_text_batch"], loader: str = d["loader"],
        score_include: list = d["score_include"], score_exclude: list = d["score_exclude"],
        settings: str = d["settings"], lr_saft: float = d["lr_saft"], checkpoint_root: str = d["checkpoint_root"],
        suite: str = d["suite"], eval_data_root: str = d["eval_data_root"], alphas: list = d["alphas"],
        eval_batch_size: int = d["eval_batch_size"], eval_reference: str = d["eval_reference"], eval_templates: str = d["eval_templates"],
        eval_allow_train_overlap: bool = d["eval_allow_train_overlap"],
        register_gate: str = d["register_gate"],
        tracking: bool = d["tracking"], params_json: str = d["params_json"],
        gpu_type: str = d["gpu_type"], gpu_count: int = d["gpu_count"],
    ) -> Dataset:
        p = SimpleNamespace(**locals())
        on = policy(cfg, gpu_type, gpu_count)

        world = begin(c, on, p, NAME)
        checked = check_protocol(c, on, p, world, register_enabled=False)
        plan = on(c.base2new_trainings(world=world.outputs["world"], suite=suite, eval_data_root=eval_data_root,
                                       dataset=dataset, data_root=data_root).after(checked), "base2new_trainings")
        with dsl.ParallelFor(plan.output, parallelism=cfg.parallelism) as t:
            prep = on(c.prepare(world=world.outputs["world"], data_root=t.root, dataset=t.dataset, split="",
                                shots=shots, val_shots=val_shots, seed=seed, data_rev=data_rev, data_repo=data_repo,
                                tracking=tracking, train_templates=train_templates, templates=templates, skip_corrupt=skip_corrupt, subset=data_subset,
                                version_check=t.version_check), "prepare")
            data = prep.outputs["data"]
            mask = on(c.score(model=model, data=data, kind="saft", density=density, rule=score_rule,
                              batch_size=score_batch_size, seed=seed, device=device, tracking=tracking,
                              prompts=score_prompts, text_batch=score_text_batch, loader=loader, include=score_include,
                          exclude=score_exclude), "score")
            tuned = on(c.finetune(model=model, data=data, method="saft", lr=lr_saft, settings=settings, seed=seed,
                                  device=device, checkpoint_root=checkpoint_root, tracking=tracking,
                                  mask=mask.outputs["mask"]), "finetune")
            part = on(c.evaluate(model=model, world=world.outputs["world"], suite=suite, data_root=eval_data_root,
                                 dataset=t.group, alphas=alphas, batch_size=eval_batch_size, device=device,
                                 tracking=tracking, deltas=tuned.outputs["delta"], loader=loader,
                                 reference=eval_reference, template_set=eval_templates,
                                 allow_train_overlap=eval_allow_train_overlap, subset=data_subset),
                      "evaluate")
        collected = on(c.collect_base2new(parts=dsl.Collected(part.outputs["metrics"]),
                                          deltas=dsl.Collected(tuned.outputs["delta"]), tracking=tracking),
                       "collect_base2new")
        results = collected.outputs["results"]
        on(c.finish_run(tracking=tracking, results=results), "finish_run")
        return results

    return base2new
