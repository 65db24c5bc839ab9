"""Registering a candidate delta as a version of a registered model, exactly once.

A candidate is identified by ``saft.candidate_key``: the sha256 of the delta file's
bytes, the canonical JSON of its metrics document, the method and alpha. Before anything
is logged, the registered model's versions are searched for that key; a re-run after a
crash, a retried pipeline step, or a second process registering the same candidate at
the same moment reuses the version instead of adding a duplicate.
The key is part of ``create_model_version``'s own tags, so a version never exists
without it.

The version's source is an MLflow 3 logged model of the register step's run (the pyfunc
model: delta, the head built here once, and the base reference, see ``pyfunc.py``); its
tags carry what the gate and a reader need. Finding a version by tag is the store's own
``tags.`` filter. Registration and the promotion gate run under a lease held in the
registry (``lease.py``), so concurrent pipeline runs register a candidate once and a
base once.

Base weights are registered once per fingerprint, as versions of the registered model
``saft-bases`` (tag ``saft.base_fingerprint``; source: ``base/weights.safetensors`` in the
run that first needed it). A delta's model references its base as ``models:/saft-bases/N``,
so a cluster without a model hub serves it from the registry alone.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saft.tracking.config import tracking_call, use_store
from saft.tracking.promotion import (FINGERPRINT_TAG, HM_TAG, ID_TAG, OOD_TAG, SUITE_TAG, ZS_HM_TAG, ZS_ID_TAG,
                                    ZS_OOD_TAG)

KEY_TAG = "saft.candidate_key"
METHOD_TAG = "saft.method"
ALPHA_TAG = "saft.alpha"
BASE_MODEL_TAG = "saft.base_model"
DELTA_SHA_TAG = "saft.delta_sha256"
DELTA_BYTES_TAG = "saft.delta_bytes"
BASE_URI_TAG = "saft.base_uri"
BASE_SPEC_TAG = "saft.base_spec"
BASE_SHA_TAG = "saft.base_sha256"
BASE_BYTES_TAG = "saft.base_bytes"
KIND_TAG = "saft.kind"
BASES_MODEL = "saft-bases"
BASE_ARTIFACT = "base"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")


def check_model_name(name: str) -> str:
    """Registered model names are kept to ``[A-Za-z0-9._-]`` so search filters need no escaping."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"registered model name {name!r}: use letters, digits, '.', '_' and '-' "
                         "(e.g. saft-tiny), starting with a letter or digit")
    return name


