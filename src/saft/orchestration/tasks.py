"""Pipeline tasks over artifact folders: one function per Kubeflow component.

A Kubeflow task sees its inputs as local folders (the artifacts of upstream tasks,
copied or mounted into its pod) and writes its outputs into folders it is given. These
functions adapt the step functions to that shape: plain strings, numbers and folder
paths in, files in the output folders out, and the same steps, record files and
tracking as ``saft run``. They import no kfp, so they are tested without a cluster.

Embedded default: the ``world`` task renders the world into its artifact; an empty
``data_root``/``suite`` downstream means "the world artifact's pool/suite". Tracking:
each task finds its MLflow parent run through :mod:`saft.orchestration.parent_run` (never
through an input, which would defeat the cache).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

# Light imports only: every task is a fresh process, and most need neither torch nor
# matplotlib until they do real work, so the heavy modules are imported where used.
from saft.io import write_json
from saft.steps.params import WorldParams
from saft.steps.tracked import step_context
from saft.layout import DECISION, DEPLOYMENT, EVAL, FINETUNE, MASK, PREPARED, WORLD_TASK

MASK_FILE = MASK.mask
HISTORY_FILE = FINETUNE.history
FINETUNE_FILE = FINETUNE.record
METRICS_FILE = EVAL.metrics
EXTERNAL_FILE = WORLD_TASK.external
VERSION_FILE = WORLD_TASK.version
RESUME_FILE = FINETUNE.resume
DEPLOY_FILE = DEPLOYMENT.deploy
CANDIDATE_METRICS_FILE = DECISION.candidate_metrics
FILES_DIR = PREPARED.files
RUN_FILES = (FINETUNE.delta, HISTORY_FILE, FINETUNE_FILE)


def _log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- the pipeline run


def start_task(params: dict, run_name: str, tracking: bool) -> str:
    """Open the pipeline's parent MLflow run (tagged with the pipeline run's id); "" when untracked."""
    from saft.tracking.config import tracking_enabled

    if not tracking or not tracking_enabled():
        return ""
    from saft.orchestration.parent_run import open_parent_run

    run_id = open_parent_run(run_name, params)
    _log(f"MLflow parent run {run_id}")
    return run_id


def finish_task(tracking: bool, *, results_dir: str | None = None, decision_dir: str | None = None,
                status: str = "FINISHED") -> None:
    """Put the results table and the registry decision on the parent run, then close it.

    Done here, in a task that is never cached, so the parent run of every pipeline run
    holds them even when collect was served from cache (CI reads them from there).
    """
    from saft.orchestration.parent_run import parent_run

    parent = parent_run(tracking)
    if not parent:
        return
    from saft.tracking.config import make_client, resolve_config, tracking_call
    from saft.tracking.runs import end_pipeline_run

    config = resolve_config()
    client = make_client(config)
    files = []
    if results_dir:
        files += [p for p in (Path(results_dir) / n for n in (EVAL.table, EVAL.results, EVAL.selection,
                                                               EVAL.report_html)) if p.is_file()]
    if decision_dir and (Path(decision_dir) / DECISION.register).is_file():
        files.append(Path(decision_dir) / DECISION.register)
        decision = json.loads((Path(decision_dir) / DECISION.register).read_text())
        with tracking_call(config, "tagging the parent run with the registry decision"):
            client.set_tag(parent, "saft.register.verdict", str(decision.get("verdict")))
            client.set_tag(parent, "saft.register.version", str(decision.get("version") or ""))
    with tracking_call(config, "logging the results on the parent run"):
        for f in files:
            client.log_artifact(parent, str(f), "results")
    end_pipeline_run(parent, status)


# --------------------------------------------------------------------------- data


def world_task(out_dir: str, data_root: str, pool_per_class: int, test_per_class: int, *,
               data_version: str = "") -> None:
    """Render the embedded world, or record that the data lives elsewhere (``data_root``).

    ``data_version`` is recorded in the output, which every data-reading task downstream
    takes: that puts the version in their cache keys, and prepare checks the data against it.
    """
    if data_root:
        write_json(Path(out_dir) / EXTERNAL_FILE, {"data_root": data_root})
    else:
        from saft.steps.world import world_step

        world_step(out_dir, WorldParams(pool_per_class, test_per_class), log=_log)
    if data_version:
        write_json(Path(out_dir) / VERSION_FILE, {"version": data_version})


def recorded_version(world_dir: str) -> str:
    """The data version the world task recorded ("" when none: ``saft run``)."""
    path = Path(world_dir) / VERSION_FILE
    return json.loads(path.read_text())["version"] if path.is_file() else ""


def train_root(world_dir: str, data_root: str) -> str:
    from saft.steps.world import POOL_DIR

    return data_root or str(Path(world_dir) / POOL_DIR)


def data_version_task(data_root: str, *, rev: str = "", repo: str = "", expected: str = "",
                      pool_per_class: int = 64, test_per_class: int = 100, tracking: bool = False) -> str:
    """The data's version now (never cached: it is what tells a recurring run that the data changed)."""
    from saft.steps.data_version import resolve_data_version

    version = resolve_data_version(data_root, rev=rev, repo=repo, expected=expected, pool_per_class=pool_per_class,
                                   test_per_class=test_per_class)
    _log(f"data version: {version.describe}")
    from saft.orchestration.parent_run import parent_run

    parent = parent_run(tracking)
    if parent:
        from saft.tracking.config import make_client, resolve_config, tracking_call

        config = resolve_config()
        with tracking_call(config, "recording the data version on the parent run"):
            _log_lineage(make_client(config), parent, version)
    return version.version


