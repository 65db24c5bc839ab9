import pytest
import torch
from synthetic import batches

import saft
from saft.sparse.trainer import StreamBatches, cosine_with_warmup


def _mask(loaded, dataset, prompts, density=0.01):
    scores = saft.importance_scores(loaded.model, batches(dataset, 16), prompts, progress=False)
    return saft.select_mask(scores, density)


def _cfg(**kw):
    base = dict(steps=6, batch_size=8, lr=5e-3, warmup_steps=1, seed=0)
    base.update(kw)
    return saft.FinetuneConfig(**base)


def test_saft_changes_only_masked_entries(loaded, dataset, prompts):
    mask = _mask(loaded, dataset, prompts)
    base = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    result = saft.finetune(loaded.model, dataset, prompts, mask=mask, config=_cfg(), progress=False)
    assert saft.fingerprint_model(loaded.model) == loaded.fingerprint  # base left in place
    assert result.history[-1]["loss"] < result.history[0]["loss"]

    saft.apply_delta(loaded.model, result.delta)
    changed_entries = 0
    for name, p in loaded.model.named_parameters():
        inside = mask.to_dense(name) if name in mask.shapes else torch.zeros_like(p, dtype=torch.bool)
        assert torch.equal(p[~inside], base[name][~inside]), f"{name} changed outside the mask"
        changed_entries += int((p[inside] != base[name][inside]).sum())
    assert changed_entries > 0.9 * mask.num_selected


def test_loss_decreases_and_history_is_recorded(vit, dataset, vit_prompts):
    mask = _mask(vit, dataset, vit_prompts)
    seen = []
    result = saft.finetune(vit.model, dataset, vit_prompts, mask=mask, config=_cfg(steps=8), progress=False,
                           callback=seen.append)
    assert [h["step"] for h in result.history] == list(range(1, 9)) == [h["step"] for h in seen]
    for key in ("loss", "lr", "grad_norm", "images_per_s", "train_acc"):
        assert key in result.history[0]
    lrs = [h["lr"] for h in result.history]
    assert lrs[0] == pytest.approx(5e-3) and lrs[-1] < lrs[1]  # warmup then cosine decay
    assert result.delta.meta["method"] == "saft"
    assert result.delta.base_fingerprint == vit.fingerprint


def test_full_finetuning_restores_base_and_returns_dense_delta(vit, dataset, vit_prompts):
    result = saft.finetune(vit.model, dataset, vit_prompts, config=_cfg(method="full", lr=1e-3), progress=False)
    assert saft.fingerprint_model(vit.model) == vit.fingerprint
    assert not result.delta.indices and result.delta.values
    assert "logit_scale" not in result.delta.values


def test_random_method_needs_a_mask(vit, dataset, vit_prompts):
    with pytest.raises(ValueError, match="trains a mask"):
        saft.finetune(vit.model, dataset, vit_prompts, config=_cfg(method="random"), progress=False)
    shapes = {n: tuple(p.shape) for n, p in saft.Eligibility().select(vit.model).items()}
    rmask = saft.random_mask(shapes, 0.01, seed=0)
    result = saft.finetune(vit.model, dataset, vit_prompts, mask=rmask, config=_cfg(method="random"),
                           progress=False)
    assert result.delta.num_values == rmask.num_selected


def test_seeded_runs_are_identical(vit, dataset, vit_prompts):
    mask = _mask(vit, dataset, vit_prompts)
    a = saft.finetune(vit.model, dataset, vit_prompts, mask=mask, config=_cfg(), progress=False)
    b = saft.finetune(vit.model, dataset, vit_prompts, mask=mask, config=_cfg(), progress=False)
    for n in a.delta.values:
        assert torch.equal(a.delta.values[n], b.delta.values[n])


class _Killed(Exception):
    pass


@pytest.mark.parametrize("method", ["saft", "full"])
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, vit, dataset, vit_prompts, method):
    mask = _mask(vit, dataset, vit_prompts) if method == "saft" else None
    cfg = _cfg(method=method, steps=7, checkpoint_every=2, lr=1e-3)
    straight = saft.finetune(vit.model, dataset, vit_prompts, mask=mask, config=cfg, progress=False)

    def kill_at_5(record):
        if record["step"] == 5:
            raise _Killed()

    with pytest.raises(_Killed):
        saft.finetune(vit.model, dataset, vit_prompts, mask=mask, config=cfg, checkpoint_dir=tmp_path,
                      progress=False, callback=kill_at_5)
    assert saft.fingerprint_model(vit.model) == vit.fingerprint  # a crash leaves the base intact
    resumed = saft.finetune(vit.model, dataset, vit_prompts, mask=mask, config=cfg, checkpoint_dir=tmp_path,
                            resume=True, progress=False)
    assert resumed.history[0]["step"] == 1 and len(resumed.history) == 7  # restored history from step 4
    assert set(resumed.delta.values) == set(straight.delta.values)
    for n in straight.delta.values:
        assert torch.equal(resumed.delta.values[n], straight.delta.values[n]), n


def test_resume_refuses_other_settings(tmp_path, vit, dataset, vit_prompts):
    mask = _mask(vit, dataset, vit_prompts)
    cfg = _cfg(steps=3, checkpoint_every=1)
    saft.finetune(vit.model, dataset, vit_prompts, mask=mask, config=cfg, checkpoint_dir=tmp_path, progress=False)
    assert (tmp_path / "checkpoint.pt").is_file()
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.005 -> 1.0\)"):
        saft.finetune(vit.model, dataset, vit_prompts, mask=mask, config=_cfg(steps=3, lr=1.0, checkpoint_every=1),
                      checkpoint_dir=tmp_path, resume=True, progress=False)


