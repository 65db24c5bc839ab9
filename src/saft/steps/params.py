"""Pipeline parameters: ``params.yaml`` as typed dataclasses, with ``KEY=VALUE`` overrides.

The same document drives ``saft run``, ``dvc repro`` (its stages read their sections) and
the Kubeflow pipeline (``saft pipeline run/submit`` turn it into pipeline arguments).
Unknown keys and values of the wrong type are refused with the dotted key and the file
named, so a typo never silently falls back to a default. The resolved parameters (file
+ overrides + defaults) are written next to a run's outputs.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from saft.io import atomic_path

DEFAULT_PARAMS_FILE = "params.yaml"
RESOLVED_FILE = "params.resolved.yaml"
# Chosen on the world's ID validation split by `saft benchmark synthshift` (protocols/chosen_lr.json).
DEFAULT_LR = {"saft": 3e-3, "full": 1e-4, "random": 1e-2}
METHODS = ("saft", "full", "random")
SUBSETS = ("all", "base")  # base: the first half of the classes (base-to-new); "new" is never trained on


def resolve_device(device: str) -> str:
    """``auto``: CUDA when a GPU is visible (cluster nodes), else the CPU (laptops, CI)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class ParamsError(ValueError):
    """A parameters file or override does not fit the schema."""


@dataclass
class WorldParams:
    """The embedded world, rendered when ``data.root`` is empty."""

    pool_per_class: int = 64
    test_per_class: int = 100


@dataclass
class DataParams:
    dataset: str = "imagefolder"
    root: str = ""  # empty: the embedded world's ID pool
    split: str = ""  # empty: the dataset's training split
    shots: int = 16
    val_shots: int = 8
    # The data version (steps/data_version.py): resolved at run time from the root; these pin it.
    version: str = ""  # non-empty: the run fails unless the data is exactly this version
    rev: str = ""  # git revision of the DVC-tracked data.root ("" = the working tree); CI passes its commit
    repo: str = ""  # repository holding data.root's .dvc file (path or git URL; "" = the one data.root is in)
    subset: str = "all"  # all | base (the first ceil(n/2) classes in label order: base-to-new)
    train_templates: list[str] = field(default_factory=list)  # empty: the dataset's training prompt


@dataclass
class LoaderParams:
    """DataLoader settings of scoring, training and evaluation (see saft.loader)."""

    num_workers: int = -1  # -1: from the task's CPUs (GPU: min(8, cpus-1); CPU: min(4, cpus//2-1))
    pin_memory: bool = True  # CUDA only
    persistent_workers: bool = True


@dataclass
class ScoreParams:
    density: float = 0.001
    rule: str = "abs_mean"
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=lambda: ["logit_scale", "logit_bias"])
    batch_size: int = 32
    prompts: str = "train"  # train: the prepared training prompt; eval: the evaluation ensemble
    text_batch: int = 0  # prompts encoded at once, bounding the text side's memory; 0: 8 per image of the batch


@dataclass
class FinetuneParams:
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    steps: int = 100
    batch_size: int = 32
    lr: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LR))
    warmup_steps: int = 10
    weight_decay: float = 0.1
    checkpoint_every: int = 0
    prompts: str = "train"
    text_batch: int = 0
    epochs: float = 0.0  # > 0: train this many passes over the training set (overrides steps)
    grad_accum: int = 1
    precision: str = "auto"  # auto | fp32 | bf16 | fp16


# The embedded world's grid around the rate `saft benchmark synthshift` chose (3e-3); real-model
# grids are in docs/pipelines.md.
DEFAULT_LR_GRID = [1e-3, 3e-3, 1e-2]


@dataclass
class RetrainParams:
    """The retrain pipeline: SAFT over a learning-rate grid, the rate chosen on ID validation."""

    lr_grid: list[float] = field(default_factory=lambda: list(DEFAULT_LR_GRID))
    seed: int = 1
    baselines: list[str] = field(default_factory=list)  # full, random: trained at finetune.lr, compared, never shipped


