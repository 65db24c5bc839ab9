"""dvc.yaml and dataset versioning with DVC.

- The pipeline file is valid for DVC, every stage's command (as DVC expands it, then as the
  shell expands it) parses with the real `saft` parser and carries the values of
  params.yaml, and each stage lists the parameters it reads.
- `dvc repro` runs the whole embedded pipeline on a small params.yaml, metrics and plots
  show, a second run does nothing, and one parameter change re-runs only what it should.
- A dataset folder goes to an S3 remote (a local moto server) and comes back byte-identical.

DVC runs as a subprocess from this virtualenv, inside temporary git + DVC repositories.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = BIN / "dvc"
CHECKPOINT = "src/saft/models/tiny/saft-tiny-clip.safetensors"
CARD = "src/saft/models/tiny/saft-tiny-clip.json"
METHODS = ("saft", "full", "random")
KINDS = ("saft", "random")
WORLD_POOL = "runs/dvc/world/photo/pool"

pytestmark = pytest.mark.skipif(not DVC.exists(), reason="dvc is not installed in this environment")


def dvc_env(home: Path, **extra: str) -> dict[str, str]:
    """This virtualenv first on PATH (DVC runs `saft`), one thread per process, DVC state
    kept under ``home`` instead of the user's config and site cache."""
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(home / "dvc-site-cache"),
        DVC_GLOBAL_CONFIG_DIR=str(home / "dvc-global-config"),
        DVC_SYSTEM_CONFIG_DIR=str(home / "dvc-system-config"),
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    env.pop("SAFT_PARENT_RUN_ID", None)  # stages would log nested MLflow runs under it
    env.update(extra)
    return env


