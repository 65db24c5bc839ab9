"""Base weights a served delta needs, found without a model hub and checked by fingerprint.

A registered version does not carry its base (hundreds of MB to GB); it references a base
stored once per fingerprint: ``weights.safetensors`` (format ``saft-base/1``) with the
model spec that rebuilds the model from those weights. :class:`BaseRef` is that reference,
as written into ``model_ref.json``.

Where :func:`load_base` looks, in order (the first source that has the weights wins):

1. ``$SAFT_BASE_WEIGHTS``: a local path or ``s3://`` URI an operator staged (a volume, a
   bucket next to the cluster);
2. the local cache, ``$SAFT_CACHE_DIR/bases/<fingerprint>/`` (default ``~/.cache/saft``);
3. the reference's ``uri``: an MLflow URI (``models:/saft-bases/3``, ``runs:/``,
   ``mlflow-artifacts:/``), an ``s3://`` URI or a local path; downloads land in the cache;
4. only when none of these has it: the spec itself, i.e. the embedded ``tiny`` model that
   ships with the package, a weights file at the spec's path, or for a hub tag
   (``ViT-B-16@openai``) the hub, which works only where one is reachable.

Whatever the source, the loaded model's fingerprint must equal the recorded one; a
mismatch is refused with both fingerprints and the source named (a damaged cache entry is
dropped and the next source tried).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from saft.io import shorten
from saft.layout import BASE

log = logging.getLogger(__name__)

BASE_FORMAT = "saft-base/1"
WEIGHTS_ENV = "SAFT_BASE_WEIGHTS"
_MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


class BaseUnavailable(RuntimeError):
    """No source holds the base weights a served model needs."""


class BaseMismatch(RuntimeError):
    """Weights were found, but they are not the base the delta was trained on."""


@dataclass(frozen=True)
class BaseRef:
    fingerprint: str
    spec: str  # the spec that rebuilds the model from the stored weights
    model: str  # the spec the delta was trained with, e.g. ViT-B-16@openai (messages, hub fallback)
    uri: str | None = None  # the folder holding weights.safetensors, or the weights file itself
    sha256: str | None = None
    bytes: int | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict) -> "BaseRef":
        try:
            return cls(**{k: doc.get(k) for k in ("fingerprint", "spec", "model", "uri", "sha256", "bytes")})
        except TypeError as exc:
            raise ValueError(f"model_ref.json: malformed base reference ({exc})") from None


def cache_dir() -> Path:
    base = os.environ.get("SAFT_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "saft") / "bases"


def _weights_spec_candidates(loaded, model_spec: str) -> list[str]:
    """Specs that may rebuild ``loaded`` (loaded from ``model_spec``) from its state dict, most likely first.

    A file, random or embedded spec usually rebuilds itself (the weights given replace its
    source). A hub tag's weights do not record the activation they were trained with, so
    the spec names it (``ARCH-quickgelu``, ``ARCH-gelu``); which one is right is settled by
    the fingerprint, never assumed. A spec the loader refuses costs nothing to try.
    """
    spec = loaded.spec
    config = getattr(loaded.model, "saft_model_config", None) or {}
    quick = bool((config.get("open_clip") or {}).get("quick_gelu", False))
    named = [f"{spec.arch}-{a}@random" for a in (("quickgelu", "gelu") if quick else ("gelu", "quickgelu"))]
    own = [model_spec, str(spec)] if spec.is_random or spec.is_file else []
    return list(dict.fromkeys(own + named + [f"{spec.arch}@random"]))


def save_base_weights(loaded, folder: str | Path, model_spec: str | None = None) -> BaseRef:
    """Write ``loaded``'s weights to ``folder/weights.safetensors``, with the spec that rebuilds it.

    ``model_spec`` is the spec ``loaded`` came from as the user wrote it (``tiny``,
    ``ViT-B-16@openai``); it is recorded for messages and as the last-resort source.

    The spec is proven by rebuilding the model from the written weights and comparing
    fingerprints, so a stored base is always one that serving can load.
    """
    from saft.io import save_tensors
    from saft.models import ModelSpecError, load_model
    from saft.data.storage import sha256_file

    model_spec = model_spec or str(loaded.spec)
    state = {k: v.detach().cpu() for k, v in loaded.model.state_dict().items()}
    tried = []
    for candidate in _weights_spec_candidates(loaded, model_spec):
        try:
            rebuilt = load_model(candidate, state_dict=state)
        except ModelSpecError as exc:
            tried.append(f"{candidate}: {exc}")
            continue
        if rebuilt.fingerprint == loaded.fingerprint:
            break
        tried.append(f"{candidate}: fingerprint {rebuilt.fingerprint[:12]}...")
    else:
        raise BaseMismatch(f"cannot store base {loaded.spec}: no model spec rebuilds its fingerprint "
                           f"{loaded.fingerprint[:12]}... from its weights ({'; '.join(tried)})")
    path = Path(folder) / BASE.weights
    save_tensors(path, state, {"fingerprint": loaded.fingerprint, "spec": candidate, "model": model_spec}, BASE_FORMAT)
    return BaseRef(loaded.fingerprint, candidate, model_spec, None, sha256_file(path), path.stat().st_size)


def _load_file(path: Path, ref: BaseRef, device: str, origin: str):
    from saft.io import load_tensors
    from saft.models import load_model

    tensors, meta = load_tensors(path, BASE_FORMAT, "base weights")
    loaded = load_model(ref.spec or meta.get("spec") or ref.model, state_dict=tensors, device=device)
    del tensors
    if loaded.fingerprint != ref.fingerprint:
        raise BaseMismatch(f"base weights from {origin} have fingerprint {loaded.fingerprint[:12]}..., but the "
                           f"delta was trained on {ref.model} with fingerprint {ref.fingerprint[:12]}...: these are "
                           "other weights; point the source at the delta's own base")
    return loaded


def _cached(ref: BaseRef) -> Path:
    return cache_dir() / ref.fingerprint / BASE.weights


# How an MLflow URI is downloaded: set by saft.tracking (which sits above this layer) to a download from the one
# store every command resolves, with its clear errors; without it, MLflow's own default store is asked.
MLFLOW_DOWNLOAD = None


def _download_mlflow(uri: str, target: Path) -> Path:
    """Download the weights of an MLflow URI (``models:/NAME/VERSION`` resolves to the version's source)."""
    if MLFLOW_DOWNLOAD is None:
        import mlflow
        import mlflow.artifacts

        def download(uri: str, target_dir: str) -> str:
            if uri.startswith("models:/"):
                name, _, version = uri[len("models:/"):].strip("/").partition("/")
                uri = mlflow.MlflowClient().get_model_version_download_uri(name, version)
            source = uri if uri.rstrip("/").endswith(".safetensors") else f"{uri.rstrip('/')}/{BASE.weights}"
            return mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=target_dir)
    else:
        download = MLFLOW_DOWNLOAD
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        os.replace(Path(download(uri, tmp)), target)  # same folder: atomic, a reader never sees a partial file
    return target


