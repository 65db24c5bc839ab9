"""Pipeline parameters: ``params.yaml`` as typed dataclasses, with ``KEY=VALUE`` overrides.

The same document drives ``saft run``, ``dvc repro`` (its stages read their sections) and
the Kubeflow pipeline (``saft pipeline run` or `saft pipeline submit`` turn it into pipeline arguments).
Unknown keys and values of the wrong type are refused with the dotted key and the file
named, so a typo never silently falls back to a default. The resolved parameters (file
+ overrides + defaults) are written next to a run's outputs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from saft.config import (ConfigError, check, describe, did_you_mean, field_of, from_mapping, section, setting,
                         to_mapping)
from saft.data.prepare import PrepareConfig
from saft.io import atomic_path
from saft.loader import LoaderSettings
from saft.serving.kserve import PredictorSettings
from saft.serving.rollout import RolloutConfig
from saft.sparse.config import METHODS, default_lr
from saft.eval.metrics import ZERO_SHOT
from saft.steps.configs import (COMPARED, DEFAULT_COMPARED, WISEFT, EvaluateConfig, FinetuneStepConfig, ScoreConfig,
                                WiseftConfig, check_alphas)
from saft.steps.register import CLI_ONLY, PIPELINE_DEFAULTS, RegisterConfig
from saft.layout import RESOLVED_PARAMS

DEFAULT_PARAMS_FILE = "params.yaml"
RESOLVED_FILE = RESOLVED_PARAMS
SUBSETS = ("all", "base")  # base: the first half of the classes (base-to-new); "new" is never trained on
LOADER = tuple(f.name for f in dataclasses.fields(LoaderSettings))
PER_TASK = ("model", "seed", "device")
"""Set once for the whole run (top-level keys) or per task, never in a step's section."""


class ParamsError(ValueError):
    """A parameters file or override does not fit the schema."""


@dataclass
class WorldParams:
    """The embedded world, rendered when ``data.root`` is empty."""

    pool_per_class: int = 64
    test_per_class: int = 100


DataParams = section("DataParams", PrepareConfig, drop=("seed",), doc="The training data and its few-shot draw.",
                     extra=[
    ("root", str, setting("", help="folder or s3://bucket/prefix of the training data; empty: the embedded world")),
    ("version", str, setting("", help="pin a data version (saft.steps.data_version): the run fails unless the "
                                      "root holds exactly this version; empty: whatever the root holds now")),
    ("rev", str, setting("", help="git revision to read a DVC-tracked root at (CI passes its commit); empty: "
                                  "the working tree")),
    ("repo", str, setting("", help="repository holding the root's .dvc file (path or git URL); empty: the one "
                                   "the root is in")),
])
LoaderParams = LoaderSettings
ScoreParams = section("ScoreParams", ScoreConfig, drop=PER_TASK + ("kind",) + LOADER,
                      doc="Phase I: the SAFT mask (and the random mask of the same density).")
FinetuneParams = section("FinetuneParams", FinetuneStepConfig, drop=PER_TASK + ("method", "lr") + LOADER,
                         doc="Phase II and the baselines: every method trains with these settings.", extra=[
    ("methods", list[str], setting(factory=lambda: list(DEFAULT_COMPARED), choices=COMPARED,
                                   help="methods compared (docs/methods.md): zeroshot (the base), the trained methods "
                                        "(full, lora, lpft, saft, random) and wiseft (full's delta at the alpha "
                                        "chosen on ID validation; needs full)")),
    ("lr", dict[str, float], setting(factory=dict, cli=False,
                                     help="learning rate per method (e.g. {saft: 0.003}); a method not named "
                                          "trains at the model's recipe (tiny: the rates its world's protocol chose "
                                          "on ID validation; others: 1e-4 for saft/random, 1e-5 for full and lpft, "
                                          "2e-4 for lora)")),
    ("lr_grid", dict[str, list[float]], setting(factory=dict, cli=False,
                                                help="learning-rate grid per method: every rate is trained and the "
                                                     "best on ID validation kept, per seed (e.g. {lora: [1e-4, 3e-4, "
                                                     "1e-3]}); a method not named trains at its lr above alone")),
    ("wiseft_alphas", list[float], field_of(WiseftConfig, "alphas")),
])
EvaluateParams = section("EvaluateParams", EvaluateConfig,
                         drop=("model", "device", "deltas", "zeroshot", "only") + LOADER,
                         doc="Evaluation of zero-shot and every delta on the suite.")


