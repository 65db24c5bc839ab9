"""The synthshift protocol: zero-shot and every compared method on a version of the embedded world.

Per seed: draw the 16-shot split (plus an ID validation split) from the world's ID pool,
score the SAFT mask, draw a random mask of the same density, fine-tune every method at
every learning rate of its grid, pick each method's rate on the ID validation split, and
evaluate the ``synthshift`` suite. Validity checks decide whether the world shows the
failure mode SAFT addresses; they are computed from full fine-tuning and zero-shot only,
never from SAFT's numbers, and only when full fine-tuning is among the methods run.

With ``b2n``, each seed also draws a 16-shot split of the base classes (the first half),
trains every method there at the rate it was given on the full task for that seed (SAFT
scores its mask on the base data), and the ``synthshift-b2n`` suite scores base and new
classes of the ID test set.

The SAFT variant is configurable (eligible tensors, density, score rule, global or
per-tensor selection) so that variants can be compared under the same protocol; the
random mask is drawn at the same density over the same eligible tensors.

The world version (``saft.world.spec``) sets the task: shots, validation shots, pool and
test sizes, seeds, steps, batch and alphas default to the version's; results.json records
the version, its fingerprint as measured now, whether that equals the frozen one, and every
setting that deviates from the version's task (a run with deviations is not the benchmark).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from saft.data.prepare import prepare_dataset
from saft.eval import delta_top1
from saft.eval.alpha_curve import ood_at_matched_id
from saft.eval.suites import load_suite
from saft.io import write_json
from saft.layout import EVAL, FINETUNE, MASK, WORLD_B2N_SUITE, WORLD_SUITE
from saft.models import load_model
from saft.protocols.methods import DEFAULT_GRIDS, DEFAULT_METHODS, METHODS
from saft.sparse import (SCORE_RULES, ClassPrompts, Eligibility, FinetuneConfig, FinetuneResult, finetune,
                         importance_scores,
                         load_delta, random_mask, save_delta, select_mask)
from saft.sparse.mask import Mask, select_mask_layerwise
from saft.steps.configs import WISEFT, WISEFT_ALPHAS
from saft.steps.evaluate import DeltaRun, EvaluateConfig, evaluate_suite
from saft.steps.prepared import PreparedData
from saft.world.checks import Checks
from saft.world.spec import DEFAULT_WORLD, get_world, world_fingerprint
from saft.world.task import build_world

SELECTIONS = ("global", "layerwise")


@dataclass
class WorldConfig:
    out_dir: Path = Path("runs/synthshift")
    world_dir: Path | None = None  # default: out_dir/world
    model: str = "tiny"
    world: str = DEFAULT_WORLD
    # None: the world version's task (saft.world.spec.Task)
    seeds: tuple[int, ...] | None = None
    shots: int | None = None
    val_shots: int | None = None
    density: float = 0.001
    steps: int | None = None
    batch_size: int | None = None
    grids: dict = field(default_factory=lambda: dict(DEFAULT_GRIDS))
    alphas: tuple[float, ...] | None = None
    pool_per_class: int | None = None
    test_per_class: int | None = None
    methods: tuple[str, ...] = DEFAULT_METHODS  # zero-shot is always evaluated
    include: tuple[str, ...] = Eligibility.include  # SAFT / random-mask eligibility (full FT keeps its own)
    exclude: tuple[str, ...] = Eligibility.exclude
    score_rule: str = "abs_mean"
    selection: str = "global"
    b2n: bool = False
    resume: bool = False  # reuse deltas a killed run left, when trained with the same configuration and data

    def __post_init__(self) -> None:
        task = get_world(self.world).task
        for name in TASK_FIELDS:
            if getattr(self, name) is None:
                setattr(self, name, getattr(task, name))
        self.seeds, self.alphas = tuple(self.seeds), tuple(float(a) for a in self.alphas)
        if self.shots + self.val_shots > self.pool_per_class:
            raise ValueError(f"shots ({self.shots}) + val_shots ({self.val_shots}) exceed the pool "
                             f"({self.pool_per_class} images per class)")
        self.methods = tuple(self.methods)
        self.include, self.exclude = tuple(self.include), tuple(self.exclude)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must be distinct names among {', '.join(METHODS)}, got {list(self.methods)}")
        if WISEFT in self.methods and "full" not in self.methods:
            raise ValueError("wiseft interpolates full fine-tuning's delta: add full to the methods")
        missing = [m for m in self.methods if m != WISEFT and not self.grids.get(m)]
        if missing:
            raise ValueError(f"no learning-rate grid for {', '.join(missing)}")
        if self.score_rule not in SCORE_RULES:
            raise ValueError(f"score_rule must be one of {', '.join(SCORE_RULES)}, got {self.score_rule!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")

    @property
    def eligibility(self) -> Eligibility:
        return Eligibility(self.include, self.exclude)


TASK_FIELDS = ("seeds", "shots", "val_shots", "steps", "batch_size", "alphas", "pool_per_class", "test_per_class")


def protocol_deviations(cfg: WorldConfig) -> dict:
    """Settings that differ from the world version's task (and grids from the protocol's): name -> [task, run]."""
    task = get_world(cfg.world).task
    out = {n: [_plain(getattr(task, n)), _plain(getattr(cfg, n))] for n in TASK_FIELDS
           if _plain(getattr(task, n)) != _plain(getattr(cfg, n))}
    out.update({f"grid.{m}": [DEFAULT_GRIDS.get(m), cfg.grids.get(m)] for m in cfg.methods
                if m in DEFAULT_GRIDS and list(cfg.grids.get(m) or []) != list(DEFAULT_GRIDS[m])})
    if cfg.density != 0.001:
        out["density"] = [0.001, cfg.density]
    return out


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def parse_grid(text: str) -> tuple[str, list[float]]:
    """``METHOD=LR[,LR...]`` (e.g. ``saft=1e-3,3e-3``) -> (method, rates)."""
    method, sep, rates = text.partition("=")
    method = method.strip()
    if not sep or method not in DEFAULT_GRIDS:
        raise ValueError(f"{text!r}: expected METHOD=LR[,LR...] with METHOD one of {', '.join(DEFAULT_GRIDS)}")
    try:
        values = [float(v) for v in rates.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{text!r}: learning rates must be numbers, e.g. saft=1e-3,3e-3") from None
    if not values or any(not v > 0 for v in values):
        raise ValueError(f"{text!r}: give at least one positive learning rate")
    return method, values


def _lr_label(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def _masks(cfg: WorldConfig, model, loader, prompts, seed: int, meta: dict, progress: bool) -> dict:
    masks: dict[str, Mask | None] = {}
    eligibility = cfg.eligibility
    # a variant's mask file must say which variant made it
    meta = dict(meta, eligible_include=json.dumps(list(cfg.include)), eligible_exclude=json.dumps(list(cfg.exclude)))
    if "saft" in cfg.methods:
        scores = importance_scores(model, loader, prompts, rule=cfg.score_rule, eligibility=eligibility,
                                   progress=progress)
        select = select_mask_layerwise if cfg.selection == "layerwise" else select_mask
        masks["saft"] = select(scores, cfg.density, meta=meta)
    if "random" in cfg.methods:
        shapes = {n: tuple(p.shape) for n, p in eligibility.select(model).items()}
        masks["random"] = random_mask(shapes, cfg.density, seed=seed, meta=meta)
    return masks


def _train(cfg: WorldConfig, model, train, prompts, method: str, lr: float, seed: int, mask, meta, progress,
           out: Path, log: Callable[[str], None] = print) -> FinetuneResult:
    """Train one run into ``out`` (its delta and history), or, with ``resume``, reuse the delta already there
    when it was trained with the same configuration on the same data from the same base."""
    fcfg = FinetuneConfig(method=method, steps=cfg.steps, batch_size=cfg.batch_size, lr=lr,
                          warmup_steps=cfg.steps // 10, seed=seed)
    delta_path, history_path = out / FINETUNE.delta, out / FINETUNE.history
    if cfg.resume and delta_path.is_file() and history_path.is_file():
        done = load_delta(delta_path)
        same = (json.loads(done.meta.get("config", "null")) == json.loads(json.dumps(fcfg.to_dict()))
                and done.meta.get("manifest_hash") == meta["manifest_hash"]
                and (mask is None or done.meta.get("mask_manifest_hash") == meta["manifest_hash"]))
        if same:
            log(f"seed {seed} {method:<6} lr {lr:.0e}: reusing {delta_path} (--resume)")
            return FinetuneResult(done, json.loads(history_path.read_text()), fcfg.to_dict(), 0.0)
    result = finetune(model, train, prompts, config=fcfg, mask=mask, meta=meta, progress=progress)
    save_delta(result.delta, delta_path)
    write_json(history_path, result.history)  # the report's training curves
    return result


def mask_landing(stats: list[dict]) -> dict:
    """Where a method's masks fall, over seeds: entries per tensor (mean), largest first."""
    n = len(stats)
    per_tensor: dict[str, float] = {}
    for st in stats:
        for name, row in st["per_tensor"].items():
            if row["selected"]:
                per_tensor[name] = per_tensor.get(name, 0.0) + row["selected"] / n
    return {"num_selected": [st["num_selected"] for st in stats], "eligible": stats[0]["eligible"],
            "per_tensor": dict(sorted(per_tensor.items(), key=lambda kv: (-kv[1], kv[0])))}