def run(cmd: list, cwd: Path, env: dict, *, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"`{' '.join(map(str, cmd))}` exited with {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}"
                    f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def init_repo(root: Path, env: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    run(["git", "init", "-q"], root, env)
    run(["git", "config", "user.email", "dvc-test@example.invalid"], root, env)
    run(["git", "config", "user.name", "dvc test"], root, env)
    run(["git", "config", "commit.gpgsign", "false"], root, env)
    run([DVC, "init", "-q"], root, env)


def commit_all(root: Path, env: dict, message: str) -> None:
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-q", "-m", message], root, env)


def pipeline_repo(root: Path, params: dict, env: dict) -> Path:
    """A fresh git + DVC repository holding the repository's dvc.yaml, .gitignore (runs/ is
    ignored, as here) and .dvcignore, the shipped tiny checkpoint at its path (the frozen
    pretrain stage's output, a dependency of the model steps), data/ and ``params``."""
    init_repo(root, env)
    for rel in ("dvc.yaml", ".gitignore", ".dvcignore", CHECKPOINT, CARD):
        if (REPO / rel).exists():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(REPO / rel, root / rel)
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "README.md").write_text("datasets tracked with `dvc add data/<name>`\n")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit_all(root, env, "pipeline")
    return root


def repo_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def load_stages(root: Path) -> dict[str, dict]:
    """Every stage as DVC resolves it (templating, foreach and matrix expanded)."""
    from dvc.repo import Repo

    stages = {}
    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            cmds = stage.cmd if isinstance(stage.cmd, list) else [stage.cmd]
            params = [key for dep in stage.deps if hasattr(dep, "params") for key in (dep.params or [])]
            stages[stage.name] = {
                "cmds": cmds, "frozen": stage.frozen, "params": params,
                "deps": [dep.def_path for dep in stage.deps if not hasattr(dep, "params")],
                "outs": [out.def_path for out in stage.outs],
                # params.yaml keys the stage's templating used (keyed by the file's path)
                "tracked": {k: v for used in stage.tracked_vars.values() for k, v in used.items()},
            }
    return stages


def expected_stage_names(params: dict) -> set[str]:
    seeds = params["seeds"]
    return ({"pretrain", "world", "evaluate@all", "collect@all", "summary"}
            | {f"prepare@{s}" for s in seeds}
            | {f"score@{s}-{k}-patterns0" for s in seeds for k in KINDS}
            | {f"finetune-{m}@{s}" for s in seeds for m in METHODS})


FAKE_SAFT = """#!/bin/sh
# Records its arguments (one per line, then a separator) instead of running anything.
for arg in "$@"; do printf '%s\\n' "$arg"; done >> "$SAFT_ARGV_LOG"
printf '\\036\\n' >> "$SAFT_ARGV_LOG"
"""


def shell_argvs(cmd: str, shell: str, workdir: Path, fake_bin: Path) -> list[list[str]]:
    """The argument lists `saft` receives when ``shell`` runs ``cmd`` (a recording `saft`)."""
    log = workdir / "argv.log"
    log.unlink(missing_ok=True)
    env = {"PATH": f"{fake_bin}{os.pathsep}/usr/bin{os.pathsep}/bin", "SAFT_ARGV_LOG": str(log)}
    proc = subprocess.run([shell, "-c", cmd], cwd=workdir, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{shell} could not run {cmd!r}: {proc.stderr}"
    text = log.read_text() if log.exists() else ""
    return [chunk.strip("\n").split("\n") if chunk.strip("\n") else [] for chunk in text.split("\x1e\n")[:-1]]


def parsed_commands(stages: dict[str, dict], shell: str, workdir: Path, fake_bin: Path) -> dict:
    """Stage name -> the argparse namespace of its one `saft` command."""
    from saft.cli import build_parser

    parser = build_parser()
    parsed = {}
    for name, stage in stages.items():
        saft_cmds = [c for c in stage["cmds"] if c.split(None, 1)[0] == "saft"]
        others = [c for c in stage["cmds"] if c not in saft_cmds]
        if name == "summary":
            # The one step that is not a saft command: results.json re-shaped for DVC metrics.
            assert not saft_cmds and len(others) == 1 and others[0].startswith("python3 -c "), stage["cmds"]
            continue
        assert len(saft_cmds) == 1 and not others, f"{name}: expected one saft command, got {stage['cmds']}"
        argvs = shell_argvs(saft_cmds[0], shell, workdir, fake_bin)
        assert len(argvs) == 1 and argvs[0][0] != "saft", f"{name}: saft ran {len(argvs)} times: {argvs}"
        try:
            parsed[name] = parser.parse_args(argvs[0])
        except SystemExit:
            pytest.fail(f"{name}: the saft parser refused {argvs[0]} (from {saft_cmds[0]!r})")
    return parsed


def covered(key: str, listed: list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in listed)


def check_wiring(stages: dict[str, dict], args: dict, params: dict) -> None:
    """Each parsed command carries params.yaml's values and the layout of dvc.yaml."""
    seeds, data, score, ft, ev = params["seeds"], params["data"], params["score"], params["finetune"], params["evaluate"]
    train_root = data["root"] or WORLD_POOL
    card = json.loads((REPO / CARD).read_text())["config"]

    a = args["pretrain"]
    assert stages["pretrain"]["frozen"] and a.command == "pretrain" and a.out == CHECKPOINT
    # The stage reproduces the shipped checkpoint's recorded training run.
    assert (a.steps, a.per_class, a.batch_size, a.lr, a.seed) == (
        card["steps"], card["per_domain_class"], card["batch_size"], card["lr"], card["seed"])
    assert not any(s["frozen"] for n, s in stages.items() if n != "pretrain")

    a = args["world"]
    assert (a.command, a.out, a.pool_per_class, a.test_per_class) == (
        "world", "runs/dvc/world", params["world"]["pool_per_class"], params["world"]["test_per_class"])

    for s in seeds:
        a = args[f"prepare@{s}"]
        assert (a.data_command, a.root, a.out, a.dataset, a.shots, a.val_shots, a.seed) == (
            "prepare", train_root, f"runs/dvc/seeds/seed{s}/data", data["dataset"], data["shots"], data["val_shots"], s)
        assert a.split == data["split"] and a.subset == data["subset"]
        for kind in KINDS:
            a = args[f"score@{s}-{kind}-patterns0"]
            assert (a.command, a.kind, a.model, a.device, a.seed, a.root) == (
                "score", kind, params["model"], params["device"], s, train_root)
            assert (a.data, a.out) == (f"runs/dvc/seeds/seed{s}/data", f"runs/dvc/seeds/seed{s}/mask-{kind}")
            assert (a.density, a.rule, a.include, a.exclude, a.batch_size) == (
                score["density"], score["rule"], score["include"], score["exclude"], score["batch_size"])
        for method in METHODS:
            a = args[f"finetune-{method}@{s}"]
            mask = None if method == "full" else f"runs/dvc/seeds/seed{s}/mask-{method}/mask.safetensors"
            assert (a.command, a.method, a.mask, a.lr, a.seed, a.root) == (
                "finetune", method, mask, ft["lr"][method], s, train_root)
            assert (a.data, a.out) == (f"runs/dvc/seeds/seed{s}/data", f"runs/dvc/seeds/seed{s}/{method}")
            assert (a.steps, a.batch_size, a.warmup_steps, a.weight_decay, a.checkpoint_every) == (
                ft["steps"], ft["batch_size"], ft["warmup_steps"], ft["weight_decay"], ft["checkpoint_every"])
            assert (a.model, a.device) == (params["model"], params["device"])

    deltas = [f"{m}:{s}=runs/dvc/seeds/seed{s}/{m}/delta.safetensors" for s in seeds for m in METHODS]
    a = args["evaluate@all"]
    assert (a.command, a.model, a.device, a.out, a.batch_size) == (
        "evaluate", params["model"], params["device"], "runs/dvc/evaluate", ev["batch_size"])
    assert a.alphas == [float(x) for x in ev["alphas"]] and a.delta == deltas
    if ev["suite"]:
        assert (a.suite, a.data_root) == (ev["suite"], ev["data_root"])
    else:
        world_suite = "synthshift-b2n" if data["subset"] == "base" else "synthshift"
        assert (a.suite, a.data_root) == (f"runs/dvc/world/{world_suite}.yaml", "runs/dvc/world")
    assert a.reference == ev["reference"]
    a = args["collect@all"]
    assert (a.command, a.metrics, a.out, a.delta) == ("collect", ["runs/dvc/evaluate"], "runs/dvc/eval", deltas)

    # Every params.yaml value a command uses is a listed parameter of its stage, so changing
    # it re-runs the stage (the seed in a stage's name is its identity, not a parameter).
    assert stages["world"]["tracked"] and stages[f"finetune-full@{seeds[0]}"]["tracked"]  # not vacuous
    for name, stage in stages.items():
        missing = [k for k in stage["tracked"] if not k.startswith("seeds.") and not covered(k, stage["params"])]
        assert not missing, f"{name} uses {missing} without listing them under params"
    for s in seeds:  # values that reach the commands through matrix/foreach data
        assert covered("score.include", stages[f"score@{s}-saft-patterns0"]["params"])
        assert covered("score.exclude", stages[f"score@{s}-random-patterns0"]["params"])
    assert covered("evaluate.alphas", stages["evaluate@all"]["params"])
    assert "seeds" in stages["evaluate@all"]["params"] and "seeds" in stages["collect@all"]["params"]
    # Precise invalidation: a method's learning rate re-runs only that method's stages.
    for method in METHODS:
        listed = stages[f"finetune-{method}@{seeds[0]}"]["params"]
        assert f"finetune.lr.{method}" in listed
        assert not any(covered(f"finetune.lr.{other}", listed) for other in METHODS if other != method)


def test_dvc_yaml_is_valid_and_every_command_parses_with_the_cli(tmp_path: Path, monkeypatch) -> None:
    env = dvc_env(tmp_path)
    for key in ("DVC_NO_ANALYTICS", "DVC_SITE_CACHE_DIR", "DVC_GLOBAL_CONFIG_DIR", "DVC_SYSTEM_CONFIG_DIR"):
        monkeypatch.setenv(key, env[key])  # for DVC's API in this process too
    params = repo_params()
    root = pipeline_repo(tmp_path / "repo", params, env)

    listed = run([DVC, "stage", "list", "--all", "--name-only"], root, env).stdout.split()
    assert set(listed) == expected_stage_names(params)
    dot = run([DVC, "dag", "--dot"], root, env).stdout
    edges = set(re.findall(r'"([^"]+)" -> "([^"]+)"', dot))
    s = params["seeds"][0]
    for edge in [("world", f"prepare@{s}"), (f"prepare@{s}", f"score@{s}-saft-patterns0"),
                 (f"score@{s}-saft-patterns0", f"finetune-saft@{s}"),
                 (f"score@{s}-random-patterns0", f"finetune-random@{s}"), (f"prepare@{s}", f"finetune-full@{s}"),
                 ("pretrain", f"score@{s}-saft-patterns0"), ("pretrain", f"finetune-full@{s}"),
                 ("pretrain", "evaluate@all"), ("world", "evaluate@all"), ("evaluate@all", "collect@all"),
                 ("collect@all", "summary")] + [(f"finetune-{m}@{x}", "evaluate@all")
                                                for m in METHODS for x in params["seeds"]]:
        assert edge in edges, f"missing DAG edge {edge}"
    # Full fine-tuning trains no mask, so no mask may trigger it.
    assert (f"score@{s}-saft-patterns0", f"finetune-full@{s}") not in edges

    fake_bin = tmp_path / "fake-bin"
    fake_bin.mkdir()
    (fake_bin / "saft").write_text(FAKE_SAFT)
    (fake_bin / "saft").chmod(0o755)
    # DVC runs commands with $SHELL: check the POSIX sh and every common shell installed.
    shells = {os.path.realpath(sh) for sh in ("/bin/sh", shutil.which("bash"), shutil.which("dash"),
                                               shutil.which("zsh")) if sh}

    # The repository's params, then every value that the shell glue decides on set.
    other = repo_params()
    other.update(seeds=[4, 7], device="cuda:1", model="ViT-B-16@openai")
    other["data"].update(root="data/my dataset", split="train", dataset="oxford_pets", shots=4, val_shots=2)
    other["score"].update(include=["visual.*", "text.transformer.*"], exclude=["logit_scale"], rule="mean_sq")
    other["finetune"].update(steps=7, lr={"saft": 0.5, "full": 0.25, "random": 0.125})
    other["evaluate"].update(suite="imagenet-shifts", data_root="/datasets", alphas=[0.5, 1.0])
    b2n = repo_params()  # the world's base-to-new variant: its suite, chosen by the shell glue
    b2n["data"]["subset"] = "base"
    other["evaluate"]["reference"] = "none"
    for variant in (params, other, b2n):
        (root / "params.yaml").write_text(yaml.safe_dump(variant, sort_keys=False))
        stages = load_stages(root)
        assert set(stages) == expected_stage_names(variant)
        for shell in sorted(shells):
            check_wiring(stages, parsed_commands(stages, shell, tmp_path, fake_bin), variant)


def test_the_summary_stage_reads_every_metrics_shape(tmp_path: Path) -> None:
    """Metrics schema v2 (effective_robustness a stat, absent without a reference), v1 (a number), and
    base-to-new aggregates all become flat numbers for `dvc metrics`."""
    cmd = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["summary"]["cmd"]
    results = {"checks_passed": False, "aggregates": [
        {"model": "saft", "alpha": 1.0, "id": {"mean": 0.5}, "ood_mean": {"mean": 0.4}, "id_gain": 0.1,
         "effective_robustness": {"mean": 0.02, "std": None}, "per_dataset": {"a": {"mean": 0.5}}},
        {"model": "full", "alpha": 0.5, "id": {"mean": 0.6}, "effective_robustness": 0.03},
        {"model": "zeroshot", "alpha": None, "id": {"mean": 0.4}},
        {"model": "random", "alpha": 1.0, "base": {"mean": 0.8}, "new": {"mean": 0.6}, "hm": {"mean": 0.686},
         "base_to_new": {"dtd": {"base": {"mean": 0.8}, "new": {"mean": 0.6}, "hm": {"mean": 0.686}}}}]}
    (tmp_path / "runs/dvc/eval").mkdir(parents=True)
    (tmp_path / "runs/dvc/eval/results.json").write_text(json.dumps(results))
    subprocess.run(["sh", "-c", cmd], cwd=tmp_path, check=True, timeout=60)
    summary = json.loads((tmp_path / "runs/dvc/summary.json").read_text())
    assert summary["saft"] == {"id": 0.5, "ood_mean": 0.4, "id_gain": 0.1, "effective_robustness": 0.02,
                               "per_dataset": {"a": 0.5}}
    assert summary["full@0.5"]["effective_robustness"] == 0.03 and "effective_robustness" not in summary["zeroshot"]
    assert summary["random"]["base_to_new"] == {"dtd": {"base": 0.8, "new": 0.6, "hm": 0.686}}
    assert summary["random"]["hm"] == 0.686 and summary["checks_passed"] is False


def small_params() -> dict:
    """The repository's params.yaml, shrunk: one seed, a few images and steps. Everything
    else (model, device, rates, suite) stays as shipped, so this is the shipped pipeline."""
    params = repo_params()
    params["seeds"] = [1]
    params["world"].update(pool_per_class=8, test_per_class=5)
    params["data"].update(shots=4, val_shots=2)
    params["score"]["batch_size"] = 16
    params["finetune"].update(steps=4, warmup_steps=1, batch_size=16)
    params["evaluate"]["batch_size"] = 64
    return params


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.mark.slow
def test_dvc_repro_runs_the_pipeline_and_reruns_only_what_a_param_change_touches(tmp_path: Path) -> None:
    from saft.steps.params import load_params

    params = small_params()
    env = dvc_env(tmp_path, SHELL="/bin/sh")
    root = pipeline_repo(tmp_path / "repo", params, env)
    load_params(root / "params.yaml")  # the same file is valid for `saft run`
    checkpoint = (root / CHECKPOINT).read_bytes()

    first = run([DVC, "repro"], root, env)
    everything = expected_stage_names(params) - {"pretrain"}
    assert ran_stages(first.stdout) == everything, first.stdout[-3000:]
    assert (root / CHECKPOINT).read_bytes() == checkpoint  # frozen: verified, never re-trained
    for rel in ("runs/dvc/seeds/seed1/saft/delta.safetensors", "runs/dvc/seeds/seed1/full/history.json",
                "runs/dvc/eval/report.html", "runs/dvc/eval/results.md"):
        assert (root / rel).is_file(), rel

    metrics = json.loads(run([DVC, "metrics", "show", "--json"], root, env).stdout)[""]["data"]
    summary = metrics["runs/dvc/summary.json"]["data"]
    results = json.loads((root / "runs/dvc/eval/results.json").read_text())
    assert set(summary) >= {"zeroshot", *METHODS} and summary.get("checks_passed") == results.get("checks_passed")
    for model in ("zeroshot", *METHODS):
        agg = next(a for a in results["aggregates"] if a["model"] == model)
        assert summary[model]["id"] == agg["id"]["mean"] and summary[model]["ood_mean"] == agg["ood_mean"]["mean"]
        assert set(summary[model]["per_dataset"]) == set(agg["per_dataset"])
    assert metrics["runs/dvc/eval/results.json"]["data"]["sizes"]["saft"]["trainable"] > 0

    plots = json.loads(run([DVC, "plots", "show", "--json"], root, env).stdout)
    assert not plots.get("errors"), plots.get("errors")
    for method in METHODS:
        (vega,) = plots["data"][f"runs/dvc/seeds/seed1/{method}/history.json"]
        steps = [p["step"] for p in vega["content"]["data"]["values"]]
        assert vega["type"] == "vega" and steps == list(range(1, params["finetune"]["steps"] + 1))
    for image in ("per_dataset.png", "id_vs_ood.png"):
        assert plots["data"][f"runs/dvc/eval/{image}"][0]["type"] == "image"
    run([DVC, "plots", "show", "-o", tmp_path / "plots"], root, env)
    assert "<html" in (tmp_path / "plots" / "index.html").read_text().lower()

    second = run([DVC, "repro"], root, env)
    assert not ran_stages(second.stdout) and "up to date" in second.stdout, second.stdout[-3000:]

    # The baseline goes into git; an experiment changes one parameter.
    commit_all(root, env, "baseline run")
    exp = run([DVC, "exp", "run", "--set-param", "finetune.steps=3"], root, env)
    assert ran_stages(exp.stdout) >= {f"finetune-{m}@1" for m in METHODS} | {"evaluate@all", "collect@all"}
    assert not ran_stages(exp.stdout) & {"world", "prepare@1", "score@1-saft-patterns0", "score@1-random-patterns0"}
    steps = [p["step"] for p in json.loads((root / "runs/dvc/seeds/seed1/saft/history.json").read_text())]
    assert steps == [1, 2, 3]
    # Metrics are cached outputs, so the committed baseline's values are still readable.
    diff = json.loads(run([DVC, "metrics", "diff", "HEAD", "--all", "--json"], root, env).stdout)
    saft_id = diff["runs/dvc/summary.json"]["saft.id"]
    assert saft_id["old"] == summary["saft"]["id"] and saft_id["new"] is not None


def test_dataset_push_and_pull_through_an_s3_remote(tmp_path: Path, s3_bucket) -> None:
    from saft.data.synth import write_domain

    client, bucket = s3_bucket
    endpoint = os.environ["AWS_ENDPOINT_URL_S3"]
    # Credentials come from the environment; the endpoint only from the remote's config,
    # so the run shows that `endpointurl` is what reaches an S3-compatible store.
    env = dvc_env(tmp_path)
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        env.pop(key, None)
    root = tmp_path / "repo"
    init_repo(root, env)
    data = write_domain(root / "data" / "shapes", "sketch", per_class=2, seed=3)
    originals = {p.relative_to(data).as_posix(): p.read_bytes() for p in sorted(data.rglob("*.png"))}
    assert len(originals) == 20

    run([DVC, "add", "data/shapes"], root, env)
    assert (root / "data" / "shapes.dvc").is_file() and "/shapes" in (root / "data" / ".gitignore").read_text()
    run([DVC, "remote", "add", "-d", "storage", f"s3://{bucket}/dvc-store"], root, env)
    run([DVC, "remote", "modify", "storage", "endpointurl", endpoint], root, env)
    config = (root / ".dvc" / "config").read_text()
    assert endpoint in config and os.environ["AWS_SECRET_ACCESS_KEY"] not in config
    commit_all(root, env, "track data/shapes")

    run([DVC, "push"], root, env)
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="dvc-store/")
            for o in page.get("Contents", [])]
    # One object per image plus the directory listing, all content-addressed.
    assert len(keys) == len(originals) + 1 and all(k.startswith("dvc-store/files/md5/") for k in keys), keys

    shutil.rmtree(data)
    shutil.rmtree(root / ".dvc" / "cache")
    run([DVC, "pull"], root, env)
    restored = {p.relative_to(data).as_posix(): p.read_bytes() for p in sorted(data.rglob("*.png"))}
    assert restored == originals
    status = json.loads(run([DVC, "status", "--cloud", "--json"], root, env).stdout)
    assert status == {}, status
