"""Where tracking goes, whether it is on, and a fast check that the store answers.

One resolution, shared by every command (``run``, ``register``, ``serve``, ``deploy``,
``pipeline run/submit`` and the Kubeflow tasks):

* ``MLFLOW_TRACKING_URI`` names the store (an ``http(s)://`` tracking server, a database
  URI, ...). When it is unset, the store is SQLite in the working directory,
  ``sqlite:///<cwd>/mlruns/mlflow.db``. A local SQLite store keeps the artifacts of the
  experiments we create next to its database (``<folder>/artifacts``), whatever the
  working directory of a later reader.
* ``use_store()`` (the CLI's entry) writes the resolved URI into ``MLFLOW_TRACKING_URI``
  for the command's lifetime, so MLflow's own global lookups (``models:/`` URIs in
  ``saft serve``) and every child process (kfp.local tasks, torchrun workers) use the same
  store, not MLflow's default.
* ``SAFT_TRACKING=off`` turns tracking off: trackers become no-ops (see ``runs.py``).

Credentials: basic auth in the URI (``http://user:secret@host``) or
``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (or ``MLFLOW_TRACKING_TOKEN``) are
passed to the server and never shown: every message and every recorded URI goes through
:func:`redact`, and ``TrackingConfig.display`` is the URI without its secrets.

A tracking server that does not answer must stop a pipeline with a message that says
which URI was tried and what to do; MLflow's own client would retry for minutes first,
so every entry point probes ``<uri>/health`` with a short timeout before it logs, and
the client's retries are bounded (``SAFT_TRACKING_RETRY_S``, see :func:`http_bounds`).
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from saft.io import shorten

TRACKING_ENV = "SAFT_TRACKING"
URI_ENV = "MLFLOW_TRACKING_URI"
USER_ENV, PASSWORD_ENV, TOKEN_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"
RETRY_ENV = "SAFT_TRACKING_RETRY_S"
REQUEST_TIMEOUT_ENV = "SAFT_TRACKING_REQUEST_TIMEOUT_S"
DEFAULT_RETRY_S = 60.0  # how long a call keeps retrying a store that is down before the step fails
DEFAULT_REQUEST_TIMEOUT_S = 60.0  # one request's wait for an answer (artifact uploads included)
DEFAULT_MARK_ENV = "SAFT_TRACKING_DEFAULT_URI"  # set by use_store: the exported URI is the default store
DEFAULT_DIR = "mlruns"
DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "artifacts"
PROBE_TIMEOUT_S = 3.0
REDACTED = "***"
_OFF = {"off", "0", "false", "no", "disabled"}
_UNANSWERED = ("Max retries exceeded", "Connection refused", "timed out", "Connection aborted", "RemoteDisconnected",
               "too many 5", "NewConnectionError")
_SECRET_QUERY = re.compile(r"(?i)([?&](?:password|passwd|pwd|secret|token|api_?key|access_?key|sig|signature|credential)"
                           r"[^=&#\s]*=)[^&#\s]+")
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^/@\s:]*):([^/@\s]*)@")


class TrackingError(RuntimeError):
    """A tracking or registry call failed; the message names the store and the remedy."""


class TrackingUnavailable(TrackingError):
    """The tracking store cannot be reached."""


def tracking_enabled() -> bool:
    value = os.environ.get(TRACKING_ENV, "on").strip().lower()
    return value not in _OFF


# --------------------------------------------------------------------------- secrets


def _secrets() -> list[str]:
    """The secret strings this process knows of: the URI's password, the password and token variables."""
    found = [os.environ.get(PASSWORD_ENV, ""), os.environ.get(TOKEN_ENV, "")]
    uri = os.environ.get(URI_ENV, "")
    with contextlib.suppress(ValueError):
        found.append(urllib.parse.unquote(urllib.parse.urlsplit(uri).password or ""))
    for match in _SECRET_QUERY.finditer(uri):
        found.append(uri[match.end(1):match.end()])
    return sorted({s for s in found if len(s) >= 3}, key=len, reverse=True)


def redact(text: str) -> str:
    """``text`` with every credential this process knows of replaced by ``***``.

    Covers ``scheme://user:password@`` anywhere in the text, secret-looking query
    parameters, and the literal values of the URI's password and of
    ``MLFLOW_TRACKING_PASSWORD``/``MLFLOW_TRACKING_TOKEN`` (an error message may quote them
    in any form, e.g. a URL-decoded one).
    """
    text = _USERINFO.sub(lambda m: f"{m.group(1)}{m.group(2)}:{REDACTED}@", str(text))
    text = _SECRET_QUERY.sub(lambda m: f"{m.group(1)}{REDACTED}", text)
    for secret in _secrets():
        text = text.replace(secret, REDACTED).replace(urllib.parse.quote(secret, safe=""), REDACTED)
    return text


# --------------------------------------------------------------------------- the store


