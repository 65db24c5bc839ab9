"""The finetune step: prepared data + model spec (+ mask) -> delta and training curves."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable

from saft.io import write_json
from saft.models import load_model
from saft.sparse import ClassPrompts, FinetuneConfig, Mask, finetune, save_delta
from saft.sparse.distributed import Dist, from_env
from saft.steps.prepared import PROMPT_SETS, PreparedData
from saft.steps.record import run_once

DELTA_FILE = "delta.safetensors"
HISTORY_FILE = "history.json"
CONFIG_FILE = "finetune.json"
CHECKPOINT_DIR = "checkpoints"


def finetune_step(model_spec: str, cfg: FinetuneConfig, data_dir: str | Path, out_dir: str | Path, *,
                  mask_path: str | Path | None = None, root: str | None = None, resume: bool = False,
                  device: str = "cpu", skip_corrupt: bool = False, progress: bool = True,
                  prompts: str = "train", checkpoint_dir: str | Path | None = None,
                  log: Callable[[str], None] | None = print) -> dict:
    """Write ``delta.safetensors``, ``history.json`` and the resolved ``finetune.json``.

    Checkpoints go to ``checkpoint_dir`` (default ``out_dir/checkpoints``; a pipeline task
    puts them where a retry of it finds them); ``resume=True`` continues from there.
    ``prompts`` picks the prepared prompt set the loss uses: ``train`` (the training
    prompt, default) or ``eval`` (the evaluation ensemble).
    Skipped when ``out_dir`` already holds the delta of the same configuration, data and
    mask (see :mod:`saft.steps.record`).
    """
    if cfg.method != "full" and mask_path is None:
        raise ValueError(f"method {cfg.method!r} needs a mask: pass the mask file written by `saft score`")
    if prompts not in PROMPT_SETS:
        raise ValueError(f"prompts must be one of {', '.join(PROMPT_SETS)}, got {prompts!r}")
    data = PreparedData.open(data_dir, root)
    inputs = [data.folder] + ([Path(mask_path)] if mask_path is not None and cfg.method != "full" else [])
    params = {"model": model_spec, "config": asdict(cfg), "root": data.root, "device": device,
              "skip_corrupt": skip_corrupt, "prompts": prompts}
    dist, device = from_env(device)  # under torchrun: this rank's part of every global batch
    return run_once("finetune", out_dir, params, inputs, [DELTA_FILE, HISTORY_FILE, CONFIG_FILE],
                    lambda: _finetune(model_spec, cfg, data, out_dir, mask_path, resume, device, skip_corrupt,
                                      progress, prompts, dist, checkpoint_dir), log=log, dist=dist)


def _finetune(model_spec: str, cfg: FinetuneConfig, data: PreparedData, out_dir, mask_path, resume: bool,
              device: str, skip_corrupt: bool, progress: bool, prompt_set: str, dist: Dist,
              checkpoint_dir=None) -> dict:
    loaded = load_model(model_spec, device=device)
    mask = Mask.load(mask_path) if mask_path is not None and cfg.method != "full" else None
    if mask is not None and mask.meta.get("base_fingerprint", loaded.fingerprint) != loaded.fingerprint:
        raise ValueError(f"{mask_path}: the mask was scored on another base model "
                         f"({mask.meta.get('base_model', 'unknown')}); score again for {model_spec}")
    train = data.dataset(loaded.preprocess, skip_corrupt=skip_corrupt)
    prompts = ClassPrompts.build(loaded.tokenizer, data.classes, data.prompt_templates(prompt_set))
    out = Path(out_dir)
    meta = {"base_model": model_spec, "manifest_hash": data.manifest_hash("train")}
    checkpoints = Path(checkpoint_dir) if checkpoint_dir is not None else out / CHECKPOINT_DIR
    result = finetune(loaded.model, train, prompts, config=cfg, mask=mask, checkpoint_dir=checkpoints,
                      resume=resume, device=device, meta=meta, progress=progress, dist=dist)
    summary = {"model": model_spec, "base_fingerprint": loaded.fingerprint, "data": str(data.folder),
               "root": data.root, "mask": str(mask_path) if mask_path else None, "config": result.config,
               "prompt_set": prompt_set, "prompt_templates": list(prompts.templates), "processes": dist.world,
               "trained_values": result.delta.num_values, "seconds": result.seconds,
               "final_loss": result.history[-1]["loss"] if result.history else None, **meta}
    if dist.is_main:
        save_delta(result.delta, out / DELTA_FILE)
        write_json(out / HISTORY_FILE, result.history)
        write_json(out / CONFIG_FILE, summary)
    return summary


__all__ = ["finetune_step"]
