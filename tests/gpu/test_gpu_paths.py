"""The CUDA code paths: autocast kernels, bf16/fp16 training, resume, NCCL (scripts/gpu-check.sh runs these).

Skipped on machines without CUDA, with the reason; `pytest -m gpu tests/gpu` on a GPU node.
"""

import os
import subprocess
import sys

import pytest
import torch

import saft
from saft.sparse.kernels import sparse_linear

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible)")]


def _cfg(**kw):
    base = dict(steps=6, batch_size=8, lr=1e-3, warmup_steps=1, seed=0)
    base.update(kw)
    return saft.FinetuneConfig(**base)


@pytest.mark.parametrize("strategy", ["auto", "gather", "product", "dense"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_linear_value_gradients_equal_masked_dense_gradients_under_cuda_autocast(dtype, strategy):
    from saft.sparse.value_grad import forced_strategy

    torch.manual_seed(0)
    x = torch.randn(6, 5, 64, device="cuda")
    weight, bias = torch.randn(48, 64, device="cuda"), torch.randn(48, device="cuda")
    idx = torch.tensor([0, 7, 65, 300, 3071], dtype=torch.long, device="cuda")
    values = torch.nn.Parameter(torch.randn(5, device="cuda") * 0.1)
    with forced_strategy(strategy), torch.autocast("cuda", dtype=dtype):
        y = sparse_linear(x, weight, bias, values, idx)
        assert y.dtype == dtype
        y.float().sum().backward()
    dense = weight.clone().reshape(-1)
    dense[idx] += values.detach()
    dense = dense.view_as(weight).requires_grad_(True)
    with torch.autocast("cuda", dtype=dtype):
        ref = torch.nn.functional.linear(x, dense, bias)
    ref.float().sum().backward()
    torch.testing.assert_close(y.float(), ref.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(values.grad, dense.grad.reshape(-1)[idx], rtol=2e-2, atol=2e-2)


def _mask(loaded, dataset, prompts):
    from synthetic import batches

    scores = saft.importance_scores(loaded.model, batches(dataset, 16), prompts, progress=False)
    return saft.select_mask(scores, 0.01)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_saft_trains_on_cuda_in_half_precision(vit, dataset, vit_prompts, precision):
    """bf16 autocast, and fp16 with its GradScaler: finite losses, a changed model, the base left intact."""
    mask = _mask(vit, dataset, vit_prompts)
    result = saft.finetune(vit.model, dataset, vit_prompts, mask=mask, config=_cfg(precision=precision),
                           device="cuda", progress=False)
    losses = [r["loss"] for r in result.history]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert any(v.abs().sum() > 0 for v in result.delta.values.values())
    assert saft.fingerprint_model(vit.model.cpu()) == vit.fingerprint


class _Killed(Exception):
    pass


def test_resume_on_cuda_matches_the_uninterrupted_run(tmp_path, vit, dataset, vit_prompts):
    mask = _mask(vit, dataset, vit_prompts)
    cfg = _cfg(steps=7, checkpoint_every=2, precision="bf16")
    straight = saft.finetune(vit.model, dataset, vit_prompts, mask=mask, config=cfg, device="cuda", progress=False)

    def kill_at_5(record):
        if record["step"] == 5:
            raise _Killed()

    with pytest.raises(_Killed):
        saft.finetune(vit.model, dataset, vit_prompts, mask=mask, config=cfg, checkpoint_dir=tmp_path, device="cuda",
                      progress=False, callback=kill_at_5)
    resumed = saft.finetune(vit.model, dataset, vit_prompts, mask=mask, config=cfg, checkpoint_dir=tmp_path,
                            resume=True, device="cuda", progress=False)
    for n in straight.delta.values:
        torch.testing.assert_close(resumed.delta.values[n], straight.delta.values[n], rtol=0, atol=1e-6)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL with 2 processes needs 2 visible GPUs")
def test_nccl_two_processes_score_the_single_process_mask(tmp_path):
    """saft score on cuda under torchrun (NCCL: one GPU per rank) writes the mask bytes of one process."""
    env = {**os.environ, "SAFT_TRACKING": "off", "SAFT_PARENT_RUN_ID": ""}
    saft_cli = [sys.executable, "-m", "saft.cli"]

    def run(cmd):
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    run(saft_cli + ["world", "--out", "W", "--pool-per-class", "10", "--test-per-class", "4"])
    run(saft_cli + ["data", "prepare", "--val-shots", "0", "W/photo/pool", "--shots", "3", "--out", "D"])
    score = ["score", "--model", "tiny", "--data", "D", "--batch-size", "4", "--density", "0.01", "--device", "cuda"]
    run(saft_cli + score + ["--out", "M1"])
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "saft.cli",
         *score, "--out", "M2"])
    assert (tmp_path / "M1" / "mask.safetensors").read_bytes() == (tmp_path / "M2" / "mask.safetensors").read_bytes()


@pytest.mark.parametrize("autocast", [False, True])
def test_cuda_backend_flags_follow_the_precision(autocast, monkeypatch):
    from saft.sparse.backends import configure_backends

    monkeypatch.delenv("SAFT_DETERMINISTIC", raising=False)
    chosen = configure_backends(torch.device("cuda"), autocast=autocast)
    assert chosen == {"deterministic": False, "tf32": autocast, "cudnn_benchmark": False}
    assert torch.backends.cuda.matmul.allow_tf32 is autocast and torch.backends.cudnn.benchmark is False
