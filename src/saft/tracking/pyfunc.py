"""The served model as an MLflow pyfunc: a sparse delta, a stored head and a base reference.

The logged model folder holds no checkpoint:

* ``artifacts/delta.safetensors``  the trained entries (KB to a few MB)
* ``artifacts/head.safetensors``   the zero-shot classifier of the served classes (float16)
* ``artifacts/model_ref.json``     base spec, fingerprint and stored copy, alpha, classes, templates
* ``wheels/saft-*.whl`` + ``constraints.txt``  what its environment installs: the project
  without the embedded world's checkpoint and the ``serve`` extra's exact pins
  (``saft.serving.wheel``)

It is logged as an MLflow 3 logged model of the register run (:func:`log_delta_model`).

``load_context`` builds the classifier with ``saft.serving.bundle.load_classifier``: the base
comes from its stored copy (never a hub unless nothing else has it and the spec is a hub
tag), its fingerprint is checked, ``alpha * delta`` is merged, the head is read, and the
text tower is freed. Where and how it runs: the loader's ``model_config`` (``device``,
``precision``; ``saft serve`` passes its flags), else ``SAFT_SERVE_DEVICE`` (default: CUDA
when visible) and ``SAFT_SERVE_PRECISION`` (``auto``: bf16 on CUDA); a device that is not
usable here is refused with the reason.

``predict`` takes a DataFrame with one of two columns per row, ``image`` (base64 image
bytes) or ``url`` (fetched only where ``SAFT_SERVE_ALLOW_URLS`` and an allow-list permit,
see ``saft.serving.fetch``), and the parameter ``top_k`` (default 5); it returns
``label`` and ``probability`` (top-1) and ``labels`` and ``probabilities`` (the top k, most
probable first). Bad input raises an ``MlflowException`` with ``INVALID_PARAMETER_VALUE``,
which ``mlflow models serve`` answers with a 400. ``saft serve`` (``saft.serving.server``)
serves the same model with the request limits and dynamic batching a production
endpoint needs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from saft.data.storage import sha256_file  # noqa: F401  (the register step hashes deltas with it)
from saft.layout import MODEL
from saft.progress import quiet_logger
from saft.serving.bundle import (HEAD_FILE, MODEL_REF_FILE, MODEL_REF_FORMAT,  # noqa: F401
                                 model_reference)
from saft.serving.protocol import example_image_b64

DELTA_ARTIFACT = MODEL.delta
MODEL_ARTIFACT_PATH = "model"
IMAGE_COLUMN = "image"
URL_COLUMN = "url"
TOP_K_PARAM = "top_k"
INPUT_COLUMNS = (IMAGE_COLUMN, URL_COLUMN)


DEVICE_ENV, PRECISION_ENV = "SAFT_SERVE_DEVICE", "SAFT_SERVE_PRECISION"
# Logged with the model so that MLflow passes a loader's model_config through (it drops keys a
# model was not logged with); "auto" defers to the environment, then to the default.
DEFAULT_MODEL_CONFIG = {"device": "auto", "precision": "auto"}


def _setting(settings: dict, key: str, env: str) -> tuple[str | None, str]:
    """``(value, where it came from)``: model_config unless ``auto``, else the environment variable."""
    value = settings.get(key)
    if value and value != "auto":
        return str(value), f"model_config {key}"
    return os.environ.get(env) or None, env


def _invalid(message: str):
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(message)


def _image_inputs(frame: pd.DataFrame, limits) -> list:
    """One ``ImageInput`` per row; every problem names the row and column."""
    from saft.serving.protocol import ImageInput, decode_b64

    extra = [c for c in frame.columns if c not in INPUT_COLUMNS]
    if extra:
        raise _invalid(f"unknown column(s) {extra}: send images in column {IMAGE_COLUMN!r} (base64) "
                       f"or {URL_COLUMN!r}")
    if len(frame) > limits.max_instances:
        raise _invalid(f"{len(frame)} rows, more than the limit of {limits.max_instances} per request")
    items = []
    for row in range(len(frame)):
        values = {c: frame[c].iloc[row] for c in INPUT_COLUMNS if c in frame.columns}
        given = {c: v for c, v in values.items() if isinstance(v, str) and v}
        if len(given) != 1:
            raise _invalid(f"row {row}: give exactly one of {IMAGE_COLUMN!r} (base64 image bytes) or {URL_COLUMN!r}")
        column, value = next(iter(given.items()))
        if column == IMAGE_COLUMN:
            items.append(ImageInput(row, data=decode_b64(value, f"row {row}: column {IMAGE_COLUMN!r}", limits)))
        else:
            items.append(ImageInput(row, url=value))
    return items


class SaftDeltaModel(mlflow.pyfunc.PythonModel):
    """Base model + alpha * sparse delta, classifying images over fixed classes with a stored head."""

    def load_context(self, context) -> None:
        from saft.serving.bundle import load_classifier, read_reference
        from saft.serving.fetch import policy_from_env
        from saft.serving.predictor import ImagePool, serving_device
        from saft.serving.protocol import Limits

        settings = getattr(context, "model_config", None) or {}  # what `saft serve` passes
        self.ref = read_reference(context.artifacts["model_ref"])
        device = serving_device(*_setting(settings, "device", DEVICE_ENV))
        precision = _setting(settings, "precision", PRECISION_ENV)[0] or "auto"
        self.classifier = load_classifier(self.ref, context.artifacts["delta"], context.artifacts.get("head"),
                                          device=device, precision=precision)
        self.limits = Limits()
        self.pool = ImagePool(self.classifier.prepare, self.limits, policy_from_env())
        self.classes = self.classifier.classes

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from saft.serving.protocol import RequestError, check_top_k, default_top_k

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        n = self.classifier.n_classes
        try:
            k = check_top_k((params or {}).get(TOP_K_PARAM, default_top_k(n)), n, TOP_K_PARAM)
            items = _image_inputs(frame, self.limits)
            rows = []
            for start in range(0, len(items), 64):
                pixels = self.pool.tensors(items[start:start + 64])
                rows += self.classifier.top_k(self.classifier.probabilities(pixels), k)
        except RequestError as exc:
            raise _invalid(str(exc)) from None
        return pd.DataFrame({
            "label": [r["labels"][0] for r in rows],
            "probability": [r["probabilities"][0] for r in rows],
            "labels": [r["labels"] for r in rows],
            "probabilities": [r["probabilities"] for r in rows],
        })


def signature():
    """Outputs and the ``top_k`` parameter; no input schema, on purpose.

    With an input schema MLflow drops columns it does not know before ``predict`` sees
    them (a misspelt ``imgae`` column would answer an empty result); without one,
    ``predict`` checks the columns itself and names the unknown one in a 400.
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=None,
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "probability"),
                        ColSpec(Array("string"), "labels"), ColSpec(Array("double"), "probabilities")]),
        params=ParamSchema([ParamSpec(TOP_K_PARAM, "long", 5)]),
    )


