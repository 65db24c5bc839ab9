import pytest
import torch
from synthetic import batches

import saft
from saft.sparse.objective import classification_loss


@pytest.fixture
def trained(vit, dataset, vit_prompts):
    scores = saft.importance_scores(vit.model, batches(dataset, 16), vit_prompts, progress=False)
    mask = saft.select_mask(scores, 0.01)
    cfg = saft.FinetuneConfig(steps=4, batch_size=8, lr=1e-2)
    result = saft.finetune(vit.model, dataset, vit_prompts, mask=mask, config=cfg, progress=False,
                           meta={"base_model": "saft-tiny-vit@random"})
    return mask, result


def _state(model):
    return {n: t.clone() for n, t in model.state_dict().items()}


def test_merge_then_unmerge_restores_base_bit_for_bit(vit, trained):
    _, result = trained
    before = _state(vit.model)
    saft.apply_delta(vit.model, result.delta, alpha=0.37)
    assert saft.fingerprint_model(vit.model) != vit.fingerprint
    saft.remove_delta(vit.model, result.delta)
    after = _state(vit.model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    with pytest.raises(RuntimeError, match="no delta is merged"):
        saft.remove_delta(vit.model)


def test_dense_delta_round_trip(vit, dataset, vit_prompts):
    cfg = saft.FinetuneConfig(method="full", steps=2, batch_size=8, lr=1e-3)
    delta = saft.finetune(vit.model, dataset, vit_prompts, config=cfg, progress=False).delta
    before = _state(vit.model)
    saft.apply_delta(vit.model, delta, alpha=0.5)
    saft.remove_delta(vit.model)
    assert all(torch.equal(before[n], t) for n, t in vit.model.state_dict().items())


def test_alpha_scales_the_change(vit, trained):
    _, result = trained
    delta = result.delta
    name = next(iter(delta.values))
    idx, values = delta.indices[name], delta.values[name]
    base = dict(vit.model.named_parameters())[name].detach().reshape(-1)[idx].clone()
    for alpha in (0.0, 0.5, 1.0):
        saft.apply_delta(vit.model, delta, alpha=alpha)
        now = dict(vit.model.named_parameters())[name].detach().reshape(-1)[idx]
        torch.testing.assert_close(now, base + alpha * values)
        saft.remove_delta(vit.model)
    saft.apply_delta(vit.model, delta, alpha=0.0)
    assert saft.fingerprint_model(vit.model) == vit.fingerprint


def test_saved_delta_reloads_into_fresh_base_with_same_outputs(tmp_path, vit, dataset, vit_prompts, trained):
    mask, result = trained
    images, labels = dataset.tensors
    update = saft.SparseUpdate(mask)
    with torch.no_grad():
        for name, _, v in update.items():
            v.copy_(result.delta.values[name])
    with torch.no_grad(), update.attached(vit.model):
        _, trained_logits = classification_loss(vit.model, images, labels, vit_prompts)
    trained_weights = update.effective_state(vit.model)

    path = saft.save_delta(result.delta, tmp_path / "delta.safetensors")
    fresh = saft.load_model("saft-tiny-vit", seed=0)  # same base, loaded anew
    delta = saft.load_delta(path)
    assert delta.meta["method"] == "saft" and delta.meta["base_model"] == "saft-tiny-vit@random"
    assert delta.num_values == mask.num_selected
    saft.apply_delta(fresh.model, delta)
    named = dict(fresh.model.named_parameters())
    for name, w in trained_weights.items():
        assert torch.equal(named[name], w), name  # merged weights are exactly the trained ones
    with torch.no_grad():
        _, logits = classification_loss(fresh.model, images, labels, vit_prompts)
    torch.testing.assert_close(logits, trained_logits, rtol=1e-5, atol=1e-5)


def test_delta_for_another_base_is_refused(trained):
    _, result = trained
    other = saft.load_model("saft-tiny-vit", seed=1)
    with pytest.raises(saft.FingerprintMismatch, match="saft-tiny-vit@random"):
        saft.apply_delta(other.model, result.delta)
    assert saft.fingerprint_model(other.model) == other.fingerprint


def test_delta_file_is_small_and_validated(tmp_path, trained):
    _, result = trained
    path = saft.save_delta(result.delta, tmp_path / "d.safetensors")
    assert path.stat().st_size < 12 * result.delta.num_values + 16_384
    with pytest.raises(ValueError, match="not a SAFT delta"):
        saft.load_delta(_other_file(tmp_path))
    with pytest.raises(FileNotFoundError):
        saft.load_delta(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 not a tensor file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        saft.load_delta(garbage)


def _other_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    return path