@dataclass
class DeployParams:
    """The retrain pipeline's deploy task: the promoted champion onto KServe, by canary (saft.steps.deploy)."""

    enabled: bool = True
    dry_run: bool = True  # apply nothing (server-side dry run where allowed); false: apply it (in-cluster credentials)
    namespace: str = "default"
    deployment_mode: str = "Knative"  # KServe >= 0.16: Knative (canary) or Standard (no canary: canary_percent 0)
    image: str = ""  # predictor image; empty: the pipeline's own image
    cpu: str = "2"
    memory: str = "8Gi"
    gpu_count: int = 1  # 0: a CPU predictor
    canary_percent: int = 10
    ready_timeout_s: float = 900.0
    poll_s: float = 5.0
    observe_s: float = 60.0  # a ready canary is watched this long before it gets all traffic


@dataclass
class EvaluateParams:
    suite: str = ""  # empty: the embedded world's synthshift suite
    data_root: str = ""
    alphas: list[float] = field(default_factory=lambda: [1.0])
    batch_size: int = 128
    reference: str = ""  # effective-robustness reference fit: "" the suite's default, none, a name or a YAML file


@dataclass
class RegisterParams:
    enabled: bool = True
    model_name: str = "saft-tiny"
    method: str = "saft"
    promote: bool = True
    ood_tolerance: float = 0.01
    id_tolerance: float = 0.01
    gate: str = "auto"  # auto | id_ood | hm (auto: hm on a base-to-new suite, else id_ood)
    hm_tolerance: float = 0.01
    baseline: bool = True  # with no champion yet, the zero-shot base is registered and promoted first


@dataclass
class ClusterParams:
    """Kubeflow only: the accelerator every scoring, training and evaluation task requests."""

    gpu_type: str = "nvidia.com/gpu"
    gpu_count: int = 1
    parallelism: int = 2  # loop iterations at a time in every fan-out (compiled into the pipeline)
    checkpoint_pvc: str = "saft-checkpoints"  # PVC where training checkpoints outlive a pod; "": none
    nodes: int = 1  # retrain: > 1 trains each SAFT delta as a TrainJob of nodes x gpu_count processes


@dataclass
class TrainJobParams:
    """The retrain pipeline with ``cluster.nodes`` > 1: each finetune as a Kubeflow Trainer TrainJob.

    The job's inputs and outputs go through ``cluster.checkpoint_pvc`` (ReadWriteMany when
    the nodes differ), mounted at the same path in the launcher task and every node.
    """

    namespace: str = "default"  # where the TrainJob is created (the pipeline runner's service account needs rights)
    image: str = ""  # the nodes' image; empty: the pipeline's own image
    runtime: str = "torch-distributed"  # ClusterTrainingRuntime name
    gpu_resource: str = "nvidia.com/gpu"
    cpu: str = ""  # per node; "": the runtime's
    memory: str = ""
    timeout_s: float = 6 * 3600.0  # running time; the job's activeDeadlineSeconds (v2.2+); past it the job is stopped
    queue_timeout_s: float = 24 * 3600.0  # time suspended waiting for admission (Kueue); past it the job is deleted
    queue: str = ""  # Kueue LocalQueue (label kueue.x-k8s.io/queue-name); "": not queued by Kueue
    poll_s: float = 15.0
    patch_api: str = "runtimePatches"  # Trainer v2.2+; podTemplateOverrides for v2.0/v2.1 (no activeDeadlineSeconds)


