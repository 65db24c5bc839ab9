"""Phase II of SAFT across nodes: one learning rate as a Kubeflow Trainer TrainJob -> a delta."""

from kfp.dsl import Dataset, Input, Model, Output


def finetune_trainjob(model: str, data: Input[Dataset], mask: Input[Model], lr: float, settings: str, seed: int,
                      nodes: int, gpus_per_node: int, shared_root: str, pvc: str, trainjob: str, image: str,
                      tracking: bool, delta: Output[Model]):
    """Submits the same saft finetune command as a TrainJob of nodes x gpus_per_node processes and waits for it.

    The launcher holds no GPU: it stages the prepared data (with its drawn images) and the mask
    on the shared volume, creates the TrainJob (torch-distributed runtime, the project image),
    waits for Complete or Failed, and copies the delta into its output. The job carries
    activeDeadlineSeconds (Trainer v2.2+), time waiting for Kueue admission is not running time, and
    a cancelled launcher deletes its job. A retried launcher finds the job it submitted and the job
    resumes from its checkpoints on the volume.

    Args:
        model: Model spec the mask was scored on.
        data: The prepare task's output.
        mask: The score task's output.
        lr: Learning rate.
        settings: JSON of the finetune settings (as the finetune component).
        seed: Seed of the batch order.
        nodes: Nodes of the job (cluster.nodes).
        gpus_per_node: GPUs and processes per node (cluster.gpu_count).
        shared_root: Where this pod mounts the shared PVC; every node mounts it at the same path.
        pvc: The shared volume claim (cluster.checkpoint_pvc; ReadWriteMany across nodes).
        trainjob: JSON of params.yaml's trainjob section (namespace, image, runtime, gpu_resource, cpu, memory, timeout_s, queue_timeout_s, queue, poll_s, patch_api).
        image: The pipeline's image, the nodes' when trainjob names none.
        tracking: Log a nested MLflow run (curves, delta).
        delta: delta.safetensors, history.json, finetune.json, trainjob.json.
    """
    from saft.steps.configs import FinetuneStepConfig
    from saft.orchestration.trainjob_task import finetune_trainjob_task
    from saft.orchestration.parent_run import parent_run
    from saft.orchestration.tasks import settings_config

    cfg = settings_config(FinetuneStepConfig, settings, model=model, method="saft", lr=lr, seed=seed,
                          device="cuda")
    finetune_trainjob_task(data.path, mask.path, delta.path, cfg, shared_root=shared_root, pvc=pvc, nodes=nodes,
                           gpus_per_node=gpus_per_node, settings=trainjob, image=image,
                           parent_run_id=parent_run(tracking))