@dataclass(frozen=True)
class TrackingConfig:
    uri: str  # what MLflow connects to: may hold credentials, never print it (use .display)
    artifact_location: str | None  # for experiments we create; None lets the server decide
    from_env: bool = True  # False: the default store, chosen because MLFLOW_TRACKING_URI is unset

    @property
    def is_http(self) -> bool:
        return self.uri.startswith(("http://", "https://"))

    @property
    def db_path(self) -> Path | None:
        """The database file of a local SQLite store, else None."""
        return _sqlite_file(self.uri)

    @property
    def is_local(self) -> bool:
        return self.db_path is not None

    @property
    def is_default(self) -> bool:
        return not self.from_env

    @property
    def display(self) -> str:
        """The URI as it may be printed, logged and recorded: credentials replaced by ``***``."""
        return redact(self.uri)

    @property
    def where(self) -> str:
        """The store and how it was chosen, for messages."""
        if self.from_env:
            return f"the MLflow store {self.display} ({URI_ENV})"
        return (f"the MLflow store {self.display} (the default: {URI_ENV} is unset, so the store is "
                f"{DEFAULT_DIR}/{DEFAULT_DB} in the working directory)")

    def __repr__(self) -> str:
        return f"TrackingConfig({self.display!r})"

    __str__ = __repr__


def _sqlite_file(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path if path.startswith("/") else Path.cwd() / path)


def _local_artifacts(db: Path) -> str:
    return (db.resolve().parent / DEFAULT_ARTIFACTS).as_uri()


def default_store(cwd: str | Path | None = None) -> TrackingConfig:
    db = Path(cwd or Path.cwd()).resolve() / DEFAULT_DIR / DEFAULT_DB
    return TrackingConfig(f"sqlite:///{db}", _local_artifacts(db), from_env=False)


def resolve_config() -> TrackingConfig:
    """The store every command uses (see the module doc)."""
    uri = os.environ.get(URI_ENV, "").strip()
    if not uri:
        return default_store()
    db = _sqlite_file(uri)
    return TrackingConfig(uri, _local_artifacts(db) if db else None, from_env=uri != os.environ.get(DEFAULT_MARK_ENV))


@contextlib.contextmanager
def use_store(config: TrackingConfig | None = None) -> Iterator[TrackingConfig]:
    """Export the resolved store (or ``config``) as ``MLFLOW_TRACKING_URI`` while a block runs (restored after).

    The default store is a path resolved from the working directory here, once, so a
    child process started elsewhere, and MLflow's own default lookups in this process,
    reach exactly the store this command resolved.
    """
    config = config or resolve_config()
    previous = {key: os.environ.get(key) for key in (URI_ENV, DEFAULT_MARK_ENV)}
    os.environ[URI_ENV] = config.uri
    if config.is_default:
        os.environ[DEFAULT_MARK_ENV] = config.uri
    try:
        yield config
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _float_env(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected a number of seconds") from None
    if value < 0:
        raise ValueError(f"{name}={text!r}: expected a number of seconds >= 0")
    return value


def http_bounds() -> dict[str, str]:
    """MLflow's HTTP retry settings derived from ``SAFT_TRACKING_RETRY_S`` (default 60 s).

    MLflow's defaults retry a store that is down for about ten minutes. Here a call gives
    up after retrying for about ``SAFT_TRACKING_RETRY_S`` seconds: backoff factor 1 (waits
    of 0, 2, 4, 8, ... s) and as many retries as fit the budget (60 s: 6 retries, 62 s of
    waiting; MLflow allows at most 10). One request waits ``SAFT_TRACKING_REQUEST_TIMEOUT_S``
    (default 60 s) for an answer. A variable ``MLFLOW_HTTP_REQUEST_*`` set by the user wins.
    """
    import math

    budget = _float_env(RETRY_ENV, DEFAULT_RETRY_S)
    timeout = _float_env(REQUEST_TIMEOUT_ENV, DEFAULT_REQUEST_TIMEOUT_S)
    retries = min(10, round(math.log2(budget + 2))) if budget >= 1 else 0
    return {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1" if retries else "0",
            "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5" if retries else "0",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, round(timeout)))}


_set_here: dict[str, str] = {}  # the MLFLOW_HTTP_REQUEST_* values this process wrote (it may update those)


def _apply_http_bounds() -> None:
    for key, value in http_bounds().items():
        current = os.environ.get(key)
        if current is None or _set_here.get(key) == current:
            os.environ[key] = _set_here[key] = value


