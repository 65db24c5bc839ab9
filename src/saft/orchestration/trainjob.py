"""``saft finetune`` across nodes: a Kubeflow Trainer TrainJob on the torch-distributed runtime.

A launcher task renders a TrainJob (``trainer.kubeflow.org/v1alpha1``) whose trainer runs
the project image with the same ``saft finetune`` command line a one-pod task runs, under
``torch.distributed.run`` on every node: the runtime's torch plugin sets the ``PET_*``
variables (nodes, processes per node, node rank, master address) that torchrun reads, so
the step itself is unchanged. Inputs and outputs live on a shared PVC mounted at the same
path in the launcher and in every node, so the launcher reads the delta the job wrote.

Trainer API generations (``patch_api``): ``runtimePatches`` is Trainer v2.2 and later, which
also has ``spec.activeDeadlineSeconds``; ``podTemplateOverrides`` is v2.0/v2.1, which has
neither. Every write uses strict field validation, so a manifest of the wrong generation is
refused with the field named instead of losing its volumes silently.

Time limits. The job carries ``activeDeadlineSeconds`` = ``timeout_s`` (v2.2+): Trainer
itself stops it (``Failed``, reason ``DeadlineExceeded``) even when the launcher pod is gone,
evicted or its run cancelled, and counts from creation or the last resume, so time a job
waits suspended (Kueue holds it ``Suspended`` until its queue has quota) is not running time.
The launcher keeps the same two clocks: waiting for admission, bounded by
``queue_timeout_s``, and running, bounded by ``timeout_s`` (plus a grace for Trainer to act
first where the deadline is in the spec); past either it deletes the job. A SIGTERM (a KFP
run cancelled) deletes the job before the launcher exits.

The job is named from its command line (:func:`job_name`), so a retried launcher finds the
job it already submitted (HTTP 409 on create): a running or queued one is waited for, a
complete one is taken, a failed one is replaced (the new job resumes from the checkpoints on
the volume), and one still being deleted is waited out before the job is created again.

Nothing here imports kfp; the Kubernetes calls are :mod:`saft.serving.kube`'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from saft.images import resolve_image
from saft.layout import FINETUNE
from saft.serving.kube import CustomObjects, KubeError

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
DEFAULT_RUNTIME = "torch-distributed"
NODE = "node"  # the runtime's trainer job and container (the torch-distributed runtime's names)
VOLUME = "saft-data"
PATCH_MANAGER = "saft.io/launcher"
PATCH_APIS = ("podTemplateOverrides", "runtimePatches")
DEADLINE_API = "runtimePatches"  # the generation (Trainer v2.2+) that has spec.activeDeadlineSeconds
GENERATIONS = {"podTemplateOverrides": "Trainer v2.0/v2.1", "runtimePatches": "Trainer v2.2+"}
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
DEADLINE_EXCEEDED = "DeadlineExceeded"
# Flags of `saft finetune` that name files: they must lie on the shared volume for the nodes to see them.
PATH_FLAGS = ("--data", "--out", "--mask", "--root", "--checkpoint-dir")
NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class TrainJobError(RuntimeError):
    """The TrainJob could not be submitted, failed, or did not finish in time; the message says which."""


class TrainJobs(CustomObjects):
    """Kubeflow Trainer TrainJobs of one namespace."""

    group, version, plural, kind = GROUP, VERSION, PLURAL, KIND


@dataclass
class TrainJobSpec:
    """What one TrainJob runs and on what (``argv`` is a ``saft finetune ...`` command line)."""

    name: str
    argv: list[str]
    pvc: str
    num_nodes: int = 2
    gpus_per_node: int = 1
    mount_path: str = "/mnt/saft"
    image: str = ""  # required: the project image the nodes run (saft.orchestration.cluster.resolve_image)
    runtime: str = DEFAULT_RUNTIME
    gpu_resource: str = "nvidia.com/gpu"
    cpu: str = ""
    memory: str = ""
    env: dict[str, str] = field(default_factory=dict)
    patch_api: str = DEADLINE_API
    labels: dict[str, str] = field(default_factory=dict)
    active_deadline_s: int = 0  # spec.activeDeadlineSeconds (runtimePatches generation only); 0: none
    queue: str = ""  # Kueue LocalQueue (label kueue.x-k8s.io/queue-name); "": not queued by Kueue

    def validate(self) -> None:
        if not NAME.match(self.name) or len(self.name) > 63:
            raise TrainJobError(f"TrainJob name {self.name!r}: must be a DNS label (lower-case letters, digits and "
                                "'-', starting with a letter, at most 63 characters)")
        if not self.argv or self.argv[0] != "finetune":
            raise TrainJobError(f"TrainJob {self.name}: argv must be a `saft finetune ...` command line, got "
                                f"{self.argv[:1] or 'nothing'}")
        for what in ("num_nodes", "gpus_per_node"):
            value = getattr(self, what)
            if not isinstance(value, int) or value < 1:
                raise TrainJobError(f"TrainJob {self.name}: {what} must be an integer >= 1, got {value!r}")
        if not self.pvc:
            raise TrainJobError(f"TrainJob {self.name}: pvc (the shared volume claim holding inputs and outputs) "
                                "is required")
        if self.patch_api not in PATCH_APIS:
            raise TrainJobError(f"TrainJob {self.name}: patch_api must be one of {', '.join(PATCH_APIS)}, "
                                f"got {self.patch_api!r}")
        if not isinstance(self.active_deadline_s, int) or self.active_deadline_s < 0:
            raise TrainJobError(f"TrainJob {self.name}: active_deadline_s must be an integer >= 0 (0: none), got "
                                f"{self.active_deadline_s!r}")
        if self.active_deadline_s and self.patch_api != DEADLINE_API:
            raise TrainJobError(f"TrainJob {self.name}: activeDeadlineSeconds exists from Trainer v2.2 on "
                                f"(patch_api {DEADLINE_API}); {GENERATIONS[self.patch_api]} has no such field")
        if "--out" not in flag_values(self.argv, PATH_FLAGS):
            raise TrainJobError(f"TrainJob {self.name}: argv has no --out (the folder the job writes the delta to)")
        mount = PurePosixPath(self.mount_path)
        if not mount.is_absolute():
            raise TrainJobError(f"TrainJob {self.name}: mount_path must be absolute, got {self.mount_path!r}")
        for flag, value in flag_values(self.argv, PATH_FLAGS).items():
            path = PurePosixPath(value)
            if not path.is_absolute() or not (path == mount or mount in path.parents):
                raise TrainJobError(f"TrainJob {self.name}: {flag} {value} is not on the shared volume: every node "
                                    f"reads and writes under {self.mount_path} (the PVC {self.pvc}); pass paths "
                                    "there")


def flag_values(argv: list[str], flags: tuple[str, ...]) -> dict[str, str]:
    """The value following each of ``flags`` in ``argv`` (``--flag value`` or ``--flag=value``)."""
    found = {}
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name in flags:
            if eq:
                found[name] = value
            elif i + 1 < len(argv):
                found[name] = argv[i + 1]
    return found


def job_name(argv: list[str], prefix: str = "saft-finetune") -> str:
    """A name that is the same for the same command line: a retried launcher finds its own job."""
    digest = hashlib.sha256(json.dumps(list(argv)).encode()).hexdigest()[:12]
    return f"{prefix[:50].rstrip('-')}-{digest}"


def render_trainjob(spec: TrainJobSpec) -> dict:
    """The TrainJob manifest for ``spec`` (validated first)."""
    spec.validate()
    resources: dict = {"limits": {spec.gpu_resource: str(spec.gpus_per_node)}}
    requests = {k: v for k, v in (("cpu", spec.cpu), ("memory", spec.memory)) if v}
    if requests:
        resources["requests"] = requests
    pod = {"volumes": [{"name": VOLUME, "persistentVolumeClaim": {"claimName": spec.pvc}}],
           "containers": [{"name": NODE, "volumeMounts": [{"name": VOLUME, "mountPath": spec.mount_path}]}]}
    trainer = {
        "image": spec.image,
        # torchrun takes nodes, processes per node, node rank and the master from the runtime's PET_* variables
        "command": ["python3", "-m", "torch.distributed.run", "-m", "saft.cli", *spec.argv],
        "numNodes": spec.num_nodes,
        "numProcPerNode": spec.gpus_per_node,
        "resourcesPerNode": resources,
        "env": [{"name": k, "value": str(v)} for k, v in sorted(spec.env.items())],
    }
    body: dict = {"runtimeRef": {"name": spec.runtime, "apiGroup": GROUP, "kind": "ClusterTrainingRuntime"},
                  "trainer": trainer}
    if spec.active_deadline_s:
        body["activeDeadlineSeconds"] = spec.active_deadline_s
    if spec.patch_api == "podTemplateOverrides":
        body["podTemplateOverrides"] = [{"targetJobs": [{"name": NODE}], "spec": pod}]
    else:
        body["runtimePatches"] = [{"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {
            "replicatedJobs": [{"name": NODE, "template": {"spec": {"template": {"spec": pod}}}}]}}}}]
    labels = {"app.kubernetes.io/part-of": "saft", **spec.labels, **({QUEUE_LABEL: spec.queue} if spec.queue else {})}
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": spec.name, "labels": labels},
            "spec": body}


def finished(job: dict) -> dict | None:
    """The job's ``Complete`` or ``Failed`` condition once one is true, else None."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return cond
    return None


