import numpy as np
import pytest
import torch

import saft
from saft.data.synth import DOMAINS, SHAPES, render, write_domain
from saft.models.tiny import VOCABULARY, tiny_tokenizer
from saft.models.tokenizer import EOT, PAD, SOT, WordTokenizer
from saft.world.checks import Checks


def test_render_is_deterministic_and_seeded():
    a = render("textile", "star", 3, seed=0)
    b = render("textile", "star", 3, seed=0)
    c = render("textile", "star", 3, seed=1)
    assert a.image.tobytes() == b.image.tobytes() != c.image.tobytes()
    assert a.image.size == (32, 32) and a.image.mode == "RGB"


def test_every_domain_renders_every_class_distinctly():
    for domain in DOMAINS:
        images = [np.asarray(render(domain, s, 0).image, dtype=np.float32) for s in SHAPES]
        for img in images:
            assert img.std() > 5, f"{domain}: a blank image"
        # same index, different class: different pictures
        assert len({img.tobytes() for img in images}) == len(SHAPES)
    with pytest.raises(ValueError, match="unknown domain"):
        render("oil-painting", "star", 0)
    with pytest.raises(ValueError, match="unknown shape"):
        render("photo", "dodecahedron", 0)


def test_write_domain_is_byte_stable(tmp_path):
    write_domain(tmp_path / "a", "sketch", 2)
    write_domain(tmp_path / "b", "sketch", 2)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 2 * len(SHAPES)
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_captions_and_prompts_fit_the_tiny_vocabulary():
    tok = tiny_tokenizer()
    for domain in DOMAINS:
        for shape in SHAPES:
            ids = tok.encode(render(domain, shape, 0).caption)
            assert ids[0] == SOT and ids[-1] == EOT and len(ids) <= tok.context_length
    assert tok(["a photo of a star."]).shape == (1, 8)
    assert tok.vocab_size == 31  # fixed by the shipped checkpoint's embedding
    with pytest.raises(ValueError, match="not in the tiny model's vocabulary"):
        tok("a photo of a dog")


def test_word_tokenizer_layout():
    tok = WordTokenizer(["a", "b"], context_length=5)
    out = tok(["a b", "b"])
    assert out.tolist() == [[SOT, 3, 4, EOT, PAD], [SOT, 4, EOT, PAD, PAD]]
    with pytest.raises(ValueError, match="unique"):
        WordTokenizer(["a", "a"])
    assert len(VOCABULARY) + 3 == 31


def test_tiny_architecture_uses_word_tokenizer():
    loaded = saft.load_model("saft-tiny-clip")
    assert isinstance(loaded.tokenizer, WordTokenizer)
    emb = loaded.model.encode_text(loaded.tokenizer(["a photo of a red star", "a sketch of a ring"]))
    assert emb.shape == (2, 128)
    params = sum(p.numel() for p in loaded.model.parameters())
    assert loaded.model.token_embedding.weight.numel() < 0.01 * params


def _aggs(zs_id, zs_ood, full_id, full_ood, ood_sets=(0.4, 0.4), mid=None):
    per = {f"o{i}": {"role": "ood", "mean": v, "std": 0.0} for i, v in enumerate(ood_sets)}
    rows = [("zeroshot", None, zs_id, zs_ood), ("full", 1.0, full_id, full_ood)]
    if mid:
        rows.append(("full", 0.5, *mid))
    return [{"model": m, "alpha": a, "id": {"mean": i}, "ood_mean": {"mean": o}, "per_dataset": per}
            for m, a, i, o in rows]


def test_validity_checks_fixed_in_advance():
    ok = Checks.compute(_aggs(0.60, 0.50, 0.80, 0.52, mid=(0.70, 0.53)))
    assert ok.passed and all(ok.results.values()) and len(ok.results) == 5
    assert ok.details()["mid_ood_gain"] == pytest.approx(0.03)
    failing = {  # one check broken at a time, the others held
        "1.": _aggs(0.45, 0.35, 0.70, 0.36, ood_sets=(0.3, 0.3), mid=(0.55, 0.37)),  # zero-shot ID under 50%
        "2.": _aggs(0.60, 0.58, 0.80, 0.59, mid=(0.70, 0.60)),  # OOD not 5 points harder
        "3.": _aggs(0.60, 0.50, 0.64, 0.50, mid=(0.62, 0.51)),  # full gains < 5 ID points
        "4.": _aggs(0.60, 0.50, 0.80, 0.58, mid=(0.70, 0.55)),  # OOD gain >= 1/3 of the ID gain
        "5.": _aggs(0.60, 0.50, 0.80, 0.52, mid=(0.70, 0.505)),  # the midpoint gains < 1 OOD point
    }
    for number, aggs in failing.items():
        c = Checks.compute(aggs)
        assert not c.passed and [n for n, v in c.results.items() if not v] == \
            [n for n in c.results if n.startswith(number)], number
    near_chance = Checks.compute(_aggs(0.60, 0.50, 0.80, 0.52, ood_sets=(0.6, 0.19), mid=(0.70, 0.53)))
    assert [n[:2] for n, v in near_chance.results.items() if not v] == ["2."]
    unmeasured = Checks.compute(_aggs(0.60, 0.50, 0.80, 0.52))  # alpha 0.5 not evaluated
    assert unmeasured.results[next(n for n in unmeasured.results if n.startswith("5."))] is None
    assert unmeasured.passed