@dataclass
class PipelineParams:
    model: str = "tiny"
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    world: WorldParams = field(default_factory=WorldParams)
    data: DataParams = field(default_factory=DataParams)
    loader: LoaderParams = field(default_factory=LoaderParams)
    score: ScoreParams = field(default_factory=ScoreParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    register: RegisterParams = field(default_factory=RegisterParams)
    retrain: RetrainParams = field(default_factory=RetrainParams)
    deploy: DeployParams = field(default_factory=DeployParams)
    cluster: ClusterParams = field(default_factory=ClusterParams)
    trainjob: TrainJobParams = field(default_factory=TrainJobParams)

    @property
    def embedded(self) -> bool:
        return not self.data.root

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "PipelineParams":
        where = "params"
        if not self.seeds:
            raise ParamsError(f"{where}: seeds is empty; give at least one seed, e.g. seeds: [1]")
        if len(set(self.seeds)) != len(self.seeds):
            raise ParamsError(f"{where}: seeds {self.seeds} repeat a seed")
        if not 0.0 < self.score.density <= 1.0:
            raise ParamsError(f"{where}: score.density must be in (0, 1], got {self.score.density}")
        unknown = [m for m in self.finetune.methods if m not in METHODS]
        if unknown or not self.finetune.methods:
            raise ParamsError(f"{where}: finetune.methods must be a non-empty subset of {list(METHODS)}, "
                              f"got {self.finetune.methods}")
        missing = [m for m in self.finetune.methods if m not in self.finetune.lr]
        if missing:
            raise ParamsError(f"{where}: finetune.lr has no learning rate for {', '.join(missing)}")
        if self.register.enabled and self.register.method not in self.finetune.methods:
            raise ParamsError(f"{where}: register.method {self.register.method!r} is not among finetune.methods")
        for name in ("steps", "batch_size"):
            if getattr(self.finetune, name) < 1:
                raise ParamsError(f"{where}: finetune.{name} must be >= 1")
        if not 0 <= self.finetune.warmup_steps <= self.finetune.steps:
            raise ParamsError(f"{where}: finetune.warmup_steps ({self.finetune.warmup_steps}) must be in "
                              f"[0, finetune.steps ({self.finetune.steps})]")
        if self.data.shots < 1:
            raise ParamsError(f"{where}: data.shots must be >= 1")
        for section in ("score", "finetune"):
            part = getattr(self, section)
            if part.prompts not in ("train", "eval"):
                raise ParamsError(f"{where}: {section}.prompts must be train or eval, got {part.prompts!r}")
            if part.text_batch < 0:
                raise ParamsError(f"{where}: {section}.text_batch must be >= 1, or 0 for 8 prompts per image")
        if self.loader.num_workers < -1:
            raise ParamsError(f"{where}: loader.num_workers must be >= 0, or -1 to choose from the CPUs")
        if self.data.subset not in SUBSETS:
            raise ParamsError(f"{where}: data.subset must be one of {', '.join(SUBSETS)} (base: train on the first "
                              f"half of the classes for base-to-new), got {self.data.subset!r}")
        if self.register.gate not in ("auto", "id_ood", "hm"):
            raise ParamsError(f"{where}: register.gate must be auto, id_ood or hm, got {self.register.gate!r}")
        f = self.finetune
        if f.epochs < 0 or f.grad_accum < 1 or f.checkpoint_every < 0:
            raise ParamsError(f"{where}: finetune.epochs must be >= 0, finetune.grad_accum >= 1 and "
                              f"finetune.checkpoint_every >= 0")
        if f.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ParamsError(f"{where}: finetune.precision must be auto, fp32, bf16 or fp16, got {f.precision!r}")
        r = self.retrain
        if not r.lr_grid or any(not lr > 0 for lr in r.lr_grid) or len(set(r.lr_grid)) != len(r.lr_grid):
            raise ParamsError(f"{where}: retrain.lr_grid must be distinct positive learning rates, got {r.lr_grid}")
        bad = [m for m in r.baselines if m not in ("full", "random")] + [m for m in r.baselines if r.baselines.count(m) > 1]
        if bad:
            raise ParamsError(f"{where}: retrain.baselines must be distinct entries of [full, random], got {r.baselines}")
        missing = [m for m in r.baselines if m not in f.lr]
        if missing:
            raise ParamsError(f"{where}: finetune.lr has no learning rate for the baseline {', '.join(missing)}")
        if self.cluster.parallelism < 1:
            raise ParamsError(f"{where}: cluster.parallelism must be >= 1")
        c = self.cluster
        if c.nodes < 1 or c.gpu_count < 0:
            raise ParamsError(f"{where}: cluster.nodes must be >= 1 and cluster.gpu_count >= 0")
        if c.nodes > 1:
            if not c.checkpoint_pvc:
                raise ParamsError(f"{where}: cluster.nodes {c.nodes} needs cluster.checkpoint_pvc: the TrainJob's "
                                  "nodes read their inputs and write the delta on that shared volume")
            if c.gpu_count < 1 or f.batch_size % (c.nodes * c.gpu_count):
                raise ParamsError(f"{where}: finetune.batch_size {f.batch_size} must divide by cluster.nodes x "
                                  f"cluster.gpu_count ({c.nodes} x {c.gpu_count}): every process trains an equal "
                                  "part of each global batch")
        if self.deploy.deployment_mode not in ("Knative", "Standard"):
            raise ParamsError(f"{where}: deploy.deployment_mode must be Knative or Standard (KServe's names since "
                              f"0.16), got {self.deploy.deployment_mode!r}")
        if self.deploy.deployment_mode == "Standard" and self.deploy.canary_percent:
            raise ParamsError(f"{where}: deploy.canary_percent {self.deploy.canary_percent} needs "
                              "deploy.deployment_mode Knative: KServe's Standard mode has no canary; set "
                              "deploy.canary_percent: 0 to replace the predictor in place")
        if self.trainjob.timeout_s <= 0 or self.trainjob.queue_timeout_s <= 0:
            raise ParamsError(f"{where}: trainjob.timeout_s and trainjob.queue_timeout_s must be > 0 (seconds)")
        if self.trainjob.patch_api not in ("podTemplateOverrides", "runtimePatches"):
            raise ParamsError(f"{where}: trainjob.patch_api must be podTemplateOverrides or runtimePatches, got "
                              f"{self.trainjob.patch_api!r}")
        return self


def _coerce(value, tp, key: str, source: str):
    """``value`` checked (and widened int -> float) against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ParamsError(f"{source}: {key} must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key, source)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ParamsError(f"{source}: {key} must be a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ParamsError(f"{source}: {key} must be a mapping, got {value!r}")
        return {str(k): _coerce(v, item, f"{key}.{k}", source) for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        except ValueError:
            pass
    if tp is str and value is None:
        return ""
    if tp in (int, bool, str) and type(value) is tp:
        return value
    raise ParamsError(f"{source}: {key} must be {tp.__name__}, got {value!r}")


def _build(cls, data: dict, prefix: str, source: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        dotted = ", ".join(f"{prefix}.{k}" if prefix else k for k in unknown)
        raise ParamsError(f"{source}: unknown key {dotted} (known here: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k, source) for k, v in data.items()}
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], object]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ParamsError(f"--set {text!r}: expected KEY=VALUE, e.g. finetune.steps=50")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ParamsError(f"--set {text!r}: the value is not valid YAML ({exc})") from None
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = json.loads(json.dumps(data))
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ParamsError(f"--set {text!r}: {part} is not a section")
        node[path[-1]] = value
    return data


def load_params(path: str | Path | None = None, overrides: list[str] = ()) -> PipelineParams:
    """Defaults, then the file (if given), then ``KEY=VALUE`` overrides; validated."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ParamsError(f"{path}: no such parameters file (write one like the repository's params.yaml)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ParamsError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    if overrides:
        data = apply_overrides(data, list(overrides))
        source += " + --set"
    return _build(PipelineParams, data, "", source).validate()


def load_cli_params(path: str | None, overrides: list[str] = ()) -> tuple[PipelineParams, str]:
    """``--params`` (default: ./params.yaml when present, else the built-in defaults) + ``--set``."""
    if not path and Path(DEFAULT_PARAMS_FILE).is_file():
        path = DEFAULT_PARAMS_FILE
    source = (path or "built-in defaults") + (" + " + ", ".join(overrides) if overrides else "")
    return load_params(path, overrides), source


def params_from_dict(data: dict, source: str = "params") -> PipelineParams:
    return _build(PipelineParams, data, "", source).validate()


def write_resolved(params: PipelineParams, out_dir: str | Path) -> Path:
    path = Path(out_dir) / RESOLVED_FILE
    with atomic_path(path) as tmp:
        tmp.write_text("# Resolved parameters of this run (file + overrides + defaults).\n"
                       + yaml.safe_dump(params.to_dict(), sort_keys=False))
    return path
