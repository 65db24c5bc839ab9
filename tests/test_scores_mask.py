import json
import math

import pytest
import torch
from synthetic import batches

import saft
from saft.sparse.mask import block_of, target_count
from saft.sparse.objective import classification_loss
from saft.sparse.scores import Scores


def _independent_abs_mean_grad(model, data, prompts):
    """|mean gradient| over all examples, with plain autograd, batch by batch."""
    params = {n: p for n, p in model.named_parameters() if n not in ("logit_scale",)}
    for p in params.values():
        p.requires_grad_(True)
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    for images, labels in data:
        loss, _ = classification_loss(model.eval(), images, labels, prompts)
        grads = torch.autograd.grad(loss * len(labels), list(params.values()), allow_unused=True)
        for n, g in zip(params, grads):
            if g is not None:
                total[n] += g
        count += len(labels)
    return {n: (t / count).abs() for n, t in total.items()}


def test_mask_is_exact_top_k_of_abs_mean_gradient(loaded, dataset, prompts):
    data = batches(dataset, 8)
    scores = saft.importance_scores(loaded.model, data, prompts, progress=False)
    reference = _independent_abs_mean_grad(loaded.model, data, prompts)
    assert set(scores.values) == set(reference)
    for n in reference:  # the text side is summed over the pass before its backward: fp32 reordering only
        scale = float(reference[n].abs().max()) or 1.0
        torch.testing.assert_close(scores.values[n], reference[n], rtol=0, atol=1e-4 * scale)

    mask = saft.select_mask(scores, density=0.003)
    eligible = sum(t.numel() for t in reference.values())
    k = target_count(0.003, eligible)
    assert mask.num_selected == k == round(0.003 * eligible)

    flat = torch.cat([reference[n].reshape(-1) for n in sorted(reference)])
    chosen = torch.cat([mask.to_dense(n).reshape(-1) for n in sorted(reference)])
    assert int(chosen.sum()) == k
    assert flat[chosen].min() >= flat[~chosen].max()  # nothing left out scores higher
    expected = set(torch.topk(flat, k).indices.tolist())
    assert set(chosen.nonzero().flatten().tolist()) == expected


def test_scores_do_not_depend_on_batching(vit, dataset, vit_prompts):
    a = saft.importance_scores(vit.model, batches(dataset, 4), vit_prompts, progress=False)
    b = saft.importance_scores(vit.model, batches(dataset, 32), vit_prompts, progress=False)
    for n in a.values:  # summation order differs: compare relative to the tensor's scale
        scale = float(b.values[n].abs().max()) or 1.0
        torch.testing.assert_close(a.values[n], b.values[n], rtol=0, atol=1e-4 * scale)
    assert a.num_examples == b.num_examples == len(dataset)


def test_scoring_leaves_model_untouched(vit, dataset, vit_prompts):
    flags = {n: p.requires_grad for n, p in vit.model.named_parameters()}
    saft.importance_scores(vit.model, batches(dataset, 16), vit_prompts, progress=False)
    assert saft.fingerprint_model(vit.model) == vit.fingerprint
    assert flags == {n: p.requires_grad for n, p in vit.model.named_parameters()}
    assert all(p.grad is None for p in vit.model.parameters())


@pytest.mark.parametrize("rule", ["mean_abs", "mean_sq"])
def test_alternative_rules(vit, dataset, vit_prompts, rule):
    data = batches(dataset, 8)
    s = saft.importance_scores(vit.model, data, vit_prompts, rule=rule, progress=False)
    base = saft.importance_scores(vit.model, data, vit_prompts, rule="abs_mean", progress=False)
    assert s.rule == rule
    for n in s.values:
        assert (s.values[n] >= 0).all()
        if rule == "mean_abs":  # Jensen: mean |g| >= |mean g| (up to fp32 rounding of two summation orders)
            assert (s.values[n] + 1e-4 * float(base.values[n].abs().max()) + 1e-12 >= base.values[n]).all()


def test_default_eligibility_covers_both_towers_but_not_temperature(vit, dataset, vit_prompts):
    s = saft.importance_scores(vit.model, batches(dataset, 16), vit_prompts, progress=False)
    names = set(s.values)
    assert "logit_scale" not in names
    for expected in ("visual.conv1.weight", "token_embedding.weight", "positional_embedding",
                     "transformer.resblocks.0.attn.in_proj_weight", "visual.proj", "text_projection",
                     "ln_final.bias"):
        assert expected in names
    vision_only = saft.Eligibility(include=["visual.*"])
    s2 = saft.importance_scores(vit.model, batches(dataset, 16), vit_prompts, eligibility=vision_only,
                                progress=False)
    assert set(s2.values) and all(n.startswith("visual.") for n in s2.values)
    with pytest.raises(ValueError, match="no parameter matches"):
        saft.Eligibility(include=["nothing.*"]).select(vit.model)


def test_unknown_rule_and_empty_data(vit, vit_prompts):
    with pytest.raises(ValueError, match="unknown score rule"):
        saft.importance_scores(vit.model, [], vit_prompts, rule="magic")
    with pytest.raises(ValueError, match="empty"):
        saft.importance_scores(vit.model, [], vit_prompts, progress=False)