def _lineage_tags(version) -> dict[str, str]:
    return {"saft.data_version": version.version, "saft.data_kind": version.kind,
            "saft.data_root": version.root or "embedded world", "saft.data_rev": version.rev or "working tree"}


def _log_lineage(client, run_id: str, version) -> None:
    """Tags and an MLflow dataset input (``mlflow.log_input`` lineage) for ``version``."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    for key, value in _lineage_tags(version).items():
        client.set_tag(run_id, key, value)
    digest = version.version.split("-", 1)[1][:32]  # MLflow keeps 36 characters
    source = json.dumps({k: v for k, v in version.to_dict().items() if k in ("root", "rev", "repo", "path") and v},
                        sort_keys=True)
    dataset = Dataset(name=(version.root or "embedded-world")[-500:], digest=digest, source_type=version.kind,
                      source=source)
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])])


def prepared_root(data_dir: str) -> str | None:
    """The root to read a prepared folder's images from when prepare copied them beside it."""
    files = Path(data_dir) / FILES_DIR
    return str(files) if files.is_dir() else None


def _materialize(storage, out_dir: Path) -> int:
    """Copy the drawn images of ``out_dir``'s manifests from ``storage`` into ``out_dir/files``."""
    from saft.data.manifest import read_manifest

    count = 0
    for name in (PREPARED.train, PREPARED.val):
        if not (out_dir / name).is_file():
            continue
        for entry in read_manifest(out_dir / name):
            target = out_dir / FILES_DIR / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(storage.fetch(entry.path, entry.sha256), target)
            count += 1
    return count


def prepare_task(world_dir: str, out_dir: str, cfg, *, data_root: str, parent_run_id: str = "",
                 data_version: str | None = None, data_rev: str = "", data_repo: str = "") -> str:
    """Few-shot manifests for ``cfg`` (a :class:`saft.data.prepare.PrepareConfig`); returns the training manifest
    hash (a cache key downstream).

    With a data version (given, or recorded by the world task: the pipelines), the root is
    read at that version or not at all: it is resolved again here and must match (a root
    that changed since the data-version task fails rather than training on other data than
    the run records). Data read through DVC at a revision is copied into ``out_dir/files``
    (only the drawn images), so later tasks read it without DVC.
    """
    from saft.config import to_mapping
    from saft.data.prepare import prepare_dataset

    logged = {**to_mapping(cfg), "root": data_root}
    reader, version = train_root(world_dir, data_root), None
    data_version = recorded_version(world_dir) if data_version is None else data_version
    if data_version:
        from saft.steps.data_version import WORLD, DataVersion, reader_for, resolve_data_version

        if data_root:
            version = resolve_data_version(data_root, rev=data_rev, repo=data_repo, expected=data_version)
            reader = reader_for(version)
        else:  # the world artifact is rendered from the parameters its version hashes
            version = DataVersion(data_version, WORLD, "")
        logged["data_version"] = data_version
    name = f"prepare seed{cfg.seed}" + ("" if cfg.subset == "all" else f" {cfg.subset}")
    with step_context(name, parent_run_id, logged) as tracker:
        result = prepare_dataset(reader, out_dir, cfg)
        tags = {"saft.manifest_hash": result.manifest_hash}
        if data_version:
            tags["saft.data_version"] = data_version
        tracker.set_tags(tags)
        if not isinstance(reader, str):
            _log(f"prepare: copied {_materialize(reader, Path(out_dir)):,} drawn images from {reader.uri}")
        if version is not None:
            write_json(Path(out_dir) / VERSION_FILE, version.to_dict())
            if vars(tracker).get("client") is not None:  # a real MLflow run (not the untracked stand-in)
                _log_lineage(tracker.client, tracker.run_id, version)
    return result.manifest_hash


