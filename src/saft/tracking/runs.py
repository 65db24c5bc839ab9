"""MLflow runs for the pipeline: one parent run per pipeline run, one nested run per step.

Steps may run in different processes (Kubeflow pods, ``dvc repro`` stages), so nothing
here relies on MLflow's "active run": the parent run id is passed explicitly, and every
call goes through an ``MlflowClient`` to a named run. A nested run is an ordinary run
with the ``mlflow.parentRunId`` tag, which is all MLflow needs to draw the tree.

    parent = start_pipeline_run("synthshift", params)          # orchestrator
    with step_run("finetune", parent, params=cfg) as tracker:   # in each step's process
        ...; tracker.log_history(history)
    end_pipeline_run(parent)

With ``SAFT_TRACKING=off`` every function still works and returns sane values:
``start_pipeline_run`` returns ``TRACKING_OFF_RUN_ID`` and ``step_run`` yields a
tracker whose log calls do nothing but return what they would have logged.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from saft.tracking.config import (
    TrackingConfig,
    TrackingError,
    get_or_create_experiment,
    make_client,
    probe,
    redact,
    resolve_config,
    tracking_call,
    tracking_enabled,
)
from saft.tracking.naming import clean_name, flatten_params, metrics_from_document, numeric
from saft.tracking.provenance import provenance_tags
from saft.layout import EVAL

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "saft"
TRACKING_OFF_RUN_ID = "tracking-off"  # what start_pipeline_run returns when tracking is off
PARENT_TAG = "mlflow.parentRunId"
STEP_TAG = "saft.step"
PIPELINE_TAG = "saft.pipeline"
STATUSES = ("FINISHED", "FAILED", "KILLED")
_BATCH = 100  # params per log_batch call (MLflow's limit); metrics allow 1000
_METRIC_BATCH = 1000
_REPORT_FILES = (EVAL.report_html, EVAL.report_md)


class NullTracker:
    """The tracker of a step when tracking is off: same API, logs nothing."""

    enabled = False
    run_id: str | None = None
    experiment_id: str | None = None
    config: TrackingConfig | None = None

    def __init__(self, step: str = ""):
        self.step = step

    def log_params(self, params: Mapping[str, Any]) -> dict[str, str]:
        return flatten_params(params)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> dict[str, float]:
        return {clean_name(k): v for k, v in ((k, numeric(v)) for k, v in metrics.items()) if v is not None}

    def set_tags(self, tags: Mapping[str, Any]) -> dict[str, str]:
        return {str(k): str(v) for k, v in tags.items()}

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        return None

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        return None

    def log_history(self, history: Sequence[Mapping[str, Any]]) -> int:
        return sum(1 for _ in _history_metrics(history))

    def log_mask_stats(self, stats: Mapping[str, Any]) -> dict[str, float]:
        return _mask_metrics(stats)

    def log_metrics_document(self, doc: Mapping[str, Any]) -> dict[str, float]:
        return metrics_from_document(doc)

    def log_report(self, directory: str | Path) -> list[str]:
        return [p.name for p in _report_files(Path(directory))]


class StepTracker(NullTracker):
    """Logs into one MLflow run by id; used inside ``step_run``."""

    enabled = True

    def __init__(self, client, config: TrackingConfig, run_id: str, experiment_id: str, step: str):
        super().__init__(step)
        self.client, self.config, self.run_id, self.experiment_id = client, config, run_id, experiment_id

    @property
    def artifact_uri(self) -> str:
        with tracking_call(self.config, "reading the run's artifact location"):
            return self.client.get_run(self.run_id).info.artifact_uri

    def log_params(self, params: Mapping[str, Any]) -> dict[str, str]:
        from mlflow.entities import Param

        flat = flatten_params(params)
        items = [Param(k, v) for k, v in flat.items()]
        with tracking_call(self.config, f"logging params of run {self.run_id}"):
            for i in range(0, len(items), _BATCH):
                self.client.log_batch(self.run_id, params=items[i:i + _BATCH])
        return flat

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> dict[str, float]:
        values = NullTracker.log_metrics(self, metrics)
        self._log_metric_rows([(k, v, step or 0) for k, v in values.items()])
        return values

    def _log_metric_rows(self, rows: list[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, int(s)) for k, v, s in rows]
        with tracking_call(self.config, f"logging metrics of run {self.run_id}"):
            for i in range(0, len(items), _METRIC_BATCH):
                self.client.log_batch(self.run_id, metrics=items[i:i + _METRIC_BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> dict[str, str]:
        from mlflow.entities import RunTag

        values = NullTracker.set_tags(self, tags)
        with tracking_call(self.config, f"setting tags of run {self.run_id}"):
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in values.items()])
        return values

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"cannot log artifact {path}: no such file")
        with tracking_call(self.config, f"uploading {path.name} to run {self.run_id}"):
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"cannot log artifacts from {directory}: no such folder")
        with tracking_call(self.config, f"uploading {directory} to run {self.run_id}"):
            self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def _log_png(self, data: bytes | None, name: str, artifact_path: str) -> None:
        if data is None:
            return
        import tempfile

        with tempfile.TemporaryDirectory(prefix="saft-plot-") as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            self.log_artifact(path, artifact_path)

    def log_history(self, history: Sequence[Mapping[str, Any]]) -> int:
        """Per-step training metrics (``loss``, ``lr``, ...) and a loss-curve PNG."""
        from saft.tracking.plots import loss_curve_png

        rows = list(_history_metrics(history))
        self._log_metric_rows(rows)
        self._log_png(loss_curve_png(history), "loss_curve.png", "plots")
        return len(rows)

    def log_mask_stats(self, stats: Mapping[str, Any]) -> dict[str, float]:
        """Mask counts as metrics, a per-layer bar plot and the stats JSON."""
        from saft.tracking.plots import mask_counts_png

        metrics = self.log_metrics(_mask_metrics(stats))
        self._log_png(mask_counts_png(stats.get("per_block", {})), "mask_per_layer.png", "plots")
        with tracking_call(self.config, f"uploading mask statistics to run {self.run_id}"):
            self.client.log_dict(self.run_id, dict(stats), "mask/mask_stats.json")
        return metrics

    def log_metrics_document(self, doc: Mapping[str, Any]) -> dict[str, float]:
        """Per-dataset top-1 and ID/OOD aggregates as metrics, the document as an artifact."""
        metrics = self.log_metrics(metrics_from_document(doc))
        meta = doc.get("meta", {})
        tags = {f"saft.eval.{k}": v for k, v in meta.items() if k in ("suite", "model", "base_fingerprint")}
        if tags:
            self.set_tags(tags)
        with tracking_call(self.config, f"uploading the metrics document to run {self.run_id}"):
            self.client.log_dict(self.run_id, dict(doc), "metrics/metrics.json")
        return metrics

    def log_report(self, directory: str | Path) -> list[str]:
        """report.html, report.md and the report's PNGs under the artifact folder ``report``."""
        files = _report_files(Path(directory))
        for path in files:
            self.log_artifact(path, "report")
        return [p.name for p in files]


