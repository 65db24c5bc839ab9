"""``params.yaml`` as pipeline arguments: the part both pipelines share.

Each pipeline's ``arguments(params, tracking)`` starts from :func:`shared_arguments` and
adds its own keys; the pipeline functions take their parameter defaults from the same
function applied to the default parameters, so a default lives in one place
(``saft.steps.params``). Training settings travel as one FinetuneConfig-shaped JSON
object (``settings``), so a new finetune setting reaches the components without a new
pipeline parameter (a JSON string rather than a dict parameter: KFP writes a dict's
default in an unstable key order, which would make the compiled YAML differ run to run).
"""

from __future__ import annotations

import json

from saft.steps.params import PipelineParams


def shared_arguments(params: PipelineParams, *, tracking: bool = True, checkpoint_root: str = "") -> dict:
    from saft.config import to_mapping
    from saft.steps.params import finetune_settings

    d, e, r = params.data, params.evaluate, params.register
    return {
        "model": params.model, "device": params.device,
        "data_root": d.root, "dataset": d.dataset, "split": d.split, "shots": d.shots, "val_shots": d.val_shots,
        "data_version": d.version, "data_rev": d.rev, "data_repo": d.repo,
        "train_templates": list(d.train_templates), "templates": list(d.templates), "data_subset": d.subset,
        "skip_corrupt": d.skip_corrupt,
        "pool_per_class": params.world.pool_per_class, "test_per_class": params.world.test_per_class,
        "density": params.score.density, "score_rule": params.score.rule, "score_batch_size": params.score.batch_size,
        "score_prompts": params.score.prompts, "score_text_batch": params.score.text_batch,
        "score_include": list(params.score.include), "score_exclude": list(params.score.exclude),
        # the loader: section for score and evaluate (finetune and baseline read it inside settings)
        "loader": json.dumps(to_mapping(params.loader), sort_keys=True),
        "settings": json.dumps(finetune_settings(params), sort_keys=True),
        "suite": e.suite, "eval_data_root": e.data_root, "alphas": list(e.alphas), "eval_batch_size": e.batch_size,
        "eval_reference": e.reference, "eval_templates": e.template_set,
        "eval_allow_train_overlap": e.allow_train_overlap,
        # untracked runs register nothing: the registry lives in MLflow, and an untracked run's task must not move
        # the champion of whatever registry its environment points at
        "register_enabled": r.enabled and tracking, "register_model_name": r.model_name, "promote": r.promote,
        "ood_tolerance": r.ood_tolerance, "id_tolerance": r.id_tolerance, "register_baseline": r.baseline,
        "register_gate": r.gate, "hm_tolerance": r.hm_tolerance,
        "tracking": tracking, "params_json": json.dumps(params.to_dict()),
        "gpu_type": params.cluster.gpu_type, "gpu_count": params.cluster.gpu_count,
        # absent: the compiled default (the checkpoint PVC's mount on a cluster)
        **({"checkpoint_root": checkpoint_root} if checkpoint_root else {}),
    }


__all__ = ["shared_arguments"]
