"""A worker process of the concurrency tests: runs one registry operation per round, released by a barrier.

    python concurrent_worker.py FOLDER INDEX

The worker imports what it needs, writes ``FOLDER/ready-INDEX`` and then, round after
round, waits for ``FOLDER/go-K`` (the parent writes every worker's task first, then the
go file, so all workers start the round within a few milliseconds of each other), runs
``FOLDER/task-K-INDEX.json`` and writes ``FOLDER/result-K-INDEX.json``. ``FOLDER/stop``
ends it.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path


def _wait_for(path: Path, stop: Path) -> bool:
    while not path.exists():
        if stop.exists():
            return False
        time.sleep(0.002)
    return True


def run_task(task: dict) -> dict:
    for key, value in task.get("env", {}).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if task.get("cwd"):
        os.chdir(task["cwd"])
    op = task["op"]
    if op == "gate":
        from saft.tracking.config import make_client, resolve_config
        from saft.tracking.promotion import GateRule, apply_gate

        client = make_client(resolve_config())
        return apply_gate(client, task["model_name"], task["version"], GateRule(0.01, 0.01), run_id=None)
    if op == "register":
        from saft.steps.register import RegisterConfig, register_step

        cfg = RegisterConfig(model_name=task["model_name"], alpha=task["alpha"], baseline=True, ood_tolerance=0.02,
                             id_tolerance=0.02)
        return register_step(cfg, task["metrics"], task["delta"], task["out"], base_model="tiny",
                             data_dir=task["data"])
    if op == "create":  # first use of the default SQLite store in a fresh folder
        from saft.tracking import end_pipeline_run, start_pipeline_run, step_run

        parent = start_pipeline_run("first", {"worker": task["index"]}, experiment="first-use")
        with step_run("score", parent, {"k": 1}) as tracker:
            tracker.log_metrics({"m": 1.0})
        end_pipeline_run(parent)
        return {"parent": parent}
    raise ValueError(f"unknown op {op!r}")


def main(folder: str, index: str) -> int:
    import torch

    torch.set_num_threads(1)
    import mlflow  # noqa: F401 - paid before the barrier, not inside the round

    import saft.steps.register  # noqa: F401
    import saft.tracking.promotion  # noqa: F401

    root, stop = Path(folder), Path(folder) / "stop"
    (root / f"ready-{index}").write_text(str(os.getpid()))
    round_ = 0
    while _wait_for(root / f"go-{round_}", stop):
        task = json.loads((root / f"task-{round_}-{index}.json").read_text())
        started = time.time()
        try:
            result = {"ok": True, "value": run_task(task)}
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the test
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
        result.update(started=started, ended=time.time())
        out = root / f"result-{round_}-{index}.json"
        out.with_suffix(".tmp").write_text(json.dumps(result, default=str))
        os.replace(out.with_suffix(".tmp"), out)
        round_ += 1
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
