"""The served model: a sparse delta plus a reference to its base, as an MLflow pyfunc.

The logged model holds two artifacts, never a checkpoint:

* ``delta.safetensors``  the trained entries (KB to a few MB)
* ``model_ref.json``     base model spec and fingerprint, alpha, class names, templates

``load_context`` rebuilds the fine-tuned model where it is served: it loads the base with
``saft.models.load_model`` (the embedded ``tiny`` model ships with the package; a
``ARCH@TAG`` base downloads on first use; an ``ARCH@/path`` base must exist at that path),
refuses a base whose weights do not match the recorded fingerprint, merges
``alpha * delta`` and encodes the zero-shot head once.

``predict`` takes a DataFrame with a column ``image`` of base64-encoded PNG/JPEG bytes
and returns ``label`` (top-1 class name), ``probability`` (its softmax probability) and
``probabilities`` (all classes, in ``model_ref.json``'s class order).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import mlflow.pyfunc
import pandas as pd

from saft.progress import quiet_logger

MODEL_REF_FILE = "model_ref.json"
DELTA_ARTIFACT = "delta.safetensors"
MODEL_REF_FORMAT = "saft-model-ref/1"
MODEL_ARTIFACT_PATH = "model"
IMAGE_COLUMN = "image"
BATCH = 64
_DISTRIBUTIONS = ("torch", "open_clip_torch", "safetensors", "pillow", "pandas")


def model_reference(*, base_model: str, base_fingerprint: str, classes: Sequence[str], templates: Sequence[str],
                    alpha: float = 1.0, method: str = "saft", delta_sha256: str | None = None) -> dict:
    if not classes or not templates:
        raise ValueError("a served model needs at least one class name and one prompt template")
    return {"format": MODEL_REF_FORMAT, "base_model": str(base_model), "base_fingerprint": base_fingerprint,
            "alpha": float(alpha), "method": method, "classes": list(classes), "templates": list(templates),
            "delta_sha256": delta_sha256}


def decode_image(value: Any, row: int = 0):
    """A PIL RGB image from base64 text (optionally a ``data:`` URI) or raw image bytes."""
    from PIL import UnidentifiedImageError

    if isinstance(value, str):
        text = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"row {row}: column {IMAGE_COLUMN!r} is not valid base64 text") from None
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    else:
        raise ValueError(f"row {row}: column {IMAGE_COLUMN!r} must hold base64-encoded image bytes, "
                         f"got {type(value).__name__}")
    from saft.data.images import load_rgb

    try:  # the decoder training uses: EXIF orientation, 16-bit, alpha, palettes alike
        return load_rgb(data, f"row {row}")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"row {row}: the bytes are not a readable image ({exc})") from None


class SaftDeltaModel(mlflow.pyfunc.PythonModel):
    """Base model + alpha * sparse delta, classifying images zero-shot over fixed classes."""

    def load_context(self, context) -> None:
        import torch

        from saft.eval.head import build_head
        from saft.models import load_model
        from saft.sparse import apply_delta, load_delta

        ref = json.loads(Path(context.artifacts["model_ref"]).read_text())
        if ref.get("format") != MODEL_REF_FORMAT:
            raise ValueError(f"{MODEL_REF_FILE}: expected format {MODEL_REF_FORMAT!r}, found {ref.get('format')!r}")
        device = os.environ.get("SAFT_SERVE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
        delta = load_delta(context.artifacts["delta"])
        loaded = load_model(ref["base_model"], device=device)
        if loaded.fingerprint != ref["base_fingerprint"]:
            raise RuntimeError(
                f"base model {ref['base_model']} loaded here has weights {loaded.fingerprint[:12]}..., but the delta "
                f"was trained on {ref['base_fingerprint'][:12]}...: serve it where the original base weights are "
                "available under that spec"
            )
        apply_delta(loaded.model, delta, float(ref.get("alpha", 1.0)))
        loaded.model.eval()
        self.ref, self.device, self.model, self.preprocess = ref, torch.device(device), loaded.model, loaded.preprocess
        self.classes = list(ref["classes"])
        self.head = build_head(loaded.model, loaded.tokenizer, self.classes, ref["templates"], device=device)

    # The DataFrame hint tells MLflow the schema is the logged signature, not inferred from hints.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        import torch
        import torch.nn.functional as F

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if IMAGE_COLUMN not in frame.columns:
            raise ValueError(f"expected a column {IMAGE_COLUMN!r} of base64-encoded PNG/JPEG bytes, "
                             f"got columns {list(frame.columns)}")
        values = list(frame[IMAGE_COLUMN])
        scale = self.model.logit_scale.exp() if hasattr(self.model, "logit_scale") else 100.0
        probs = []
        with torch.inference_mode():
            for start in range(0, len(values), BATCH):
                images = [self.preprocess(decode_image(v, start + i))
                          for i, v in enumerate(values[start:start + BATCH])]
                features = self.model.encode_image(torch.stack(images).to(self.device))
                logits = scale * F.normalize(features.float(), dim=-1) @ self.head.float().t()
                probs.append(logits.softmax(-1).cpu())
        p = torch.cat(probs) if probs else torch.zeros(0, len(self.classes))
        best = p.argmax(-1) if len(p) else torch.zeros(0, dtype=torch.long)
        return pd.DataFrame({
            "label": [self.classes[i] for i in best.tolist()],
            "probability": [float(p[r, i]) for r, i in enumerate(best.tolist())],
            "probabilities": [row.tolist() for row in p],
        })


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", IMAGE_COLUMN)]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "probability"),
                        ColSpec(Array("double"), "probabilities")]),
    )


def example_image_b64(size: int = 32) -> str:
    """A small, valid PNG (a colour gradient) as base64: the logged input example."""
    from PIL import Image

    image = Image.new("RGB", (size, size))
    image.putdata([(x * 255 // size, y * 255 // size, 128) for y in range(size) for x in range(size)])
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _requirements() -> list[str]:
    """Pins of what the model imports; ``saft`` itself comes from the project image."""
    from importlib import metadata

    from saft.version import __version__

    pins = [f"mlflow=={mlflow.__version__}", f"saft=={__version__}"]
    for dist in _DISTRIBUTIONS:
        try:
            pins.append(f"{dist}=={metadata.version(dist).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pins.append(dist)
    return pins


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_pyfunc_model(path: str | Path, delta_path: str | Path, reference: dict) -> Path:
    """Write the MLflow model folder (MLmodel, python_model.pkl, the two artifacts) at ``path``."""
    path = Path(path)
    # quiet: MLflow's advice to log models as code does not apply to this importable class
    with tempfile.TemporaryDirectory(prefix="saft-model-ref-") as tmp, quiet_logger("mlflow.pyfunc"):
        ref_file = Path(tmp) / MODEL_REF_FILE
        ref_file.write_text(json.dumps(reference, indent=2, sort_keys=True) + "\n")
        mlflow.pyfunc.save_model(
            str(path),
            python_model=SaftDeltaModel(),
            artifacts={"delta": str(delta_path), "model_ref": str(ref_file)},
            signature=signature(),
            input_example=pd.DataFrame({IMAGE_COLUMN: [example_image_b64()]}),
            pip_requirements=_requirements(),
            metadata={"saft.base_model": reference["base_model"], "saft.method": reference["method"]},
        )
    return path


def log_delta_model(tracker, delta_path: str | Path, reference: dict, artifact_path: str = MODEL_ARTIFACT_PATH) -> str:
    """Log the pyfunc model into the tracker's run under ``artifact_path``; returns its artifact URI."""
    with tempfile.TemporaryDirectory(prefix="saft-model-") as tmp:
        local = save_pyfunc_model(Path(tmp) / artifact_path, delta_path, reference)
        tracker.log_artifacts(local, artifact_path)
    return f"{tracker.artifact_uri.rstrip('/')}/{artifact_path}"