# The embedded world's grid around the rate `saft benchmark synthshift` chose; real-model grids are in
# docs/pipelines.md.
DEFAULT_LR_GRID = [1e-3, 3e-3, 1e-2]


@dataclass
class RetrainParams:
    """The retrain pipeline: SAFT over a learning-rate grid, the rate chosen on ID validation."""

    lr_grid: list[float] = setting(factory=lambda: list(DEFAULT_LR_GRID),
                                   help="SAFT rates trained in parallel; the best on ID validation ships")
    seed: int = setting(1, help="seed of the data draw and the training")
    baselines: list[str] = setting(factory=list, choices=("full", "random"),
                                   help="comparisons trained at finetune.lr and evaluated, never registered")


RegisterParams = section("RegisterParams", RegisterConfig, drop=CLI_ONLY, defaults=PIPELINE_DEFAULTS,
                         doc="The registry and the promotion gate (saft register).", extra=[
    ("enabled", bool, setting(True, help="register the candidate (false: nothing is registered)")),
])


DeployParams = section("DeployParams", PredictorSettings, RolloutConfig, drop=("extra_env",),
                       doc="The retrain pipeline, on promotion: the champion onto KServe by canary (docs/serving.md).",
                       extra=[
    ("enabled", bool, setting(True, help="deploy a promoted champion")),
    ("dry_run", bool, setting(True, help="apply nothing (a server-side dry run where the cluster allows it, else a local "
                                         "render into the task's output); false: apply it (in-cluster credentials)")),
])


@dataclass
class ClusterParams:
    """Kubeflow only: the accelerator every scoring, training and evaluation task requests."""

    gpu_type: str = setting("nvidia.com/gpu", help="accelerator resource of scoring, training and evaluation tasks")
    gpu_count: int = setting(1, minimum=0, help="accelerators per task; several: the step runs under torchrun")
    parallelism: int = setting(2, minimum=1, help="loop iterations at a time in every fan-out (compiled into "
                                                  "the pipeline)")
    checkpoint_pvc: str = setting("saft-checkpoints", help="PVC where training checkpoints outlive a pod (retries "
                                                           "resume); empty: none")
    nodes: int = setting(1, minimum=1, help="retrain: > 1 trains each SAFT delta as a Kubeflow Trainer TrainJob of "
                                            "nodes x gpu_count processes (trainjob: below)")


@dataclass
class TrainJobParams:
    """``cluster.nodes`` > 1: each finetune as a Kubeflow Trainer TrainJob, inputs and outputs on
    ``cluster.checkpoint_pvc`` (ReadWriteMany across nodes), mounted at the same path everywhere."""

    namespace: str = setting("default", help="namespace of the TrainJob (the pipeline runner's service account "
                                             "needs rights there)")
    image: str = setting("", help="the nodes' image; empty: the pipeline's image")
    runtime: str = setting("torch-distributed", help="ClusterTrainingRuntime name")
    gpu_resource: str = setting("nvidia.com/gpu", help="accelerator resource of each node")
    cpu: str = setting("", help="CPU request per node; empty: the runtime's")
    memory: str = setting("", help="memory request per node; empty: the runtime's")
    timeout_s: float = setting(6 * 3600.0, minimum=1.0,
                               help="running time: the job's activeDeadlineSeconds (Trainer v2.2+); past it the job is "
                                    "stopped (its GPUs freed) and the task fails")
    queue_timeout_s: float = setting(24 * 3600.0, minimum=1.0,
                                     help="time suspended waiting for admission (Kueue); past it the job is deleted")
    queue: str = setting("", help="Kueue LocalQueue (label kueue.x-k8s.io/queue-name); empty: not queued by Kueue")
    poll_s: float = setting(15.0, minimum=0.0, help="seconds between status polls")
    patch_api: str = setting("runtimePatches", choices=("runtimePatches", "podTemplateOverrides"),
                             help="how the job patches its runtime: runtimePatches (Trainer v2.2+) or "
                                  "podTemplateOverrides (v2.0/v2.1, which have no activeDeadlineSeconds)")