# --------------------------------------------------------------------------- training


def settings_config(cls, settings: str | dict, **fixed):
    """A step configuration from a component's ``settings`` JSON (its fields, see saft.steps.params) and the
    values the pipeline sets per task (``fixed``): unknown keys refused with the closest known one."""
    from saft.config import from_mapping

    values = (json.loads(settings) if settings.strip() else {}) if isinstance(settings, str) else dict(settings or {})
    return from_mapping(cls, values, source=f"{cls.__name__} settings", **fixed)


def score_task(data_dir: str, out_dir: str, cfg, parent_run_id: str = "", *, progress: bool = False,
               log=_log) -> dict:
    from saft.config import to_mapping
    from saft.orchestration.torchrun import score_argv, task_processes
    from saft.steps.score import score_step

    processes = task_processes(cfg.device)
    with step_context(f"score {cfg.kind} seed{cfg.seed}", parent_run_id, to_mapping(cfg)) as tracker:
        if processes > 1:  # one process per GPU of the pod (saft.orchestration.trainjob_task)
            from saft.orchestration.torchrun import run_launched

            stats = run_launched(score_argv(cfg, data_dir, out_dir, root=prepared_root(data_dir)), processes,
                                 out_dir, log=log)
        else:
            stats = score_step(cfg, data_dir, out_dir, root=prepared_root(data_dir), progress=progress, log=log)
        tracker.log_mask_stats(stats)
        tracker.log_artifact(str(Path(out_dir) / MASK_FILE))
    return stats


def with_epochs(cfg, data_dir: str, log=_log):
    """``cfg`` with ``epochs`` (> 0) turned into steps over the training manifest (what a checkpoint is keyed by)."""
    if not cfg.epochs:
        return cfg
    from saft.data.manifest import read_manifest
    from saft.steps.prepared import PreparedData

    n_train = len(read_manifest(PreparedData.open(data_dir).manifest("train")))
    resolved = replace(cfg, steps=cfg.for_data(n_train).steps, epochs=0.0)
    log(f"finetune: {cfg.epochs:g} epochs of {n_train} images at batch {cfg.batch_size} x {cfg.grad_accum} = "
        f"{resolved.steps} steps")
    return resolved


def checkpoint_dir_for(checkpoint_root: str, model: str, cfg, data_dir: str, mask_dir: str | None) -> Path:
    """Where this exact training run keeps its checkpoint: keyed by everything that shapes it.

    The key covers the model spec, the full training config, the training manifest and
    the mask, so a retry (a new pod, a fresh output folder) finds its own checkpoint and
    nothing else's, and a run with other settings never resumes from it.
    """
    import hashlib

    from saft.data.storage import sha256_file
    from saft.steps.prepared import PreparedData

    key = {"model": model, "config": cfg.training().to_dict(),
           "train": PreparedData.open(data_dir).manifest_hash("train"),
           "mask": sha256_file(Path(mask_dir) / MASK_FILE) if mask_dir and cfg.needs_mask else None}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(checkpoint_root) / f"finetune-{cfg.method}-{digest}"