def _b2n_runs(cfg: WorldConfig, pool: Path, seed_dir: Path, seed: int, loaded, lrs: dict[str, float],
              log: Callable[[str], None], progress: bool) -> list[DeltaRun]:
    """Train every method on the base half of the classes at the rate chosen for this seed."""
    model = loaded.model
    prepare_dataset(pool, seed_dir / "b2n" / "data", shots=cfg.shots, seed=seed,
                    subset="base", val_shots=0)
    data = PreparedData.open(seed_dir / "b2n" / "data")
    train = data.dataset(loaded.preprocess)
    prompts = ClassPrompts.build(loaded.tokenizer, data.classes, data.templates)
    loader = torch.utils.data.DataLoader(train, batch_size=cfg.batch_size)
    meta = {"base_model": cfg.model, "manifest_hash": data.manifest_hash()}
    masks = _masks(cfg, model, loader, prompts, seed, meta, progress)
    runs = []
    for method in (m for m in cfg.methods if m != WISEFT):
        result = _train(cfg, model, train, prompts, method, lrs[method], seed, masks.get(method), meta, progress,
                        seed_dir / "b2n" / method, log)
        path = seed_dir / "b2n" / method / FINETUNE.delta
        runs.append(DeltaRun(method, str(path), seed))
        log(f"seed {seed} {method:<6} base-to-new: trained on {len(data.classes)} base classes at lr "
            f"{lrs[method]:.0e} ({result.seconds:.1f} s)")
        if method == "full" and WISEFT in lrs:  # at the alpha chosen on the full task for this seed
            runs.append(DeltaRun(WISEFT, str(path), seed, lrs[WISEFT]))
    return runs


