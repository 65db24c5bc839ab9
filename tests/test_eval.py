import math

import pytest
import torch
import torch.nn.functional as F
from synthetic import CLASS_NAMES, make_dataset
from torch.utils.data import TensorDataset

import saft
from saft.eval import Record, aggregate, build_head, cached_head, evaluate_head, metrics_document
from saft.eval.metrics import harmonic_mean, records_from_document
from saft.eval.report import write_report


def test_head_is_normalised_template_mean(vit):
    head = build_head(vit.model, vit.tokenizer, CLASS_NAMES, ["a {}", "the {}"], classes_per_batch=3)
    assert head.shape[0] == len(CLASS_NAMES)
    torch.testing.assert_close(head.norm(dim=-1), torch.ones(len(CLASS_NAMES)))
    with torch.no_grad():
        single = F.normalize(vit.model.encode_text(vit.tokenizer(["a star", "the star"])), dim=-1).mean(0)
    torch.testing.assert_close(head[2], F.normalize(single, dim=-1), rtol=1e-5, atol=1e-6)


def test_head_cache_hit_and_key(tmp_path, vit, monkeypatch):
    import saft.eval.head as head_module

    real, calls = head_module.build_head, []
    monkeypatch.setattr(head_module, "build_head", lambda *a, **k: calls.append(1) or real(*a, **k))
    kwargs = dict(fingerprint=vit.fingerprint, cache_dir=tmp_path)
    first = cached_head(vit.model, vit.tokenizer, CLASS_NAMES, ["a {}"], **kwargs)
    again = cached_head(vit.model, vit.tokenizer, CLASS_NAMES, ["a {}"], **kwargs)
    assert calls == [1] and torch.equal(first, again)
    cached_head(vit.model, vit.tokenizer, CLASS_NAMES, ["the {}"], **kwargs)  # other templates: new key
    cached_head(vit.model, vit.tokenizer, CLASS_NAMES, ["a {}"], fingerprint="other", cache_dir=tmp_path)
    assert calls == [1, 1, 1]
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    for f in tmp_path.glob("*.safetensors"):
        f.write_bytes(b"damaged")  # a damaged entry is rebuilt, not trusted
    rebuilt = cached_head(vit.model, vit.tokenizer, CLASS_NAMES, ["a {}"], **kwargs)
    assert len(calls) == 4 and torch.equal(rebuilt, first)


def test_subset_projection_equals_explicit_subset_head(vit):
    dataset = make_dataset(24, num_classes=4)
    full_names = [f"thing {i}" for i in range(10)]
    subset = [1, 4, 6, 9]
    labels = torch.tensor([subset[i % 4] for i in range(24)])
    ds_full = TensorDataset(dataset.tensors[0], labels)
    ds_small = TensorDataset(dataset.tensors[0], torch.arange(24) % 4)
    head = build_head(vit.model, vit.tokenizer, full_names, ["a {}"])
    small_head = build_head(vit.model, vit.tokenizer, [full_names[i] for i in subset], ["a {}"])
    projected = evaluate_head(vit.model, head, ds_full, subset=subset, batch_size=7)
    explicit = evaluate_head(vit.model, small_head, ds_small, batch_size=5)
    assert projected.n == explicit.n == 24
    assert projected.correct == explicit.correct
    unrestricted = evaluate_head(vit.model, head, ds_full)
    assert unrestricted.correct <= projected.correct  # fewer classes can only help


def test_top1_matches_manual_argmax(vit):
    ds = make_dataset(16)
    prompts = saft.ClassPrompts.build(vit.tokenizer, CLASS_NAMES)
    acc = saft.eval.top1_accuracy(vit.model, ds, prompts, batch_size=5)
    with torch.no_grad():
        logits = saft.sparse.clip_logits(vit.model, ds.tensors[0], saft.sparse.class_embeddings(vit.model, prompts))
    assert acc == pytest.approx(float((logits.argmax(-1) == ds.tensors[1]).float().mean()))


def _records():
    rows = []
    for seed, (i, o1, o2) in zip((1, 2), ((0.70, 0.50, 0.40), (0.72, 0.52, 0.38))):
        rows += [Record("saft", "in", "id", i, 100, seed), Record("saft", "s1", "ood", o1, 100, seed),
                 Record("saft", "s2", "ood", o2, 100, seed)]
    rows += [Record("zeroshot", "in", "id", 0.60, 100), Record("zeroshot", "s1", "ood", 0.45, 100),
             Record("zeroshot", "s2", "ood", 0.35, 100)]
    return rows


def test_aggregates_id_ood_and_gains():
    aggs = {a["model"]: a for a in aggregate(_records())}
    s = aggs["saft"]
    assert s["seeds"] == [1, 2]
    assert s["id"]["mean"] == pytest.approx(0.71)
    assert s["id"]["std"] == pytest.approx(math.sqrt(2 * 0.01 ** 2))
    assert s["ood_mean"]["mean"] == pytest.approx((0.45 + 0.45) / 2)
    assert s["per_dataset"]["s1"]["mean"] == pytest.approx(0.51) and s["per_dataset"]["s1"]["n_seeds"] == 2
    assert s["ood_gain"] == pytest.approx(0.45 - 0.40)
    assert s["id_gain"] == pytest.approx(0.11)
    assert not any(key.startswith("effective_robustness") for key in s)  # no reference fit: not reported
    assert aggs["zeroshot"]["id"]["std"] is None  # one value: no spread


def test_base_new_harmonic_mean():
    recs = [Record("saft", "pets/base", "base", 0.9, 10, 1, group="pets"),
            Record("saft", "pets/new", "new", 0.6, 10, 1, group="pets")]
    (agg,) = aggregate(recs)
    assert agg["hm"]["mean"] == pytest.approx(harmonic_mean(0.9, 0.6)) == pytest.approx(0.72)
    assert agg["base_to_new"]["pets"]["hm"]["mean"] == pytest.approx(0.72)


def test_record_validation_and_document_round_trip():
    with pytest.raises(ValueError, match="role"):
        Record("m", "d", "train", 0.5, 1)
    with pytest.raises(ValueError, match="fraction"):
        Record("m", "d", "id", 50.0, 1)
    doc = metrics_document(_records(), {"suite": "toy"})
    assert records_from_document(doc) == _records()
    with pytest.raises(ValueError, match="schema"):
        records_from_document({"schema": "other", "records": []})


def test_report_files(tmp_path):
    recs = _records() + [Record("saft", "in", "id", 0.65, 100, 1, alpha=0.5),
                         Record("saft", "s1", "ood", 0.49, 100, 1, alpha=0.5),
                         Record("saft", "s2", "ood", 0.39, 100, 1, alpha=0.5)]
    recs = [r if r.model != "saft" or r.alpha is not None else
            Record(r.model, r.dataset, r.role, r.top1, r.n, r.seed, 1.0) for r in recs]
    written = write_report(metrics_document(recs), tmp_path, title="toy")
    assert set(written) >= {"report.md", "report.html", "id_vs_ood.png", "per_dataset.png", "alpha_curve.png"}
    md = (tmp_path / "report.md").read_text()
    assert "| saft |" in md and "71.00 ± 1.41" in md
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "<table>" in page
    for name in ("id_vs_ood.png", "per_dataset.png", "alpha_curve.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
