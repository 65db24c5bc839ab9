"""The configuration of every model step, in one light module (no torch: see saft.config).

Each is a dataclass whose fields carry their default and help; the command line, the
``params.yaml`` sections, the Kubeflow components' settings and the torchrun command
lines are derived from them (:mod:`saft.config`, :mod:`saft.steps.params`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from saft.config import ConfigError, check, setting
from saft.eval.metrics import ZERO_SHOT
from saft.loader import LoaderSettings
from saft.sparse.config import AUTO_TEXT_BATCH, DEFAULT_EXCLUDE, DEFAULT_INCLUDE, SCORE_RULES, FinetuneConfig, default_lr
from saft.steps.prepared import PROMPT_SETS


MASK_KINDS = ("saft", "random")
WISEFT = "wiseft"
COMPARED = (ZERO_SHOT, "full", WISEFT, "lora", "lpft", "saft", "random")
"""What a benchmark compares (docs/methods.md): the base model, the trained methods, and WiSE-FT (full fine-tuning's
delta at the mixing weight chosen on ID validation: nothing of its own is trained)."""
DEFAULT_COMPARED = (ZERO_SHOT, "full", WISEFT, "lora", "saft", "random")
WISEFT_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))
"""WiSE-FT's mixing weights scored on ID validation: 0, 0.1, ..., 1 (the paper draws its curves over [0, 1])."""


def check_alphas(alphas) -> list[float]:
    """WiSE-FT's mixing weights, sorted; ValueError unless distinct and within [0, 1]."""
    alphas = sorted(float(a) for a in alphas)
    if not alphas or any(not 0.0 <= a <= 1.0 for a in alphas) or len(set(alphas)) != len(alphas):
        raise ValueError(f"WiSE-FT alphas must be distinct mixing weights in [0, 1], got {alphas}")
    return alphas


@dataclass
class ScoreConfig(LoaderSettings):
    """Phase I: how the mask is chosen."""

    model: str = setting("", required=True, help="model spec: ARCH@TAG, ARCH@/path/weights, ARCH@random or tiny")
    density: float = setting(0.001, help="fraction of the eligible entries selected (0 < d <= 1)")
    rule: str = setting("abs_mean", choices=SCORE_RULES,
                        help="score of an entry: |mean gradient| (abs_mean, the paper), mean |g| or mean g^2 "
                             "over batches")
    kind: str = setting("saft", choices=MASK_KINDS,
                        help="saft: gradient scores; random: uniformly random entries of the same density")
    include: list[str] = setting(factory=lambda: list(DEFAULT_INCLUDE), metavar="PATTERN",
                                 help="parameter name patterns (fnmatch) the mask may select")
    exclude: list[str] = setting(factory=lambda: list(DEFAULT_EXCLUDE), metavar="PATTERN",
                                 help="parameter name patterns the mask never selects")
    batch_size: int = setting(32, minimum=1, help="images per scoring batch (abs_mean scores do not depend on it)")
    seed: int = setting(0, help="seed of the random mask")
    device: str = setting("auto", help="torch device: cpu, cuda, cuda:N, or auto (cuda when visible)")
    prompts: str = setting("train", choices=PROMPT_SETS,
                           help="prompt set of the loss: train (the data's training prompt) or eval (the "
                                "evaluation ensemble, e.g. CLIP's 80 ImageNet prompts)")
    text_batch: int = setting(AUTO_TEXT_BATCH, minimum=0,
                              help="prompts encoded at once, bounding the text side's memory at any class count; "
                                   "0: 8 per image of the batch, within 32-2048")

    def __post_init__(self) -> None:
        check(self)
        if not 0 < self.density <= 1:
            raise ConfigError(f"density must be in (0, 1], got {self.density}")


@dataclass
class FinetuneStepConfig(FinetuneConfig):
    """Phase II (or a baseline) as a step: the training settings, the model and how data is read."""

    model: str = setting("", required=True, help="model spec: ARCH@TAG, ARCH@/path/weights, ARCH@random or tiny")
    device: str = setting("auto", help="torch device: cpu, cuda, cuda:N, or auto (cuda when visible)")
    prompts: str = setting("train", choices=PROMPT_SETS,
                           help="prompt set of the loss: train (the data's training prompt) or eval (the "
                                "evaluation ensemble)")
    skip_corrupt: bool = setting(False, help="skip unreadable images instead of failing")

    def training(self) -> FinetuneConfig:
        """The library's part, its learning rate resolved for the model (what a checkpoint records)."""
        values = {f.name: getattr(self, f.name) for f in fields(FinetuneConfig)}
        values["lr"] = default_lr(self.method, self.model) if self.lr is None else self.lr
        return FinetuneConfig(**values)


