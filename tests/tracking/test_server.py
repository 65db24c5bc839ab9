"""Tracking, registry and promotion against a real MLflow server with artifacts on (moto) S3."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from tracking_support import ALPHA, SUITE, png_b64, shifted_document, write_document

from saft.steps.register import RegisterConfig, register_step
from saft.tracking import step_run
from saft.tracking.promotion import COMPARED_TAG, REPLACED_TAG, VERDICT_TAG, GateRule, apply_gate
from saft.tracking.registry import KEY_TAG


def _alias(client, name, alias):
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= _artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def _register(candidate, out: Path, name: str, doc_path: Path | None = None, **cfg) -> dict:
    cfg = RegisterConfig(model_name=name, alpha=ALPHA, **{"ood_tolerance": 0.02, "id_tolerance": 0.02, **cfg})
    return register_step(cfg, doc_path or candidate.metrics, candidate.delta, out, base_model="tiny",
                         data_dir=candidate.data_dir)


# --- runs -----------------------------------------------------------------------------------


def test_pipeline_run_has_nested_step_runs_with_params_metrics_and_artifacts(pipeline, mlflow_server, candidate):
    client = mlflow_server.client()
    parent = client.get_run(pipeline.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == "synthshift-mini"
    assert parent.data.params["finetune.lr"] == "0.0003"
    assert parent.data.params["evaluate.alphas"] == json.dumps([ALPHA, 1.0])
    assert parent.data.tags["trigger"] == "test"
    assert parent.data.tags["saft.version"]
    assert len(parent.data.tags.get("mlflow.source.git.commit", "x" * 40)) == 40

    exp = client.get_experiment_by_name(pipeline.experiment)
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{pipeline.parent_run_id}'")
    by_step = {r.data.tags["saft.step"]: r for r in children}
    assert sorted(by_step) == ["evaluate", "finetune", "register", "score"]
    assert all(r.info.status == "FINISHED" for r in children)
    assert by_step["score"].data.params == {"density": "0.001"}

    # training curve: one point per optimizer step
    history = json.loads(candidate.history.read_text())
    loss = client.get_metric_history(by_step["finetune"].info.run_id, "train.loss")
    assert [m.step for m in sorted(loss, key=lambda m: m.step)] == [h["step"] for h in history]
    assert sorted(loss, key=lambda m: m.step)[-1].value == pytest.approx(history[-1]["loss"])

    # mask statistics
    stats = json.loads(candidate.mask_stats.read_text())
    score_metrics = by_step["score"].data.metrics
    assert score_metrics["mask.num_selected"] == stats["num_selected"]
    assert score_metrics["mask.density"] == pytest.approx(stats["density"])

    # evaluation: per-dataset top-1 and aggregates, named after the model (and alpha when not 1)
    doc = candidate.doc()
    eval_metrics = by_step["evaluate"].data.metrics
    agg = {(a["model"], a["alpha"]): a for a in doc["aggregates"]}
    assert eval_metrics["saft.id"] == pytest.approx(agg[("saft", 1.0)]["id"]["mean"])
    assert eval_metrics["saft.ood_mean"] == pytest.approx(agg[("saft", 1.0)]["ood_mean"]["mean"])
    assert eval_metrics["saft.sketch"] == pytest.approx(agg[("saft", 1.0)]["per_dataset"]["sketch"]["mean"])
    assert eval_metrics["saft.alpha_0.5.ood_mean"] == pytest.approx(agg[("saft", ALPHA)]["ood_mean"]["mean"])
    assert eval_metrics["zeroshot.id"] == pytest.approx(agg[("zeroshot", None)]["id"]["mean"])
    assert by_step["evaluate"].data.tags["saft.eval.suite"] == SUITE

    artifacts = {step: _artifact_paths(client, run.info.run_id) for step, run in by_step.items()}
    assert {"mask/mask.safetensors", "mask/mask_stats.json", "plots/mask_per_layer.png"} <= artifacts["score"]
    assert {"delta/delta.safetensors", "plots/loss_curve.png"} <= artifacts["finetune"]
    assert {"report/report.html", "report/report.md", "report/id_vs_ood.png", "metrics/metrics.json"} \
        <= artifacts["evaluate"]
    assert "promotion/register.json" in artifacts["register"]
    # the served model is an MLflow 3 logged model of the register run, its output, linked to its scores
    register_run = client.get_run(by_step["register"].info.run_id)
    [output] = register_run.outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert (logged.name, logged.source_run_id, str(logged.status)) == ("model", register_run.info.run_id, "READY")
    assert logged.tags["saft.candidate_key"] == pipeline.register["candidate_key"]
    linked = {m.key: m.value for m in logged.metrics or []}
    assert linked["ood_mean"] == pytest.approx(pipeline.register["candidate"]["ood_mean"])
    mv = client.get_model_version(pipeline.model_name, pipeline.register["version"])
    assert mv.source == f"models:/{logged.model_id}"

    # the bytes went through the server's proxy into the S3 bucket
    keys = mlflow_server.s3_keys()
    for step, names in (("score", ["mask/mask.safetensors"]), ("finetune", ["delta/delta.safetensors"]),
                        ("evaluate", ["report/report.html"])):
        run_id = by_step[step].info.run_id
        for name in names:
            assert any(k.startswith("mlflow/") and run_id in k and k.endswith(name) for k in keys), (step, name)
    assert any(logged.model_id in k and k.endswith("artifacts/delta.safetensors") for k in keys)
    local = Path(client.download_artifacts(by_step["finetune"].info.run_id, "delta/delta.safetensors",
                                           str(pipeline.out_dir.parent)))
    assert local.read_bytes() == candidate.delta.read_bytes()


def test_failed_step_run_is_marked_failed_with_the_error(tracking_env):
    client = tracking_env.client()
    with pytest.raises(ZeroDivisionError):
        with step_run("finetune", None, {"lr": 1}, experiment="saft-test-failures") as tracker:
            tracker.log_metrics({"train.loss": 1.5}, step=1)
            run_id = tracker.run_id
            1 / 0
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["saft.error"].startswith("ZeroDivisionError")
    assert run.data.metrics["train.loss"] == 1.5  # logged before the failure, kept
    assert "mlflow.parentRunId" not in run.data.tags  # standalone


def test_unknown_parent_run_is_a_clear_error(tracking_env):
    from saft.tracking import TrackingError

    with pytest.raises(TrackingError, match="parent run 'f{32}' does not exist".replace("f{32}", "f" * 32)):
        with step_run("score", "f" * 32):
            pass


# --- registry and promotion --------------------------------------------------------------------


def test_candidate_is_registered_as_delta_plus_reference_and_promoted(pipeline, mlflow_server, candidate, tracking_env):
    client = mlflow_server.client()
    result = pipeline.register
    assert result["verdict"] == "promoted" and result["created"] is True and result["version"] == "1"
    assert result["summary"].startswith(f"{pipeline.model_name} v1: promoted (passes the gate")
    assert json.loads((pipeline.out_dir / "register.json").read_text()) == result

    mv = client.get_model_version(pipeline.model_name, "1")
    agg = {(a["model"], a["alpha"]): a for a in candidate.doc()["aggregates"]}
    assert float(mv.tags["saft.id"]) == pytest.approx(agg[("saft", ALPHA)]["id"]["mean"])
    assert float(mv.tags["saft.ood_mean"]) == pytest.approx(agg[("saft", ALPHA)]["ood_mean"]["mean"])
    assert float(mv.tags["saft.zeroshot.ood_mean"]) == pytest.approx(agg[("zeroshot", None)]["ood_mean"]["mean"])
    assert mv.tags["saft.suite"] == SUITE and mv.tags["saft.method"] == "saft"
    assert mv.tags["saft.base_fingerprint"] == candidate.doc()["meta"]["base_fingerprint"]
    assert mv.tags[KEY_TAG] == result["candidate_key"]
    assert mv.tags[VERDICT_TAG] == "promoted" and mv.tags[COMPARED_TAG] == "none"
    assert "no champion yet" in mv.tags["saft.promotion.reason"]
    assert mv.tags["saft.promotion.ood_tolerance"] == "0.02"
    assert mv.run_id == result["run_id"]
    assert client.get_run(mv.run_id).data.tags["mlflow.parentRunId"] == pipeline.parent_run_id
    assert _alias(client, pipeline.model_name, "champion") == "1"
    assert _alias(client, pipeline.model_name, "previous-champion") is None

    # the registered version is the delta, its head, its base reference and its environment: KB, not a
    # checkpoint; the whole version, the project's wheel included, stays under 2 MB (issue 24)
    import mlflow.artifacts

    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{pipeline.model_name}/1",
                                                         dst_path=str(pipeline.out_dir.parent / "dl")))
    sizes = {p.relative_to(model_dir).as_posix(): p.stat().st_size for p in model_dir.rglob("*")
             if p.is_file() and p.parent.name != "wheels"}
    [wheel] = (model_dir / "wheels").glob("saft-*.whl")
    assert (model_dir / "artifacts" / "delta.safetensors").read_bytes() == candidate.delta.read_bytes()
    assert sum(sizes.values()) < 200_000, sizes
    assert sum(sizes.values()) + wheel.stat().st_size < 2_000_000, (sizes, wheel.stat().st_size)
    assert not any(n.endswith((".pt", ".bin", ".pth")) for n in sizes)
    ref = json.loads((model_dir / "artifacts" / "model_ref.json").read_text())
    assert ref["base_model"] == "tiny" and ref["alpha"] == ALPHA
    assert ref["classes"] == candidate.classes()
    assert ref["base_fingerprint"] == mv.tags["saft.base_fingerprint"]
    mlmodel = (model_dir / "MLmodel").read_text()
    assert "signature:" in mlmodel and (model_dir / "input_example.json").exists()

    # the audit is logged in the register run too
    audit = json.loads(Path(client.download_artifacts(mv.run_id, "promotion/register.json",
                                                      str(pipeline.out_dir.parent / "dl2"))).read_text())
    assert audit["verdict"] == "promoted" and audit["rule"]["ood_tolerance"] == 0.02
    assert audit["candidate"]["version"] == "1" and audit["champion"] is None and audit["timestamp"]


def test_worse_candidate_is_registered_but_not_promoted_and_reruns_change_nothing(tracking_env, candidate, model_name,
                                                                                 tmp_path):
    client = tracking_env.client()
    first = _register(candidate, tmp_path / "r1", model_name)
    assert first["verdict"] == "promoted" and first["version"] == "1"

    worse = write_document(tmp_path / "worse.json", shifted_document(candidate.doc(), ood=-0.05))
    second = _register(candidate, tmp_path / "r2", model_name, worse)
    assert second["version"] == "2" and second["created"] is True
    assert second["verdict"] == "rejected"
    assert "OOD mean vs champion v1" in second["reason"]
    mv2 = client.get_model_version(model_name, "2")
    assert mv2.tags[VERDICT_TAG] == "rejected"
    assert "OOD mean vs champion v1" in mv2.tags["saft.promotion.reason"]
    assert mv2.tags[COMPARED_TAG] == "1"
    assert _alias(client, model_name, "champion") == "1"
    assert _alias(client, model_name, "previous-champion") is None
    assert json.loads((tmp_path / "r2" / "register.json").read_text())["verdict"] == "rejected"

    # re-running either registration (a retried step) reuses its version and moves nothing
    again1 = _register(candidate, tmp_path / "r1b", model_name)
    again2 = _register(candidate, tmp_path / "r2b", model_name, worse)
    assert (again1["version"], again1["created"], again1["verdict"]) == ("1", False, "already champion")
    assert (again2["version"], again2["created"], again2["verdict"]) == ("2", False, "rejected")
    assert again2["repeated"] is True
    versions = client.search_model_versions(f"name = '{model_name}'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]
    assert _alias(client, model_name, "champion") == "1"


def test_better_candidate_takes_the_champion_alias_once(tracking_env, candidate, model_name, tmp_path):
    client = tracking_env.client()
    assert _register(candidate, tmp_path / "r1", model_name)["verdict"] == "promoted"
    better = write_document(tmp_path / "better.json", shifted_document(candidate.doc(), ood=0.02, id=0.02))
    result = _register(candidate, tmp_path / "r2", model_name, better)
    assert (result["version"], result["verdict"]) == ("2", "promoted")
    assert result["aliases"] == {"champion": "2", "previous-champion": "1"}
    assert result["champion"]["version"] == "1"  # what it was compared against
    assert [c["passed"] for c in result["checks"]] == [True] * 4
    assert client.get_model_version(model_name, "1").tags[REPLACED_TAG] == "2"

    assert _register(candidate, tmp_path / "r2b", model_name, better)["verdict"] == "already champion"
    old = _register(candidate, tmp_path / "r1b", model_name)  # the old champion's step retried
    assert old["verdict"] == "promoted" and old["repeated"] and "aliases unchanged" in old["reason"]
    assert (_alias(client, model_name, "champion"), _alias(client, model_name, "previous-champion")) == ("2", "1")


def test_zero_shot_baseline_is_the_first_champion_and_a_worse_candidate_is_judged_against_it(
        tracking_env, candidate, model_name, tmp_path):
    import mlflow.pyfunc
    import pandas as pd
    import torch

    from saft.data.synth import SHAPES, render
    from saft.eval.head import build_head
    from saft.models import load_model
    from saft.steps.prepared import PreparedData
    from saft.steps.register import BASELINE_TAG
    from saft.world.task import WORLD_SEED

    client = tracking_env.client()
    worse = write_document(tmp_path / "worse.json", shifted_document(candidate.doc(), ood=-0.05))
    result = _register(candidate, tmp_path / "r1", model_name, worse, baseline=True)
    baseline = result["baseline"]
    assert (baseline["version"], baseline["created"], baseline["verdict"]) == ("1", True, "promoted")
    assert (result["version"], result["verdict"]) == ("2", "rejected")
    assert "OOD mean vs champion v1" in result["reason"] and "OOD mean vs zero-shot" in result["reason"]
    assert result["summary"].startswith(f"{model_name} v1 (zero-shot baseline")
    assert (_alias(client, model_name, "champion"), _alias(client, model_name, "previous-champion")) == ("1", None)
    v1 = client.get_model_version(model_name, "1")
    zs = next(a for a in candidate.doc()["aggregates"] if a["model"] == "zeroshot")
    assert v1.tags[BASELINE_TAG] == "true" and v1.tags["saft.method"] == "zeroshot"
    assert float(v1.tags["saft.ood_mean"]) == pytest.approx(zs["ood_mean"]["mean"])
    assert int(v1.tags["saft.delta_bytes"]) < 1024  # an empty delta: the base reference is the model
    assert client.get_model_version(model_name, "2").tags[COMPARED_TAG] == "1"

    # the served baseline classifies exactly like the base model
    served = mlflow.pyfunc.load_model(f"models:/{model_name}@champion")
    images = [render("photo", shape, 30_000 + i, WORLD_SEED).image for i, shape in enumerate(SHAPES)]
    out = served.predict(pd.DataFrame({"image": [png_b64(im) for im in images]}))
    data, base = PreparedData.open(candidate.data_dir), load_model("tiny")
    head = build_head(base.model, base.tokenizer, data.classes, data.templates)
    with torch.inference_mode():
        feats = base.model.encode_image(torch.stack([base.preprocess(im) for im in images]))
        expected = (torch.nn.functional.normalize(feats, dim=-1) @ head.t()).argmax(-1).tolist()
    assert list(out["label"]) == [data.classes[i] for i in expected]

    # a retried step registers nothing new and moves nothing; once a champion exists there is no bootstrap
    again = _register(candidate, tmp_path / "r1b", model_name, worse, baseline=True)
    assert again["baseline"] is None and (again["version"], again["verdict"]) == ("2", "rejected")
    better = write_document(tmp_path / "better.json", shifted_document(candidate.doc(), ood=0.02, id=0.02))
    promoted = _register(candidate, tmp_path / "r3", model_name, better, baseline=True)
    assert promoted["baseline"] is None and (promoted["version"], promoted["verdict"]) == ("3", "promoted")
    assert promoted["aliases"] == {"champion": "3", "previous-champion": "1"}
    assert sorted(str(v.version) for v in client.search_model_versions(f"name = '{model_name}'")) == ["1", "2", "3"]


def test_promotion_interrupted_before_the_alias_moved_is_completed(tracking_env, candidate, model_name, tmp_path):
    client = tracking_env.client()
    registered = _register(candidate, tmp_path / "r1", model_name, promote=False)
    assert registered["verdict"] == "registered" and _alias(client, model_name, "champion") is None
    assert VERDICT_TAG not in client.get_model_version(model_name, "1").tags
    # a gate run that recorded its decision and died before moving the alias
    client.set_model_version_tag(model_name, "1", VERDICT_TAG, "promoted")
    client.set_model_version_tag(model_name, "1", COMPARED_TAG, "none")
    audit = apply_gate(client, model_name, "1", GateRule(0.02, 0.02))
    assert audit["verdict"] == "promoted" and audit["repeated"] and "completed now" in audit["reason"]
    assert _alias(client, model_name, "champion") == "1"


def test_champion_on_another_suite_is_not_comparable(tracking_env, candidate, model_name, tmp_path):
    client = tracking_env.client()
    assert _register(candidate, tmp_path / "r1", model_name)["verdict"] == "promoted"
    other = write_document(tmp_path / "other.json", shifted_document(candidate.doc(), ood=0.1, suite="other-suite"))
    result = _register(candidate, tmp_path / "r2", model_name, other)
    assert result["verdict"] == "rejected"
    assert result["reason"].startswith("not comparable with the champion v1")
    assert "suite 'mini-shift'" in result["reason"] and "'other-suite'" in result["reason"]
    assert _alias(client, model_name, "champion") == "1"


def test_full_fine_tuning_baseline_is_logged_not_registered(tracking_env, candidate, model_name, tmp_path):
    import torch

    from saft.models import load_model
    from saft.sparse import Delta

    base = load_model("tiny")
    dense = Delta({"ln_final.weight": torch.full_like(base.model.ln_final.weight, 1e-3)}, {}, base.fingerprint,
                  {"method": "full", "base_model": "tiny"})
    delta_path = dense.save(tmp_path / "full" / "delta.safetensors")
    doc = write_document(tmp_path / "full.json", shifted_document(candidate.doc(), rename="full"))
    cfg = RegisterConfig(model_name=model_name, method="full", alpha=ALPHA)
    result = register_step(cfg, doc, delta_path, tmp_path / "out", base_model="tiny", data_dir=candidate.data_dir)
    assert result["verdict"] == "not registered" and result["version"] is None
    assert "full fine-tuning baseline" in result["reason"]
    client = tracking_env.client()
    assert client.search_registered_models(f"name = '{model_name}'") == []
    run = client.get_run(result["run_id"])
    assert run.data.metrics["candidate.ood_mean"] == pytest.approx(result["candidate"]["ood_mean"])
    assert "promotion/register.json" in _artifact_paths(client, run.info.run_id)


def test_register_cli(tracking_env, candidate, model_name, tmp_path, capsys):
    from saft.cli.register import register

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    register(sub)
    for action in sub.choices["register"]._actions:
        assert action.help, action.dest
    common = ["register", "--metrics", str(candidate.metrics), "--delta", str(candidate.delta), "--data",
              str(candidate.data_dir), "--model", "tiny", "--model-name", model_name, "--alpha", str(ALPHA),
              "--ood-tolerance", "0.02", "--id-tolerance", "0.02"]
    assert parser.parse_args(common + ["--out", "x", "--baseline"]).baseline is True
    args = parser.parse_args(common + ["--out", str(tmp_path / "a"), "--no-promote"])
    assert args.baseline is False  # the command line opts in; the pipeline's params.yaml turns it on
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert f"{model_name} v1: new version" in out and "verdict: registered" in out
    assert _alias(tracking_env.client(), model_name, "champion") is None

    args = parser.parse_args(common + ["--out", str(tmp_path / "b")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "existing version (same candidate key)" in out and "verdict: promoted" in out
    assert "aliases: champion -> v1" in out
    assert json.loads((tmp_path / "b" / "register.json").read_text())["verdict"] == "promoted"

    with pytest.raises((SystemExit, ValueError), match="tolerance|"):  # refused when the flags are read
        bad = parser.parse_args(common + ["--out", str(tmp_path / "c"), "--ood-tolerance", "5"])
        bad.func(bad)
    assert not (tmp_path / "c" / "register.json").exists()
    args = parser.parse_args(common + ["--out", str(tmp_path / "d"), "--method", "random"])
    with pytest.raises(ValueError, match="no aggregate for random at alpha 0.5"):
        args.func(args)


def test_register_refuses_a_delta_of_another_base(tracking_env, candidate, model_name, tmp_path):
    with pytest.raises(ValueError, match="pass the delta's base with --model"):
        register_step(RegisterConfig(model_name=model_name, alpha=ALPHA), candidate.metrics, candidate.delta,
                      tmp_path, base_model="saft-tiny-clip@random", data_dir=candidate.data_dir)
    assert not (tmp_path / "register.json").exists()


def test_base_to_new_candidate_is_judged_on_hm(tracking_env, candidate, model_name, tmp_path):
    from saft.eval.metrics import Record, harmonic_mean, metrics_document

    client = tracking_env.client()

    def b2n(base: float, new: float) -> Path:
        halves = [("zeroshot", None, None, 0.70, 0.70), ("saft", 1, ALPHA, base, new)]
        records = [Record(m, f"textile/{half}", half, acc, 50, seed, alpha, "textile")
                   for m, seed, alpha, b, n in halves for half, acc in (("base", b), ("new", n))]
        doc = metrics_document(records, {**candidate.doc()["meta"], "suite": "mini-b2n"})
        return write_document(tmp_path / f"b2n-{base}-{new}.json", doc)

    # gains on the base classes by forgetting the new ones: HM 0.643 < 0.70 - 0.01
    worse = _register(candidate, tmp_path / "r1", model_name, b2n(0.90, 0.50), baseline=True, hm_tolerance=0.01)
    assert worse["baseline"]["verdict"] == "promoted" and worse["verdict"] == "rejected"
    assert [c["name"] for c in worse["checks"]] == ["HM vs zero-shot", "HM vs champion v1"]
    tags = client.get_model_version(model_name, "2").tags
    assert float(tags["saft.hm"]) == pytest.approx(harmonic_mean(0.90, 0.50)) and "saft.id" not in tags
    assert float(client.get_model_version(model_name, "1").tags["saft.hm"]) == pytest.approx(0.70)
    better = _register(candidate, tmp_path / "r2", model_name, b2n(0.80, 0.72))
    assert (better["version"], better["verdict"]) == ("3", "promoted") and "hm" in better["rule"]["text"]


def test_a_version_is_found_by_its_key_with_one_server_side_search(pipeline, mlflow_server):
    from saft.tracking.registry import find_version

    real = mlflow_server.client()
    calls = []

    class Spy:
        def search_model_versions(self, filter_string, **kwargs):
            calls.append((filter_string, kwargs))
            return real.search_model_versions(filter_string, **kwargs)

    found = find_version(Spy(), pipeline.model_name, pipeline.register["candidate_key"])
    assert str(found.version) == pipeline.register["version"]
    assert len(calls) == 1 and f"tags.`{KEY_TAG}` = '{pipeline.register['candidate_key']}'" in calls[0][0]
    assert find_version(Spy(), pipeline.model_name, "0" * 64) is None
    assert find_version(Spy(), "saft-no-such-model", "0" * 64) is None
    with pytest.raises(ValueError, match="cannot be searched for"):
        find_version(Spy(), pipeline.model_name, "x' OR name != '")
