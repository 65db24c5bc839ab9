"""The score step: prepared data + model spec -> SAFT mask and its statistics."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from saft.io import write_json
from saft.loader import AUTO_WORKERS, LoaderOptions
from saft.models import load_model
from saft.sparse import ClassPrompts, Eligibility, importance_scores, random_mask, select_mask
from saft.sparse.distributed import Dist, from_env
from saft.sparse.objective import AUTO_TEXT_BATCH, auto_text_batch
from saft.steps.prepared import PROMPT_SETS, PreparedData
from saft.steps.record import run_once

MASK_FILE = "mask.safetensors"
STATS_FILE = "mask_stats.json"
CONFIG_FILE = "score.json"


@dataclass
class ScoreConfig:
    model: str
    density: float = 0.001
    rule: str = "abs_mean"
    kind: str = "saft"  # saft | random
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=lambda: ["logit_scale", "logit_bias"])
    batch_size: int = 32
    num_workers: int = AUTO_WORKERS  # -1: from the task's CPUs
    pin_memory: bool = True
    persistent_workers: bool = True
    seed: int = 0
    device: str = "cpu"
    prompts: str = "train"  # train: the prepared training prompt set; eval: the evaluation ensemble
    text_batch: int = AUTO_TEXT_BATCH  # 0: 8 prompts per image of the batch (auto_text_batch)


def score_step(cfg: ScoreConfig, data_dir: str | Path, out_dir: str | Path, *, root: str | None = None,
               progress: bool = True, log: Callable[[str], None] | None = print) -> dict:
    """Write ``mask.safetensors``, ``mask_stats.json`` and the resolved ``score.json`` into ``out_dir``.

    Returns the mask statistics. Skipped when ``out_dir`` already holds the mask of the
    same configuration and prepared data (see :mod:`saft.steps.record`).
    """
    if cfg.kind not in ("saft", "random"):
        raise ValueError(f"mask kind must be saft or random, got {cfg.kind!r}")
    if not 0.0 < cfg.density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {cfg.density}")
    if cfg.prompts not in PROMPT_SETS:
        raise ValueError(f"prompts must be one of {', '.join(PROMPT_SETS)}, got {cfg.prompts!r}")
    data = PreparedData.open(data_dir, root)
    params = {**asdict(cfg), "root": data.root}
    dist, device = from_env(cfg.device)  # under torchrun: this rank's share of the batches
    return run_once("score", out_dir, params, [data.folder], [MASK_FILE, STATS_FILE, CONFIG_FILE],
                    lambda: _score(cfg, data, out_dir, progress, dist, device), log=log, dist=dist)


def _score(cfg: ScoreConfig, data: PreparedData, out_dir: str | Path, progress: bool, dist: Dist,
           device: str) -> dict:
    loaded = load_model(cfg.model, device=device)
    eligibility = Eligibility(tuple(cfg.include), tuple(cfg.exclude))
    meta = {"base_model": cfg.model, "base_fingerprint": loaded.fingerprint,
            "manifest_hash": data.manifest_hash("train")}
    if cfg.kind == "saft":
        train = data.dataset(loaded.preprocess)
        options = LoaderOptions(cfg.num_workers, cfg.pin_memory, cfg.persistent_workers)
        batches = [list(range(s, min(s + cfg.batch_size, len(train)))) for s in range(0, len(train), cfg.batch_size)]
        loader = torch.utils.data.DataLoader(train, batch_sampler=list(dist.batches(batches)),
                                             **options.kwargs(device, cfg.seed))
        prompts = ClassPrompts.build(loaded.tokenizer, data.classes, data.prompt_templates(cfg.prompts))
        scores = importance_scores(loaded.model, loader, prompts, rule=cfg.rule, eligibility=eligibility,
                                   device=device, progress=progress, text_batch=auto_text_batch(cfg.text_batch, cfg.batch_size), dist=dist)
        mask = select_mask(scores, cfg.density, meta=meta)
    else:
        shapes = {n: tuple(p.shape) for n, p in eligibility.select(loaded.model).items()}
        mask = random_mask(shapes, cfg.density, seed=cfg.seed, meta=meta)
    out = Path(out_dir)
    stats = mask.stats()
    if dist.is_main:
        mask.save(out / MASK_FILE)
        write_json(out / STATS_FILE, stats)
        write_json(out / CONFIG_FILE, {"config": asdict(cfg), "data": str(data.folder), "root": data.root,
                                       "processes": dist.world, **meta})
    return stats
