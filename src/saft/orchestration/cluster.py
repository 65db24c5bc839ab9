"""Cluster settings of the pipelines' tasks: one policy, applied by name, for every pipeline.

``ClusterConfig`` is compile-time (KFP v2 takes the image, resource requests, volumes and
loop parallelism when the pipeline is compiled, not as run parameters). ``configure``
applies it to a task by its component's name:

- resources: CPU and memory requests (and limits) on every task, sized by what the task
  loads (``TASK_RESOURCES``); a GPU, GPU-node placement and a memory-backed /dev/shm on
  the tasks that run a model over images;
- credentials: S3 and MLflow secrets as environment variables (optional secrets, so a
  cluster without one still runs); the pipeline run's id (the pod's ``pipeline/runid``
  label) as ``SAFT_PIPELINE_RUN``, through which tasks find their MLflow parent run
  without an input that would defeat caching (:mod:`saft.orchestration.parent_run`);
- caching on every deterministic task (its key covers its inputs: the data version is
  one of them wherever data is read) and never on tasks with side effects or whose
  answer changes over time (MLflow runs, the data version, the registry, deploy);
- retries with backoff on the tasks that are safe to repeat; training checkpoints on a
  PVC (``checkpoint_pvc``) mounted into the finetune tasks, where a retry finds them.

kfp.local cannot resolve pipeline parameters inside resource and Kubernetes settings
(and ignores them anyway), so local runs build the DAG with ``kubernetes=False``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from saft.images import SNAPSHOT_IMAGE
PIPELINE_RUN_LABEL = "metadata.labels['pipeline/runid']"


@dataclass(frozen=True)
class Resources:
    cpu: str
    memory: str
    memory_limit: str
    gpu: bool = False


# What each component loads decides its size: a model over images (GPU), a whole dataset
# split or a model on CPU (data), or a few files and API calls (light).
_GPU = Resources("4", "16Gi", "32Gi", gpu=True)
_DATA = Resources("4", "8Gi", "16Gi")
_LIGHT = Resources("500m", "1Gi", "2Gi")
TASK_RESOURCES: dict[str, Resources] = {
    "score": _GPU, "finetune": _GPU, "finetune_trainjob": _DATA, "baseline": _GPU, "select": _GPU, "evaluate": _GPU,
    "train_method": _GPU,
    "world": _DATA, "prepare": _DATA, "register": _DATA, "collect": _DATA, "compare": _DATA,
    "gather_deltas": _DATA, "gather_seed": _DATA, "gather_runs": _DATA, "collect_base2new": _DATA,
    "data_version": Resources("1", "2Gi", "4Gi"), "start_run": _LIGHT, "finish_run": _LIGHT,
    "suite_datasets": _LIGHT, "protocol": _LIGHT, "base2new_trainings": _LIGHT, "deploy": _LIGHT,
}
UNCACHED = frozenset({"start_run", "finish_run", "data_version", "register", "deploy"})
NO_RETRY = frozenset({"start_run", "finish_run"})  # a retried start would open a second parent run
CHECKPOINTED = frozenset({"finetune", "baseline", "finetune_trainjob", "train_method"})  # the launcher: its job's shared volume


@dataclass(frozen=True)
class ClusterConfig:
    image: str = SNAPSHOT_IMAGE
    kubernetes: bool = True
    parallelism: int = 2  # loop iterations at a time in every fan-out
    retries: int = 2
    checkpoint_pvc: str = "saft-checkpoints"  # "" = checkpoints die with the pod
    checkpoint_mount: str = "/mnt/saft-checkpoints"
    s3_secret: str = "saft-s3"  # keys: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL_S3
    mlflow_secret: str = "saft-mlflow"  # keys: MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME, ..._PASSWORD
    gpu_node_label: tuple[str, str] = ("nvidia.com/gpu.present", "true")
    gpu_toleration_key: str = "nvidia.com/gpu"
    shm_size: str = "8Gi"
    s3_keys: tuple[str, ...] = field(default=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"))
    mlflow_keys: tuple[str, ...] = field(default=("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                                                  "MLFLOW_TRACKING_PASSWORD"))

    @property
    def checkpoint_root(self) -> str:
        """The default of the pipelines' checkpoint_root parameter."""
        return self.checkpoint_mount if self.kubernetes and self.checkpoint_pvc else ""

    @classmethod
    def from_params(cls, params, **overrides) -> "ClusterConfig":
        """The compile-time settings params.yaml holds (``cluster.parallelism``, ``cluster.checkpoint_pvc``)."""
        return cls(parallelism=params.cluster.parallelism, checkpoint_pvc=params.cluster.checkpoint_pvc,
                   **overrides)


def configure(task, name: str, cfg: ClusterConfig, gpu_type=None, gpu_count=None, *, display: str | None = None):
    """Apply the cluster policy for component ``name`` to ``task`` (see the module docstring)."""
    if display:
        task.set_display_name(display)
    task.set_caching_options(name not in UNCACHED)
    if not cfg.kubernetes:
        return task
    from kfp import kubernetes

    res = TASK_RESOURCES[name]
    task.set_cpu_request(res.cpu).set_memory_request(res.memory).set_memory_limit(res.memory_limit)
    if res.gpu:
        task.set_accelerator_type(gpu_type).set_accelerator_limit(gpu_count)
        kubernetes.add_node_selector(task, *cfg.gpu_node_label)
        kubernetes.add_toleration(task, key=cfg.gpu_toleration_key, operator="Exists", effect="NoSchedule")
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=cfg.shm_size)
    if name not in NO_RETRY and cfg.retries:
        task.set_retry(num_retries=cfg.retries, backoff_duration="60s", backoff_factor=2.0)
    if name in CHECKPOINTED and cfg.checkpoint_pvc:
        kubernetes.mount_pvc(task, pvc_name=cfg.checkpoint_pvc, mount_path=cfg.checkpoint_mount)
    kubernetes.use_secret_as_env(task, cfg.s3_secret, {k: k for k in cfg.s3_keys}, optional=True)
    kubernetes.use_secret_as_env(task, cfg.mlflow_secret, {k: k for k in cfg.mlflow_keys}, optional=True)
    kubernetes.use_field_path_as_env(task, "SAFT_PIPELINE_RUN", PIPELINE_RUN_LABEL)
    return task


def policy(cfg: ClusterConfig, gpu_type=None, gpu_count=None):
    """``on(task, name, display=None)``: :func:`configure` bound to a pipeline's cluster settings (what the
    shared stages in :mod:`saft.orchestration.stages` take)."""
    def on(task, name: str, display: str | None = None):
        return configure(task, name, cfg, gpu_type, gpu_count, display=display)
    return on


__all__ = ["ClusterConfig", "Resources", "TASK_RESOURCES", "UNCACHED", "configure", "policy"]
