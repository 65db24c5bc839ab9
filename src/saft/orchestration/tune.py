"""One method for one seed, its learning rate chosen on ID validation (and, for full fine-tuning, WiSE-FT's alpha).

The benchmark's unit of work (``saft run``, the benchmark pipeline's ``train-method``
task). Every method gets the same treatment: it is trained at every rate of its own grid
(one finetune output per rate, ``lr-<rate>/``), and the rate whose delta has the best
top-1 on the prepared ID validation split is kept (:mod:`saft.steps.select`: ties to the
lower rate; the suite is never looked at). A grid of one rate trains straight into
``out_dir``: nothing to choose. With ``wiseft_alphas`` (full fine-tuning only), WiSE-FT's
mixing weight is then chosen on the same split (:mod:`saft.steps.wiseft`).

``out_dir`` ends as a finetune output (``delta.safetensors``, ``history.json``,
``finetune.json``: the chosen run), with ``select/`` (``selection.json``, ``selection.png``)
when a grid was searched and ``wiseft/`` when WiSE-FT's alpha was chosen.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Sequence

from saft.orchestration.tasks import RUN_FILES, _log, finetune_task, prepared_root, select_task
from saft.steps.tracked import step_context

SELECT_DIR = "select"


def lr_folder(lr: float) -> str:
    return f"lr-{lr:g}"


def check_grid(method: str, lrs: Sequence[float]) -> list[float]:
    lrs = [float(lr) for lr in lrs]
    if not lrs or any(not lr > 0 for lr in lrs) or len(set(lrs)) != len(lrs):
        raise ValueError(f"the learning-rate grid of {method} must hold distinct positive rates, got {lrs}")
    return lrs


def tune_task(data_dir: str, mask_dir: str | None, out_dir: str, cfg, lrs: Sequence[float], *,
              wiseft_alphas: Sequence[float] = (), parent_run_id: str = "", progress: bool = False,
              log: Callable[[str], None] = _log, checkpoint_root: str = "") -> dict:
    """Train ``cfg.method`` (a :class:`~saft.steps.configs.FinetuneStepConfig`; its ``lr`` is replaced by each rate
    of ``lrs``) and keep the best rate on ID validation; returns the chosen run's finetune summary plus ``lr``,
    ``grid`` (rate -> validation top-1, when searched) and ``wiseft_alpha`` (when chosen)."""
    from dataclasses import replace

    lrs = check_grid(cfg.method, lrs)
    if wiseft_alphas and cfg.method != "full":
        raise ValueError(f"WiSE-FT interpolates full fine-tuning's delta: wiseft_alphas given to method {cfg.method}")
    out = Path(out_dir)
    train = dict(parent_run_id=parent_run_id, progress=progress, log=log, checkpoint_root=checkpoint_root)
    if len(lrs) == 1:
        summary = finetune_task(data_dir, mask_dir, str(out), replace(cfg, lr=lrs[0]), **train)
        summary["lr"] = lrs[0]
    else:
        folders = []
        for lr in lrs:
            folder = out / lr_folder(lr)
            finetune_task(data_dir, mask_dir, str(folder), replace(cfg, lr=lr), **train)
            folders.append(str(folder))
        doc = select_task(cfg.model, data_dir, folders, str(out / SELECT_DIR), batch_size=cfg.batch_size,
                          device=cfg.device, parent_run_id=parent_run_id)
        chosen = out / lr_folder(doc["chosen_lr"])
        for name in RUN_FILES:
            shutil.copyfile(chosen / name, out / name)
        summary = json.loads((out / RUN_FILES[2]).read_text())
        summary.update(lr=doc["chosen_lr"], grid={repr(c["lr"]): c["val_top1"] for c in doc["candidates"]})
        log(f"{cfg.method}: lr {doc['chosen_lr']:g} chosen on ID validation among {', '.join(f'{x:g}' for x in lrs)}")
    if wiseft_alphas:
        summary["wiseft_alpha"] = wiseft_task(cfg.model, data_dir, str(out), wiseft_alphas, batch_size=cfg.batch_size,
                                              device=cfg.device, seed=cfg.seed, parent_run_id=parent_run_id,
                                              log=log)["chosen_alpha"]
    return summary


def wiseft_task(model: str, data_dir: str, full_dir: str, alphas: Sequence[float], *, batch_size: int,
                device: str = "auto", seed: int | None = None, parent_run_id: str = "", log=_log) -> dict:
    """WiSE-FT's alpha for the full fine-tuning output ``full_dir``, written into ``full_dir/wiseft/``."""
    from saft.sparse.distributed import resolve_device
    from saft.layout import FINETUNE, WISEFT_OUT
    from saft.steps.configs import WiseftConfig
    from saft.steps.wiseft import WISEFT_DIR, wiseft_step

    name = "wiseft" + ("" if seed is None else f" seed{seed}")
    with step_context(name, parent_run_id, {"alphas": list(alphas)}) as tracker:
        cfg = WiseftConfig(model=model, alphas=list(alphas), batch_size=batch_size, device=resolve_device(device))
        doc = wiseft_step(cfg, data_dir, Path(full_dir) / FINETUNE.delta, Path(full_dir) / WISEFT_DIR,
                          root=prepared_root(data_dir), log=log)
        tracker.log_metrics({f"val_top1.alpha_{c['alpha']:g}": c["val_top1"] for c in doc["curve"]}
                            | {"chosen_alpha": doc["chosen_alpha"]})
        tracker.log_artifact(str(Path(full_dir) / WISEFT_DIR / WISEFT_OUT.plot))
    return doc


__all__ = ["check_grid", "lr_folder", "tune_task", "wiseft_task"]
