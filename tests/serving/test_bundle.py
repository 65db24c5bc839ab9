"""The served model's files: stored base found without a hub and checked, stored head, no text tower."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from saft.layout import BASE
from saft.serving.bases import BaseMismatch, BaseRef, BaseUnavailable, load_base
from saft.serving.bundle import HEAD_FILE, MODEL_REF_FILE, load_classifier, read_reference


def _reference(folder: Path) -> dict:
    return read_reference(folder / "model" / "artifacts" / MODEL_REF_FILE)


def _load(folder: Path, ref: dict | None = None, head: bool = True):
    artifacts = folder / "model" / "artifacts"
    return load_classifier(ref or _reference(folder), artifacts / "delta.safetensors",
                           artifacts / HEAD_FILE if head else None)


def test_the_model_references_a_stored_base_and_holds_a_float16_head(served_folder) -> None:
    from saft.io import load_tensors
    from saft.models import load_model

    ref = _reference(served_folder)
    base = BaseRef.from_json(ref["base"])
    assert base.fingerprint == ref["base_fingerprint"] == load_model("tiny").fingerprint
    assert Path(base.uri, BASE.weights).is_file() and base.model == "tiny"
    artifacts = sorted(p.name for p in (served_folder / "model" / "artifacts").iterdir())
    assert artifacts == ["delta.safetensors", "head.safetensors", "model_ref.json"]  # no checkpoint
    tensors, meta = load_tensors(served_folder / "model" / "artifacts" / HEAD_FILE, "saft-head/1", "head")
    assert tensors["head"].dtype == torch.float16 and tensors["head"].shape[0] == len(ref["classes"])
    assert ref["head"]["n_classes"] == len(ref["classes"]) and meta["alpha"] == repr(ref["alpha"])


def test_startup_never_touches_the_text_tower(served_folder, monkeypatch, tmp_path) -> None:
    import saft.eval.head as head_module

    def refuse(*args, **kwargs):
        raise AssertionError("the text tower was run at start-up")

    monkeypatch.setattr(head_module, "build_head", refuse)
    monkeypatch.setattr(head_module, "cached_head", refuse)
    monkeypatch.setenv("SAFT_CACHE_DIR", str(tmp_path / "cache"))
    classifier = _load(served_folder)
    model = classifier.model
    assert model.transformer is None and model.token_embedding is None  # freed, so it cannot run either
    with pytest.raises(Exception):
        model.encode_text(torch.zeros(1, 8, dtype=torch.long))
    assert classifier.n_classes == 5


def test_the_served_head_is_the_merged_models_head(served_folder, tmp_path, monkeypatch) -> None:
    """Built at registration from base + alpha * delta, equal to encoding it now (float16 rounding aside)."""
    from saft.eval.head import build_head
    from saft.models import load_model
    from saft.sparse import apply_delta, load_delta

    monkeypatch.setenv("SAFT_CACHE_DIR", str(tmp_path / "cache"))
    ref = _reference(served_folder)
    loaded = load_model("tiny")
    apply_delta(loaded.model, load_delta(served_folder / "model" / "artifacts" / "delta.safetensors"), ref["alpha"])
    fresh = build_head(loaded.model, loaded.tokenizer, ref["classes"], ref["templates"])
    served = _load(served_folder).head.cpu()
    assert torch.allclose(served, fresh, atol=2e-3)
    unmerged = build_head(load_model("tiny").model, loaded.tokenizer, ref["classes"], ref["templates"])
    assert not torch.allclose(served, unmerged, atol=2e-3)  # the delta changed the head: alpha was applied


def test_other_weights_are_refused_with_both_fingerprints(served_folder, tmp_path, monkeypatch) -> None:
    from saft.io import load_tensors, save_tensors

    monkeypatch.setenv("SAFT_CACHE_DIR", str(tmp_path / "cache"))
    ref = _reference(served_folder)
    tensors, meta = load_tensors(Path(ref["base"]["uri"]) / BASE.weights, "saft-base/1", "base weights")
    name = next(iter(sorted(tensors)))
    tensors[name] = tensors[name] + 0.01
    wrong = save_tensors(tmp_path / "wrong" / BASE.weights, tensors, meta, "saft-base/1")
    moved = {**ref, "base": {**ref["base"], "uri": str(wrong.parent)}}
    with pytest.raises(BaseMismatch) as err:
        _load(served_folder, moved)
    message = str(err.value)
    assert ref["base_fingerprint"][:12] in message and str(wrong.parent) in message and "other weights" in message
    # the operator's override is checked the same way
    monkeypatch.setenv("SAFT_BASE_WEIGHTS", str(wrong))
    with pytest.raises(BaseMismatch, match="SAFT_BASE_WEIGHTS"):
        _load(served_folder)


def test_a_missing_base_says_where_it_looked(served_folder, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SAFT_CACHE_DIR", str(tmp_path / "cache"))
    ref = BaseRef.from_json(_reference(served_folder)["base"])
    gone = BaseRef(ref.fingerprint, ref.spec, "saft-tiny-vit@/nowhere/weights.safetensors", str(tmp_path / "gone"))
    with pytest.raises(BaseUnavailable) as err:
        load_base(gone)
    for needle in ("not in the cache", str(tmp_path / "gone"), "MLFLOW_TRACKING_URI", "SAFT_BASE_WEIGHTS"):
        assert needle in str(err.value)


def test_a_damaged_cache_entry_is_dropped_and_refetched(served_folder, tmp_path, monkeypatch) -> None:
    from saft.serving import bases

    monkeypatch.setenv("SAFT_CACHE_DIR", str(tmp_path / "cache"))
    ref = BaseRef.from_json(_reference(served_folder)["base"])
    cached = bases.cache_dir() / ref.fingerprint / BASE.weights
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not safetensors")
    assert load_base(ref).fingerprint == ref.fingerprint
    assert not cached.exists() or cached.read_bytes() != b"not safetensors"


def test_the_base_loads_from_s3(served_folder, s3_bucket, tmp_path) -> None:
    """An s3:// source (moto): downloaded once into the content-addressed cache, then checked."""
    client, bucket = s3_bucket
    ref = BaseRef.from_json(_reference(served_folder)["base"])
    client.upload_file(str(Path(ref.uri) / BASE.weights), bucket, f"bases/{ref.fingerprint}/{BASE.weights}")
    on_s3 = BaseRef(ref.fingerprint, ref.spec, "saft-tiny-vit@/nowhere/weights.safetensors",
                    f"s3://{bucket}/bases/{ref.fingerprint}", ref.sha256, ref.bytes)
    assert load_base(on_s3).fingerprint == ref.fingerprint
    assert list((tmp_path / "blob-cache" / "bases" / "blobs").rglob(ref.sha256))  # cached under its sha256


def test_a_damaged_head_or_delta_is_refused(served_folder, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SAFT_CACHE_DIR", str(tmp_path / "cache"))
    ref = _reference(served_folder)
    with pytest.raises(ValueError, match="not built for this model"):
        _load(served_folder, {**ref, "alpha": 1.0})
    copy = tmp_path / "copy"
    shutil.copytree(served_folder / "model", copy / "model")
    (copy / "model" / "artifacts" / "delta.safetensors").write_bytes(b"damaged")
    with pytest.raises(ValueError, match="damaged"):
        _load(copy, ref)


def test_models_registered_before_the_stored_head_still_load(served_folder, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SAFT_CACHE_DIR", str(tmp_path / "cache"))
    ref = _reference(served_folder)
    legacy = {k: v for k, v in ref.items() if k not in ("base", "head")} | {"format": "saft-model-ref/1"}
    path = tmp_path / MODEL_REF_FILE
    path.write_text(json.dumps(legacy))
    old = _load(served_folder, read_reference(path), head=False)
    assert torch.allclose(old.head.cpu(), _load(served_folder).head.cpu(), atol=2e-3)
    path.write_text(json.dumps({"format": "something/9"}))
    with pytest.raises(ValueError, match="expected format"):
        read_reference(path)
