"""The settings of sparse training, and the constants they share with scoring (no torch here).

Kept apart from the trainer so a configuration can be read, checked and turned into flags
or params.yaml keys (:mod:`saft.config`) by a process that never trains: a light pipeline
task, the command line's help, the pipeline compiler.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from saft.config import ConfigError, check, setting, to_mapping
from saft.loader import LoaderSettings

SCORE_RULES = ("abs_mean", "mean_abs", "mean_sq")
DEFAULT_INCLUDE = ("*",)
DEFAULT_EXCLUDE = ("logit_scale", "logit_bias")
AUTO_TEXT_BATCH = 0
"""``text_batch`` 0: 8 prompts per image of the batch (:func:`auto_text_batch`)."""


def auto_text_batch(text_batch: int, batch_size: int) -> int:
    """``text_batch``, or for ``0`` (auto) 8 prompts per image of the batch, within [32, 2048].

    A chunk of the text side is re-encoded with its graph after the image side's graph is
    freed, so it should hold no more activations than an image batch: a 224 px ViT image
    is ~197 tokens at width 768, a prompt ~20 tokens at width 512, so 8 prompts per image
    keep a chunk at about half the image batch's activations and training's peak memory
    close to its peak with a handful of classes.
    """
    if text_batch < 0:
        raise ValueError(f"text_batch must be >= 1, or 0 for auto, got {text_batch}")
    return text_batch or min(2048, max(32, 8 * batch_size))


METHODS = ("saft", "random", "full", "lora", "lpft")
"""What ``finetune`` trains (docs/methods.md): saft and random train the entries of a mask, full every eligible
parameter, lora a low-rank update of the attention and MLP projections (Hugging Face PEFT), lpft a linear probe on
the frozen features and then every eligible parameter with it (Kumar et al. 2022)."""
MASK_METHODS = ("saft", "random")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# The library's learning rates for pre-trained CLIP models; a model may ship its own (see default_lr).
# lora: CLIP-LoRA's rate (Zanella & Ben Ayed 2024); lpft: full fine-tuning's, its second stage being that.
DEFAULT_LR = {"saft": 1e-4, "random": 1e-4, "full": 1e-5, "lora": 2e-4, "lpft": 1e-5}
LORA_TARGETS = ("attn", "mlp.c_fc", "mlp.c_proj")
"""open_clip's names, in both towers: each block's nn.MultiheadAttention (its fused q/k/v input projection and its
output projection) and the two MLP projections."""


def default_lr(method: str, model_spec: str | None = None) -> float:
    """The learning rate ``method`` trains at unless one is given: the model's own recipe when it ships one
    (the embedded ``tiny`` model: the rates its world's protocol chose on ID validation), else the library's."""
    if model_spec is not None:
        from saft.models.tiny import recipe_lr

        rates = recipe_lr(model_spec)
        if rates and method in rates:
            return float(rates[method])
    return DEFAULT_LR[method]


@dataclass
class FinetuneConfig(LoaderSettings):
    """Hyper-parameters of one fine-tuning run."""

    method: str = setting("saft", choices=METHODS,
                          help="saft and random train the entries of a mask; full every eligible parameter; lora a "
                               "low-rank update of the attention and MLP projections; lpft a linear probe, then "
                               "full fine-tuning with it (docs/methods.md)")
    steps: int = setting(100, minimum=1, help="optimizer steps")
    epochs: float = setting(0.0, minimum=0.0,
                            help="> 0: passes over the training set, overriding steps (at least one step)")
    batch_size: int = setting(32, minimum=1, help="images per optimizer step (split over the processes)")
    grad_accum: int = setting(1, minimum=1, help="micro-batches per optimizer step")
    lr: float | None = setting(None, help="learning rate; none: the model's recipe (tiny: the rates its world's "
                                          "protocol chose; others: 1e-4 for saft/random, 1e-5 for full)")
    weight_decay: float = setting(0.1, minimum=0.0, help="AdamW weight decay")
    warmup_steps: int = setting(10, minimum=0, help="linear warm-up steps before the cosine decay (at most steps)")
    max_grad_norm: float = setting(1.0, minimum=0.0, help="gradient clipping norm; 0 disables clipping")
    betas: tuple[float, float] = setting((0.9, 0.999), help="AdamW betas", metavar="BETA")
    seed: int = setting(0, help="seed of the batch order")
    precision: str = setting("auto", choices=PRECISIONS,
                             help="auto: bf16 autocast on CUDA, fp32 on CPU; fp16 adds loss scaling")
    checkpoint_every: int = setting(0, minimum=0, help="steps between resumable checkpoints (0: none)")
    text_batch: int = setting(AUTO_TEXT_BATCH, minimum=0,
                              help="prompts encoded at once, bounding the text side's memory at any class count; "
                                   "0: 8 per image of the batch, within 32-2048")
    include: tuple[str, ...] = setting(DEFAULT_INCLUDE, metavar="PATTERN",
                                       help="parameter name patterns (fnmatch) full fine-tuning trains")
    exclude: tuple[str, ...] = setting(DEFAULT_EXCLUDE, metavar="PATTERN",
                                       help="parameter name patterns full fine-tuning never trains")
    lora_rank: int = setting(8, minimum=1, help="lora: rank r of each adapted weight's update B @ A")
    lora_alpha: float = setting(8.0, minimum=0.0,
                                help="lora: PEFT's lora_alpha, the update being scaled by lora_alpha / r (not the "
                                     "interpolation weight alpha of evaluation)")
    lora_targets: tuple[str, ...] = setting(LORA_TARGETS, metavar="MODULE",
                                            help="lora: modules adapted in both towers, by name or dotted suffix "
                                                 "(PEFT's target_modules); attn: each attention's fused q/k/v input "
                                                 "projection and its output projection")
    probe_steps: int = setting(100, minimum=1,
                               help="lpft: full-batch AdamW steps of the linear probe on the frozen image features "
                                    "before full fine-tuning")
    probe_lr: float = setting(1e-3, minimum=0.0, help="lpft: learning rate of the linear probe")

    def __post_init__(self) -> None:
        check(self)
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be > 0 (or none for the model's recipe), got {self.lr!r}")
        self.betas = tuple(self.betas)
        self.include = tuple(self.include)
        self.exclude = tuple(self.exclude)
        self.lora_targets = tuple(self.lora_targets)
        if not self.lora_targets:
            raise ConfigError("lora_targets is empty: name at least one module, e.g. attn")

    @property
    def text_prompts(self) -> int:
        """Prompts per text chunk of one process (``text_batch``, or the automatic size for the batch)."""
        return auto_text_batch(self.text_batch, self.batch_size)

    @property
    def needs_mask(self) -> bool:
        return self.method in MASK_METHODS

    @property
    def learning_rate(self) -> float:
        return default_lr(self.method) if self.lr is None else self.lr

    def for_data(self, n_train: int) -> "FinetuneConfig":
        """This config with ``epochs`` (> 0) turned into steps over ``n_train`` images."""
        if not self.epochs:
            return self
        steps = max(1, math.ceil(self.epochs * n_train / (self.batch_size * self.grad_accum)))
        return dataclasses.replace(self, steps=steps)

    def to_dict(self) -> dict:
        d = to_mapping(self)
        d["lr"] = self.learning_rate
        return d