@dataclass
class PipelineParams:
    """Every parameter of a run: read by `saft run`, `dvc repro` (dvc.yaml) and `saft pipeline run` or `saft pipeline submit`."""

    model: str = setting("tiny", help="ARCH@TAG (hub), ARCH@/path/weights, ARCH@random, or tiny (shipped)")
    seeds: list[int] = setting(factory=lambda: [1, 2, 3], help="seeds: each draws its own data and trains anew")
    device: str = setting("auto", help="auto: cuda when a GPU is visible, else cpu; or cpu, cuda, cuda:N")
    world: WorldParams = setting(factory=WorldParams, help="the embedded world, rendered when data.root is empty")
    data: DataParams = setting(factory=DataParams, help="the training data and its few-shot draw")
    loader: LoaderParams = setting(factory=LoaderParams,
                                   help="DataLoader of scoring, training and evaluation")
    score: ScoreParams = setting(factory=ScoreParams, help="phase I: the SAFT mask")
    finetune: FinetuneParams = setting(factory=FinetuneParams, help="phase II and the baselines")
    evaluate: EvaluateParams = setting(factory=EvaluateParams, help="zero-shot and every delta on the suite")
    register: RegisterParams = setting(factory=RegisterParams, help="the registry and the promotion gate")
    retrain: RetrainParams = setting(factory=RetrainParams,
                                     help="the retrain pipeline (saft pipeline ... --pipeline retrain)")
    deploy: DeployParams = setting(factory=DeployParams, help="the retrain pipeline, on promotion: KServe by canary")
    cluster: ClusterParams = setting(factory=ClusterParams, help="Kubeflow only (saft pipeline submit/schedule)")
    trainjob: TrainJobParams = setting(factory=TrainJobParams, help="cluster.nodes > 1 only")

    @property
    def embedded(self) -> bool:
        return not self.data.root

    def to_dict(self) -> dict:
        return to_mapping(self)

    def learning_rates(self) -> dict[str, float]:
        """Every method's rate: finetune.lr where it names one, else the model's recipe."""
        return {m: self.finetune.lr.get(m, default_lr(m, self.model)) for m in METHODS}

    def trained_methods(self) -> list[str]:
        """The methods of finetune.methods that train a delta, in the order given."""
        return [m for m in self.finetune.methods if m in METHODS]

    def lr_grid(self, method: str) -> list[float]:
        """The rates ``method`` trains at: finetune.lr_grid's, else its one rate."""
        return list(self.finetune.lr_grid.get(method) or [self.learning_rates()[method]])

    def wiseft_alphas(self) -> list[float]:
        """WiSE-FT's alpha grid when wiseft is compared, else none."""
        return list(self.finetune.wiseft_alphas) if WISEFT in self.finetune.methods else []

    # ----------------------------------------------------------------- step configurations

    def score_config(self, kind: str, seed: int) -> ScoreConfig:
        return ScoreConfig(**to_mapping(self.score), **to_mapping(self.loader), model=self.model, kind=kind,
                           seed=seed, device=self.device)

    def finetune_config(self, method: str, seed: int) -> FinetuneStepConfig:
        return FinetuneStepConfig(**finetune_settings(self), model=self.model, method=method,
                                  lr=self.learning_rates()[method], seed=seed, device=self.device)

    def prepare_config(self, seed: int, dataset: str | None = None, split: str | None = None) -> PrepareConfig:
        """The few-shot draw of ``seed`` (``dataset``/``split`` of one task of a base-to-new suite)."""
        values = to_mapping(self.data, skip=("root", "version", "rev", "repo"))
        values.update({k: v for k, v in (("dataset", dataset), ("split", split)) if v is not None})
        return PrepareConfig(**values, seed=seed)

    def evaluate_config(self, deltas=(), only=()) -> EvaluateConfig:
        return EvaluateConfig(**to_mapping(self.evaluate), **to_mapping(self.loader), model=self.model,
                              deltas=list(deltas), only=list(only), device=self.device,
                              zeroshot=ZERO_SHOT in self.finetune.methods)

    def register_config(self, gate: str | None = None) -> RegisterConfig:
        """``register:`` as the step's configuration (``gate``: the metric resolved for the suite)."""
        values = to_mapping(self.register, skip=("enabled",))
        if gate:
            values["gate"] = gate
        return RegisterConfig(**values)

    def validate(self, source: str = "params") -> "PipelineParams":
        def fail(msg: str) -> None:
            raise ParamsError(f"{source}: {msg}")

        for part in (self.loader, self.data, self.score, self.finetune, self.evaluate, self.register, self.retrain,
                     self.deploy, self.cluster, self.trainjob):
            try:  # allowed values and bounds, from each field's definition
                check(part)
            except ConfigError as err:
                fail(f"{_section_of(self, part)}.{err}")
        for name, build in (("score", lambda: self.score_config("saft", 0)),
                            ("finetune", lambda: self.finetune_config((self.trained_methods() or ["saft"])[0], 0)),
                            ("evaluate", self.evaluate_config), ("data", lambda: self.prepare_config(0)),
                            ("register", self.register_config)):
            try:  # every check of the steps themselves (across fields too), with the section named
                build()
            except (ConfigError, ValueError) as err:
                fields = {f.name for f in dataclasses.fields(getattr(self, name))}
                fail(f"{name}.{err}" if str(err).split(" ", 1)[0] in fields else f"{name}: {err}")
        if not self.seeds:
            fail("seeds is empty; give at least one seed, e.g. seeds: [1]")
        if len(set(self.seeds)) != len(self.seeds):
            fail(f"seeds {self.seeds} repeat a seed")
        f, r, c = self.finetune, self.retrain, self.cluster
        if not self.trained_methods() or len(set(f.methods)) != len(f.methods):
            fail(f"finetune.methods must be distinct methods of {', '.join(COMPARED)}, at least one of them trained "
                 f"({', '.join(METHODS)}), got {f.methods}")
        if WISEFT in f.methods and "full" not in f.methods:
            fail("finetune.methods has wiseft but not full: WiSE-FT interpolates full fine-tuning's delta; add full")
        for key in ("lr", "lr_grid"):
            unknown = sorted(set(getattr(f, key)) - set(METHODS))
            if unknown:
                fail(f"finetune.{key} names no method {', '.join(unknown)}"
                     f"{did_you_mean(unknown[0], METHODS)} (methods: {', '.join(METHODS)})")
        bad = [f"{m}: {v}" for m, v in f.lr.items() if not v > 0]
        if bad:
            fail(f"finetune.lr must be positive rates, got {', '.join(bad)}")
        for m, grid in f.lr_grid.items():
            if not grid or any(not v > 0 for v in grid) or len(set(grid)) != len(grid):
                fail(f"finetune.lr_grid.{m} must be distinct positive learning rates, got {grid}")
        if WISEFT in f.methods:
            try:
                check_alphas(f.wiseft_alphas)
            except ValueError as err:
                fail(f"finetune.wiseft_alphas: {err}")
        if self.register.method not in METHODS:
            fail(f"register.method must be one of {', '.join(METHODS)}, got {self.register.method!r}"
                 f"{did_you_mean(self.register.method, METHODS)}")
        if self.register.enabled and self.register.method not in f.methods:
            fail(f"register.method {self.register.method} is not among finetune.methods {f.methods}")
        if self.data.subset not in SUBSETS:
            fail(f"data.subset must be one of {', '.join(SUBSETS)} for training (base: the first half of the "
                 f"classes for base-to-new; new is never trained on), got {self.data.subset!r}")
        if not r.lr_grid or any(not lr > 0 for lr in r.lr_grid) or len(set(r.lr_grid)) != len(r.lr_grid):
            fail(f"retrain.lr_grid must be distinct positive learning rates, got {r.lr_grid}")
        if len(set(r.baselines)) != len(r.baselines):
            fail(f"retrain.baselines must be distinct entries of [full, random], got {r.baselines}")
        if c.nodes > 1:
            if not c.checkpoint_pvc:
                fail(f"cluster.nodes {c.nodes} needs cluster.checkpoint_pvc: the TrainJob's nodes read their inputs "
                     "and write the delta on that shared volume")
            if c.gpu_count < 1 or f.batch_size % (c.nodes * c.gpu_count):
                fail(f"finetune.batch_size {f.batch_size} must divide by cluster.nodes x cluster.gpu_count "
                     f"({c.nodes} x {c.gpu_count}): every process trains an equal part of each global batch")
        try:
            from saft.serving.rollout import check_mode

            check_mode(self.deploy.deployment_mode, self.deploy.canary_percent)
        except ValueError as err:
            fail(f"deploy.canary_percent {self.deploy.canary_percent} with deploy.deployment_mode "
                 f"{self.deploy.deployment_mode}: {err}")
        if c.nodes <= 1 and c.gpu_count > 1 and f.batch_size % c.gpu_count:
            fail(f"finetune.batch_size {f.batch_size} must divide by cluster.gpu_count {c.gpu_count}: each GPU's "
                 "process trains an equal part of each global batch")
        return self