def save_pyfunc_model(path: str | Path, delta_path: str | Path, reference: dict,
                      head_path: str | Path | None = None, *, mlflow_model=None) -> Path:
    """Write the MLflow model folder at ``path``: MLmodel, the artifacts, the wheel and its pins.

    The environment is the serving one (``saft.serving.wheel``): the project's wheel
    without the embedded world's checkpoint, requiring only the ``serve`` extra, and the
    exact pins of that closure. ``mlflow_model`` is the ``mlflow.models.Model`` of a logged
    model (its id and artifact location), when the folder is logged as one.
    """
    import json

    from saft.serving.wheel import WHEELS_DIR, build_serving_wheel, mlflow_requirement, serving_closure

    path = Path(path)
    # quiet: MLflow's advice to log models as code does not apply to this importable class
    with tempfile.TemporaryDirectory(prefix="saft-model-ref-") as tmp, quiet_logger("mlflow.pyfunc"), \
            quiet_logger("mlflow.utils.environment"):
        ref_file = Path(tmp) / MODEL_REF_FILE
        ref_file.write_text(json.dumps(reference, indent=2, sort_keys=True) + "\n")
        wheel = build_serving_wheel(Path(tmp) / WHEELS_DIR)
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text("\n".join(serving_closure()) + "\n")
        artifacts = {"delta": str(delta_path), "model_ref": str(ref_file)}
        if head_path is not None:
            artifacts["head"] = str(head_path)
        mlflow.pyfunc.save_model(
            str(path),
            python_model=SaftDeltaModel(),
            artifacts=artifacts,
            signature=signature(),
            model_config=DEFAULT_MODEL_CONFIG,
            input_example=(pd.DataFrame({IMAGE_COLUMN: [example_image_b64()]}), {TOP_K_PARAM: 1}),
            # MLflow would add the full `mlflow` (a tracking server's stack); the client is what serving needs
            pip_requirements=[mlflow_requirement(), f"{WHEELS_DIR}/{wheel.name}", f"-c {constraints}"],
            mlflow_model=mlflow_model,
            metadata={"saft.base_model": reference["base_model"], "saft.method": reference["method"],
                      "saft.model_ref_format": reference.get("format", MODEL_REF_FORMAT)},
        )
        (path / WHEELS_DIR).mkdir(exist_ok=True)
        shutil.copy2(wheel, path / WHEELS_DIR / wheel.name)
    return path