@dataclass(frozen=True)
class DeltaRun:
    """A trained delta to evaluate: method name, seed and file; ``alpha``: evaluated at that weight alone (WiSE-FT's
    chosen point of full fine-tuning's delta) instead of at the evaluation's alphas."""

    name: str
    path: str
    seed: int | None = None
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"delta {self.name}: a fixed alpha must be in [0, 1], got {self.alpha}")

    @classmethod
    def parse(cls, text: str) -> "DeltaRun":
        """``NAME[:SEED][@ALPHA]=PATH``, e.g. ``saft:1=runs/seed1/saft/delta.safetensors`` or
        ``wiseft:1@0.6=runs/seed1/full/delta.safetensors``."""
        label, sep, path = text.partition("=")
        if not sep or not label or not path:
            raise ValueError(f"--delta {text!r}: expected NAME[:SEED][@ALPHA]=PATH, e.g. "
                             "saft:1=runs/saft/delta.safetensors")
        label, _, alpha = label.partition("@")
        name, _, seed = label.partition(":")
        if name == ZERO_SHOT:
            raise ValueError(f"--delta {text!r}: the name {ZERO_SHOT!r} is reserved for the base model")
        try:
            seed_value = int(seed) if seed else None
        except ValueError:
            raise ValueError(f"--delta {text!r}: the seed must be an integer") from None
        try:
            alpha_value = float(alpha) if alpha else None
        except ValueError:
            raise ValueError(f"--delta {text!r}: the alpha after @ must be a number, e.g. wiseft:1@0.5=...") from None
        return cls(name, path, seed_value, alpha_value)

    def __str__(self) -> str:
        """The ``--delta`` argument :meth:`parse` reads back."""
        seed = "" if self.seed is None else f":{self.seed}"
        alpha = "" if self.alpha is None else f"@{self.alpha!r}"
        return f"{self.name}{seed}{alpha}={self.path}"


@dataclass
class EvaluateConfig(LoaderSettings):
    """The evaluation of a base model and its deltas on a suite."""

    model: str = setting("", required=True, help="base model spec: ARCH@TAG, ARCH@/path/weights, ARCH@random or tiny")
    suite: str = setting("", required=True, help="imagenet-shifts, base2new, cross-dataset, synthshift, or a suite YAML file; "
                                  "empty in a pipeline: the embedded world's suite")
    data_root: str = setting("", help="folder or s3:// prefix holding the suite's datasets in their default folders")
    deltas: list[DeltaRun] = setting(factory=list, cli=False, help="the deltas to evaluate (NAME[:SEED]=PATH)")
    alphas: list[float] = setting(factory=lambda: [1.0], flag="--alpha", metavar="ALPHA",
                                  help="evaluate base + alpha * delta for each value")
    zeroshot: bool = setting(True, help="score the base model itself")
    batch_size: int = setting(128, minimum=1, help="images per batch")
    device: str = setting("auto", help="torch device: cpu, cuda, cuda:N, or auto (cuda when visible)")
    template_set: str = setting("default", flag="--templates",
                                help="prompt set where a dataset offers several, e.g. simple for ImageNet")
    only: list[str] = setting(factory=list, metavar="NAME",
                              help="evaluate only these suite datasets (a fan-out part; merge parts with "
                                   "`saft collect`)")
    reference: str = setting("", help="effective-robustness reference fit: a shipped name (taori2020-testbed), "
                                      "none, or a reference YAML file; empty: the suite's own")
    allow_train_overlap: bool = setting(False, help="score evaluation images that are also images a delta was "
                                                    "trained or validated on (refused by default; the metrics "
                                                    "then record that overlap was not checked)")

    def __post_init__(self) -> None:
        check(self)


@dataclass
class WiseftConfig:
    """WiSE-FT's choice of alpha for a full fine-tuning delta (``saft wiseft``; in a pipeline the alphas are
    ``finetune.wiseft_alphas`` and the batch size and device those of the training)."""

    model: str = setting("", required=True, help="base model spec the delta was trained on")
    alphas: list[float] = setting(factory=lambda: list(WISEFT_ALPHAS), flag="--alpha", metavar="ALPHA",
                                  help="wiseft: mixing weights of base + alpha * (full's delta) scored on ID "
                                       "validation; the best is reported")
    batch_size: int = setting(128, minimum=1, help="images per batch")
    device: str = setting("auto", help="torch device: cpu, cuda, cuda:N, or auto (cuda when visible)")

    def __post_init__(self) -> None:
        check(self)
        check_alphas(self.alphas)