def b2n_table(aggregates: list[dict]) -> dict:
    """method -> base / new / hm (mean and std over seeds) from the b2n suite's aggregates."""
    return {a["model"]: {k: a[k] for k in ("base", "new", "hm")} for a in aggregates
            if a["alpha"] in (None, 1.0) and "hm" in a}


def run_world(cfg: WorldConfig, log: Callable[[str], None] = print, progress: bool = False) -> dict:
    t0 = time.perf_counter()
    out = Path(cfg.out_dir)
    spec = get_world(cfg.world)
    world = build_world(cfg.world_dir or out / "world", pool_per_class=cfg.pool_per_class,
                        test_per_class=cfg.test_per_class, version=spec.name, log=log)
    loaded = load_model(cfg.model)
    fingerprint = world_fingerprint(spec, loaded.fingerprint)
    frozen = (spec.frozen or {}).get("fingerprint")
    deviations = protocol_deviations(cfg)
    if frozen and fingerprint != frozen:
        log(f"warning: world {spec.name} fingerprint {fingerprint[:12]} differs from the frozen {frozen[:12]} "
            "(renderer, image library or model changed): these numbers are not the frozen world's")
    if deviations:
        log("protocol deviations from the world's task: " + ", ".join(f"{k} {v[1]} (task: {v[0]})"
                                                                      for k, v in deviations.items()))
    model = loaded.model
    chosen_runs: list[DeltaRun] = []
    b2n_runs: list[DeltaRun] = []
    grid_log: list[dict] = []
    chosen_lr: dict[str, list[float]] = {}
    wiseft_alpha: dict[int, float] = {}
    sizes: dict[str, dict] = {}
    mask_stats: dict[str, list[dict]] = {}
    for seed in cfg.seeds:
        seed_dir = out / f"seed{seed}"
        prepare_dataset(world / spec.pool_dir, seed_dir / "data", shots=cfg.shots, seed=seed,
                        val_shots=cfg.val_shots)
        data = PreparedData.open(seed_dir / "data")
        train, val = data.dataset(loaded.preprocess), data.dataset(loaded.preprocess, "val")
        prompts = ClassPrompts.build(loaded.tokenizer, data.classes, data.templates)
        loader = torch.utils.data.DataLoader(train, batch_size=cfg.batch_size)
        meta = {"base_model": cfg.model, "manifest_hash": data.manifest_hash()}
        masks = _masks(cfg, model, loader, prompts, seed, meta, progress)
        for method in ("saft", "random"):
            if masks.get(method) is not None:
                stats = masks[method].stats()
                mask_stats.setdefault(method, []).append(stats)
                if method == "saft":
                    masks[method].save(seed_dir / MASK.mask)
                    write_json(seed_dir / MASK.stats, stats)
        seed_lr: dict[str, float] = {}
        for method in (m for m in cfg.methods if m != WISEFT):
            best = None
            for lr in cfg.grids[method]:
                result = _train(cfg, model, train, prompts, method, lr, seed, masks.get(method), meta, progress,
                                seed_dir / method / _lr_label(lr), log)
                path = seed_dir / method / _lr_label(lr) / FINETUNE.delta
                val_acc = delta_top1(model, result.delta, val, prompts)
                grid_log.append({"seed": seed, "method": method, "lr": lr, "val_acc": val_acc,
                                 "final_loss": result.history[-1]["loss"], "seconds": result.seconds})
                log(f"seed {seed} {method:<6} lr {lr:.0e}: ID val {100 * val_acc:5.1f}  "
                    f"({result.seconds:.1f} s)")
                if best is None or val_acc > best[0]:
                    best = (val_acc, lr, path, result.delta.num_values)
            chosen_runs.append(DeltaRun(method, str(best[2]), seed))
            chosen_lr.setdefault(method, []).append(best[1])
            seed_lr[method] = best[1]
            sizes[method] = {"trainable": best[3], "delta_bytes": Path(best[2]).stat().st_size}
            if method == "full" and WISEFT in cfg.methods:  # WiSE-FT: the chosen full delta's alpha, on ID val
                curve = [(a, delta_top1(model, load_delta(best[2]), val, prompts, alpha=a)) for a in WISEFT_ALPHAS]
                alpha = max(curve, key=lambda c: (c[1], -c[0]))[0]
                chosen_runs.append(DeltaRun(WISEFT, str(best[2]), seed, alpha))
                wiseft_alpha.setdefault(seed, alpha)
                seed_lr[WISEFT], sizes[WISEFT] = alpha, sizes["full"]
                log(f"seed {seed} wiseft alpha {alpha:g}: ID val {100 * max(v for _, v in curve):5.1f}")
        if cfg.b2n:
            b2n_runs += _b2n_runs(cfg, world / spec.pool_dir, seed_dir, seed, loaded, seed_lr, log, progress)
    log("evaluating the synthshift suite")
    suite = load_suite(str(world / WORLD_SUITE), str(world))
    doc = evaluate_suite(EvaluateConfig(model=cfg.model, deltas=chosen_runs, alphas=list(cfg.alphas)), suite,
                         out / "eval", progress=progress, log=lambda *_: None)
    b2n = None
    if cfg.b2n:
        log("evaluating the synthshift-b2n suite")
        b2n_suite = load_suite(str(world / WORLD_B2N_SUITE), str(world))
        b2n_doc = evaluate_suite(EvaluateConfig(model=cfg.model, deltas=b2n_runs, alphas=[1.0]), b2n_suite,
                                 out / "eval-b2n", progress=progress, log=lambda *_: None)
        b2n = {"table": b2n_table(b2n_doc["aggregates"]), "aggregates": b2n_doc["aggregates"]}
    # The checks judge the world by full fine-tuning; without it there is nothing to judge.
    checks = Checks.compute(doc["aggregates"]) if "full" in cfg.methods else None
    matched = ood_at_matched_id(doc["aggregates"])
    if wiseft_alpha and "full" in matched:  # WiSE-FT's points lie on full fine-tuning's curve
        matched[WISEFT] = matched["full"]
    summary = {"config": json.loads(json.dumps(asdict(cfg), default=str)), "grid": grid_log,
               "chosen_lr": {m: max(set(v), key=v.count) for m, v in chosen_lr.items()},
               "chosen_lr_per_seed": chosen_lr, "sizes": sizes,
               "masks": {m: mask_landing(st) for m, st in mask_stats.items()},
               "ood_at_matched_id": matched, "wiseft_alpha": {str(s): a for s, a in wiseft_alpha.items()},
               "checks_computed": checks is not None,
               "checks": checks.results if checks else {}, "checks_passed": checks.passed if checks else None,
               "check_details": checks.details() if checks else {},
               "world": spec.name, "world_fingerprint": fingerprint, "world_frozen": frozen,
               "world_matches_frozen": frozen == fingerprint if frozen else None,
               "protocol_deviations": deviations,
               "aggregates": doc["aggregates"], "b2n": b2n, "seconds": round(time.perf_counter() - t0, 1)}
    write_json(out / EVAL.results, summary)
    return summary