def suspended(job: dict) -> dict | None:
    """Why the job waits (its ``Suspended`` condition, or ``spec.suspend`` before the controller has
    set one: Kueue suspends a queued job at creation), else None."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Suspended":
            return cond if cond.get("status") == "True" else None
    if (job.get("spec") or {}).get("suspend"):
        return {"type": "Suspended", "status": "True", "reason": "Suspended", "message": "spec.suspend is true"}
    return None


class _Terminated(BaseException):
    """SIGTERM during the wait (a cancelled KFP run, an evicted pod): delete the job, then exit."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _unknown_field_hint(exc: KubeError, patch_api: str) -> str:
    if "strict decoding error" not in exc.server_message:
        return ""
    other = next(p for p in PATCH_APIS if p != patch_api)
    return (f"; the cluster's Trainer does not know these fields: the manifest is for {GENERATIONS[patch_api]} "
            f"(trainjob.patch_api: {patch_api}), so the cluster probably runs {GENERATIONS[other]}: set "
            f"trainjob.patch_api: {other}")


class _Launch:
    """One submission of a TrainJob and the wait for it (the two clocks, the clean-up)."""

    def __init__(self, jobs: TrainJobs, spec: TrainJobSpec, manifest: dict, *, timeout_s: float,
                 queue_timeout_s: float, poll_s: float, log, sleep, clock):
        self.jobs, self.spec, self.manifest = jobs, spec, manifest
        self.timeout_s, self.queue_timeout_s, self.poll_s = timeout_s, queue_timeout_s, poll_s
        self.log, self.sleep, self.clock = log, sleep, clock
        self.where = f"TrainJob {jobs.namespace}/{spec.name}"
        self.queued_s = self.running_s = 0.0
        # where the deadline is in the spec, Trainer acts first; the launcher's own limit is the fallback
        self.grace_s = max(60.0, 2 * poll_s) if spec.active_deadline_s else 0.0

    def _create_when_free(self) -> None:
        try:
            self.jobs.create_when_free(self.manifest, max(300.0, 10 * self.poll_s), poll_s=max(self.poll_s, 1.0),
                                       clock=self.clock, sleep=self.sleep, log=lambda m: self.log(f"trainjob: {m}"))
        except KubeError as exc:
            raise TrainJobError(f"submitting {self.where} failed: {exc}"
                                f"{_unknown_field_hint(exc, self.spec.patch_api)}") from None

    def submit(self) -> None:
        try:
            self.jobs.create(self.manifest)
        except KubeError as exc:
            if exc.status != 409:
                raise TrainJobError(f"submitting {self.where} failed: {exc}"
                                    f"{_unknown_field_hint(exc, self.spec.patch_api)}") from None
            self._adopt(exc)
            return
        self.log(f"trainjob: submitted {self.where}: {self.spec.num_nodes} nodes x {self.spec.gpus_per_node} GPUs, "
                 f"runtime {self.spec.runtime}"
                 + (f", deadline {self.spec.active_deadline_s} s of running" if self.spec.active_deadline_s else "")
                 + (f", Kueue queue {self.spec.queue}" if self.spec.queue else ""))

    def _adopt(self, exc: KubeError) -> None:
        """A job of this name exists (a retried launcher): wait for it, take it, or replace it."""
        if exc.terminating:
            self.log(f"trainjob: {self.where} is still being deleted: creating it again once it is gone")
            return self._create_when_free()
        existing = self.jobs.get(self.spec.name)
        if existing is None:
            return self._create_when_free()
        cond = finished(existing)
        if cond is None:
            self.log(f"trainjob: {self.where} already exists (a retry): waiting for it")
        elif cond["type"] == "Complete":
            self.log(f"trainjob: {self.where} already completed (a retry): taking its outputs")
        else:
            self.log(f"trainjob: {self.where} already failed ({cond.get('reason')}: {cond.get('message')}): "
                     "replacing it; the new job resumes from the checkpoints on the volume")
            self.delete("it failed before")
            self._create_when_free()

    def delete(self, why: str) -> None:
        """Delete the job (Foreground: it stays, terminating, until its JobSet and pods are gone)."""
        try:
            self.jobs.delete(self.spec.name, propagation="Foreground")
            self.log(f"trainjob: deleted {self.where} ({why}); its pods and GPUs are released")
        except KubeError as exc:
            self.log(f"trainjob: could not delete {self.where} ({why}): {exc}")

    def _times(self) -> str:
        return f"{self.queued_s:.0f} s waiting for admission, {self.running_s:.0f} s running"

    def wait(self) -> dict:
        """Poll until ``Complete`` or ``Failed``; returns that condition."""
        phase, last, started = None, self.clock(), self.clock()
        while True:
            try:
                job = self.jobs.get(self.spec.name)
            except KubeError as exc:
                raise TrainJobError(f"reading {self.where} failed: {exc}") from None
            now = self.clock()
            if phase == "queued":
                self.queued_s += now - last
            elif phase == "running":
                self.running_s += now - last
            last = now
            if job is None:
                raise TrainJobError(f"{self.where} disappeared while it ran (deleted by someone else?)")
            cond = finished(job)
            if cond is not None:
                return cond
            waiting = suspended(job)
            if waiting is not None:
                if phase != "queued":
                    self.log(f"trainjob: {self.where} waits for admission (Suspended: {waiting.get('reason')}: "
                             f"{waiting.get('message')}); this does not count as running time")
                phase = "queued"
                if self.queued_s >= self.queue_timeout_s:
                    self.delete("it waited too long for admission")
                    raise TrainJobError(
                        f"{self.where} was not admitted within {self.queue_timeout_s:g} s (Suspended: "
                        f"{waiting.get('reason')}: {waiting.get('message')}; {self._times()}); the job was deleted. "
                        "Its queue has no quota for it: check the Kueue ClusterQueue, or raise "
                        "trainjob.queue_timeout_s")
            else:
                if phase != "running":
                    started = now  # Trainer's deadline counts from creation or the last resume, as this clock does
                    if phase == "queued":
                        self.log(f"trainjob: {self.where} admitted after {self.queued_s:.0f} s: running")
                phase = "running"
                if now - started >= self.timeout_s + self.grace_s:
                    states = [f"{c.get('type')}={c.get('status')}" for c in
                              (job.get("status") or {}).get("conditions") or []]
                    self.delete("past its time limit")
                    raise TrainJobError(f"{self.where} did not finish within {self.timeout_s:g} s of running "
                                        f"(conditions: {', '.join(states) or 'none'}; {self._times()}); the job was "
                                        "deleted to free its GPUs")
            self.sleep(self.poll_s)