def _section_of(params: PipelineParams, part) -> str:
    return next(f.name for f in dataclasses.fields(params) if getattr(params, f.name) is part)


def finetune_settings(params: PipelineParams) -> dict:
    """``finetune:`` (but ``methods`` and ``lr``, chosen per task) and ``loader:`` as one settings mapping: what a
    finetune component takes as its ``settings`` JSON (:class:`FinetuneStepConfig` fields)."""
    return {**to_mapping(params.finetune, skip=("methods", "lr", "lr_grid", "wiseft_alphas")),
            **to_mapping(params.loader)}


# --------------------------------------------------------------------------- reading


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


def params_from_dict(data: dict, source: str = "params") -> PipelineParams:
    try:
        params = from_mapping(PipelineParams, data, source=source)
    except ConfigError as err:
        raise ParamsError(str(err)) from None
    return params.validate(source)


def load_params(path: str | Path | None = None, overrides: list[str] = ()) -> PipelineParams:
    """Defaults, then the file (if given), then ``KEY=VALUE`` overrides; validated."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ParamsError(f"{path}: no such parameters file (`saft params show --defaults > {path}` writes one "
                              "with every default)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ParamsError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    if overrides:
        data = apply_overrides(data, list(overrides))
        source += " + --set"
    return params_from_dict(data, source)


def load_cli_params(path: str | None, overrides: list[str] = ()) -> tuple[PipelineParams, str]:
    """``--params`` (default: ./params.yaml when present, else the built-in defaults) + ``--set``."""
    if not path and Path(DEFAULT_PARAMS_FILE).is_file():
        path = DEFAULT_PARAMS_FILE
    source = (path or "built-in defaults") + (" + " + ", ".join(overrides) if overrides else "")
    return load_params(path, overrides), source


# --------------------------------------------------------------------------- writing


HEADER = """\
# Parameters of a run: read by `saft run`, `dvc repro` (dvc.yaml) and `saft pipeline run` or `saft pipeline submit`
# (Kubeflow). Override any key on the command line with `--set section.key=value`.
# Written by `saft params show --defaults` from the parameters' own definitions (saft.steps.params):
# every value here is the default, every comment the setting's help.
"""


def _yaml_value(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-4].strip() if text.endswith("\n...") else text.removesuffix("...").strip()


def render(params: PipelineParams, *, header: str = HEADER) -> str:
    """``params`` as commented YAML: one line per setting, its help as the comment.

    ``finetune.lr`` is written out for every method (the model's recipe where it names none), so the file
    says at which rate each method trains, and ``dvc.yaml`` can read each rate.
    """
    params = dataclasses.replace(params, finetune=dataclasses.replace(params.finetune,
                                                                      lr=params.learning_rates()))
    lines = [header.rstrip("\n")] if header else []

    def emit(obj, indent: str) -> None:
        for name, _, _, help_ in describe(type(obj)):
            value = getattr(obj, name)
            if dataclasses.is_dataclass(value):
                lines.append("")
                lines.append(f"{indent}{name}:".ljust(28) + f"  # {help_}")
                emit(value, indent + "  ")
                continue
            item = f"{indent}{name}: {_yaml_value(to_mapping_value(value))}"
            lines.append(item.ljust(28) + f"  # {help_}" if len(item) < 28 else f"{item}  # {help_}")

    emit(params, "")
    return "\n".join(lines) + "\n"


def to_mapping_value(value):
    if isinstance(value, tuple):
        return [to_mapping_value(v) for v in value]
    if isinstance(value, list):
        return [to_mapping_value(v) for v in value]
    return value


def write_resolved(params: PipelineParams, out_dir: str | Path) -> Path:
    path = Path(out_dir) / RESOLVED_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(render(params, header="# Resolved parameters of this run (file + overrides + defaults).\n"))
    return path
