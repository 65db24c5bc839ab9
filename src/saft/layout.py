"""What each artifact folder holds: the one definition of every file name a step writes and another reads.

A step's output folder is a contract between the step that writes it and every reader:
the next step, a Kubeflow task on another pod, DVC, the registry, a user's script. The
names are defined here once; writers and readers take them from here, and ``check``
refuses a folder that lacks what its writer always leaves, naming the folder, the
missing files and the command that makes such a folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

STEP_RECORD = "step.json"  # saft.steps.record: the inputs and parameters a step's outputs were made from
RESOLVED_PARAMS = "params.resolved.yaml"  # the parameters of a run (file + overrides + defaults)
WORLD_MARKER = "world.json"  # saft.world.task: which version of the embedded world a world folder holds
WORLD_SUITE = "synthshift.yaml"  # saft.world.task: the world's suite (ID first, then the OOD sets)
WORLD_B2N_SUITE = "synthshift-b2n.yaml"  # saft.world.task: base-to-new on the ID test set


class LayoutError(ValueError):
    """A folder is not the artifact folder it was given as (the message names what is missing and how to make it)."""


@dataclass(frozen=True)
class _Layout:
    def names(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("what", "made_by", "required")}

    def check(self, folder: str | Path) -> Path:
        """``folder`` as a path, once every file its writer always leaves is there."""
        folder = Path(folder)
        if not folder.is_dir():
            raise LayoutError(f"{folder}: no such folder (expected {self.what}, made by `{self.made_by}`)")
        missing = [getattr(self, name) for name in self.required if not (folder / getattr(self, name)).exists()]
        if missing:
            raise LayoutError(f"{folder}: not {self.what} (missing {', '.join(missing)}); make one with "
                              f"`{self.made_by}`")
        return folder

    def read_json(self, folder: str | Path, name: str):
        """The JSON document ``name`` (a field of this layout) of ``folder``, or a clear error."""
        path = Path(folder) / getattr(self, name)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise LayoutError(f"{path}: missing from {self.what}; make the folder with `{self.made_by}`") from None
        except ValueError as err:
            raise LayoutError(f"{path}: not valid JSON ({err}); the folder is damaged: make it again with "
                              f"`{self.made_by}`") from None


@dataclass(frozen=True)
class Prepared(_Layout):
    """``saft data prepare`` / the prepare task: few-shot manifests and the prompts of a dataset."""

    train: str = "train.jsonl"
    val: str = "val.jsonl"  # only with val_shots > 0
    classes: str = "classes.json"
    templates: str = "templates.json"
    train_templates: str = "train_templates.json"
    record: str = "prepare.json"
    version: str = "data_version.json"  # the data version it was drawn from (pipelines)
    files: str = "files"  # the drawn images, copied when the data was read through DVC
    what: str = "a prepared data folder"
    made_by: str = "saft data prepare ROOT --out FOLDER"
    required: tuple[str, ...] = ("record", "classes", "templates", "train")


@dataclass(frozen=True)
class MaskFolder(_Layout):
    """``saft score``: the mask, its statistics and the resolved configuration."""

    mask: str = "mask.safetensors"
    stats: str = "mask_stats.json"
    record: str = "score.json"
    what: str = "a score output folder"
    made_by: str = "saft score --model M --data D --out FOLDER"
    required: tuple[str, ...] = ("mask",)


@dataclass(frozen=True)
class FinetuneFolder(_Layout):
    """``saft finetune``: the delta, its training curve and record."""

    delta: str = "delta.safetensors"
    history: str = "history.json"
    record: str = "finetune.json"
    resume: str = "resume.json"  # pipeline tasks: where they checkpointed and from which step they resumed
    checkpoints: str = "checkpoints"
    trainjob: str = "trainjob.json"  # the TrainJob that trained it (several nodes)
    wiseft: str = "wiseft"  # full fine-tuning in a benchmark: WiSE-FT's choice of alpha (a WiseftFolder)
    what: str = "a finetune output folder"
    made_by: str = "saft finetune --model M --data D --out FOLDER"
    required: tuple[str, ...] = ("delta", "history", "record")


@dataclass(frozen=True)
class WiseftFolder(_Layout):
    """``saft wiseft`` (in a benchmark: ``wiseft/`` beside full fine-tuning's delta): the alpha chosen on ID
    validation and its curve."""

    record: str = "wiseft.json"
    plot: str = "wiseft.png"
    what: str = "a WiSE-FT output folder"
    made_by: str = "saft wiseft --model M --data D --delta F --out FOLDER"
    required: tuple[str, ...] = ("record",)


@dataclass(frozen=True)
class EvalFolder(_Layout):
    """``saft evaluate`` / ``saft collect``: metrics, the report and (collect) the results table."""

    metrics: str = "metrics.json"
    report_md: str = "report.md"
    report_html: str = "report.html"
    results: str = "results.json"
    table: str = "results.md"
    selection: str = "selection.json"  # the retrain pipeline: the learning rate chosen on ID validation
    selection_plot: str = "selection.png"
    what: str = "an evaluation output folder"
    made_by: str = "saft evaluate --model M --suite S --out FOLDER"
    required: tuple[str, ...] = ("metrics",)


@dataclass(frozen=True)
class DecisionFolder(_Layout):
    """``saft register`` / the register task: the registry's decision."""

    register: str = "register.json"
    candidate_metrics: str = "candidate_metrics.json"  # the registered seed's own metrics
    what: str = "a register output folder"
    made_by: str = "saft register"
    required: tuple[str, ...] = ("register",)


@dataclass(frozen=True)
class DeploymentFolder(_Layout):
    """``saft deploy`` / the deploy task: the rollout's outcome and the manifest it applied."""

    deploy: str = "deploy.json"
    manifest: str = "inferenceservice.json"
    what: str = "a deploy output folder"
    made_by: str = "saft deploy"
    required: tuple[str, ...] = ("deploy",)


@dataclass(frozen=True)
class ModelArtifacts(_Layout):
    """A registered version's artifacts (the MLflow pyfunc model): the delta, its base reference and the head."""

    delta: str = "delta.safetensors"
    head: str = "head.safetensors"  # the zero-shot head, stored so a server starts without encoding prompts
    model_ref: str = "model_ref.json"  # the base (spec, fingerprint, where its weights are), classes, templates
    what: str = "a registered model's artifacts"
    made_by: str = "saft register"
    required: tuple[str, ...] = ("delta", "model_ref")


@dataclass(frozen=True)
class BaseWeights(_Layout):
    """A stored base model (``saft.serving.bases``): its weights, once per fingerprint, in the cache, a registry
    artifact or a bucket."""

    weights: str = "weights.safetensors"  # format saft-base/1, with the spec that rebuilds the model
    what: str = "a stored base model"
    made_by: str = "saft register"
    required: tuple[str, ...] = ("weights",)


@dataclass(frozen=True)
class SynthshiftBenchmarkFolder(_Layout):
    """``saft benchmark synthshift``: what the benchmark chose (beside the files of saft.protocols.synthshift)."""

    chosen_lr: str = "chosen_lr.json"  # each method's rate (and WiSE-FT's alpha) chosen on ID validation
    what: str = "a synthshift benchmark output folder"
    made_by: str = "saft benchmark synthshift --out FOLDER"
    required: tuple[str, ...] = ("chosen_lr",)


@dataclass(frozen=True)
class FewshotFolder(_Layout):
    """``saft benchmark fewshot``: accuracy against shots per class, over seeds."""

    results: str = "fewshot.json"
    table: str = "fewshot.md"
    plot: str = "fewshot.png"
    what: str = "a few-shot benchmark output folder"
    made_by: str = "saft benchmark fewshot --out FOLDER"
    required: tuple[str, ...] = ("results", "table", "plot")


@dataclass(frozen=True)
class WorldTaskFolder(_Layout):
    """The pipelines' world task: the rendered world, or a record that the data lives elsewhere."""

    external: str = "external.json"  # data_root given: where the data is
    version: str = "data_version.json"  # the data version every data-reading task downstream takes
    what: str = "a world task output folder"
    made_by: str = "the world component of a saft pipeline"
    required: tuple[str, ...] = ()


PREPARED = Prepared()
MASK = MaskFolder()
FINETUNE = FinetuneFolder()
EVAL = EvalFolder()
DECISION = DecisionFolder()
DEPLOYMENT = DeploymentFolder()
WORLD_TASK = WorldTaskFolder()
MODEL = ModelArtifacts()
WISEFT_OUT = WiseftFolder()
BASE = BaseWeights()
SYNTHSHIFT_BENCHMARK = SynthshiftBenchmarkFolder()
FEWSHOT = FewshotFolder()
LAYOUTS = (PREPARED, MASK, FINETUNE, WISEFT_OUT, EVAL, DECISION, DEPLOYMENT, WORLD_TASK, MODEL, BASE,
           SYNTHSHIFT_BENCHMARK, FEWSHOT)

__all__ = ["BASE", "DECISION", "DEPLOYMENT", "EVAL", "FEWSHOT", "FINETUNE", "LAYOUTS", "MASK", "PREPARED",
           "RESOLVED_PARAMS", "STEP_RECORD", "SYNTHSHIFT_BENCHMARK", "WISEFT_OUT", "WORLD_TASK", "MODEL", "LayoutError"]
