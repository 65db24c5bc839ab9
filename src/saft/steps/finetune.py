"""The finetune step: prepared data + model spec (+ mask) -> delta and training curves."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from saft.config import ConfigError
from saft.io import atomic_paths, write_json
from saft.models import load_model
from saft.sparse import ClassPrompts, FinetuneConfig, Mask, finetune, save_delta
from saft.sparse.distributed import Dist, from_env
from saft.steps.configs import FinetuneStepConfig
from saft.steps.prepared import PreparedData
from saft.steps.record import run_once
from saft.layout import FINETUNE

HISTORY_FILE = FINETUNE.history
CONFIG_FILE = FINETUNE.record
CHECKPOINT_DIR = FINETUNE.checkpoints


def finetune_step(cfg: FinetuneStepConfig, data_dir: str | Path, out_dir: str | Path, *,
                  mask_path: str | Path | None = None, root: str | None = None, resume: bool = False,
                  progress: bool = True, checkpoint_dir: str | Path | None = None,
                  log: Callable[[str], None] | None = print) -> dict:
    """Write ``delta.safetensors``, ``history.json`` and the resolved ``finetune.json``.

    Checkpoints go to ``checkpoint_dir`` (default ``out_dir/checkpoints``; a pipeline task
    puts them where a retry of it finds them); ``resume=True`` continues from there.
    Skipped when ``out_dir`` already holds the delta of the same configuration, data and
    mask (see :mod:`saft.steps.record`).
    """
    if not cfg.model:
        raise ConfigError("finetune: no model spec given (--model, or params.yaml model)")
    if cfg.needs_mask and mask_path is None:
        raise ConfigError(f"method {cfg.method} trains the entries of a mask: pass --mask with the mask.safetensors "
                          "`saft score` wrote")
    if not cfg.needs_mask and mask_path is not None:
        trains = {"full": "every eligible parameter", "lora": "low-rank adapters",
                  "lpft": "a linear probe, then every eligible parameter"}.get(cfg.method, "no mask's entries")
        raise ConfigError(f"method {cfg.method} trains {trains} and takes no mask (got --mask {mask_path}); drop "
                          "--mask, or use --method saft")
    data = PreparedData.open(data_dir, root)
    training = cfg.training()
    inputs = [data.folder] + ([Path(mask_path)] if mask_path is not None else [])
    params = {"model": cfg.model, "config": training.to_dict(), "root": data.root, "device": cfg.device,
              "skip_corrupt": cfg.skip_corrupt, "prompts": cfg.prompts}
    dist, device = from_env(cfg.device)  # under torchrun: this rank's part of every global batch
    return run_once("finetune", out_dir, params, inputs, [FINETUNE.delta, HISTORY_FILE, CONFIG_FILE],
                    lambda: _finetune(cfg, training, data, out_dir, mask_path, resume, device, progress, dist,
                                      checkpoint_dir), log=log, dist=dist)


def _finetune(cfg: FinetuneStepConfig, training: FinetuneConfig, data: PreparedData, out_dir, mask_path,
              resume: bool, device: str, progress: bool, dist: Dist, checkpoint_dir=None) -> dict:
    loaded = load_model(cfg.model, device=device)
    mask = Mask.load(mask_path) if mask_path is not None else None
    if mask is not None and mask.meta.get("base_fingerprint", loaded.fingerprint) != loaded.fingerprint:
        raise ValueError(f"{mask_path}: the mask was scored on another base model "
                         f"({mask.meta.get('base_model', 'unknown')}); score again for {cfg.model}")
    train = data.dataset(loaded.preprocess, skip_corrupt=cfg.skip_corrupt)
    prompts = ClassPrompts.build(loaded.tokenizer, data.classes, data.prompt_templates(cfg.prompts))
    out = Path(out_dir)
    meta = {"base_model": cfg.model, "manifest_hash": data.manifest_hash("train")}
    checkpoints = Path(checkpoint_dir) if checkpoint_dir is not None else out / CHECKPOINT_DIR
    result = finetune(loaded.model, train, prompts, config=training, mask=mask, checkpoint_dir=checkpoints,
                      resume=resume, device=device, meta=meta, progress=progress, dist=dist)
    summary = {"model": cfg.model, "base_fingerprint": loaded.fingerprint, "data": str(data.folder),
               "root": data.root, "mask": str(mask_path) if mask_path else None, "config": result.config,
               "prompt_set": cfg.prompts, "prompt_templates": list(prompts.templates), "processes": dist.world,
               "trained_values": result.delta.num_values, "seconds": result.seconds,
               "final_loss": result.history[-1]["loss"] if result.history else None, **meta}
    if dist.is_main:  # the delta and its records appear together or not at all (a full disk leaves none)
        with atomic_paths(out / FINETUNE.delta, out / HISTORY_FILE, out / CONFIG_FILE) as (delta, history, record):
            save_delta(result.delta, delta)
            write_json(history, result.history)
            write_json(record, summary)
    return summary


__all__ = ["FinetuneStepConfig", "finetune_step"]
