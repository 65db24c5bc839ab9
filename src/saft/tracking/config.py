"""Where tracking goes, whether it is on, and a fast check that the store answers.

* ``MLFLOW_TRACKING_URI`` names the store (an ``http(s)://`` tracking server, a database
  URI, ...). When it is unset, runs go to a SQLite store in the working directory,
  ``sqlite:///<cwd>/mlruns/mlflow.db``, with artifacts under ``<cwd>/mlruns/artifacts``.
* ``SAFT_TRACKING=off`` turns tracking off: trackers become no-ops (see ``runs.py``).

A tracking server that does not answer must stop a pipeline with a message that says
which URI was tried and what to do; MLflow's own client would retry for minutes first,
so every entry point probes ``<uri>/health`` with a short timeout before it logs.
"""

from __future__ import annotations

import contextlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

TRACKING_ENV = "SAFT_TRACKING"
URI_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_DIR = "mlruns"
DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "artifacts"
PROBE_TIMEOUT_S = 3.0
_OFF = {"off", "0", "false", "no", "disabled"}


class TrackingError(RuntimeError):
    """A tracking or registry call failed; the message names the store and the remedy."""


class TrackingUnavailable(TrackingError):
    """The tracking store cannot be reached."""


def tracking_enabled() -> bool:
    value = os.environ.get(TRACKING_ENV, "on").strip().lower()
    return value not in _OFF


@dataclass(frozen=True)
class TrackingConfig:
    uri: str
    artifact_location: str | None  # for experiments we create; None lets the server decide
    is_default: bool  # the local SQLite store chosen because MLFLOW_TRACKING_URI is unset

    @property
    def is_http(self) -> bool:
        return self.uri.startswith(("http://", "https://"))


def default_store(cwd: str | Path | None = None) -> TrackingConfig:
    root = Path(cwd or Path.cwd()).resolve() / DEFAULT_DIR
    return TrackingConfig(f"sqlite:///{root / DEFAULT_DB}", (root / DEFAULT_ARTIFACTS).as_uri(), True)


def resolve_config() -> TrackingConfig:
    uri = os.environ.get(URI_ENV, "").strip()
    if not uri:
        return default_store()
    return TrackingConfig(uri, None, False)


def probe(config: TrackingConfig, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise ``TrackingUnavailable`` unless the store can be used right now."""
    if config.is_default:
        db = Path(config.uri.removeprefix("sqlite:///"))
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingUnavailable(
                f"cannot create the local MLflow store {config.uri} ({exc}); run from a writable folder, "
                f"set {URI_ENV} to a tracking server, or set {TRACKING_ENV}=off to run without tracking"
            ) from None
        return
    if not config.is_http:
        return  # database and file stores fail on first use with their own clear errors
    url = config.uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # the server answered (a proxy may guard /health): it is up
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingUnavailable(
            f"the MLflow tracking server {config.uri} is not reachable ({reason}). Start it, point "
            f"{URI_ENV} at a running server, or set {TRACKING_ENV}=off to run without tracking "
            "(nothing is then logged or registered)"
        ) from None


@contextlib.contextmanager
def tracking_call(config: TrackingConfig, what: str) -> Iterator[None]:
    """Turn any store failure into a TrackingError naming the store: metrics are never dropped."""
    try:
        yield
    except TrackingError:
        raise
    except Exception as exc:  # MlflowException, requests errors, boto errors behind the server
        raise TrackingError(f"{what} failed on the MLflow store {config.uri}: {type(exc).__name__}: "
                            f"{str(exc)[:800]}") from exc


def make_client(config: TrackingConfig):
    """An ``MlflowClient`` bound to ``config`` (no reliance on process-global MLflow state)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=config.uri)


def get_or_create_experiment(client, config: TrackingConfig, name: str) -> str:
    """The id of experiment ``name``, created if missing (safe when processes race)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise TrackingError(f"experiment {name!r} is deleted on {config.uri}; restore it or choose another name")
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=config.artifact_location)
    except MlflowException:
        found = client.get_experiment_by_name(name)  # another process created it first
        if found is None:
            raise
        return found.experiment_id
