"""The benchmark pipeline: SAFT beside the methods users would pick instead, over seeds (the comparison made once).

    start-run -> data-version -> world (renders the world or marks data_root; records the version)
      -> for each seed: prepare
         -> for each trained method of finetune.methods: train-method (its mask for saft/random; every rate of
            its learning-rate grid, the best on ID validation kept; WiSE-FT's alpha chosen beside full's)
         -> gather-seed
      -> gather-deltas -> for each suite dataset: evaluate (zero-shot and every delta) -> collect (table, report,
         checks)
      -> if register_enabled: register (the lowest seed's SAFT delta, judged on its own metrics)
      -> finish-run

The methods are run parameters (``train_methods``, each one's ``lr_grids`` entry and
``wiseft_alphas``, from params.yaml's ``finetune.methods``, ``finetune.lr``/``lr_grid`` and
``wiseft_alphas``), so one compiled pipeline runs any subset. Compiled into ``pipeline.yaml`` beside this file
(``saft pipeline compile --pipeline benchmark``).
"""

import json
from types import SimpleNamespace

from kfp import dsl
from kfp.dsl import Dataset

from saft.orchestration.arguments import shared_arguments
from saft.orchestration.cluster import ClusterConfig, policy
from saft.orchestration.stages import begin, check_protocol, evaluate_suite, register_and_finish
from saft.steps.params import PipelineParams

NAME = "saft-benchmark"
DESCRIPTION = ("SAFT beside zero-shot, full fine-tuning, WiSE-FT, LoRA, LP-FT and a random mask over seeds, each "
               "method's learning rate chosen on ID validation, on an OOD suite, with MLflow tracking and an "
               "OOD-aware promotion gate.")


def arguments(params: PipelineParams, *, tracking: bool = True, checkpoint_root: str = "") -> dict:
    """``params.yaml`` as this pipeline's arguments (the methods of ``finetune.methods``)."""
    if params.register.enabled and tracking and params.register.method != "saft":
        raise ValueError("the benchmark pipeline registers the saft delta: keep register.method: saft")
    # the grids travel as one JSON string: KFP writes a dict's default in an unstable key order
    grids = {m: params.lr_grid(m) for m in params.trained_methods()}
    return {**shared_arguments(params, tracking=tracking, checkpoint_root=checkpoint_root),
            "seeds": list(params.seeds), "train_methods": params.trained_methods(),
            "lr_grids": json.dumps(grids, sort_keys=True), "wiseft_alphas": params.wiseft_alphas(),
            "zeroshot": "zeroshot" in params.finetune.methods}


def build(cfg: ClusterConfig, c):
    """The pipeline function for ``cfg`` and the components ``c`` (compile it, run it locally, submit it)."""
    # params_json is the run's own (a default would restate every default of params.yaml)
    d = {**arguments(PipelineParams()), "checkpoint_root": cfg.checkpoint_root, "params_json": "{}"}

    @dsl.pipeline(name=NAME, description=DESCRIPTION)
    def benchmark(
        model: str = d["model"], seeds: list = d["seeds"], device: str = d["device"],
        data_root: str = d["data_root"], dataset: str = d["dataset"], split: str = d["split"],
        shots: int = d["shots"], val_shots: int = d["val_shots"], data_version: str = d["data_version"],
        data_rev: str = d["data_rev"], data_repo: str = d["data_repo"],
        pool_per_class: int = d["pool_per_class"], test_per_class: int = d["test_per_class"],
        train_templates: list = d["train_templates"], data_subset: str = d["data_subset"],
        templates: list = d["templates"], skip_corrupt: bool = d["skip_corrupt"],
        density: float = d["density"], score_rule: str = d["score_rule"], score_batch_size: int = d["score_batch_size"],
        score_prompts: str = d["score_prompts"], score_text_batch: int = d["score_text_batch"], loader: str = d["loader"],
        score_include: list = d["score_include"], score_exclude: list = d["score_exclude"],
        settings: str = d["settings"], train_methods: list = d["train_methods"], lr_grids: str = d["lr_grids"],
        wiseft_alphas: list = d["wiseft_alphas"], zeroshot: bool = d["zeroshot"],
        checkpoint_root: str = d["checkpoint_root"],
        suite: str = d["suite"], eval_data_root: str = d["eval_data_root"], alphas: list = d["alphas"],
        eval_batch_size: int = d["eval_batch_size"], eval_reference: str = d["eval_reference"], eval_templates: str = d["eval_templates"],
        eval_allow_train_overlap: bool = d["eval_allow_train_overlap"],
        register_enabled: bool = d["register_enabled"], register_model_name: str = d["register_model_name"],
        promote: bool = d["promote"], ood_tolerance: float = d["ood_tolerance"],
        id_tolerance: float = d["id_tolerance"], register_baseline: bool = d["register_baseline"],
        register_gate: str = d["register_gate"], hm_tolerance: float = d["hm_tolerance"],
        tracking: bool = d["tracking"], params_json: str = d["params_json"],
        gpu_type: str = d["gpu_type"], gpu_count: int = d["gpu_count"],
    ) -> Dataset:
        p = SimpleNamespace(**locals())
        on = policy(cfg, gpu_type, gpu_count)

        world = begin(c, on, p, NAME)
        checked = check_protocol(c, on, p, world)
        with dsl.ParallelFor(seeds, parallelism=cfg.parallelism) as seed:
            prep = on(c.prepare(world=world.outputs["world"], data_root=data_root, dataset=dataset, split=split,
                                shots=shots, val_shots=val_shots, seed=seed, data_rev=data_rev,
                                data_repo=data_repo, tracking=tracking, train_templates=train_templates, templates=templates, skip_corrupt=skip_corrupt,
                                subset=data_subset).after(checked), "prepare")
            data = prep.outputs["data"]
            with dsl.ParallelFor(train_methods, parallelism=cfg.parallelism) as method:
                trained = on(c.train_method(model=model, data=data, method=method, lr_grids=lr_grids,
                                            wiseft_alphas=wiseft_alphas, settings=settings, device=device, checkpoint_root=checkpoint_root, tracking=tracking,
                                            density=density, score_rule=score_rule,
                                            score_batch_size=score_batch_size, score_prompts=score_prompts,
                                            score_text_batch=score_text_batch, score_include=score_include,
                                            score_exclude=score_exclude, loader=loader), "train_method")
            seed_deltas = on(c.gather_seed(trained=dsl.Collected(trained.outputs["trained"]), data=data),
                             "gather_seed")
        gathered = on(c.gather_deltas(seeds=dsl.Collected(seed_deltas.outputs["deltas"])), "gather_deltas")
        deltas = gathered.outputs["deltas"]
        collected = evaluate_suite(c, on, p, world, deltas, cfg.parallelism)
        results = collected.outputs["results"]
        register_and_finish(c, on, p, results, deltas)  # the data: data-seed<N>/ in the gathered deltas
        return results

    return benchmark
