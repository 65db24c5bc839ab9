"""``saft bench step --nproc N``: the SAFT training step as N processes vs one, in one run.

The baseline is one process at global batch B; the job is N ranks under torchrun
(``python -m torch.distributed.run --standalone``; gloo on the CPU, NCCL on GPUs), each
training on its B/N part of the same global batch, as :func:`saft.sparse.trainer.finetune`
does: the loss is the part's summed cross-entropy over B, the text side's dL/dT is summed
(:class:`saft.sparse.text_side.StepTextSide`) and so are the trained values' gradients
(:meth:`saft.sparse.distributed.Dist.all_reduce_grads`). Same model, data and mask (scored
once here and handed to the ranks as a file). Every ``all_reduce`` the step makes is counted
(:class:`CountingDist`), so the report shows that what crosses the wire is the sparse values'
gradients, not the model's. After the timed steps the ranks' trained values are compared with
the baseline's by :data:`saft.sparse.distributed.VALUES_RULE` (the same sums in another fp32 order).

speedup = t_1proc / t_Nproc at the same global batch (t_Nproc: the slowest rank's median step),
efficiency = speedup / N. On a CPU the ranks share the baseline's cores (threads / N each), so
there the figures that matter are correctness and communication volume, not the speedup.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from saft.bench.step import (
    StepBenchConfig,
    _optimizer_bytes,
    _sync,
    _tensor_bytes,
    environment,
    mask_summary,
)
from saft.models import load_model
from saft.sparse.distributed import VALUE_TOLERANCE, VALUES_RULE, Dist, from_env, values_agree
from saft.sparse.mask import Mask, select_mask
from saft.sparse.objective import (
    ClassPrompts,
    auto_text_batch,
    clip_logits,
    is_text_side,
)
from saft.sparse.scores import importance_scores
from saft.sparse.text_side import StepTextSide
from saft.sparse.trainer import _freeze_norm_statistics
from saft.sparse.update import SparseUpdate
from saft.orchestration.torchrun import TORCHRUN_MARKERS, source_pythonpath, torchrun_command
from saft.layout import MASK

WORKER = "saft.bench.step_dist_worker"


@dataclass(frozen=True)
class CountingDist(Dist):
    """:class:`Dist` recording the bytes of every ``all_reduce`` under the current tag."""

    log: list = field(default_factory=list, compare=False)
    tag: list = field(default_factory=lambda: ["other"], compare=False)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            self.log.append((self.tag[0], tensor.numel() * tensor.element_size()))
        return super().all_reduce(tensor)


def _setup(cfg: StepBenchConfig, device: torch.device):
    """The model, global batch and prompts every process builds identically from the seed."""
    torch.manual_seed(cfg.seed)
    loaded = load_model(f"{cfg.arch}@random", device=device, seed=cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    images = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=gen)
    labels = torch.arange(cfg.batch_size) % cfg.num_classes
    prompts = ClassPrompts.build(loaded.tokenizer, [f"class {i}" for i in range(cfg.num_classes)]).to(device)
    return loaded.model, images, labels, prompts


def _train(cfg: StepBenchConfig, model, images, labels, prompts, mask: Mask, dist: CountingDist,
           device: torch.device) -> tuple[dict, list[torch.Tensor]]:
    """``warmup + repeats`` SAFT steps of this rank on its part of the global batch; its report and values."""
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    model.train()
    _freeze_norm_statistics(model)
    update = SparseUpdate(mask, device=device)
    params = list(update.values)
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    part = torch.tensor(list(dist.part(range(cfg.batch_size))))
    x, y = images[part].to(device), labels[part].to(device)
    text_side = StepTextSide(model, prompts, trains=any(is_text_side(n) for n in update.names),
                             text_batch=auto_text_batch(0, len(part)), context=lambda: update.attached(model),
                             dist=dist)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        text = text_side.begin()
        with update.attached(model):
            loss = F.cross_entropy(clip_logits(model, x, text).float(), y, reduction="sum") / cfg.batch_size
        loss.backward()
        dist.tag[0] = "text"  # dL/dT of the class embeddings
        text_side.finish()
        dist.tag[0] = "grads"  # the trained values' gradients
        dist.all_reduce_grads(params)
        opt.step()

    times, per_step = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for r in range(cfg.warmup + cfg.repeats):
        dist.barrier()  # the ranks start each step together
        _sync(device)
        start = len(dist.log)
        t0 = time.perf_counter()
        step()
        _sync(device)
        if r >= cfg.warmup:
            times.append(time.perf_counter() - t0)
        per_step.append(dist.log[start:])
    steady = all(s == per_step[-1] for s in per_step)
    reduced = {tag: sum(b for t, b in per_step[-1] if t == tag) for tag in ("grads", "text", "other")}
    state = {"values": _tensor_bytes(params), "grads": _tensor_bytes(p.grad for p in params),
             "optimizer": _optimizer_bytes(opt)}
    report = {
        "rank": dist.rank, "world": dist.world, "device": str(device), "threads": torch.get_num_threads(),
        "images": len(part), "step_times_s": times, "step_time_s": statistics.median(times),
        "state_bytes": sum(state.values()), "state": state,
        "all_reduce": {"bytes_per_step": sum(reduced.values()), **{f"{t}_bytes": b for t, b in reduced.items()},
                       "calls_per_step": len(per_step[-1]), "same_every_step": steady},
    }
    if device.type == "cuda":
        report["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return report, [v.detach().cpu().clone() for v in params]


def worker_main(argv: list[str]) -> int:
    """One rank (``python -m saft.bench.step_dist_worker FOLDER`` under torchrun)."""
    folder = Path(argv[0])
    conf = json.loads((folder / "config.json").read_text())
    torch.set_num_threads(conf.pop("threads_per_rank"))
    cfg = StepBenchConfig(**conf)
    base, device = from_env(cfg.device)
    dist = CountingDist(base.rank, base.world, base.local_rank)
    model, images, labels, prompts = _setup(cfg, torch.device(device))
    if dist.is_main:
        print(f"{dist.world} ranks: {cfg.warmup + cfg.repeats} steps of {cfg.batch_size // dist.world} images each",
              file=sys.stderr, flush=True)
    report, values = _train(cfg, model, images, labels, prompts, Mask.load(folder / MASK.mask), dist,
                            torch.device(device))
    torch.save(values, folder / f"values{dist.rank}.pt")
    (folder / f"rank{dist.rank}.json").write_text(json.dumps(report))
    dist.barrier()
    torch.distributed.destroy_process_group()
    return 0


def _launch(folder: Path, nproc: int, threads: int, progress: Callable[[str], None]) -> None:
    env = {**os.environ, "PYTHONPATH": source_pythonpath(dict(os.environ)), "OMP_NUM_THREADS": str(threads),
           "PYTHONUNBUFFERED": "1"}
    cmd = torchrun_command([str(folder)], nproc, module=WORKER)
    progress(f"launch: {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail: list[str] = []
    with proc.stdout:
        for line in proc.stdout:
            progress(line.rstrip("\n"))
            tail = (tail + [line])[-40:]
    if proc.wait():
        raise RuntimeError(f"the {nproc}-process job failed with exit code {proc.returncode}:\n{''.join(tail)}")


def run_dist_step_benchmark(cfg: StepBenchConfig, nproc: int, progress: Callable[[str], None] = print) -> dict:
    if nproc < 2:
        raise ValueError(f"nproc must be >= 2 for the distributed step benchmark, got {nproc}")
    if cfg.batch_size % nproc:
        raise ValueError(f"batch size {cfg.batch_size} must divide by --nproc {nproc}: each rank trains on an "
                         "equal part of the global batch")
    if any(os.environ.get(k) for k in TORCHRUN_MARKERS):
        raise ValueError("saft bench step --nproc starts its own torchrun job; run it directly, not under torchrun")
    device = torch.device(cfg.device)
    threads = torch.get_num_threads()
    per_rank = max(1, threads // nproc)
    model, images, labels, prompts = _setup(cfg, device)
    progress(f"scoring a one-batch |grad| mask at density {cfg.density} ...")
    scores = importance_scores(model, [(images.to(device), labels.to(device))], prompts, progress=False)
    with tempfile.TemporaryDirectory(prefix="saft-bench-step-") as tmp:
        folder = Path(tmp)
        select_mask(scores, cfg.density).save(folder / MASK.mask)
        mask = Mask.load(folder / MASK.mask)  # the very mask the ranks load
        progress(f"one process: {cfg.warmup + cfg.repeats} steps of {cfg.batch_size} images ...")
        one, one_values = _train(cfg, model, images, labels, prompts, mask, CountingDist(), device)
        (folder / "config.json").write_text(json.dumps({**cfg.__dict__, "threads_per_rank": per_rank}))
        _launch(folder, nproc, per_rank, progress)
        ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(nproc)]
        values = [torch.load(folder / f"values{r}.pt", weights_only=True) for r in range(nproc)]

    model_bytes = _tensor_bytes(model.parameters())
    values_bytes = mask.num_selected * 4  # fp32 values, one per selected entry
    scale = max(float(v.abs().max()) for v in one_values) or 1.0
    checks = [[values_agree(a, b) for b, a in zip(vs, one_values)] for vs in values]
    diffs = [max(c["max_abs_diff"] for c in rank) for rank in checks]
    t1, tn = one["step_time_s"], max(r["step_time_s"] for r in ranks)
    reduced = ranks[0]["all_reduce"]
    backend = "nccl" if device.type == "cuda" else "gloo"
    return {
        "config": {**cfg.__dict__, "nproc": nproc},
        "environment": environment(device, cpus=os.cpu_count(), backend=backend, threads_1proc=threads,
                                   threads_per_rank=per_rank),
        "mask": mask_summary(mask),
        "model_parameter_bytes": model_bytes,
        "values_bytes": values_bytes,
        "one_process": one,
        "ranks": ranks,
        "all_reduce": {**reduced, "vs_model_parameter_bytes": reduced["bytes_per_step"] / model_bytes,
                       "grads_vs_values_bytes": reduced["grads_bytes"] / values_bytes},
        "scaling": {"t_1proc_s": t1, "t_nproc_s": tn, "speedup": t1 / tn, "efficiency": t1 / tn / nproc,
                    "definition": "speedup = t_1proc / t_Nproc at the same global batch (t: median step time; "
                                  "t_Nproc: the slowest rank's); efficiency = speedup / N"},
        "correctness": {"max_abs_diff": max(diffs), "max_abs_diff_per_rank": diffs, "max_abs_value": scale,
                        "beyond_tolerance": sum(c["beyond_tolerance"] for rank in checks for c in rank),
                        "tolerance": VALUES_RULE, "relative_tolerance": VALUE_TOLERANCE,
                        "passed": all(c["passed"] for rank in checks for c in rank)},
    }


def format_dist_step_benchmark(report: dict) -> str:
    cfg, env, mask, ar = report["config"], report["environment"], report["mask"], report["all_reduce"]
    sc, ok, n = report["scaling"], report["correctness"], cfg["nproc"]
    mb = 2 ** 20
    lines = [
        (f"{cfg['arch']} random init, {cfg['image_size']} px, global batch {cfg['batch_size']}, "
        f"{cfg['num_classes']} class prompts, device {env['device']}, {env['backend']}; "
        f"1 process x {env['threads_1proc']} threads vs {n} x {env['threads_per_rank']}"),
        (f"mask: {mask['num_selected']} of {mask['eligible']} entries in "
        f"{mask['tensors_with_selection']} of {mask['tensors_eligible']} tensors "
        f"({report['values_bytes']} bytes of fp32 values; model parameters {report['model_parameter_bytes'] / mb:.1f} MB)"),
        f"{'process':<12}{'images':>8}{'step time (s)':>15}{'state (MB)':>12}{'all-reduced/step (B)':>22}",
    ]
    rows = [("1 of 1", report["one_process"])] + [(f"rank {r['rank']} of {n}", r) for r in report["ranks"]]
    for name, r in rows:
        lines.append(f"{name:<12}{r['images']:>8}{r['step_time_s']:>15.3f}{r['state_bytes'] / mb:>12.3f}"
                     f"{r['all_reduce']['bytes_per_step']:>22}")
    lines += [
        (f"all-reduced per step: {ar['bytes_per_step']} bytes in {ar['calls_per_step']} calls = values' gradients "
        f"{ar['grads_bytes']} ({ar['grads_vs_values_bytes']:.3f} x the values' bytes) + text dL/dT "
        f"{ar['text_bytes']}; {ar['vs_model_parameter_bytes']:.2e} x the dense model's parameter bytes"),
        (f"speedup {sc['speedup']:.3f} (t_1proc {sc['t_1proc_s']:.3f} s / t_{n}proc {sc['t_nproc_s']:.3f} s), "
        f"efficiency {sc['efficiency']:.3f} (speedup / {n})"),
        (f"trained values vs 1 process: max|diff| {ok['max_abs_diff']:.3e}, max|value| {ok['max_abs_value']:.3e}, "
        f"{ok['tolerance']}: {'PASS' if ok['passed'] else 'FAIL'}"),
    ]
    return "\n".join(lines)