def _fetch_s3(uri: str, ref: BaseRef) -> Path:
    from saft.data.storage import open_storage

    if not uri.rstrip("/").endswith(".safetensors"):
        uri = f"{uri.rstrip('/')}/{BASE.weights}"
    parent, _, name = uri.rpartition("/")
    return open_storage(parent, cache_dir=cache_dir() / "blobs").fetch(name, ref.sha256)


def _local(uri: str) -> Path:
    path = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
    return path / BASE.weights if path.is_dir() else path


def _fetch(uri: str, ref: BaseRef) -> Path:
    if uri.startswith(_MLFLOW_SCHEMES):
        return _download_mlflow(uri, _cached(ref))
    if uri.startswith("s3://"):
        return _fetch_s3(uri, ref)
    path = _local(uri)
    if not path.is_file():
        raise FileNotFoundError(f"no base weights at {path}")
    return path


def load_base(ref: BaseRef, *, device: str = "cpu"):
    """The base model of ``ref`` as a ``LoadedModel``, from the first source that has it (see module doc)."""
    from saft.models import load_model

    missing = []
    override = os.environ.get(WEIGHTS_ENV)
    if override:
        return _load_file(_fetch(override, ref), ref, device, f"${WEIGHTS_ENV}={override}")
    cached = _cached(ref)
    if cached.is_file():
        try:
            return _load_file(cached, ref, device, f"the cache ({cached})")
        except (BaseMismatch, ValueError, OSError) as exc:
            log.warning("dropping damaged cached base %s (%s)", cached, exc)
            with contextlib.suppress(OSError):
                shutil.rmtree(cached.parent)
    else:
        missing.append(f"not in the cache ({cached})")
    if ref.uri:
        try:
            path = _fetch(ref.uri, ref)
        except BaseMismatch:
            raise
        except Exception as exc:  # MLflow, boto3 and the file system raise many kinds
            missing.append(f"{ref.uri}: {type(exc).__name__}: {shorten(str(exc))}")
        else:
            return _load_file(path, ref, device, ref.uri)
    else:
        missing.append("the model records no stored base")
    try:
        loaded = load_model(ref.model, device=device)
    except Exception as exc:  # a hub that cannot be reached, a file that is not there
        missing.append(f"{ref.model} itself: {type(exc).__name__}: {shorten(str(exc))}")
    else:
        if loaded.fingerprint != ref.fingerprint:
            raise BaseMismatch(f"{ref.model} loaded here has fingerprint {loaded.fingerprint[:12]}..., but the delta "
                               f"was trained on {ref.fingerprint[:12]}...: these are other weights")
        log.info("base %s loaded from its spec (no stored copy found: %s)", ref.model, "; ".join(missing))
        return loaded
    raise BaseUnavailable(f"base weights for {ref.model} (fingerprint {ref.fingerprint[:12]}...) not found: "
                          f"{'; '.join(missing)}. Give the tracking server's address (MLFLOW_TRACKING_URI) so the "
                          f"registry's copy can be fetched, or stage the weights and set {WEIGHTS_ENV}")