def _history_metrics(history: Sequence[Mapping[str, Any]]) -> Iterator[tuple[str, float, int]]:
    """(name, value, step) for every numeric field of every trainer history entry."""
    for i, entry in enumerate(history):
        step = entry.get("step", i + 1)
        for key, value in entry.items():
            if key == "step":
                continue
            v = numeric(value)
            if v is not None:
                yield f"train.{clean_name(key)}", v, int(step)


def _mask_metrics(stats: Mapping[str, Any]) -> dict[str, float]:
    metrics = {f"mask.{k}": float(stats[k]) for k in
               ("num_selected", "eligible", "density", "tensors_with_selection", "tensors_eligible") if k in stats}
    for block, row in stats.get("per_block", {}).items():
        metrics[f"mask.selected.{clean_name(block)}"] = float(row.get("selected", 0))
    return metrics


def _report_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise FileNotFoundError(f"report folder {directory} does not exist")
    files = [directory / n for n in _REPORT_FILES if (directory / n).is_file()]
    files += sorted(p for p in directory.glob("*.png") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{directory} holds no report (report.html, report.md or plots)")
    return files


def _connect() -> tuple[TrackingConfig, Any]:
    """The store, probed, and its client; runs an earlier outage left open are closed first."""
    from saft.tracking.pending import close_pending

    config = resolve_config()
    probe(config)
    client = make_client(config)
    close_pending(client, config.display)
    return config, client


def start_pipeline_run(name: str, params: Mapping[str, Any], tags: Mapping[str, Any] | None = None,
                       experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Create the parent run of one pipeline run; returns its id (pass it to every step)."""
    if not tracking_enabled():
        return TRACKING_OFF_RUN_ID
    config, client = _connect()
    with tracking_call(config, f"starting pipeline run {name!r}"):
        experiment_id = get_or_create_experiment(client, config, experiment)
        all_tags = {**provenance_tags(), PIPELINE_TAG: name, **{str(k): str(v) for k, v in (tags or {}).items()}}
        run = client.create_run(experiment_id, tags=all_tags, run_name=name)
    tracker = StepTracker(client, config, run.info.run_id, experiment_id, "pipeline")
    tracker.log_params(params)
    return run.info.run_id


def end_pipeline_run(run_id: str | None, status: str = "FINISHED") -> None:
    """Close the parent run with ``status`` (FINISHED, FAILED or KILLED), and its step runs left open.

    A step whose process died (killed pod, lost store) leaves its nested run RUNNING; by
    the time the pipeline ends no step of it runs, so those are closed FAILED here.
    """
    if status not in STATUSES:
        raise ValueError(f"run status must be one of {', '.join(STATUSES)}, got {status!r}")
    if not tracking_enabled() or not run_id or run_id == TRACKING_OFF_RUN_ID:
        return
    config, client = _connect()
    try:
        with tracking_call(config, f"ending pipeline run {run_id}"):
            close_orphans(client, run_id)
            client.set_terminated(run_id, status)
    except TrackingError as exc:
        _remember(config, run_id, status, exc)
        raise


def close_orphans(client, parent_run_id: str) -> list[str]:
    """Mark the nested runs of ``parent_run_id`` still RUNNING as FAILED; returns their ids."""
    experiment = client.get_run(parent_run_id).info.experiment_id
    found = client.search_runs([experiment], f"tags.`{PARENT_TAG}` = '{parent_run_id}' AND attributes.status = "
                                             "'RUNNING'", max_results=1000)
    for run in found:
        client.set_tag(run.info.run_id, "saft.error", "its step ended without closing the run (process killed, or "
                                                      "the tracking store unreachable); closed when the pipeline ended")
        client.set_terminated(run.info.run_id, "FAILED")
    return [r.info.run_id for r in found]


def _remember(config: TrackingConfig, run_id: str, status: str, error: BaseException) -> None:
    from saft.tracking.pending import remember

    remember(config.display, run_id, status, redact(f"{type(error).__name__}: {error}"))


@contextlib.contextmanager
def pipeline_run(name: str, params: Mapping[str, Any], tags: Mapping[str, Any] | None = None,
                 experiment: str = DEFAULT_EXPERIMENT) -> Iterator[str]:
    """``start_pipeline_run`` ... ``end_pipeline_run`` for a pipeline that runs in one process."""
    run_id = start_pipeline_run(name, params, tags, experiment)
    try:
        yield run_id
    except BaseException as exc:
        _terminate_quietly(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED", error=exc)
        raise
    end_pipeline_run(run_id)


def _terminate_quietly(run_id: str, status: str, client=None, error: BaseException | None = None,
                       config: TrackingConfig | None = None) -> None:
    """Best effort on the failure path: the original error matters more than the status.

    When the store does not answer, the run goes to the journal of unclosed runs
    (``pending.py``) and is closed by the next tracking call that reaches the store.
    """
    if not tracking_enabled() or run_id == TRACKING_OFF_RUN_ID:
        return
    message = redact(f"{type(error).__name__}: {error}" if error is not None else f"ended {status}")[:4000]
    try:
        if isinstance(error, TrackingError) and config is not None:
            probe(config)  # a store that just failed: a few seconds, not another full retry budget
        if client is None:
            config, client = _connect()
        if error is not None:
            client.set_tag(run_id, "saft.error", message)
        client.set_terminated(run_id, status)
    except Exception as exc:  # noqa: BLE001 - the step's own exception is re-raised by the caller
        log.warning("could not mark run %s as %s: %s", run_id, status, redact(str(exc))[:500])
        _remember(config or resolve_config(), run_id, status, error or exc)


@contextlib.contextmanager
def step_run(step: str, parent_run_id: str | None, params: Mapping[str, Any] | None = None, *,
             tags: Mapping[str, Any] | None = None, experiment: str = DEFAULT_EXPERIMENT) -> Iterator[NullTracker]:
    """A run for one step, nested under ``parent_run_id`` (a standalone run when None).

    The run ends FINISHED when the block completes, FAILED when it raises (KILLED on
    Ctrl-C), with the error in the ``saft.error`` tag. ``experiment`` is used only for
    standalone runs; nested runs live in their parent's experiment.
    """
    if not tracking_enabled():
        yield NullTracker(step)
        return
    if parent_run_id == TRACKING_OFF_RUN_ID:
        log.warning("parent run id %r comes from a run with tracking off: logging step %r as a standalone run",
                    parent_run_id, step)
        parent_run_id = None
    config, client = _connect()
    with tracking_call(config, f"starting the run of step {step!r}"):
        if parent_run_id:
            from mlflow.exceptions import MlflowException

            try:
                experiment_id = client.get_run(parent_run_id).info.experiment_id
            except MlflowException as exc:
                raise TrackingError(f"parent run {parent_run_id!r} does not exist on {config.display} "
                                    f"({exc.error_code}); pass the id start_pipeline_run returned") from None
        else:
            experiment_id = get_or_create_experiment(client, config, experiment)
        all_tags = {**provenance_tags(), STEP_TAG: step, **{str(k): str(v) for k, v in (tags or {}).items()}}
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        run = client.create_run(experiment_id, tags=all_tags, run_name=step)
    tracker = StepTracker(client, config, run.info.run_id, experiment_id, step)
    try:
        if params:
            tracker.log_params(params)
        yield tracker
    except BaseException as exc:
        _terminate_quietly(tracker.run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED",
                           client, exc, config)
        raise
    try:
        with tracking_call(config, f"ending the run of step {step!r}"):
            client.set_terminated(tracker.run_id, "FINISHED")
    except TrackingError as exc:
        _remember(config, tracker.run_id, "FAILED", exc)
        raise
