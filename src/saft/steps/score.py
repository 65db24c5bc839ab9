"""The score step: prepared data + model spec -> SAFT mask and its statistics."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from saft.io import write_json
from saft.models import load_model
from saft.sparse import ClassPrompts, Eligibility, importance_scores, random_mask, select_mask
from saft.steps.prepared import PreparedData

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
    num_workers: int = 0
    seed: int = 0
    device: str = "cpu"


def score_step(cfg: ScoreConfig, data_dir: str | Path, out_dir: str | Path, *, root: str | None = None,
               progress: bool = True) -> dict:
    """Write ``mask.safetensors``, ``mask_stats.json`` and the resolved ``score.json`` into ``out_dir``."""
    if cfg.kind not in ("saft", "random"):
        raise ValueError(f"mask kind must be saft or random, got {cfg.kind!r}")
    data = PreparedData.open(data_dir, root)
    loaded = load_model(cfg.model, device=cfg.device)
    eligibility = Eligibility(tuple(cfg.include), tuple(cfg.exclude))
    meta = {"base_model": cfg.model, "base_fingerprint": loaded.fingerprint,
            "manifest_hash": data.manifest_hash("train")}
    if cfg.kind == "saft":
        train = data.dataset(loaded.preprocess)
        loader = torch.utils.data.DataLoader(train, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
        prompts = ClassPrompts.build(loaded.tokenizer, data.classes, data.templates)
        scores = importance_scores(loaded.model, loader, prompts, rule=cfg.rule, eligibility=eligibility,
                                   device=cfg.device, progress=progress)
        mask = select_mask(scores, cfg.density, meta=meta)
    else:
        shapes = {n: tuple(p.shape) for n, p in eligibility.select(loaded.model).items()}
        mask = random_mask(shapes, cfg.density, seed=cfg.seed, meta=meta)
    out = Path(out_dir)
    mask.save(out / MASK_FILE)
    stats = mask.stats()
    write_json(out / STATS_FILE, stats)
    write_json(out / CONFIG_FILE, {"config": asdict(cfg), "data": str(data.folder), "root": data.root, **meta})
    return stats