def launch_trainjob(argv: list[str], *, namespace: str, pvc: str, num_nodes: int, gpus_per_node: int,
                    name: str = "", mount_path: str = "/mnt/saft", image: str = "",
                    runtime: str = DEFAULT_RUNTIME, gpu_resource: str = "nvidia.com/gpu", cpu: str = "",
                    memory: str = "", env: dict[str, str] | None = None, patch_api: str = DEADLINE_API,
                    timeout_s: float = 6 * 3600, queue_timeout_s: float = 24 * 3600, queue: str = "",
                    poll_s: float = 15.0, host: str | None = None, token: str | None = None,
                    kubeconfig: str | None = None, context: str | None = None, verify_ssl: bool = True,
                    log: Callable[[str], None] = print, sleep: Callable[[float], None] = time.sleep,
                    clock: Callable[[], float] = time.monotonic) -> dict:
    """Submit ``saft ARGV`` (a finetune) as a TrainJob, wait for it, return its outputs.

    Returns ``{"name", "namespace", "condition", "queued_s", "running_s", "out_dir",
    "outputs", "summary"}``: the files the job wrote in its ``--out`` folder (read here through
    the same PVC, which this process must mount at ``mount_path``) and its ``finetune.json``.
    Raises :class:`TrainJobError` when the job fails (with its condition's reason and message;
    ``DeadlineExceeded`` said as such), when it waited longer than ``queue_timeout_s`` for
    admission or ran longer than ``timeout_s`` (the job is then deleted), when the launcher
    is stopped by SIGTERM (the job is deleted first), or when the API refuses it (with the
    server's message).
    """
    if timeout_s <= 0 or queue_timeout_s <= 0:
        raise TrainJobError(f"trainjob timeout_s ({timeout_s:g}) and queue_timeout_s ({queue_timeout_s:g}) must be > 0")
    spec = TrainJobSpec(name=name or job_name(argv), argv=[str(a) for a in argv], pvc=pvc, num_nodes=num_nodes,
                        gpus_per_node=gpus_per_node, mount_path=mount_path, image=resolve_image(image), runtime=runtime,
                        gpu_resource=gpu_resource, cpu=cpu, memory=memory, env=dict(env or {}),
                        patch_api=patch_api, queue=queue,
                        active_deadline_s=math.ceil(timeout_s) if patch_api == DEADLINE_API else 0)
    manifest = render_trainjob(spec)
    jobs = TrainJobs(namespace, host=host, token=token, kubeconfig=kubeconfig, context=context,
                     verify_ssl=verify_ssl, log=log)
    run = _Launch(jobs, spec, manifest, timeout_s=timeout_s, queue_timeout_s=queue_timeout_s, poll_s=poll_s,
                  log=log, sleep=sleep, clock=clock)
    if not spec.active_deadline_s:
        log(f"trainjob: {GENERATIONS[patch_api]} has no activeDeadlineSeconds: only this launcher enforces the "
            f"{timeout_s:g} s limit, so a job outlives a launcher that is killed without warning")
    with _sigterm_raises():
        try:
            run.submit()
            cond = run.wait()
        except _Terminated:
            run.delete("the launcher got SIGTERM: the run was cancelled or the pod evicted")
            raise TrainJobError(f"{run.where}: the launcher was stopped (SIGTERM); the job was deleted") from None
        except KeyboardInterrupt:
            run.delete("the launcher was interrupted")
            raise
    if cond["type"] == "Failed":
        if cond.get("reason") == DEADLINE_EXCEEDED:
            raise TrainJobError(f"{run.where} failed: {DEADLINE_EXCEEDED}: Trainer stopped it at its "
                                f"activeDeadlineSeconds ({spec.active_deadline_s} s of running, waiting for admission "
                                f"not counted; {run._times()}): {cond.get('message') or 'no message'}. Raise "
                                "trainjob.timeout_s if the training needs longer; a retry resumes from its checkpoints")
        raise TrainJobError(f"{run.where} failed: {cond.get('reason') or 'no reason'}: "
                            f"{cond.get('message') or 'no message'} ({run._times()})")
    log(f"trainjob: {run.where} complete ({run._times()})")
    return {"name": spec.name, "namespace": namespace, "condition": cond, "queued_s": round(run.queued_s, 1),
            "running_s": round(run.running_s, 1), **_outputs(spec, run.where)}


def _outputs(spec: TrainJobSpec, where: str) -> dict:
    out = Path(flag_values(spec.argv, ("--out",)).get("--out", ""))
    if not out.is_dir():
        raise TrainJobError(f"{where} is complete but its output folder {out} is not visible here: the launcher "
                            f"must mount the PVC {spec.pvc} at {spec.mount_path}")
    summary_file = out / FINETUNE.record
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    return {"out_dir": str(out), "outputs": sorted(p.name for p in out.iterdir()), "summary": summary}
