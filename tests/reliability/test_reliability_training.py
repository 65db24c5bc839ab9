"""Training and evaluation faults: a NaN/inf loss stops the run and keeps the last good
checkpoint; an out-of-memory batch is reported with its size and how to lower it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from synthetic import CLASS_NAMES, make_dataset
from torch.utils.data import Dataset

import saft
from saft.eval.runner import evaluate_head
from saft.sparse.checkpoint import CHECKPOINT_NAME
from saft.sparse.trainer import BatchOutOfMemoryError, TrainingDivergedError

torch.set_num_threads(1)


class PoisonableImages(Dataset):
    """The synthetic set; once ``poisoned`` is set, every image it returns is all NaN."""

    def __init__(self) -> None:
        self.inner = make_dataset(16)
        self.poisoned = False

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i):
        image, label = self.inner[i]
        return (torch.full_like(image, math.nan) if self.poisoned else image), label


def _mask(vit):
    shapes = {n: tuple(p.shape) for n, p in saft.Eligibility().select(vit.model).items()}
    return saft.random_mask(shapes, 0.01, seed=3, meta={"base_fingerprint": vit.fingerprint})


def _cfg(**kw):
    return saft.FinetuneConfig(**{"steps": 5, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 1, "seed": 0, **kw})


def test_nan_loss_stops_keeps_the_last_good_checkpoint_and_resumes(vit, tmp_path: Path) -> None:
    prompts = saft.ClassPrompts.build(vit.tokenizer, CLASS_NAMES)
    mask = _mask(vit)
    data = PoisonableImages()
    ckpt = tmp_path / "ckpt"
    saved: dict[int, bytes] = {}

    def poison_after_step_2(record):
        saved[record["step"]] = (ckpt / CHECKPOINT_NAME).read_bytes()
        if record["step"] == 2:
            data.poisoned = True

    with pytest.raises(TrainingDivergedError) as caught:
        saft.finetune(vit.model, data, prompts, mask=mask, config=_cfg(), checkpoint_dir=ckpt, callback=poison_after_step_2,
                      progress=False)
    err = caught.value
    assert err.step == 3 and math.isnan(err.value) and err.checkpoint_step == 2
    text = str(err)
    assert "step 3" in text and "loss is nan" in text and "checkpoint (step 2)" in text
    assert "lower learning rate" in text and "--precision fp32" in text
    assert (ckpt / CHECKPOINT_NAME).read_bytes() == saved[2]  # never overwritten with a NaN state
    assert saft.fingerprint_model(vit.model) == vit.fingerprint  # the base is left in place

    # Fixing the data and resuming from the kept checkpoint ends where a clean run ends.
    data.poisoned = False
    resumed = saft.finetune(vit.model, data, prompts, mask=mask, config=_cfg(), checkpoint_dir=ckpt, resume=True,
                            progress=False)
    clean = saft.finetune(vit.model, data, prompts, mask=mask, config=_cfg(), checkpoint_dir=tmp_path / "clean",
                          progress=False)
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4, 5]
    for name in clean.delta.values:
        assert torch.equal(resumed.delta.values[name], clean.delta.values[name]), name


def test_exploding_learning_rate_is_caught_before_a_bad_checkpoint(vit, tmp_path: Path) -> None:
    prompts = saft.ClassPrompts.build(vit.tokenizer, CLASS_NAMES)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(TrainingDivergedError, match=r"training diverged at step \d+: .* \(not finite\)") as caught:
        saft.finetune(vit.model, make_dataset(16), prompts, mask=_mask(vit), config=_cfg(lr=1e30, steps=8),
                      checkpoint_dir=ckpt, progress=False)
    err = caught.value
    assert err.step < 8
    assert "now 1e+30" in str(err)
    if err.checkpoint_step is not None:  # whatever was saved holds finite numbers only
        state = torch.load(ckpt / CHECKPOINT_NAME, weights_only=True)
        assert state["step"] == err.checkpoint_step
        assert all(bool(torch.isfinite(p).all()) for p in state["params"])


# --- out of memory -------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 85899345920 bytes"),
])
def test_out_of_memory_in_training_names_the_batch_size(vit, monkeypatch, error) -> None:
    prompts = saft.ClassPrompts.build(vit.tokenizer, CLASS_NAMES)

    def boom(*args, **kwargs):
        raise error

    monkeypatch.setattr(vit.model, "encode_image", boom)
    with pytest.raises(BatchOutOfMemoryError) as caught:
        saft.finetune(vit.model, make_dataset(16), prompts, mask=_mask(vit),
                      config=_cfg(batch_size=8, grad_accum=2, checkpoint_every=0), progress=False)
    text = str(caught.value)
    assert "training step 1" in text and "batch size 8 (grad_accum 2)" in text
    assert "--batch-size 4" in text and "finetune.batch_size in params.yaml" in text and "--grad-accum 4" in text
    assert caught.value.__cause__ is error
    assert saft.fingerprint_model(vit.model) == vit.fingerprint


def test_other_runtime_errors_are_not_reported_as_memory(vit, monkeypatch) -> None:
    prompts = saft.ClassPrompts.build(vit.tokenizer, CLASS_NAMES)

    def boom(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(vit.model, "encode_image", boom)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as caught:
        saft.finetune(vit.model, make_dataset(16), prompts, mask=_mask(vit), config=_cfg(checkpoint_every=0),
                      progress=False)
    assert not isinstance(caught.value, BatchOutOfMemoryError)


def test_out_of_memory_in_evaluation_names_the_batch_size(vit, monkeypatch) -> None:
    head = torch.nn.functional.normalize(torch.randn(len(CLASS_NAMES), vit.model.text_projection.shape[1]), dim=-1)

    def boom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(vit.model, "encode_image", boom)
    with pytest.raises(BatchOutOfMemoryError) as caught:
        evaluate_head(vit.model, head, make_dataset(16), batch_size=16, desc="zeroshot photo")
    text = str(caught.value)
    assert "zeroshot photo" in text and "batch size 16" in text
    assert "--batch-size 8" in text and "evaluate.batch_size in params.yaml" in text