def log_delta_model(tracker, delta_path: str | Path, reference: dict, name: str = MODEL_ARTIFACT_PATH,
                    head_path: str | Path | None = None, *, tags: dict[str, str] | None = None,
                    metrics: dict[str, float] | None = None):
    """Log the pyfunc model as an MLflow 3 logged model named ``name`` of the tracker's run; the ``LoggedModel``.

    What ``mlflow.pyfunc.log_model(name=...)`` does, through the tracker's client instead
    of MLflow's process-global active run: the logged model is created in the run's
    experiment with the run as its source, recorded as the run's output, the folder is
    uploaded to the model's own artifact location and the model finalized ``READY``;
    ``metrics`` are logged on the run linked to the model (the Models view shows them).
    A failure half-way marks the logged model ``FAILED``.
    """
    import time

    from mlflow.entities import LoggedModelOutput, Metric
    from mlflow.models import Model

    from saft.tracking.config import tracking_call

    client, config = tracker.client, tracker.config
    with tracking_call(config, f"creating the logged model {name!r} of run {tracker.run_id}"):
        model = client.create_logged_model(tracker.experiment_id, name=name, source_run_id=tracker.run_id,
                                           tags=dict(tags or {}), model_type="saft-sparse-delta")
    try:
        with tracking_call(config, f"logging the model {model.model_id} of run {tracker.run_id}"):
            client.log_outputs(tracker.run_id, [LoggedModelOutput(model.model_id, step=0)])
            if metrics:
                now = int(time.time() * 1000)
                client.log_batch(tracker.run_id, metrics=[Metric(k, float(v), now, 0, model_id=model.model_id)
                                                          for k, v in metrics.items()])
        with tempfile.TemporaryDirectory(prefix="saft-model-") as tmp:
            spec = Model(artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=tracker.run_id,
                         model_id=model.model_id)
            local = save_pyfunc_model(Path(tmp) / name, delta_path, reference, head_path, mlflow_model=spec)
            with tracking_call(config, f"uploading the model {model.model_id} of run {tracker.run_id}"):
                client.log_model_artifacts(model.model_id, str(local))
        with tracking_call(config, f"finalizing the model {model.model_id}"):
            return client.finalize_logged_model(model.model_id, "READY")
    except BaseException:
        try:
            client.finalize_logged_model(model.model_id, "FAILED")
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass
        raise


def build_model_folder(folder: str | Path, *, base_model: str, classes, templates, delta_path: str | Path | None = None,
                       alpha: float = 1.0, method: str = "saft") -> Path:
    """A servable model without a registry: ``folder/model`` (the MLflow model) and ``folder/base``.

    The base weights are stored once in ``folder/base`` and referenced by path, the head is
    built here; benchmarks and tests serve ``folder/model`` with ``saft serve`` or
    ``mlflow models serve``. An empty delta serves the zero-shot base.
    """
    from dataclasses import replace

    from saft.models import load_model
    from saft.serving.bases import save_base_weights
    from saft.serving.bundle import build_head_file
    from saft.sparse import Delta, load_delta

    folder = Path(folder)
    base = load_model(base_model)
    if delta_path is None:
        delta_path = Delta({}, {}, base.fingerprint, {"method": method, "base_model": base_model}).save(
            folder / MODEL.delta)
    reference = model_reference(base_model=base_model, base_fingerprint=base.fingerprint, classes=classes,
                                templates=templates, alpha=alpha, method=method, delta_sha256=sha256_file(delta_path))
    base_ref = replace(save_base_weights(base, folder / "base", base_model), uri=str((folder / "base").resolve()))
    head = build_head_file(base, load_delta(delta_path), reference, folder / HEAD_FILE, progress=False)
    reference = {**reference, "base": base_ref.to_json(), "head": head}
    return save_pyfunc_model(folder / MODEL_ARTIFACT_PATH, delta_path, reference, folder / HEAD_FILE)
