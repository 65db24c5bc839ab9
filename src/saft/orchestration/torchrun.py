"""One step on every GPU of a pod: ``saft score|finetune|evaluate`` directly or under torchrun.

A Kubeflow task with ``gpu_count > 1`` gets N GPUs in one pod; the step uses them by
running as N processes under ``python -m torch.distributed.run --standalone`` (the
library's own rendezvous on one node: no home-made launcher). :func:`run_step` does that
from a step's command line, and the ``*_argv`` helpers build that command line from the
same config objects the task functions take, so a task can switch between the in-process
call and the torchrun job without a second way of spelling its settings.

Nothing here imports kfp: the integrator calls it from a task body.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from collections.abc import Callable, Sequence

from saft.steps.record import RECORD_FILE
from saft.steps.tracked import PARENT_ENV

STEPS = ("score", "finetune", "evaluate")
PROCESSES_ENV = "SAFT_TASK_PROCESSES"
"""Overrides the process count of a pipeline task's step (e.g. 2 on a CPU node: gloo ranks)."""
# Set by torchrun (elastic agent) in every worker: a step already running as a rank must not start its own job.
TORCHRUN_MARKERS = ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE")


class LaunchError(RuntimeError):
    """The step cannot be launched as asked (bad argv or process count, or already a torchrun worker)."""


def task_processes(device: str, env: dict | None = None) -> int:
    """How many processes a pipeline task runs its step as: one per GPU its pod sees.

    A task with ``gpu_count: N`` gets N GPUs in its pod (the device plugin makes exactly
    those visible), so on ``cuda``/``auto`` that count is the process count; a device that
    names one GPU (``cuda:1``) or the CPU is one process. ``SAFT_TASK_PROCESSES`` set to an
    integer >= 1 overrides it (CPU ranks on gloo, or fewer processes than GPUs).
    """
    env = os.environ if env is None else env
    forced = env.get(PROCESSES_ENV, "").strip()
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise LaunchError(f"{PROCESSES_ENV}={forced!r}: expected an integer >= 1 (the processes a task's step "
                              "runs as), or unset it to use one per visible GPU")
        return int(forced)
    if device not in ("auto", "cuda"):
        return 1
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def torchrun_command(argv: Sequence[str], processes: int, *, python: str | None = None,
                     module: str = "saft.cli") -> list[str]:
    """The command line that runs ``python -m MODULE ARGV`` (default: ``saft ARGV``) as ``processes`` ranks on this node."""
    return [python or sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={processes}", "-m", module, *argv]


def source_pythonpath(env: dict) -> str:
    """``PYTHONPATH`` for a job's children: this saft's source folder first, so they import the same saft."""
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)


def _check(argv: Sequence[str], processes: int, env: dict) -> None:
    if not argv or argv[0] not in STEPS:
        raise LaunchError(f"run_step: argv must start with one of {', '.join(STEPS)} "
                          f"(got {list(argv[:1]) or 'nothing'})")
    if not isinstance(processes, int) or isinstance(processes, bool) or processes < 0:
        raise LaunchError(f"run_step: processes must be an integer >= 0 (the GPUs in the pod), got {processes!r}")
    if processes > 1 and (any(env.get(k) for k in TORCHRUN_MARKERS) or int(env.get("WORLD_SIZE") or 1) > 1):
        raise LaunchError(f"run_step: this process is already a torchrun worker (WORLD_SIZE="
                          f"{env.get('WORLD_SIZE', '?')}); run the step directly (processes=1) instead of "
                          "starting a job inside a job")


