"""The score step: prepared data + model spec -> SAFT mask and its statistics."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from saft.io import atomic_paths, write_json
from saft.config import ConfigError
from saft.models import load_model
from saft.sparse import ClassPrompts, Eligibility, importance_scores, random_mask, select_mask
from saft.sparse.distributed import Dist, from_env
from saft.sparse.config import auto_text_batch
from saft.steps.configs import ScoreConfig
from saft.steps.prepared import PreparedData
from saft.steps.record import run_once
from saft.layout import MASK

MASK_FILE = MASK.mask
STATS_FILE = MASK.stats
CONFIG_FILE = MASK.record


def score_step(cfg: ScoreConfig, data_dir: str | Path, out_dir: str | Path, *, root: str | None = None,
               progress: bool = True, log: Callable[[str], None] | None = print) -> dict:
    """Write ``mask.safetensors``, ``mask_stats.json`` and the resolved ``score.json`` into ``out_dir``.

    Returns the mask statistics. Skipped when ``out_dir`` already holds the mask of the
    same configuration and prepared data (see :mod:`saft.steps.record`).
    """
    if not cfg.model:
        raise ConfigError("score: no model spec given (--model, or params.yaml model)")
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
        options = cfg.loader
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
    if dist.is_main:  # the mask and its records appear together or not at all (a full disk leaves none)
        with atomic_paths(out / MASK_FILE, out / STATS_FILE, out / CONFIG_FILE) as (mask_file, stats_file, record):
            mask.save(mask_file)
            write_json(stats_file, stats)
            write_json(record, {"config": asdict(cfg), "data": str(data.folder), "root": data.root,
                                "processes": dist.world, **meta})
    return stats
