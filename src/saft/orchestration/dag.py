"""The Kubeflow DAG and its cluster settings.

    start_run -> world -> for each seed: prepare -> score (saft, random) -> finetune (saft, random, full)
              -> suite_datasets -> for each dataset: evaluate (all deltas) -> collect -> register -> finish_run

Cluster settings (``ClusterConfig``, compile-time; kfp.local ignores them): GPU requests
and accelerator type on scoring, training and evaluation; node selector and toleration
for GPU nodes; S3 and MLflow credentials from Kubernetes secrets as environment
variables; a memory-backed /dev/shm for DataLoader workers; caching on every
deterministic task (its key covers the inputs, and the data hash is an input of every
task that reads the data) and never on tasks with side effects (MLflow runs, registry);
retries with backoff on compute tasks, which resume from their step records.
"""


import json
from dataclasses import dataclass, field

from kfp import dsl, kubernetes
from kfp.dsl import Dataset

from saft.orchestration.components import DEFAULT_IMAGE, build
from saft.steps.params import PipelineParams

PIPELINE_NAME = "saft-robust-finetuning"


@dataclass(frozen=True)
class ClusterConfig:
    image: str = DEFAULT_IMAGE
    # kfp.local cannot resolve pipeline parameters inside resource and Kubernetes settings
    # (it ignores those settings anyway), so local runs build the DAG without them.
    kubernetes: bool = True
    s3_secret: str = "saft-s3"  # keys: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL_S3
    mlflow_secret: str = "saft-mlflow"  # keys: MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME, ..._PASSWORD
    gpu_node_label: tuple[str, str] = ("nvidia.com/gpu.present", "true")
    gpu_toleration_key: str = "nvidia.com/gpu"
    shm_size: str = "8Gi"
    retries: int = 2
    cpu_request: str = "4"
    memory_request: str = "16Gi"
    memory_limit: str = "32Gi"
    s3_keys: tuple[str, ...] = field(default=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"))
    mlflow_keys: tuple[str, ...] = field(default=("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                                                  "MLFLOW_TRACKING_PASSWORD"))


def _credentials(task, cfg: ClusterConfig):
    if not cfg.kubernetes:
        return task
    kubernetes.use_secret_as_env(task, cfg.s3_secret, {k: k for k in cfg.s3_keys}, optional=True)
    kubernetes.use_secret_as_env(task, cfg.mlflow_secret, {k: k for k in cfg.mlflow_keys}, optional=True)
    return task


def _cached(task, on: bool = True):
    task.set_caching_options(on)
    return task


def _compute(task, cfg: ClusterConfig, gpu_type, gpu_count):
    """A GPU task: accelerator request, GPU node placement, shared memory, resources, retries."""
    if not cfg.kubernetes:
        return _cached(task)
    task.set_accelerator_type(gpu_type).set_accelerator_limit(gpu_count)
    task.set_cpu_request(cfg.cpu_request).set_memory_request(cfg.memory_request).set_memory_limit(cfg.memory_limit)
    task.set_retry(num_retries=cfg.retries, backoff_duration="60s", backoff_factor=2.0)
    kubernetes.add_node_selector(task, *cfg.gpu_node_label)
    kubernetes.add_toleration(task, key=cfg.gpu_toleration_key, operator="Exists", effect="NoSchedule")
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                               size_limit=cfg.shm_size)
    return _cached(_credentials(task, cfg))


def build_pipeline(cfg: ClusterConfig = ClusterConfig()):
    """The pipeline function for ``cfg`` (compile it, run it with kfp.local, or submit it)."""
    c = build(cfg.image)

    @dsl.pipeline(name=PIPELINE_NAME, description="SAFT vs full fine-tuning vs a random mask, with an OOD suite, "
                                                  "MLflow tracking and an OOD-aware promotion gate.")
    def saft_pipeline(
        model: str = "tiny",
        seeds: list = [1, 2, 3],
        device: str = "auto",
        data_root: str = "",
        dataset: str = "imagefolder",
        split: str = "",
        shots: int = 16,
        val_shots: int = 8,
        pool_per_class: int = 64,
        test_per_class: int = 100,
        density: float = 0.001,
        score_rule: str = "abs_mean",
        score_batch_size: int = 32,
        steps: int = 100,
        batch_size: int = 32,
        lr_saft: float = 3e-3,
        lr_full: float = 1e-4,
        lr_random: float = 1e-2,
        warmup_steps: int = 10,
        weight_decay: float = 0.1,
        suite: str = "",
        alphas: list = [1.0],
        eval_batch_size: int = 128,
        register_model_name: str = "saft-tiny",
        promote: bool = True,
        ood_tolerance: float = 0.01,
        id_tolerance: float = 0.01,
        register_baseline: bool = True,
        tracking: bool = True,
        params_json: str = "{}",
        gpu_type: str = "nvidia.com/gpu",
        gpu_count: int = 1,
    ) -> Dataset:
        start = _cached(_credentials(c.start_run(params_json=params_json, run_name=PIPELINE_NAME,
                                                 tracking=tracking), cfg), False)
        run_id = start.outputs["run"]
        world = _cached(_credentials(c.world(data_root=data_root, pool_per_class=pool_per_class,
                                             test_per_class=test_per_class), cfg))
        with dsl.ParallelFor(seeds) as seed:
            prep = _cached(_credentials(c.prepare(world=world.outputs["world"], data_root=data_root, dataset=dataset,
                                                  split=split, shots=shots, val_shots=val_shots, seed=seed,
                                                  run=run_id), cfg))
            data, data_hash = prep.outputs["data"], prep.outputs["Output"]
            masks = {}
            for kind in ("saft", "random"):
                task = c.score(model=model, data=data, data_hash=data_hash, kind=kind, density=density,
                               rule=score_rule, batch_size=score_batch_size, seed=seed, device=device,
                               run=run_id)
                masks[kind] = _compute(task.set_display_name(f"score-{kind}"), cfg, gpu_type, gpu_count)
            tuned = {}
            for method, lr in (("saft", lr_saft), ("random", lr_random), ("full", lr_full)):
                kwargs = {"mask": masks[method].outputs["mask"]} if method in masks else {}
                task = c.finetune(model=model, data=data, data_hash=data_hash, method=method, lr=lr, steps=steps,
                                  batch_size=batch_size, warmup_steps=warmup_steps, weight_decay=weight_decay,
                                  seed=seed, device=device, run=run_id, **kwargs)
                tuned[method] = _compute(task.set_display_name(f"finetune-{method}"), cfg, gpu_type, gpu_count)
        gathered = _cached(c.gather_deltas(**{f"{m}_deltas": dsl.Collected(t.outputs["delta"])
                                              for m, t in tuned.items()}))
        deltas = gathered.outputs["deltas"]
        names = _cached(c.suite_datasets(world=world.outputs["world"], suite=suite, data_root=data_root))
        with dsl.ParallelFor(names.output) as name:
            part = c.evaluate(model=model, world=world.outputs["world"], suite=suite, data_root=data_root,
                              dataset=name, alphas=alphas, batch_size=eval_batch_size, device=device,
                              run=run_id, deltas=deltas)
            _compute(part, cfg, gpu_type, gpu_count)
        collected = _cached(_credentials(c.collect(
            parts=dsl.Collected(part.outputs["metrics"]), deltas=deltas, lr_saft=lr_saft, lr_full=lr_full, lr_random=lr_random,
            run=run_id), cfg))
        reg = _cached(_credentials(c.register(
            model=model, results=collected.outputs["results"], deltas=deltas,
            data=dsl.Collected(prep.outputs["data"]), model_name=register_model_name, promote=promote,
            ood_tolerance=ood_tolerance, id_tolerance=id_tolerance, baseline=register_baseline, run=run_id), cfg),
            False)
        reg.set_retry(num_retries=cfg.retries, backoff_duration="30s", backoff_factor=2.0)  # idempotent
        finish = _cached(_credentials(c.finish_run(run=run_id, results=collected.outputs["results"]), cfg),
                         False)
        finish.after(reg)
        return collected.outputs["results"]

    return saft_pipeline


def pipeline_arguments(params: PipelineParams, *, tracking: bool = True) -> dict:
    """``params.yaml`` as the pipeline's arguments (the pipeline trains saft, random and full)."""
    if sorted(params.finetune.methods) != ["full", "random", "saft"]:
        raise ValueError("the Kubeflow pipeline trains saft, random and full: keep finetune.methods at all three "
                         "(use `saft run` for a subset)")
    if params.register.method != "saft":
        raise ValueError("the Kubeflow pipeline registers the saft delta: keep register.method: saft")
    if list(params.score.include) != ["*"] or list(params.score.exclude) != ["logit_scale", "logit_bias"]:
        raise ValueError("the Kubeflow pipeline uses the default eligibility: keep score.include/exclude "
                         "(use `saft run` for other patterns)")
    f, d, e, r = params.finetune, params.data, params.evaluate, params.register
    return {
        "model": params.model, "seeds": list(params.seeds), "device": params.device, "data_root": d.root,
        "dataset": d.dataset, "split": d.split, "shots": d.shots, "val_shots": d.val_shots,
        "pool_per_class": params.world.pool_per_class, "test_per_class": params.world.test_per_class,
        "density": params.score.density, "score_rule": params.score.rule, "score_batch_size": params.score.batch_size,
        "steps": f.steps, "batch_size": f.batch_size, "lr_saft": f.lr["saft"], "lr_full": f.lr["full"],
        "lr_random": f.lr["random"], "warmup_steps": f.warmup_steps, "weight_decay": f.weight_decay,
        "suite": e.suite, "alphas": list(e.alphas), "eval_batch_size": e.batch_size,
        "register_model_name": r.model_name, "promote": r.promote and r.enabled, "ood_tolerance": r.ood_tolerance,
        "id_tolerance": r.id_tolerance, "register_baseline": r.baseline, "tracking": tracking,
        "params_json": json.dumps(params.to_dict()),
        "gpu_type": params.cluster.gpu_type, "gpu_count": params.cluster.gpu_count,
    }
