"""``saft finetune`` across nodes: a Kubeflow Trainer TrainJob on the torch-distributed runtime.

A launcher task renders a TrainJob (``trainer.kubeflow.org/v1alpha1``) whose trainer runs
the project image with the same ``saft finetune`` command line a one-pod task runs, under
``torch.distributed.run`` on every node: the runtime's torch plugin sets the ``PET_*``
variables (nodes, processes per node, node rank, master address) that torchrun reads, so
the step itself is unchanged. Inputs and outputs live on a shared PVC mounted at the same
path in the launcher and in every node, so the launcher reads the delta the job wrote.

The job is named from its command line (:func:`job_name`), so a retried launcher finds
the job it already submitted (HTTP 409 on create) and waits for it instead of starting a
second one. A job past the timeout is deleted, freeing its GPUs.

Volumes go through ``podTemplateOverrides`` (Trainer v2.0/v2.1) or, with
``patch_api="runtimePatches"``, the API that replaced it in later releases.

Nothing here imports kfp; the Kubernetes calls are :mod:`saft.serving.kube`'s.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from saft.orchestration.cluster import resolve_image
from saft.serving.kube import CustomObjects, KubeError

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
DEFAULT_RUNTIME = "torch-distributed"
NODE = "node"  # the runtime's trainer job and container (the torch-distributed runtime's names)
VOLUME = "saft-data"
PATCH_MANAGER = "saft.io/launcher"
PATCH_APIS = ("podTemplateOverrides", "runtimePatches")
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
    patch_api: str = "podTemplateOverrides"
    labels: dict[str, str] = field(default_factory=dict)

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
    if spec.patch_api == "podTemplateOverrides":
        body["podTemplateOverrides"] = [{"targetJobs": [{"name": NODE}], "spec": pod}]
    else:
        body["runtimePatches"] = [{"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {
            "replicatedJobs": [{"name": NODE, "template": {"spec": {"template": {"spec": pod}}}}]}}}}]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
            "metadata": {"name": spec.name, "labels": {"app.kubernetes.io/part-of": "saft", **spec.labels}},
            "spec": body}


def finished(job: dict) -> dict | None:
    """The job's ``Complete`` or ``Failed`` condition once one is true, else None."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return cond
    return None


def launch_trainjob(argv: list[str], *, namespace: str, pvc: str, num_nodes: int, gpus_per_node: int,
                    name: str = "", mount_path: str = "/mnt/saft", image: str = "",
                    runtime: str = DEFAULT_RUNTIME, gpu_resource: str = "nvidia.com/gpu", cpu: str = "",
                    memory: str = "", env: dict[str, str] | None = None, patch_api: str = "podTemplateOverrides",
                    timeout_s: float = 6 * 3600, poll_s: float = 15.0, host: str | None = None,
                    token: str | None = None, kubeconfig: str | None = None, context: str | None = None,
                    verify_ssl: bool = True, log: Callable[[str], None] = print,
                    sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> dict:
    """Submit ``saft ARGV`` (a finetune) as a TrainJob, wait for it, return its outputs.

    Returns ``{"name", "namespace", "condition", "out_dir", "outputs", "summary"}``:
    the files the job wrote in its ``--out`` folder (read here through the same PVC,
    which this process must mount at ``mount_path``) and its ``finetune.json``.
    Raises :class:`TrainJobError` when the job fails (with its condition's reason and
    message), when it is not finished after ``timeout_s`` (the job is then deleted), or
    when the API refuses it (with the server's message).
    """
    spec = TrainJobSpec(name=name or job_name(argv), argv=[str(a) for a in argv], pvc=pvc, num_nodes=num_nodes,
                        gpus_per_node=gpus_per_node, mount_path=mount_path, image=resolve_image(image), runtime=runtime,
                        gpu_resource=gpu_resource, cpu=cpu, memory=memory, env=dict(env or {}),
                        patch_api=patch_api)
    manifest = render_trainjob(spec)
    jobs = TrainJobs(namespace, host=host, token=token, kubeconfig=kubeconfig, context=context,
                     verify_ssl=verify_ssl)
    where = f"TrainJob {namespace}/{spec.name}"
    try:
        jobs.create(manifest)
        log(f"trainjob: submitted {where}: {num_nodes} nodes x {gpus_per_node} GPUs, runtime {runtime}")
    except KubeError as exc:
        if exc.status != 409:
            raise TrainJobError(f"submitting {where} failed: {exc}") from None
        log(f"trainjob: {where} already exists (a retry): waiting for it")
    deadline = clock() + timeout_s
    while True:
        try:
            job = jobs.get(spec.name)
        except KubeError as exc:
            raise TrainJobError(f"reading {where} failed: {exc}") from None
        if job is None:
            raise TrainJobError(f"{where} disappeared while it ran (deleted by someone else?)")
        cond = finished(job)
        if cond is not None:
            break
        if clock() >= deadline:
            states = [f"{c.get('type')}={c.get('status')}" for c in (job.get("status") or {}).get("conditions") or []]
            try:
                jobs.delete(spec.name)
            except KubeError as exc:
                log(f"trainjob: could not delete {where} after the timeout: {exc}")
            raise TrainJobError(f"{where} did not finish within {timeout_s:g} s (conditions: "
                                f"{', '.join(states) or 'none yet'}); the job was deleted to free its GPUs")
        sleep(poll_s)
    if cond["type"] == "Failed":
        raise TrainJobError(f"{where} failed: {cond.get('reason') or 'no reason'}: "
                            f"{cond.get('message') or 'no message'}")
    log(f"trainjob: {where} complete")
    return {"name": spec.name, "namespace": namespace, "condition": cond, **_outputs(spec, where)}


def _outputs(spec: TrainJobSpec, where: str) -> dict:
    out = Path(flag_values(spec.argv, ("--out",)).get("--out", ""))
    if not out.is_dir():
        raise TrainJobError(f"{where} is complete but its output folder {out} is not visible here: the launcher "
                            f"must mount the PVC {spec.pvc} at {spec.mount_path}")
    summary_file = out / "finetune.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    return {"out_dir": str(out), "outputs": sorted(p.name for p in out.iterdir()), "summary": summary}
