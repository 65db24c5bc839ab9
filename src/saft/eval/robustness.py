"""Effective robustness against a reference fit (Taori et al. 2020; Radford et al. 2021).

Taori et al. ("Measuring robustness to natural distribution shifts in image
classification", NeurIPS 2020, Sec. 3) define the effective robustness of a model f on a
shift as ``rho(f) = acc_shift(f) - beta(acc_id(f))``, where ``beta`` is a baseline: a
linear fit, in logit-transformed accuracy, of shift accuracy on ID accuracy over a
testbed of standard ImageNet models. Radford et al. ("Learning transferable visual
models from natural language supervision", ICML 2021, Sec. 3.3, Fig. 13-14) report
CLIP's effective robustness the same way. For shifts that cover a subset of the classes
(ImageNet-A/-R: 200 of 1000) the ID accuracy on the x-axis is ImageNet accuracy on that
subset of classes (Taori et al.'s ``val-on-imagenet-r-classes``; Radford et al.'s "class
subsampled ImageNet"), so a suite scores it in an ``id_subset`` entry.

Neither paper prints the fitted coefficients: they plot the lines. What the literature
publishes is the testbed's per-model accuracies, so the reference shipped here
(``references/taori2020-testbed.yaml``) holds the standard-training models of Taori et
al.'s testbed and the line is fitted here by least squares in transformed space, as the
testbed's plotting code does. It covers ImageNetV2, -Sketch and -R; ImageNet-A is listed
as missing (its published baseline is piecewise). A user reference is a YAML file of the
same format (``format: saft-reference/1``) with either ``models`` (accuracies to fit)
or ``fits`` (given coefficients)::

    format: saft-reference/1
    name: my-testbed
    transform: logit              # logit (Taori et al., Radford et al.) or probit
    source: where the numbers come from
    shifts:                       # which ID accuracy is each shift's x-axis
      imagenet-v2: {x: id}
      imagenet-r: {x: id_on_shift_classes}
    models:                       # top-1 fractions; a model fits the shifts it lists
      - {name: resnet50, id: 0.7613, ood: {imagenet-v2: 0.632, imagenet-r: 0.362},
         id_on_shift_classes: {imagenet-r: 0.921}}
    # or, instead of models:
    fits:
      imagenet-v2: {slope: 0.92, intercept: -0.50}

Accuracies of exactly 0 or 1 are clipped to [1e-6, 1 - 1e-6] before the transform.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist

import yaml

REFERENCE_FORMAT = "saft-reference/1"
REFERENCE_DIR = Path(__file__).with_name("references")
TRANSFORMS = ("logit", "probit")
X_KINDS = ("id", "id_on_shift_classes")
NO_REFERENCE = "none"
_EPS = 1e-6
_NORMAL = NormalDist()


class ReferenceError(ValueError):
    """A reference file that cannot be used (the message names the file and field)."""


def transform(acc: float, kind: str) -> float:
    p = min(max(float(acc), _EPS), 1 - _EPS)
    return math.log(p / (1 - p)) if kind == "logit" else _NORMAL.inv_cdf(p)


def inverse(value: float, kind: str) -> float:
    return 1 / (1 + math.exp(-value)) if kind == "logit" else _NORMAL.cdf(value)


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Ordinary least squares ``y = slope * x + intercept``."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ReferenceError("the reference models all have the same ID accuracy; a line cannot be fitted")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope, my - slope * mx


@dataclass(frozen=True)
class LineFit:
    """The baseline of one shift: ``T(ood) = slope * T(x) + intercept`` in transform ``T``."""

    slope: float
    intercept: float
    x: str = "id"  # "id" or "id_on_shift_classes"
    n_models: int | None = None  # None: coefficients given, not fitted here

    def predict(self, x_acc: float, kind: str) -> float:
        return inverse(self.slope * transform(x_acc, kind) + self.intercept, kind)


@dataclass(frozen=True)
class Reference:
    name: str
    transform: str
    source: str
    fits: dict[str, LineFit]
    missing: dict[str, str] = field(default_factory=dict)

    def effective_robustness(self, shift: str, x_acc: float, ood_acc: float) -> float:
        return ood_acc - self.fits[shift].predict(x_acc, self.transform)

    def to_dict(self) -> dict:
        return {"name": self.name, "transform": self.transform, "source": self.source,
                "fits": {s: asdict(f) for s, f in self.fits.items()}, "missing": dict(self.missing)}

    @classmethod
    def from_dict(cls, doc: dict) -> "Reference":
        return cls(doc["name"], doc["transform"], doc.get("source", ""),
                   {s: LineFit(**f) for s, f in doc["fits"].items()}, dict(doc.get("missing", {})))


def builtin_references() -> list[str]:
    return sorted(p.stem for p in REFERENCE_DIR.glob("*.yaml"))


def _fraction(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ReferenceError(f"{where}: expected a top-1 fraction in [0, 1], got {value!r}")
    return float(value)


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ReferenceError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _shift_axes(doc: dict, path: str) -> dict[str, str]:
    shifts = doc.get("shifts") or {}
    if not isinstance(shifts, dict):
        raise ReferenceError(f"{path}: 'shifts' must map shift names to {{x: id | id_on_shift_classes}}")
    axes = {}
    for shift, spec in shifts.items():
        x = (spec or {}).get("x", "id") if isinstance(spec, dict) else spec
        if x not in X_KINDS:
            raise ReferenceError(f"{path}: shifts.{shift}.x must be one of {', '.join(X_KINDS)}, got {x!r}")
        axes[str(shift)] = x
    return axes


def _fit_models(models, axes: dict[str, str], kind: str, path: str) -> dict[str, LineFit]:
    if not isinstance(models, list) or not models:
        raise ReferenceError(f"{path}: 'models' must be a non-empty list of {{name, id, ood: {{shift: acc}}}}")
    points: dict[str, list[tuple[float, float]]] = {}
    for i, model in enumerate(models, start=1):
        where = f"{path}, models item {i}"
        if not isinstance(model, dict) or not isinstance(model.get("ood"), dict):
            raise ReferenceError(f"{where}: expected a mapping with 'id' and 'ood' (shift -> accuracy)")
        where = f"{path}, model {model.get('name', i)!r}"
        subset = model.get("id_on_shift_classes") or {}
        for shift, acc in model["ood"].items():
            x_kind = axes.get(shift, "id")
            if x_kind == "id":
                x = _fraction(model.get("id"), f"{where}: id")
            elif shift in subset:
                x = _fraction(subset[shift], f"{where}: id_on_shift_classes.{shift}")
            else:
                raise ReferenceError(f"{where}: shift {shift!r} is fitted on ID accuracy over its classes; "
                                     f"give id_on_shift_classes.{shift}")
            y = _fraction(acc, f"{where}: ood.{shift}")
            points.setdefault(str(shift), []).append((transform(x, kind), transform(y, kind)))
    fits = {}
    for shift, pts in points.items():
        if len(pts) < 2:
            raise ReferenceError(f"{path}: shift {shift!r} has {len(pts)} reference model(s); a fit needs at least 2")
        slope, intercept = fit_line([p[0] for p in pts], [p[1] for p in pts])
        fits[shift] = LineFit(slope, intercept, axes.get(shift, "id"), len(pts))
    return fits


def _given_fits(fits, axes: dict[str, str], path: str) -> dict[str, LineFit]:
    if not isinstance(fits, dict) or not fits:
        raise ReferenceError(f"{path}: 'fits' must map shift names to {{slope, intercept}}")
    out = {}
    for shift, spec in fits.items():
        if not isinstance(spec, dict):
            raise ReferenceError(f"{path}: fits.{shift} must be a mapping with slope and intercept")
        out[str(shift)] = LineFit(_number(spec.get("slope"), f"{path}: fits.{shift}.slope"),
                                  _number(spec.get("intercept"), f"{path}: fits.{shift}.intercept"),
                                  axes.get(str(shift), "id"))
    return out


def load_reference(name_or_path: str) -> Reference:
    """A shipped reference by name (``builtin_references()``) or a reference YAML file."""
    path = REFERENCE_DIR / f"{name_or_path}.yaml" if name_or_path in builtin_references() else Path(name_or_path)
    if not path.is_file():
        raise ReferenceError(f"unknown effective-robustness reference {name_or_path!r}: use one of "
                             f"{', '.join(builtin_references())}, {NO_REFERENCE!r}, or the path of a reference YAML "
                             f"file ({REFERENCE_FORMAT})")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ReferenceError(f"{path}: not valid YAML ({exc})") from None
    where = str(path)
    if not isinstance(doc, dict) or doc.get("format") != REFERENCE_FORMAT:
        raise ReferenceError(f"{where}: expected a mapping with format: {REFERENCE_FORMAT}")
    kind = doc.get("transform", "logit")
    if kind not in TRANSFORMS:
        raise ReferenceError(f"{where}: transform must be one of {', '.join(TRANSFORMS)}, got {kind!r}")
    if ("models" in doc) == ("fits" in doc):
        raise ReferenceError(f"{where}: give either 'models' (accuracies to fit) or 'fits' (coefficients)")
    axes = _shift_axes(doc, where)
    fits = _fit_models(doc["models"], axes, kind, where) if "models" in doc else _given_fits(doc["fits"], axes, where)
    missing = {str(k): str(v) for k, v in (doc.get("missing") or {}).items()}
    return Reference(str(doc.get("name") or path.stem), kind, str(doc.get("source", "")), fits, missing)


__all__ = ["LineFit", "NO_REFERENCE", "Reference", "ReferenceError", "builtin_references", "fit_line",
           "load_reference"]
