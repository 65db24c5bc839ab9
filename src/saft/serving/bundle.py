"""The served model's files: a delta, a stored head and a reference to the base, never a checkpoint.

``model_ref.json`` (format ``saft-model-ref/2``) says what the files mean:

* ``base_model``, ``base_fingerprint``: the spec the delta was trained with, and the
  fingerprint its base must have (opaque, from ``saft.models.load_model``);
* ``base``: where the base weights are stored once per fingerprint (:mod:`saft.serving.bases`);
* ``alpha``, ``method``, ``delta_sha256``: the served model is base + alpha * delta;
* ``classes``, ``templates``: the served class set and the prompts its head was built from;
* ``head``: ``head.safetensors``, the zero-shot classifier of the merged model, one
  unit-norm float16 row per class, built once at registration (:func:`build_head_file`).

Loading (:func:`load_classifier`) therefore never runs the text tower: it loads the base,
merges the delta, reads the head, checks that the head was built for exactly this base,
delta, alpha and class set, and frees the text tower's weights. Models registered before
the head was stored (format ``saft-model-ref/1``) still load: their head is encoded at
start, as it was then.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import torch
from saft.layout import MODEL

log = logging.getLogger(__name__)

MODEL_REF_FILE = MODEL.model_ref
MODEL_REF_FORMAT = "saft-model-ref/2"
LEGACY_FORMAT = "saft-model-ref/1"
HEAD_FILE = MODEL.head
_REQUIRED = ("base_model", "base_fingerprint", "alpha", "method", "classes", "templates")
_TEXT_MODULES = ("transformer", "token_embedding", "ln_final", "text")
_TEXT_TENSORS = ("positional_embedding", "text_projection", "attn_mask")


def model_reference(*, base_model: str, base_fingerprint: str, classes: Sequence[str], templates: Sequence[str],
                    alpha: float = 1.0, method: str = "saft", delta_sha256: str | None = None) -> dict:
    """The reference of a served model, before its base is stored and its head built."""
    if not classes or not templates:
        raise ValueError("a served model needs at least one class name and one prompt template")
    if len(set(classes)) != len(classes):
        raise ValueError("the served class names must be distinct (a label must name one class)")
    return {"format": MODEL_REF_FORMAT, "base_model": str(base_model), "base_fingerprint": base_fingerprint,
            "alpha": float(alpha), "method": method, "classes": list(classes), "templates": list(templates),
            "delta_sha256": delta_sha256, "base": None, "head": None}


def read_reference(path: str | Path) -> dict:
    """``model_ref.json``, checked; a foreign or incomplete file is a clear error."""
    from saft.io import read_text

    text = read_text(path, MODEL_REF_FILE, ValueError)
    try:
        ref = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(ref, dict) or ref.get("format") not in (MODEL_REF_FORMAT, LEGACY_FORMAT):
        found = ref.get("format") if isinstance(ref, dict) else type(ref).__name__
        raise ValueError(f"{path}: expected format {MODEL_REF_FORMAT!r}, found {found!r}")
    missing = [k for k in _REQUIRED if k not in ref]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}")
    return ref


def _head_key(ref: dict) -> str:
    """What a head depends on besides classes and templates: the base, the delta and alpha."""
    return hashlib.sha256(f"{ref['base_fingerprint']}|{ref.get('delta_sha256')}|{float(ref['alpha'])!r}"
                          .encode()).hexdigest()


def _head_meta(ref: dict) -> dict[str, str]:
    digest = hashlib.sha256(json.dumps([ref["classes"], ref["templates"]]).encode()).hexdigest()
    return {"base_fingerprint": ref["base_fingerprint"], "delta_sha256": str(ref.get("delta_sha256")),
            "alpha": repr(float(ref["alpha"])), "classes_templates_sha256": digest,
            "n_classes": str(len(ref["classes"]))}


def build_head_file(base, delta, reference: dict, path: str | Path, *, progress: bool = True) -> dict:
    """Build the head of base + alpha * delta over the reference's classes and write it as float16.

    ``base`` is the unmerged ``LoadedModel``; it is restored bit for bit afterwards. The
    head goes through the evaluation head cache, so a retried registration encodes nothing.
    Returns the reference's ``head`` entry.
    """
    from saft.data.storage import sha256_file
    from saft.eval.head import HEAD_FORMAT, cached_head
    from saft.io import save_tensors
    from saft.sparse import apply_delta, remove_delta

    apply_delta(base.model, delta, float(reference["alpha"]))
    try:
        head = cached_head(base.model, base.tokenizer, reference["classes"], reference["templates"],
                           fingerprint=_head_key(reference), progress=progress)
    finally:
        remove_delta(base.model, delta)
    offsets = delta.head_offsets(reference["classes"], float(reference["alpha"]))
    if offsets is not None:  # a trained head (lpft) moves the encoded class embeddings
        head = head + offsets.to(device=head.device, dtype=head.dtype)
    path = save_tensors(path, {"head": head.to(torch.float16)}, _head_meta(reference), HEAD_FORMAT)
    return {"file": HEAD_FILE, "dtype": "float16", "n_classes": int(head.shape[0]), "dim": int(head.shape[1]),
            "sha256": sha256_file(path)}


def _read_head(path: str | Path, ref: dict) -> torch.Tensor:
    from saft.eval.head import HEAD_FORMAT
    from saft.io import load_tensors

    tensors, meta = load_tensors(path, HEAD_FORMAT, "head")
    expected = _head_meta(ref)
    wrong = [k for k, v in expected.items() if meta.get(k) != v]
    if wrong or "head" not in tensors:
        raise ValueError(f"{path}: the stored head was not built for this model ({', '.join(wrong) or 'no head'} "
                         "differ from model_ref.json): register the model again")
    return tensors["head"]


def drop_text_tower(model: torch.nn.Module) -> int:
    """Free the text tower's weights (the head replaces it); returns the number of parameters freed."""
    freed = 0
    for name in _TEXT_MODULES:
        module = getattr(model, name, None)
        if isinstance(module, torch.nn.Module):
            freed += sum(p.numel() for p in module.parameters())
            setattr(model, name, None)
    for name in _TEXT_TENSORS:
        tensor = getattr(model, name, None)
        if isinstance(tensor, torch.Tensor):
            freed += tensor.numel() if isinstance(tensor, torch.nn.Parameter) else 0
            setattr(model, name, None)
    return freed