def test_world_protocol_fast_path(tmp_path):
    from saft.protocols.synthshift import WorldConfig, run_world
    from saft.world.table import format_checks, format_results

    cfg = WorldConfig(out_dir=tmp_path, model="saft-tiny-clip@random", seeds=(1,), steps=2, batch_size=16,
                      grids={"full": [1e-4], "saft": [1e-3, 3e-3], "random": [1e-3], "lora": [1e-3]}, pool_per_class=6,
                      test_per_class=3, shots=2, val_shots=2)
    logs = []
    summary = run_world(cfg, log=logs.append)
    assert set(summary["checks"]) and isinstance(summary["checks_passed"], bool)
    assert {row["method"] for row in summary["grid"]} == {"full", "saft", "random", "lora"}
    assert len([r for r in summary["grid"] if r["method"] == "saft"]) == 2
    assert summary["chosen_lr"]["saft"] in (1e-3, 3e-3)
    assert summary["sizes"]["full"]["trainable"] > 100 * summary["sizes"]["saft"]["trainable"]
    models = {a["model"] for a in summary["aggregates"]}
    assert models == {"zeroshot", "full", "wiseft", "lora", "saft", "random"}  # the default method list
    assert set(summary["wiseft_alpha"]) == {"1"} and summary["sizes"]["wiseft"] == summary["sizes"]["full"]
    assert summary["checks_computed"] is True and summary["b2n"] is None  # base-to-new is opt-in in the library
    for method in ("saft", "random"):
        landing = summary["masks"][method]
        assert landing["num_selected"] == [summary["sizes"][method]["trainable"]]
        assert sum(landing["per_tensor"].values()) == landing["num_selected"][0]
    table = format_results(summary)
    assert "OOD mean" in table and "photo_v2" in table and "textile" not in table.splitlines()[0]
    assert summary["world"] == "synthshift-v2" and len(summary["world_fingerprint"]) == 64
    assert summary["protocol_deviations"]["shots"] == [16, 2]  # a toy run says it is not the benchmark
    assert "PASS" in format_checks(summary) or "FAIL" in format_checks(summary)
    for name in ("results.json", "eval/report.html", "eval/metrics.json", "world/synthshift.yaml",
                 "seed1/mask.safetensors", "seed1/data/train.jsonl"):
        assert (tmp_path / name).is_file(), name


def test_shipped_checkpoint_reproduces_its_card():
    import json

    from saft.models.tiny import CHECKPOINT
    from saft.world.pretrain import reference_accuracy

    card = json.loads(CHECKPOINT.with_suffix(".json").read_text())
    loaded = saft.load_model("tiny")
    assert loaded.fingerprint == card["fingerprint"]
    accuracy = reference_accuracy(loaded.model, loaded.tokenizer)
    for domain, value in card["reference_zero_shot"].items():
        assert accuracy[domain] == pytest.approx(value, abs=0.011), domain  # at most one image of 100 flips
    assert card["reference_zero_shot"]["textile"] > 0.3  # clearly above the 10% chance level


def test_ood_at_matched_id_interpolates_along_alpha():
    from saft.eval.alpha_curve import ood_at_matched_id

    def agg(model, alpha, i, o):
        return {"model": model, "alpha": alpha, "id": {"mean": i}, "ood_mean": {"mean": o}}

    aggs = [agg("zeroshot", None, 0.4, 0.5),
            agg("full", 0.5, 0.6, 0.45), agg("full", 1.0, 0.8, 0.3),
            agg("saft", 0.5, 0.5, 0.52), agg("saft", 1.0, 0.6, 0.5)]
    out = ood_at_matched_id(aggs)
    assert out["id"] == pytest.approx(0.6)  # the highest ID every curve reaches
    assert out["saft"] == pytest.approx(0.5)
    assert out["full"] == pytest.approx(0.45)