def test_gradient_accumulation_matches_large_batch(vit, dataset, vit_prompts):
    mask = _mask(vit, dataset, vit_prompts)
    big = saft.finetune(vit.model, dataset, vit_prompts, mask=mask, progress=False,
                        config=_cfg(steps=3, batch_size=16, grad_accum=1, max_grad_norm=None))
    acc = saft.finetune(vit.model, dataset, vit_prompts, mask=mask, progress=False,
                        config=_cfg(steps=3, batch_size=8, grad_accum=2, max_grad_norm=None))
    for n in big.delta.values:
        torch.testing.assert_close(acc.delta.values[n], big.delta.values[n], rtol=1e-3, atol=1e-6)


def test_batch_stream_is_deterministic_and_covers_epochs():
    a = list(StreamBatches(10, 4, seed=1, start=0, stop=5))
    b = list(StreamBatches(10, 4, seed=1, start=2, stop=5))
    assert a[2:] == b
    assert sorted(sum(a, [])[:10]) == list(range(10))  # first epoch is a permutation
    assert list(StreamBatches(10, 4, seed=2, start=0, stop=5)) != a


def test_schedule_shape():
    assert cosine_with_warmup(0, 10, 2) == pytest.approx(0.5)
    assert cosine_with_warmup(2, 10, 2) == pytest.approx(1.0)
    assert cosine_with_warmup(10, 10, 2) == pytest.approx(0.0)


def test_config_validation():
    with pytest.raises(ValueError, match="method"):
        saft.FinetuneConfig(method="lorra")
    with pytest.raises(ValueError, match="steps"):
        saft.FinetuneConfig(steps=0)
    with pytest.raises(ValueError, match="precision"):
        saft.FinetuneConfig(precision="fp8")
    assert saft.FinetuneConfig(method="full").learning_rate < saft.FinetuneConfig().learning_rate


def _count_prompts(model):
    """Wrap encode_text to record how many prompts each text-tower call encodes."""
    sizes = []
    original = model.encode_text

    def counting(tokens, *args, **kwargs):
        sizes.append(tokens.shape[0])
        return original(tokens, *args, **kwargs)

    model.encode_text = counting
    return sizes


@pytest.mark.parametrize("method", ["saft", "full"])
def test_text_side_at_1000_classes_is_chunked(vit, method):
    """1000 classes with a trained text tower: no text call sees more than text_batch prompts, the text
    tower runs once (plus its chunked re-encoding) per step rather than per micro-batch, and for saft the
    delta equals the one-graph step's."""
    from synthetic import make_dataset, many_class_names

    prompts = saft.ClassPrompts.build(vit.tokenizer, many_class_names(1000), ["a photo of a {}."])
    data = make_dataset(n=32, num_classes=1000, seed=1)
    mask = _mask(vit, data, prompts, density=0.002) if method == "saft" else None
    assert method == "full" or any(saft.sparse.objective.is_text_side(n) for n in mask.indices)
    deltas = {}
    for text_batch in ((4096, 128) if method == "saft" else (128,)):
        sizes = _count_prompts(vit.model)
        cfg = _cfg(method=method, steps=2, grad_accum=2, lr=1e-3, text_batch=text_batch)
        deltas[text_batch] = saft.finetune(vit.model, data, prompts, mask=mask, config=cfg, progress=False).delta
        del vit.model.encode_text
        assert max(sizes) <= text_batch
        chunks = -(-1000 // text_batch)
        assert len(sizes) == 2 * (chunks if text_batch >= 1000 else 2 * chunks)
    if method == "saft":  # Adam's first steps are ~lr * sign(g): compare sparse values, whose |g| is largest
        a, b = deltas[4096], deltas[128]
        for name in a.values:
            scale = float(a.values[name].abs().max()) or 1.0
            torch.testing.assert_close(b.values[name], a.values[name], rtol=0, atol=1e-4 * scale, msg=name)
        assert a.meta["prompt_templates"] == '["a photo of a {}."]'


def test_chunked_text_backward_gives_the_one_graph_gradients(vit):
    """Full fine-tuning's gradients over both towers, one graph vs chunks of 100 prompts and micro-batches."""
    from synthetic import make_dataset, many_class_names

    from saft.sparse.objective import class_embeddings, clip_logits
    from saft.sparse.text_side import StepTextSide

    model = vit.model
    prompts = saft.ClassPrompts.build(vit.tokenizer, many_class_names(300), ["a photo of a {}.", "a {}."])
    images, labels = make_dataset(n=8, num_classes=300, seed=2).tensors
    for p in model.parameters():
        p.requires_grad_(True)
    reference = torch.nn.functional.cross_entropy(
        clip_logits(model, images, class_embeddings(model, prompts)), labels)
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    side = StepTextSide(model, prompts, trains=True, text_batch=100)
    text = side.begin()
    for part in (slice(0, 3), slice(3, 8)):  # two micro-batches, summed as the trainer's grad_accum does
        loss = torch.nn.functional.cross_entropy(clip_logits(model, images[part], text), labels[part])
        (loss * (part.stop - part.start) / 8).backward()
    side.finish()
    for name, grad in expected.items():
        got = dict(model.named_parameters())[name].grad
        scale = float(grad.abs().max()) or 1.0
        torch.testing.assert_close(got, grad, rtol=0, atol=1e-4 * scale, msg=name)
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