def finetune_task(data_dir: str, mask_dir: str | None, out_dir: str, cfg, *, parent_run_id: str = "",
                  progress: bool = False, log=_log, checkpoint_root: str = "") -> dict:
    """Train one delta (``cfg``: a :class:`saft.steps.configs.FinetuneStepConfig`). With ``checkpoint_root``,
    checkpoints go to a folder keyed by the run (:func:`checkpoint_dir_for`) and a rerun resumes from the last
    one; the folder is removed once the delta is written. A pod with several GPUs runs the step as one process
    per GPU (:mod:`saft.orchestration.trainjob_task`)."""
    from saft.config import to_mapping
    from saft.steps.finetune import finetune_step
    from saft.orchestration.torchrun import task_processes

    mask = str(Path(mask_dir) / MASK_FILE) if mask_dir and cfg.needs_mask else None
    cfg = with_epochs(cfg, data_dir, log)
    ckpt, resumed = None, 0
    if checkpoint_root:
        from saft.sparse.checkpoint import checkpoint_step

        ckpt = checkpoint_dir_for(checkpoint_root, cfg.model, cfg, data_dir, mask_dir)
        resumed = checkpoint_step(ckpt)
        if resumed:
            log(f"finetune: resuming from the checkpoint at step {resumed} of {cfg.steps} in {ckpt}")
        elif cfg.checkpoint_every:
            log(f"finetune: a checkpoint every {cfg.checkpoint_every} steps in {ckpt}")
        else:
            log("finetune: no checkpoints (finetune.checkpoint_every is 0): a retry starts from step 0")
    processes = task_processes(cfg.device)
    with step_context(f"finetune {cfg.method} seed{cfg.seed}", parent_run_id, to_mapping(cfg)) as tracker:
        if processes > 1:  # one process per GPU of the pod (saft.orchestration.trainjob_task)
            from saft.orchestration.torchrun import finetune_argv, run_launched

            argv = finetune_argv(cfg, data_dir, out_dir, mask_path=mask, root=prepared_root(data_dir),
                                 resume=ckpt is not None, checkpoint_dir=str(ckpt) if ckpt else None)
            summary = run_launched(argv, processes, out_dir, log=log)
        else:
            summary = finetune_step(cfg, data_dir, out_dir, mask_path=mask, root=prepared_root(data_dir),
                                    progress=progress, log=log, resume=ckpt is not None, checkpoint_dir=ckpt)
        tracker.log_history(json.loads((Path(out_dir) / HISTORY_FILE).read_text()))
        tracker.log_artifact(str(Path(out_dir) / FINETUNE.delta))
        if ckpt is not None:
            tracker.set_tags({"saft.resumed_from_step": str(resumed)})
    if ckpt is not None:
        write_json(Path(out_dir) / RESUME_FILE, {"checkpoint_dir": str(ckpt), "resumed_from_step": resumed,
                                                "steps": cfg.steps})
        shutil.rmtree(ckpt, ignore_errors=True)  # the delta is in the artifact store now
    return {**summary, "resumed_from_step": resumed}


def baseline_task(data_dir: str, out_dir: str, cfg, *, density: float, parent_run_id: str = "",
                  checkpoint_root: str = "") -> dict:
    """A comparison run of the retrain pipeline: full fine-tuning, or a random mask of SAFT's density.

    ``out_dir`` becomes a finetune output folder (what gather and evaluate read); a random
    mask is drawn into a folder beside it and removed once the delta (which holds its
    indices) is written.
    """
    import tempfile

    if cfg.method not in ("full", "random"):
        raise ValueError(f"baseline: method must be full or random, got {cfg.method!r}")
    with tempfile.TemporaryDirectory(prefix="saft-baseline-mask-") as tmp:
        mask_dir = None
        if cfg.method == "random":
            from saft.config import to_mapping
            from saft.loader import LoaderSettings
            from saft.steps.configs import ScoreConfig

            mask_dir = str(Path(tmp) / "mask")
            # a random mask reads no images, but its record shows the run's loader settings like every task's
            loader = to_mapping(LoaderSettings(cfg.num_workers, cfg.pin_memory, cfg.persistent_workers))
            score_task(data_dir, mask_dir, ScoreConfig(model=cfg.model, density=density, kind="random",
                                                       seed=cfg.seed, device=cfg.device, **loader), parent_run_id)
        return finetune_task(data_dir, mask_dir, out_dir, cfg, parent_run_id=parent_run_id,
                             checkpoint_root=checkpoint_root)


