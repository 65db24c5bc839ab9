"""A pipeline task's step on more than one GPU: torchrun in the task's pod, or a TrainJob across nodes.

*One pod, N GPUs* (``gpu_count: N``): the score, finetune and evaluate tasks run their
step as ``saft score|finetune|evaluate`` under torchrun with one process per GPU
(:func:`saft.orchestration.torchrun.task_processes`, :func:`run_launched`). The job runs
untracked; the task's own nested MLflow run logs what the job wrote, exactly as after the
in-process call, and the task returns the summary the step's record holds.

*Several nodes* (the retrain pipeline's ``nodes`` > 1): :func:`finetune_trainjob_task`
stages the prepared data (with its drawn images) and the mask on the shared volume,
submits the same ``saft finetune`` command as a Kubeflow Trainer TrainJob
(:mod:`saft.orchestration.trainjob`), waits for it, and copies the delta into the task's
output, so select and evaluate downstream see what a one-pod finetune task leaves.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

from saft.config import to_mapping
from saft.io import write_json
from saft.orchestration.torchrun import finetune_argv
from saft.steps.tracked import step_context
from saft.layout import FINETUNE

TRAINJOB_FILE = FINETUNE.trainjob


def _log(msg: str) -> None:
    print(msg, flush=True)


TRAINJOB_KEYS = ("namespace", "image", "runtime", "gpu_resource", "cpu", "memory", "timeout_s", "queue_timeout_s",
                 "queue", "poll_s", "patch_api", "host")


def trainjob_options(settings: str | dict, *, image: str = "") -> dict:
    """params.yaml's ``trainjob:`` section (the pipeline's JSON) as :func:`launch_trainjob` keyword arguments."""
    values = json.loads(settings) if isinstance(settings, str) else dict(settings)
    unknown = sorted(set(values) - set(TRAINJOB_KEYS))
    if unknown:
        raise ValueError(f"trainjob settings: unknown field(s) {', '.join(unknown)}; known: "
                         f"{', '.join(TRAINJOB_KEYS)} (params.yaml trainjob: section)")
    out = {k: v for k, v in values.items() if v not in ("", None)}
    if not out.get("image") and image:
        out["image"] = image
    for key in ("timeout_s", "queue_timeout_s", "poll_s"):
        if key in out:
            out[key] = float(out[key])
    return out


def _stage(data_dir: str, mask_dir: str | None, stage: Path, log) -> tuple[Path, Path | None]:
    """The prepared folder (with its drawn images) and the mask, copied onto the shared volume."""
    from saft.steps.prepared import PreparedData
    from saft.orchestration.tasks import FILES_DIR, MASK_FILE, _materialize

    data = stage / "data"
    if data.exists():
        shutil.rmtree(data)  # a retry: stage again, the inputs are the task's own
    shutil.copytree(data_dir, data)
    if not (data / FILES_DIR).is_dir():  # the nodes read the images from the volume, not the dataset root
        from saft.data.storage import open_storage

        log(f"trainjob: staged {_materialize(open_storage(PreparedData.open(data_dir).root), data):,} drawn images "
            f"in {data / FILES_DIR}")
    mask = None
    if mask_dir:
        mask = stage / "mask" / MASK_FILE
        mask.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(mask_dir) / MASK_FILE, mask)
    return data, mask


def finetune_trainjob_task(data_dir: str, mask_dir: str | None, out_dir: str, cfg, *, shared_root: str, pvc: str,
                           nodes: int, gpus_per_node: int, settings: str | dict = "{}", image: str = "",
                           parent_run_id: str = "", log=_log, **launch_overrides) -> dict:
    """Train one delta as a TrainJob of ``nodes`` x ``gpus_per_node`` processes; the delta lands in ``out_dir``.

    ``shared_root`` is where this pod mounts ``pvc`` (every node mounts it at the same path);
    the job's folder there is keyed like a checkpoint (model, settings, data, mask), so a
    retried launcher finds its job (same command line, same TrainJob name) and resumes
    from its checkpoints. The folder is removed once the delta is copied out.
    """
    from saft.orchestration.trainjob import launch_trainjob
    from saft.orchestration.tasks import HISTORY_FILE, RUN_FILES, checkpoint_dir_for, prepared_root, with_epochs

    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"trainjob: nodes ({nodes}) and gpus_per_node ({gpus_per_node}) must be >= 1")
    if cfg.batch_size % (nodes * gpus_per_node):
        raise ValueError(f"trainjob: finetune.batch_size {cfg.batch_size} must divide by the {nodes * gpus_per_node} "
                         "processes (nodes x gpu_count): each trains an equal part of every global batch")
    cfg = replace(with_epochs(cfg, data_dir, log), device="cuda")
    stage = Path(shared_root) / "trainjobs" / checkpoint_dir_for(shared_root, cfg.model, cfg, data_dir, mask_dir).name
    data, mask = _stage(data_dir, mask_dir if cfg.needs_mask else None, stage, log)
    argv = finetune_argv(cfg, str(data), str(stage / "out"), mask_path=str(mask) if mask else None,
                         root=prepared_root(str(data)), resume=True, checkpoint_dir=str(stage / "checkpoints"))
    options = {**trainjob_options(settings, image=image), **launch_overrides}
    options.setdefault("namespace", "default")
    with step_context(f"finetune {cfg.method} seed{cfg.seed} (trainjob)", parent_run_id,
                      {**to_mapping(cfg), "nodes": nodes, "gpus_per_node": gpus_per_node}) as tracker:
        result = launch_trainjob(argv, pvc=pvc, num_nodes=nodes, gpus_per_node=gpus_per_node,
                                 mount_path=shared_root, log=log, **options)
        missing = [f for f in RUN_FILES if f not in result["outputs"]]
        if missing:
            raise RuntimeError(f"trainjob {result['name']} is complete but wrote no {', '.join(missing)} in "
                               f"{result['out_dir']}")
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        for f in RUN_FILES:
            shutil.copyfile(Path(result["out_dir"]) / f, Path(out_dir) / f)
        tracker.log_history(json.loads((Path(out_dir) / HISTORY_FILE).read_text()))
        tracker.log_artifact(str(Path(out_dir) / FINETUNE.delta))
        tracker.set_tags({"saft.trainjob": result["name"], "saft.trainjob.queued_s": str(result["queued_s"]),
                          "saft.trainjob.running_s": str(result["running_s"])})
    write_json(Path(out_dir) / TRAINJOB_FILE, {"name": result["name"], "namespace": result["namespace"],
                                               "nodes": nodes, "gpus_per_node": gpus_per_node,
                                               "condition": result["condition"], "queued_s": result["queued_s"],
                                               "running_s": result["running_s"]})
    shutil.rmtree(stage, ignore_errors=True)  # the delta is in the artifact store now
    return {**(result["summary"] or {}), "trainjob": result["name"]}