def _auth_header(config: TrackingConfig) -> tuple[str, dict[str, str]]:
    """The URL without user info, and the Authorization header MLflow would send."""
    parts = urllib.parse.urlsplit(config.uri)
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
    user = os.environ.get(USER_ENV) or urllib.parse.unquote(parts.username or "")
    password = os.environ.get(PASSWORD_ENV) or urllib.parse.unquote(parts.password or "")
    token = os.environ.get(TOKEN_ENV)
    if user and password:
        return url, {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    if token:
        return url, {"Authorization": f"Bearer {token}"}
    return url, {}


def probe(config: TrackingConfig, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise ``TrackingUnavailable`` unless the store can be used right now."""
    if config.is_local:
        try:
            config.db_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingUnavailable(
                f"cannot create {config.where}: {redact(str(exc))}; run from a writable folder, set {URI_ENV} to a "
                f"tracking server, or set {TRACKING_ENV}=off to run without tracking") from None
        return
    if not config.is_http:
        return  # database and file stores fail on first use, through tracking_call
    url, headers = _auth_header(config)
    request = urllib.request.Request(url.rstrip("/") + "/health", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise TrackingUnavailable(
                f"{config.where} refused the credentials (HTTP {exc.code}): set {USER_ENV} and {PASSWORD_ENV} (or "
                f"user:password in the URI, or {TOKEN_ENV}) to an account of that server") from None
        return  # the server answered (a proxy may guard /health): it is up
    except (OSError, ValueError) as exc:
        reason = redact(str(getattr(exc, "reason", exc)))
        raise TrackingUnavailable(
            f"the MLflow tracking server {config.display} is not reachable ({reason}). Start it, point "
            f"{URI_ENV} at a running server, or set {TRACKING_ENV}=off to run without tracking "
            "(nothing is then logged or registered)") from None


@contextlib.contextmanager
def tracking_call(config: TrackingConfig, what: str) -> Iterator[None]:
    """Turn any store failure into a TrackingError naming the store: metrics are never dropped."""
    try:
        yield
    except TrackingError:
        raise
    except Exception as exc:  # MlflowException, requests errors, boto errors behind the server
        text = str(exc)
        hint = ""
        if any(m in text for m in _UNANSWERED):
            budget = _float_env(RETRY_ENV, DEFAULT_RETRY_S)
            hint = (f" [the store did not answer; retried for about {budget:g} s ({RETRY_ENV}). Runs this left "
                    "open are closed FAILED by the next tracking call that reaches the store]")
        raise TrackingError(redact(f"{what} failed on {config.where}: {type(exc).__name__}: "
                                   f"{text[:800]}{hint}")) from None


@contextlib.contextmanager
def _creation_lock(db: Path) -> Iterator[None]:
    """An exclusive lock beside a local SQLite database while MLflow creates or migrates it.

    Two processes creating the same fresh database run MLflow's migrations at once and
    can leave it half-migrated; the lock makes the second wait and find it complete.
    """
    import fcntl

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.parent / f".{db.name}.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def make_client(config: TrackingConfig):
    """An ``MlflowClient`` bound to ``config``, its stores opened (and created once, safely).

    No reliance on process-global MLflow state. Failures are ``TrackingError`` naming the
    store; a local database that cannot be opened says how to set it aside.
    """
    _apply_http_bounds()
    with tracking_call(config, "opening the MLflow client"):
        from mlflow import MlflowClient

        if not config.is_local:
            if urllib.parse.urlsplit(config.uri).password:  # MLflow prints run links with the host it was given
                os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
            return MlflowClient(tracking_uri=config.uri, registry_uri=config.uri)
        db = config.db_path
        try:
            with _creation_lock(db):
                client = MlflowClient(tracking_uri=config.uri, registry_uri=config.uri)
                client._tracking_client.store  # noqa: B018 - creates and migrates the database
                client._get_registry_client().store  # noqa: B018
        except Exception as exc:  # noqa: BLE001 - sqlite, alembic and MLflow raise many kinds
            moved = f"{db.parent}.broken"
            raise TrackingError(redact(
                f"cannot open {config.where}: {type(exc).__name__}: {shorten(str(exc))}. If a run was interrupted "
                f"while creating it, set it aside and run again: mv {db.parent} {moved} (its runs and models stay "
                f"readable there with MLFLOW_TRACKING_URI=sqlite:///{Path(moved) / db.name})")) from None
        return client


def get_or_create_experiment(client, config: TrackingConfig, name: str) -> str:
    """The id of experiment ``name``, created if missing (safe when processes race)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise TrackingError(f"experiment {name!r} is deleted on {config.where}; restore it or choose another name")
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=config.artifact_location)
    except MlflowException:
        found = client.get_experiment_by_name(name)  # another process created it first
        if found is None:
            raise
        return found.experiment_id


def download_from_store(uri: str, target_dir: str) -> str:
    """Download an MLflow URI's base weights (``models:/NAME/VERSION``: the version's source) from the one store
    every command resolves, never MLflow's own default; what saft.serving.bases uses once tracking is loaded."""
    import mlflow.artifacts

    from saft.layout import BASE

    config = resolve_config()
    with tracking_call(config, f"downloading the base weights {uri}"):
        if uri.startswith("models:/"):
            name, _, version = uri[len("models:/"):].strip("/").partition("/")
            uri = make_client(config).get_model_version_download_uri(name, version)
        source = uri if uri.rstrip("/").endswith(".safetensors") else f"{uri.rstrip('/')}/{BASE.weights}"
        return mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=target_dir, tracking_uri=config.uri)