def load_classifier(reference: dict, delta_path: str | Path, head_path: str | Path | None, *,
                    device: str = "cpu", precision: str = "auto"):
    """The served classifier: base (found and checked), merged delta, stored head, no text tower."""
    from saft.data.storage import sha256_file
    from saft.serving.bases import BaseMismatch, BaseRef, load_base
    from saft.serving.predictor import Classifier
    from saft.sparse import apply_delta, load_delta

    if reference.get("delta_sha256") and sha256_file(delta_path) != reference["delta_sha256"]:
        raise ValueError(f"{delta_path}: its sha256 is not the one model_ref.json records: the artifact is damaged")
    delta = load_delta(delta_path)
    if reference.get("base"):
        loaded = load_base(BaseRef.from_json(reference["base"]), device=device)
    else:
        from saft.models import load_model

        loaded = load_model(reference["base_model"], device=device)
    if loaded.fingerprint != reference["base_fingerprint"]:
        raise BaseMismatch(f"base model {reference['base_model']} loaded here has fingerprint "
                           f"{loaded.fingerprint[:12]}..., but the delta was trained on "
                           f"{reference['base_fingerprint'][:12]}...: serve it with its own base weights")
    apply_delta(loaded.model, delta, float(reference["alpha"]))
    classes = list(reference["classes"])
    if reference.get("head") and head_path is not None:
        head = _read_head(head_path, reference)
    else:
        from saft.eval.head import build_head

        log.warning("model_ref.json stores no head (registered before %s): encoding %d classes x %d templates "
                    "now; register the model again to start without the text tower", MODEL_REF_FORMAT,
                    len(classes), len(reference["templates"]))
        head = build_head(loaded.model, loaded.tokenizer, classes, reference["templates"], device=device)
        offsets = delta.head_offsets(classes, float(reference["alpha"]))
        if offsets is not None:
            head = head + offsets.to(device=head.device, dtype=head.dtype)
    drop_text_tower(loaded.model)
    return Classifier(loaded.model, loaded.preprocess, head, classes, device=device, precision=precision)