def select_task(model: str, data_dir: str, candidate_dirs: list[str], out_dir: str, *, batch_size: int = 128,
                device: str = "cpu", parent_run_id: str = "") -> dict:
    from saft.sparse.distributed import resolve_device
    from saft.steps.select import SELECTION_PLOT, select_step

    with step_context("select", parent_run_id, {"candidates": len(candidate_dirs)}) as tracker:
        doc = select_step(model, data_dir, candidate_dirs, out_dir, root=prepared_root(data_dir),
                          batch_size=batch_size, device=resolve_device(device), log=_log)
        tracker.log_metrics({f"val_top1.lr_{c['lr']:g}": c["val_top1"] for c in doc["candidates"]}
                            | {"chosen_lr": doc["chosen_lr"], "zeroshot_val_top1": doc["zeroshot_val_top1"]})
        tracker.log_artifact(str(Path(out_dir) / SELECTION_PLOT))
    return doc


def gather_deltas(delta_dirs: list[str], out_dir: str, data_dirs: list[str] = ()) -> list[str]:
    """Copy finetune output folders into ``out_dir/<method>-seed<N>/`` (delta, history, record, and WiSE-FT's
    choice when made), and the small files of prepared data folders (manifests, classes, templates, records) into
    ``out_dir/data-seed<N>/``. A folder gathered before (one seed's) is merged in as it is."""
    from saft.steps.wiseft import WISEFT_DIR

    names = []
    for folder in delta_dirs:
        if not (Path(folder) / FINETUNE_FILE).is_file():  # gathered before: its sub-folders as they are
            for sub in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
                shutil.copytree(sub, Path(out_dir) / sub.name, dirs_exist_ok=True)
                names += [sub.name] if (sub / FINETUNE_FILE).is_file() else []
            continue
        run = _runs([folder])[0]
        name = f"{run.name}-seed{run.seed}"
        target = Path(out_dir) / name
        target.mkdir(parents=True, exist_ok=True)
        for f in RUN_FILES:
            shutil.copyfile(Path(folder) / f, target / f)
        if (Path(folder) / WISEFT_DIR).is_dir():
            shutil.copytree(Path(folder) / WISEFT_DIR, target / WISEFT_DIR, dirs_exist_ok=True)
        names.append(name)
    for folder in data_dirs:
        target = Path(out_dir) / f"data-seed{json.loads((Path(folder) / PREPARED.record).read_text())['seed']}"
        target.mkdir(parents=True, exist_ok=True)
        for f in Path(folder).iterdir():
            if f.is_file():
                shutil.copyfile(f, target / f.name)
    return names


def delta_runs(deltas_dir: str) -> list:
    """Method and seed of every delta gathered into ``deltas_dir``, from each finetune.json.

    ``deltas_dir`` may also be one finetune output itself (the base-to-new fan-out evaluates
    each training's delta where it was written).
    """
    if (Path(deltas_dir) / FINETUNE_FILE).is_file():
        return _runs([deltas_dir])
    folders = sorted(str(p.parent) for p in Path(deltas_dir).glob(f"*/{FINETUNE_FILE}"))
    if not folders:
        raise ValueError(f"{deltas_dir}: no finetune outputs (expected <method>-seed<N>/{FINETUNE_FILE})")
    return sorted(_runs(folders), key=lambda r: (r.name, r.seed))


def _runs(delta_dirs: list[str]) -> list:
    """The run of each finetune output, and WiSE-FT's (full fine-tuning's delta at its chosen alpha) where chosen."""
    from saft.steps.configs import DeltaRun
    from saft.steps.wiseft import read_wiseft

    runs = []
    for folder in delta_dirs:
        record = json.loads((Path(folder) / FINETUNE_FILE).read_text())
        run = DeltaRun(record["config"]["method"], str(Path(folder) / FINETUNE.delta), record["config"]["seed"])
        runs.append(run)
        chosen = read_wiseft(folder) if run.name == "full" else None
        if chosen is not None:
            runs.append(DeltaRun("wiseft", run.path, run.seed, float(chosen["chosen_alpha"])))
    return runs
