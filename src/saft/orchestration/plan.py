"""What a run trains, and whether the suite's protocol allows it: checked before any GPU work.

A run trains once per seed on ``data`` and evaluates the whole suite, except for a
base-to-new suite of several datasets (the CoOp/CoCoOp protocol's 11): there every
dataset is a task of its own, trained on the base half of its classes, read from the
dataset's own suite root and training split, and evaluated on its own base and new
halves. One dataset's model never scores another dataset's classes.

Protocol rules (:func:`check_protocol`), each refused with the setting to change:

* a suite with ``base``/``new`` entries needs ``data.subset: base`` (trained on all
  classes, the "new" ones would not be new), and ``data.subset: base`` needs such a suite;
  base/new entries do not mix with ID/OOD ones in one run;
* the built-in ``imagenet-shifts`` and ``cross-dataset`` suites train on ImageNet (all
  classes): ``data.dataset: imagenet`` with a ``data.root``;
* with registration on, the gate must be able to judge the suite (ID/OOD, or HM on
  base-to-new; :func:`saft.tracking.promotion.gate_metric`), and a base-to-new run of
  several datasets has no single candidate to register.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from saft.eval.suites import BUILTIN_SUITES, Suite
from saft.steps.params import ParamsError, PipelineParams

IMAGENET_PROTOCOLS = ("imagenet-shifts", "cross-dataset")


@dataclass(frozen=True)
class TrainingTask:
    """One training per seed: where its data comes from and which suite entries its deltas score."""

    name: str  # "" for the single task of an ordinary run, else the base-to-new group
    dataset: str
    root: str  # "" : the embedded world's pool
    split: str = ""  # "" : the dataset's training split
    entries: tuple[str, ...] = field(default=())  # suite entries to evaluate; () : all

    @property
    def folder(self) -> str:
        """Sub-folder of ``seed<N>/`` for this task's data, masks and deltas ("" for the single task)."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.name)


def training_plan(params: PipelineParams, suite: Suite, train_root: str) -> list[TrainingTask]:
    groups = suite.base_to_new_groups()
    if params.data.subset == "base" and len(groups) > 1:
        return [TrainingTask(group, base.dataset, base.root, "", (base.name, new.name))
                for group, (base, new) in groups.items()]
    return [TrainingTask("", params.data.dataset, train_root, params.data.split)]


def check_protocol(params: PipelineParams, suite: Suite, plan: list[TrainingTask]) -> str | None:
    """Raise ParamsError when the run cannot follow the suite's protocol; return the gate metric (None: no register)."""
    roles = suite.roles
    b2n = {"base", "new"} <= roles
    where = f"suite {suite.name!r}"
    if b2n and params.data.subset != "base":
        raise ParamsError(f"{where} scores base and new classes (base-to-new): train on the base half with "
                          "data.subset: base; trained on all classes, the 'new' classes would not be new")
    if params.data.subset == "base" and not b2n:
        raise ParamsError(f"data.subset: base trains on half of the classes, and {where} has no base/new entries to "
                          "score both halves: use a base-to-new suite (base2new, the world's synthshift-b2n, or "
                          "your own) or data.subset: all")
    if b2n and roles & {"id", "ood", "id_subset"}:
        raise ParamsError(f"{where} mixes base/new entries with id/ood ones; one run follows one protocol: split "
                          "the suite in two")
    if params.evaluate.suite in IMAGENET_PROTOCOLS and params.evaluate.suite in BUILTIN_SUITES:
        if params.data.dataset != "imagenet" or not params.data.root:
            raise ParamsError(f"the {params.evaluate.suite} protocol trains on ImageNet (all classes): set "
                              "data.dataset: imagenet and data.root to the ImageNet root")
    if not params.register.enabled:
        return None
    from saft.tracking.promotion import gate_metric

    try:
        gate = gate_metric(roles, params.register.gate, where)
    except ValueError as exc:
        raise ParamsError(str(exc)) from None
    if len(plan) > 1:
        raise ParamsError(f"{where} trains one model per dataset ({len(plan)} datasets): there is no single "
                          "candidate to register; set register.enabled: false (the metrics, report and tracking "
                          "runs are written as usual)")
    return gate


__all__ = ["TrainingTask", "check_protocol", "training_plan"]