def test_ties_never_push_past_k():
    scores = Scores({"a": torch.ones(10, 10), "b": torch.ones(37)}, "abs_mean", 1)
    mask = saft.select_mask(scores, density=0.1)
    assert mask.num_selected == target_count(0.1, 137) == 14


def test_density_bounds():
    with pytest.raises(ValueError, match="density"):
        target_count(0.0, 100)
    with pytest.raises(ValueError, match="density"):
        target_count(1.5, 100)
    assert target_count(0.001, 400) == 1  # never an empty mask


def _shapes():
    return {"visual.conv1.weight": (8, 3, 4, 4), "visual.transformer.resblocks.0.attn.in_proj_weight": (24, 8),
            "token_embedding.weight": (1000, 8)}


def test_random_mask_global_and_per_tensor():
    shapes = _shapes()
    total = sum(math.prod(s) for s in shapes.values())
    m = saft.random_mask(shapes, density=0.05, seed=1)
    assert m.num_selected == target_count(0.05, total)
    assert m.meta["random_mode"] == "global"
    assert saft.random_mask(shapes, density=0.05, seed=1).counts() == m.counts()
    for n, idx in m.indices.items():
        assert idx.unique().numel() == idx.numel()
        assert int(idx.max()) < math.prod(shapes[n])

    ref = saft.Mask({"visual.conv1.weight": torch.tensor([0, 5, 9]),
                     "token_embedding.weight": torch.arange(40)}, shapes)
    like = saft.random_mask(shapes, seed=2, like=ref)
    assert like.counts() == ref.counts()
    assert not torch.equal(like.indices["token_embedding.weight"], ref.indices["token_embedding.weight"])


def test_mask_save_load_and_stats(tmp_path, vit, dataset, vit_prompts):
    scores = saft.importance_scores(vit.model, batches(dataset, 16), vit_prompts, progress=False)
    assert scores.meta["base_fingerprint"] == vit.fingerprint  # recorded by scoring itself
    mask = saft.select_mask(scores, density=0.002, meta={"manifest_hash": "abc"})
    path = mask.save(tmp_path / "mask.safetensors")
    again = saft.Mask.load(path)
    assert again.counts() == mask.counts()
    assert all(torch.equal(again.indices[n], mask.indices[n]) for n in mask.indices)
    assert again.shapes == mask.shapes
    for key in ("density", "score_rule", "base_fingerprint", "manifest_hash", "library_version"):
        assert key in again.meta
    assert again.meta["base_model"] == "saft-tiny-vit@random"
    stats = again.stats()
    assert stats["num_selected"] == mask.num_selected
    assert sum(b["selected"] for b in stats["per_block"].values()) == mask.num_selected
    assert sum(t["selected"] for t in stats["per_tensor"].values()) == mask.num_selected
    assert not list(tmp_path.glob(".*.tmp"))


def test_mask_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a SAFT mask"):
        saft.Mask.load(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError):
        saft.Mask.load(tmp_path / "missing.safetensors")


def test_block_names():
    assert block_of("visual.transformer.resblocks.3.attn.in_proj_weight") == "visual.transformer.resblocks.3"
    assert block_of("transformer.resblocks.11.mlp.c_fc.bias") == "transformer.resblocks.11"
    assert block_of("visual.layer2.0.conv1.weight") == "visual.layer2.0"
    assert block_of("token_embedding.weight") == "token_embedding"
    assert block_of("positional_embedding") == "positional_embedding"


def _reference_mask(model, data, prompts, density):
    """Today's path before the text side moved: a full backward (both towers) for every batch."""
    reference = _independent_abs_mean_grad(model, data, prompts)
    return saft.select_mask(Scores(reference, "abs_mean", sum(len(y) for _, y in data)), density)


def test_mask_at_1000_classes_equals_a_per_batch_full_backward(vit):
    """The text tower runs once per pass, in chunks of 96 prompts, and the mask is unchanged."""
    from synthetic import make_dataset, many_class_names

    names = many_class_names(1000)
    prompts = saft.ClassPrompts.build(vit.tokenizer, names, ["a photo of a {}."])
    data = batches(make_dataset(n=48, num_classes=1000, seed=3), 16)
    calls = {"n": 0}
    original = vit.model.encode_text

    def counting(tokens, *args, **kwargs):
        calls["n"] += 1
        return original(tokens, *args, **kwargs)

    vit.model.encode_text = counting
    try:
        scores = saft.importance_scores(vit.model, data, prompts, progress=False, text_batch=96)
    finally:
        del vit.model.encode_text
    # one no-grad encoding and one chunked backward: 2 x ceil(1000 / 96) text calls for 3 batches
    assert calls["n"] == 2 * math.ceil(1000 / 96)
    mask = saft.select_mask(scores, density=0.001)
    reference = _reference_mask(vit.model, data, prompts, 0.001)
    assert mask.counts() == reference.counts()
    for name, idx in reference.indices.items():
        assert torch.equal(mask.indices[name], idx), name
    assert json.loads(mask.meta["prompt_templates"]) == ["a photo of a {}."]
