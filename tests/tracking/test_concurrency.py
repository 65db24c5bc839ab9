"""Overlapping runs against one registry: real processes, released together, on SQLite and on a server.

Two worker processes (``concurrent_worker.py``) are started once for the module; each
round the parent writes their tasks and then releases them with one barrier file, so
they hit the store within milliseconds of each other. What must hold (issue 23):

* concurrent promotion gates give the result of some serial order: the better candidate
  ends as champion, and each version's recorded decision is the one ``decide`` gives in
  that order, which is also what each worker's audit (its register.json) says;
* registering one candidate from two processes at once makes one version, one zero-shot
  baseline and one ``saft-bases`` version;
* two first runs in a fresh folder create the default SQLite store once, both succeed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from services import no_proxy_env
from tracking_support import ALPHA, AWS_TEST_ENV

from saft.tracking.promotion import (CHAMPION, COMPARED_TAG, FINGERPRINT_TAG, ID_TAG, OOD_TAG, PREVIOUS_CHAMPION,
                                     PROMOTED, REJECTED, SUITE_TAG, VERDICT_TAG, ZS_ID_TAG, ZS_OOD_TAG, GateRule,
                                     Scores, apply_gate, decide, get_alias)

WORKERS = 2
GATE_ROUNDS = 3
WORKER = Path(__file__).with_name("concurrent_worker.py")


@dataclass
class Crew:
    folder: Path
    processes: list
    round: int = 0

    def run(self, tasks: list[dict], timeout: float = 400.0) -> list[dict]:
        """Give worker i ``tasks[i]``, release them together, return their results (fails on any error)."""
        k = self.round
        for i, task in enumerate(tasks):
            (self.folder / f"task-{k}-{i}.json").write_text(json.dumps(task))
        (self.folder / f"go-{k}").write_text("go")
        self.round += 1
        deadline = time.monotonic() + timeout
        paths = [self.folder / f"result-{k}-{i}.json" for i in range(len(tasks))]
        while not all(p.exists() for p in paths):
            dead = [p.pid for p in self.processes if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                pytest.fail(f"workers {dead or 'alive'} gave no result for round {k} in time: {self._logs()}")
            time.sleep(0.05)
        results = [json.loads(p.read_text()) for p in paths]
        failed = [r for r in results if not r["ok"]]
        if failed:
            pytest.fail("worker failed:\n" + "\n".join(r["trace"] for r in failed))
        starts = [r["started"] for r in results]
        assert max(starts) - min(starts) < 1.0, starts  # released together
        return results

    def _logs(self) -> str:
        return "".join((self.folder / f"worker-{i}.log").read_text(errors="replace")[-2000:]
                       for i in range(len(self.processes)))


@pytest.fixture(scope="module")
def crew(tmp_path_factory, moto_endpoint):
    folder = tmp_path_factory.mktemp("crew")
    env = no_proxy_env({**AWS_TEST_ENV, "SAFT_CACHE_DIR": str(folder / "cache"), "MLFLOW_S3_ENDPOINT_URL": moto_endpoint,
                        "OMP_NUM_THREADS": "1"})
    processes = []
    for i in range(WORKERS):
        log = open(folder / f"worker-{i}.log", "wb")
        processes.append(subprocess.Popen([sys.executable, str(WORKER), str(folder), str(i)], env=env, stdout=log,
                                          stderr=subprocess.STDOUT, cwd=folder))
    crew = Crew(folder, processes)
    deadline = time.monotonic() + 180
    while not all((folder / f"ready-{i}").exists() for i in range(WORKERS)):
        if any(p.poll() is not None for p in processes) or time.monotonic() > deadline:
            pytest.fail(f"workers did not start: {crew._logs()}")
        time.sleep(0.1)
    try:
        yield crew
    finally:
        (folder / "stop").write_text("stop")
        for p in processes:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=20)


@pytest.fixture(params=["sqlite", "server"])
def store(request, tmp_path, monkeypatch) -> str:
    """A tracking URI of each kind, this process pointed at it."""
    if request.param == "sqlite":
        uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    else:
        server = request.getfixturevalue("tracking_env")
        uri = server.url
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SAFT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SAFT_TRACKING", raising=False)
    return uri


def _client():
    from saft.tracking.config import make_client, resolve_config

    return make_client(resolve_config())


ZERO_SHOT = Scores(0.50, 0.50)
SCORES = {"B": Scores(0.70, 0.80), "A": Scores(0.70, 0.95), "C": Scores(0.70, 0.85)}  # issue 23's numbers
RULE = GateRule(0.01, 0.01)


def _gate_model(client, run_id: str) -> tuple[str, dict[str, str]]:
    """A registered model with champion B and two fresh candidates A and C; their version numbers."""
    name = f"gate-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    versions = {}
    for label, s in SCORES.items():
        tags = {ID_TAG: repr(s.id), OOD_TAG: repr(s.ood_mean), ZS_ID_TAG: repr(ZERO_SHOT.id),
                ZS_OOD_TAG: repr(ZERO_SHOT.ood_mean), SUITE_TAG: "mini", FINGERPRINT_TAG: "f" * 64, "label": label}
        versions[label] = str(client.create_model_version(name, f"runs:/{run_id}/m", run_id=run_id, tags=tags).version)
    assert apply_gate(client, name, versions["B"], RULE)["verdict"] == PROMOTED
    return name, versions


def _serial_check(client, name: str, versions: dict[str, str], audits: dict[str, dict]) -> None:
    """The registry equals some serial order of the two gates, and each audit says what the registry holds."""
    label_of = {v: k for k, v in versions.items()}
    tags = {label: client.get_model_version(name, v).tags for label, v in versions.items()}
    compared = {label: label_of.get(tags[label][COMPARED_TAG]) for label in ("A", "C")}
    first = [label for label in ("A", "C") if compared[label] == "B"]
    assert len(first) >= 1, compared
    orders = [(f, "C" if f == "A" else "A") for f in first]
    consistent = []
    for order in orders:
        champion, expected = "B", {}
        for label in order:
            d = decide(SCORES[label], ZERO_SHOT, SCORES[champion], RULE, champion_label=f"champion v{versions[champion]}")
            expected[label] = (d.verdict, champion)
            champion = label if d.promoted else champion
        observed = {label: (tags[label][VERDICT_TAG], compared[label]) for label in order}
        if observed == expected:
            consistent.append((order, champion))
    assert len(consistent) == 1, (compared, {k: tags[k][VERDICT_TAG] for k in ("A", "C")})
    order, final = consistent[0]
    assert final == "A"  # the better candidate wins whatever the order
    assert str(get_alias(client, name, CHAMPION).version) == versions["A"]
    if order == ("C", "A"):
        assert str(get_alias(client, name, PREVIOUS_CHAMPION).version) == versions["C"]
    for label in ("A", "C"):
        audit = audits[label]
        assert audit["verdict"] == tags[label][VERDICT_TAG]  # what the worker reports is what the registry holds
        assert (audit["champion"] or {}).get("version") == tags[label][COMPARED_TAG]
        if audit["verdict"] == PROMOTED:
            assert audit["aliases"][CHAMPION] == versions[label]
        else:
            assert audit["verdict"] == REJECTED and audit["aliases"][CHAMPION] != versions[label]
    assert [m.name for m in client.search_registered_models(f"name = '{name}.saft-lease'")] == []  # released


def test_concurrent_gates_are_linearizable(crew, store, candidate):
    client = _client()
    experiment = client.create_experiment(f"gates-{uuid.uuid4().hex[:8]}")
    run_id = client.create_run(experiment).info.run_id
    waited = []
    for round_ in range(GATE_ROUNDS):
        name, versions = _gate_model(client, run_id)
        labels = ("A", "C") if round_ % 2 == 0 else ("C", "A")  # who gets which candidate alternates
        results = crew.run([{"op": "gate", "model_name": name, "version": versions[label],
                             "env": {"MLFLOW_TRACKING_URI": store}} for label in labels])
        audits = {label: r["value"] for label, r in zip(labels, results)}
        _serial_check(client, name, versions, audits)
        waited += [a["lease_wait_s"] for a in audits.values()]
    print(f"lease waits over {GATE_ROUNDS} rounds on {store.split(':')[0]}: {waited}")


def test_concurrent_registration_of_one_candidate_registers_it_once(crew, store, candidate, tmp_path):
    from saft.steps.register import BASELINE_TAG
    from saft.tracking.registry import BASES_MODEL, KEY_TAG

    client = _client()
    name = f"saft-twice-{uuid.uuid4().hex[:8]}"
    results = crew.run([{"op": "register", "model_name": name, "alpha": ALPHA, "metrics": str(candidate.metrics),
                         "delta": str(candidate.delta), "data": str(candidate.data_dir),
                         "out": str(tmp_path / f"out-{i}"), "env": {"MLFLOW_TRACKING_URI": store}}
                        for i in range(WORKERS)])
    docs = [r["value"] for r in results]
    versions = client.search_model_versions(f"name = '{name}'")
    baselines = [v for v in versions if v.tags.get(BASELINE_TAG) == "true"]
    candidates = [v for v in versions if v.tags.get(BASELINE_TAG) != "true"]
    assert len(baselines) == 1 and len(candidates) == 1, [(v.version, v.tags.get(KEY_TAG)) for v in versions]
    [cand] = candidates
    assert {d["version"] for d in docs} == {str(cand.version)}
    assert sorted(d["created"] for d in docs) == [False, True]
    assert {d["baseline"]["version"] for d in docs} == {str(baselines[0].version)}
    fingerprint = cand.tags[FINGERPRINT_TAG]
    bases = client.search_model_versions(f"name = '{BASES_MODEL}' AND tags.`{FINGERPRINT_TAG}` = '{fingerprint}'")
    assert len(bases) == 1
    # the decision on record is the one both register.json files report (the second as a repeat)
    recorded = cand.tags[VERDICT_TAG]
    assert {d["verdict"] for d in docs} <= {recorded, "already champion"}
    for i, doc in enumerate(docs):
        assert json.loads((tmp_path / f"out-{i}" / "register.json").read_text()) == doc
    champion = get_alias(client, name, CHAMPION)
    assert docs[-1]["aliases"][CHAMPION] == str(champion.version) or docs[0]["aliases"][CHAMPION] == str(
        champion.version)


def test_first_use_of_the_default_store_by_concurrent_processes(crew, tmp_path):
    from mlflow import MlflowClient

    for round_ in range(2):
        folder = tmp_path / f"fresh-{round_}"
        folder.mkdir()
        crew.run([{"op": "create", "index": i, "cwd": str(folder), "env": {"MLFLOW_TRACKING_URI": None}}
                  for i in range(WORKERS)])
        client = MlflowClient(f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("first-use")
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == 2 * WORKERS and {r.info.status for r in runs} == {"FINISHED"}
        assert not (folder / "mlflow.db").exists() and not (folder / "mlruns" / "0").exists()  # nothing elsewhere
    os.chdir(tmp_path)