def run_step(argv: Sequence[str], processes: int, *, log: Callable[[str], None] = print,
             env: dict | None = None, cwd: str | None = None) -> int:
    """Run ``saft ARGV``; return its exit code (0: success).

    ``processes`` <= 1 runs it as one child process (``python -m saft.cli``); more runs it
    under torchrun with one process per GPU. Either way its output (stdout and stderr
    merged) is passed to ``log`` line by line as it comes, and the exit code returned
    (non-zero when any rank failed). ``env`` replaces the environment of the job (default:
    this process's). The step runs in a child, never by importing the command line, which
    sits above this layer.
    """
    argv = [str(a) for a in argv]
    env = dict(os.environ if env is None else env)
    _check(argv, processes, env)
    # The job's children must import the same saft as this process (a task may run from a source tree).
    env["PYTHONPATH"] = source_pythonpath(env)
    env.setdefault("PYTHONUNBUFFERED", "1")  # lines arrive as they are printed, not at exit
    if processes <= 1:
        cmd = [sys.executable, "-m", "saft.cli", *argv]
        log(f"launch: {argv[0]} as one process: {' '.join(cmd)}")
    else:
        cmd = torchrun_command(argv, processes)
        log(f"launch: {argv[0]} as {processes} processes: {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    try:
        for line in proc.stdout:
            log(line.rstrip("\n"))
    finally:
        proc.stdout.close()
        code = proc.wait()
    if code:
        log(f"launch: {argv[0]} failed with exit code {code} on {max(processes, 1)} process(es)")
    return code


def check_step(argv: Sequence[str], processes: int, **kwargs) -> None:
    """:func:`run_step`, raising :class:`RuntimeError` naming the step when it fails."""
    code = run_step(argv, processes, **kwargs)
    if code:
        raise RuntimeError(f"saft {argv[0]} failed with exit code {code} on {max(processes, 1)} process(es)")


def run_launched(argv: list[str], processes: int, out_dir: str, *, log: Callable[[str], None] = print) -> dict:
    """Run ``saft ARGV`` as ``processes`` ranks in this pod; return the summary its record holds."""
    env = {k: v for k, v in os.environ.items() if k != PARENT_ENV}  # the task logs, not every rank
    check_step(argv, processes, log=log, env=env)
    record = Path(out_dir) / RECORD_FILE
    if not record.is_file():
        raise RuntimeError(f"saft {argv[0]} on {processes} processes exited cleanly but left no {RECORD_FILE} in "
                           f"{out_dir}")
    return json.loads(record.read_text()).get("summary", {})


# --------------------------------------------------------------------------- command lines
# Derived from the step configurations (saft.config.to_argv), so every setting travels and
# the command parses back into the same configuration (tests/test_config_agreement.py).


def _optional(flag: str, value) -> list[str]:
    return [] if value in (None, "") else [flag, str(value)]


def score_argv(cfg, data_dir: str, out_dir: str, *, root: str | None = None) -> list[str]:
    """``saft score`` for a :class:`saft.steps.configs.ScoreConfig`."""
    from saft.config import to_argv

    return ["score", "--data", str(data_dir), "--out", str(out_dir), *_optional("--root", root), *to_argv(cfg)]


def finetune_argv(cfg, data_dir: str, out_dir: str, *, mask_path: str | None = None, root: str | None = None,
                  resume: bool = False, checkpoint_dir: str | None = None) -> list[str]:
    """``saft finetune`` for a :class:`saft.steps.configs.FinetuneStepConfig`."""
    from saft.config import to_argv

    return ["finetune", "--data", str(data_dir), "--out", str(out_dir), *_optional("--root", root),
            *_optional("--mask", mask_path), *_optional("--checkpoint-dir", checkpoint_dir),
            *(["--resume"] if resume else []), *to_argv(cfg)]


def evaluate_argv(cfg, out_dir: str) -> list[str]:
    """``saft evaluate`` for a :class:`saft.steps.configs.EvaluateConfig` (its suite a built-in name or a YAML
    file, its data_root the folder the suite's roots are relative to)."""
    from saft.config import to_argv

    deltas = []
    for run in cfg.deltas:
        deltas += ["--delta", str(run)]
    return ["evaluate", "--out", str(out_dir), *deltas, *to_argv(cfg)]