def candidate_key(delta_path: str | Path, metrics_doc: dict, *, method: str, alpha: float) -> str:
    digest = hashlib.sha256()
    with open(delta_path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    digest.update(b"\0metrics\0")
    digest.update(json.dumps(metrics_doc, sort_keys=True, separators=(",", ":")).encode())
    digest.update(f"\0{method}\0{float(alpha)!r}".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class CandidateInfo:
    """What a version's tags record about the candidate it holds.

    The scores a suite does not define stay None and get no tag: an ID/OOD suite has no
    HM, a base-to-new suite no ID or OOD mean.
    """

    method: str
    alpha: float
    suite: str
    base_model: str
    base_fingerprint: str
    delta_sha256: str
    delta_bytes: int
    id: float | None = None
    ood_mean: float | None = None
    zeroshot_id: float | None = None
    zeroshot_ood_mean: float | None = None
    hm: float | None = None
    zeroshot_hm: float | None = None

    def tags(self, key: str) -> dict[str, str]:
        tags = {KEY_TAG: key, METHOD_TAG: self.method, ALPHA_TAG: repr(float(self.alpha)), SUITE_TAG: self.suite,
                BASE_MODEL_TAG: self.base_model, FINGERPRINT_TAG: self.base_fingerprint,
                DELTA_SHA_TAG: self.delta_sha256, DELTA_BYTES_TAG: str(self.delta_bytes)}
        scores = {ID_TAG: self.id, OOD_TAG: self.ood_mean, ZS_ID_TAG: self.zeroshot_id,
                  ZS_OOD_TAG: self.zeroshot_ood_mean, HM_TAG: self.hm, ZS_HM_TAG: self.zeroshot_hm}
        tags.update({tag: repr(float(v)) for tag, v in scores.items() if v is not None})
        return tags

    def describe(self) -> str:
        parts = [f"{label} {100 * v:.2f}" for label, v in (("ID", self.id), ("OOD mean", self.ood_mean),
                                                            ("HM", self.hm)) if v is not None]
        return ", ".join(parts) or "no scores"


_FILTER_VALUE = re.compile(r"^[A-Za-z0-9._:+-]{1,500}$")


def find_version_by_tag(client, model_name: str, tag: str, value: str):
    """The lowest version of ``model_name`` whose tag ``tag`` is ``value``, or None (also when the model is absent).

    The store filters (``tags.`KEY` = 'VALUE'``), so a model with thousands of versions
    costs one small answer, not a client-side walk through every version.
    """
    from mlflow.exceptions import MlflowException

    check_model_name(model_name)
    if not _FILTER_VALUE.match(str(value)):
        raise ValueError(f"tag value {value!r} cannot be searched for: expected letters, digits and ._:+-")
    query = f"name = '{model_name}' AND tags.`{tag}` = '{value}'"
    try:
        found = list(client.search_model_versions(query, max_results=50))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return min(found, key=lambda mv: int(mv.version)) if found else None


def find_version(client, model_name: str, key: str):
    """The version of ``model_name`` tagged with candidate ``key``, or None."""
    return find_version_by_tag(client, model_name, KEY_TAG, key)


def ensure_registered_model(client, model_name: str, *, kind: str = "sparse-delta", description: str | None = None) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(model_name)
        return
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        client.create_registered_model(
            model_name, tags={KIND_TAG: kind},
            description=description or "SAFT sparse deltas over a fixed base model; the champion alias is moved by "
                                       "the promotion gate (see saft.promotion.* version tags).")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # another process registered it first
            raise


def _lease(tracker, model_name: str, purpose: str):
    from saft.tracking.lease import RegistryLease

    return RegistryLease(tracker.client, model_name, purpose, where=tracker.config.where)


def _base_ref(mv, base, model_spec: str, bases_model: str):
    from saft.serving.bases import BaseRef

    tags = mv.tags or {}
    return BaseRef(base.fingerprint, tags.get(BASE_SPEC_TAG, model_spec), tags.get(BASE_MODEL_TAG, model_spec),
                   f"models:/{bases_model}/{mv.version}", tags.get(BASE_SHA_TAG),
                   int(tags[BASE_BYTES_TAG]) if tags.get(BASE_BYTES_TAG, "").isdigit() else None)


def store_base(tracker, base, model_spec: str, bases_model: str = BASES_MODEL):
    """The stored copy of ``base`` (a ``LoadedModel`` of ``model_spec``) in the registry, written on first use; a ``BaseRef``.

    One version of ``bases_model`` per fingerprint, also when processes race: the weights
    are uploaded outside the lease (they may be GB), the version is created under it
    after a second look. A process that lost the race keeps its upload in its own run,
    unregistered, and uses the winner's version.
    """
    import tempfile

    from saft.serving.bases import save_base_weights

    client, config = tracker.client, tracker.config
    what = f"base {base.fingerprint[:12]} in {bases_model}"
    with tracking_call(config, f"searching {bases_model} for base {base.fingerprint[:12]}"):
        existing = find_version_by_tag(client, bases_model, FINGERPRINT_TAG, base.fingerprint)
    if existing is not None:
        return _base_ref(existing, base, model_spec, bases_model)
    with tempfile.TemporaryDirectory(prefix="saft-base-") as tmp:
        ref = save_base_weights(base, Path(tmp) / BASE_ARTIFACT, model_spec)
        tracker.log_artifacts(Path(tmp) / BASE_ARTIFACT, BASE_ARTIFACT)
    source = f"{tracker.artifact_uri.rstrip('/')}/{BASE_ARTIFACT}"
    with tracking_call(config, f"registering {what}"), _lease(tracker, bases_model, f"registration of {what}") as lease:
        existing = find_version_by_tag(client, bases_model, FINGERPRINT_TAG, base.fingerprint)
        if existing is not None:
            return _base_ref(existing, base, model_spec, bases_model)
        ensure_registered_model(client, bases_model, kind="base-weights",
                                description="Base model weights stored once per fingerprint (tag "
                                            "saft.base_fingerprint); served deltas reference them.")
        lease.check()
        mv = client.create_model_version(
            bases_model, source, run_id=tracker.run_id, await_creation_for=0,  # stored already: no wait, no log line
            tags={FINGERPRINT_TAG: base.fingerprint, BASE_SPEC_TAG: ref.spec, BASE_MODEL_TAG: ref.model,
                  BASE_SHA_TAG: ref.sha256, BASE_BYTES_TAG: str(ref.bytes)},
            description=f"weights of {ref.model} ({ref.bytes / 2**20:.1f} MiB), rebuilt with spec {ref.spec}")
    return _base_ref(mv, base, model_spec, bases_model)


def _serving_files(tracker, reference: dict, delta_path, base, folder: Path) -> tuple[dict, Path]:
    """Store the base, build the head; the completed reference and the head file."""
    from saft.models import load_model
    from saft.serving.bundle import HEAD_FILE, build_head_file
    from saft.sparse import load_delta

    loaded = base or load_model(reference["base_model"])
    if loaded.fingerprint != reference["base_fingerprint"]:
        raise ValueError(f"base model {reference['base_model']} has fingerprint {loaded.fingerprint[:12]}..., the "
                         f"delta was trained on {reference['base_fingerprint'][:12]}...: register it with its own base")
    base_ref = store_base(tracker, loaded, reference["base_model"])
    head = build_head_file(loaded, load_delta(delta_path), reference, folder / HEAD_FILE)
    return {**reference, "base": base_ref.to_json(), "head": head}, folder / HEAD_FILE


def register_delta(tracker, *, model_name: str, delta_path: str | Path, reference: dict, info: CandidateInfo,
                   key: str, artifact_path: str | None = None, extra_tags: dict[str, str] | None = None,
                   description: str | None = None, base=None) -> tuple[Any, bool]:
    """Log the pyfunc model as an MLflow logged model of ``tracker``'s run and register it; ``(version, created)``.

    The logged model is named ``artifact_path`` (default ``model``), linked to the run
    and to the candidate's metrics (MLflow 3's Models view), and registered as a version
    whose ``model_id`` is that logged model. When a version with ``key`` exists, nothing
    is logged and ``created`` is False. Otherwise the base is stored in the registry (once
    per fingerprint) and the head is built from ``base`` (a ``LoadedModel`` of
    ``reference["base_model"]``, loaded here when not given) merged with the delta.

    Exactly once under concurrency: the model is logged outside the lease, then, under
    the lease on ``model_name``, the key is looked up again and the version created only
    if still absent; the losing process deletes its logged model and returns the winner's
    version (``created`` False).
    """
    import tempfile

    from saft.tracking.pyfunc import MODEL_ARTIFACT_PATH, log_delta_model

    check_model_name(model_name)
    client, config = tracker.client, tracker.config
    with tracking_call(config, f"searching {model_name} for candidate {key[:12]}"):
        existing = find_version(client, model_name, key)
    if existing is not None:
        return existing, False
    tags = {**info.tags(key), **(extra_tags or {})}
    scores = {name: v for name, v in (("id", info.id), ("ood_mean", info.ood_mean), ("hm", info.hm),
                                      ("zeroshot.id", info.zeroshot_id), ("zeroshot.ood_mean", info.zeroshot_ood_mean),
                                      ("zeroshot.hm", info.zeroshot_hm)) if v is not None}
    with tempfile.TemporaryDirectory(prefix="saft-serving-") as tmp:
        reference, head = _serving_files(tracker, reference, delta_path, base, Path(tmp))
        model = log_delta_model(tracker, delta_path, reference, artifact_path or MODEL_ARTIFACT_PATH, head,
                                tags=tags, metrics=scores)
    what = description or f"{info.method} delta (alpha {info.alpha:g})"
    with tracking_call(config, f"registering a version of {model_name}"), \
            _lease(tracker, model_name, f"registration of candidate {key[:12]}") as lease:
        existing = find_version(client, model_name, key)
        if existing is None:
            ensure_registered_model(client, model_name)
            lease.check()
            # models:/<id> is how MLflow links a version to its logged model; a local store resolves it
            # through MLflow's global URI, pinned here to this store
            with use_store(config):
                mv = client.create_model_version(
                    model_name, f"models:/{model.model_id}", run_id=tracker.run_id, model_id=model.model_id,
                    await_creation_for=0,
                    tags={**tags, BASE_URI_TAG: reference["base"]["uri"]},
                    description=f"{what} on {info.base_model}, suite {info.suite}: {info.describe()}")
            return mv, True
    with tracking_call(config, f"deleting the duplicate logged model {model.model_id}"):
        client.delete_logged_model(model.model_id)  # another process registered this candidate meanwhile
    return existing, False


def check_model_uri(model_uri: str) -> str | None:
    """The version a ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` URI names on the resolved store.

    Other URIs (a folder, ``runs:/``, a logged model ``models:/m-...``) give None. A name,
    alias or version the store does not have is a ``TrackingError`` naming the store that
    was searched and how to point at another one.
    """
    from mlflow.exceptions import MlflowException

    from saft.tracking.config import URI_ENV, TrackingError, make_client, probe, resolve_config

    if not model_uri.startswith("models:/"):
        return None
    rest = model_uri[len("models:/"):].strip("/")
    name, alias = rest.split("@", 1) if "@" in rest else (rest.split("/", 1)[0], None)
    version = None if alias else (rest.split("/", 1)[1] if "/" in rest else None)
    if alias is None and version is None:
        return None  # models:/<model id>, a logged model
    config = resolve_config()
    probe(config)
    client = make_client(config)
    hint = (f"register one with `saft register` (`make demo` registers saft-tiny), run from the folder whose mlruns/ "
            f"holds it, or set {URI_ENV} to the store that does" if config.is_default else
            f"check the name, or set {URI_ENV} to the store that holds it")
    with tracking_call(config, f"resolving {model_uri}"):
        try:
            client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise TrackingError(f"registered model {name!r} not found on {config.where}: {hint}") from None
        try:
            mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                raise
            what = f"alias {alias!r}" if alias else f"version {version}"
            raise TrackingError(f"registered model {name!r} has no {what} on {config.where} (promote a version, or "
                                f"name one: models:/{name}/N)") from None
    return str(mv.version)
