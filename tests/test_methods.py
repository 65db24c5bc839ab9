"""The methods users compare SAFT with, as library code: LoRA (PEFT) and LP-FT train on the tiny model, their
deltas are exact (the LoRA export against the PEFT-adapted model and PEFT's own merge; LP-FT's head offsets), and
every method leaves the base model as it was given."""

from __future__ import annotations

import copy

import pytest
import torch
from synthetic import CLASS_NAMES

import saft
from saft.sparse.delta import DELTA_FORMAT, DELTA_FORMAT_V2, Delta, LowRank
from saft.sparse.lora import lora_adapters, lora_delta, unload_adapters
from saft.sparse.lpft import linear_probe


def _cfg(**kw):
    base = dict(steps=6, batch_size=8, lr=5e-3, warmup_steps=1, seed=0)
    base.update(kw)
    return saft.FinetuneConfig(**base)


def _state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _outputs(model, images, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


@pytest.fixture
def tokens(vit):
    return vit.tokenizer([f"a photo of a {c}." for c in CLASS_NAMES])


@pytest.mark.parametrize("method", ["lora", "lpft"])
def test_each_new_method_trains_and_leaves_the_base_as_given(vit, dataset, vit_prompts, method):
    names = [n for n, _ in vit.model.named_parameters()]
    flags = {n: p.requires_grad for n, p in vit.model.named_parameters()}
    before = _state(vit.model)
    result = saft.finetune(vit.model, dataset, vit_prompts, config=_cfg(method=method, lr=1e-3), progress=False)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    # the very same parameters, in the same order, bit for bit, with their flags; nothing of PEFT left behind
    assert [n for n, _ in vit.model.named_parameters()] == names
    assert all(torch.equal(p, before[n]) for n, p in vit.model.named_parameters())
    assert {n: p.requires_grad for n, p in vit.model.named_parameters()} == flags
    assert "peft_config" not in vars(vit.model) and saft.fingerprint_model(vit.model) == vit.fingerprint
    delta = result.delta
    assert delta.meta["method"] == method and delta.num_values > 0
    if method == "lora":
        assert not delta.values and delta.factors and delta.head is None
    else:
        assert delta.values and not delta.indices and not delta.factors
        assert delta.head_classes == CLASS_NAMES and delta.head.shape == (len(CLASS_NAMES), vit_prompts_dim(vit))


def vit_prompts_dim(vit) -> int:
    return int(vit.model.text_projection.shape[1])


def test_lora_adapts_attention_and_mlp_projections_of_both_towers(vit, dataset, vit_prompts):
    cfg = _cfg(method="lora", lora_rank=4, lora_alpha=8.0)
    delta = saft.finetune(vit.model, dataset, vit_prompts, config=cfg, progress=False).delta
    blocks = {n.rsplit(".", 1)[0].rsplit(".attn", 1)[0].rsplit(".mlp", 1)[0] for n in delta.factors}
    assert any(b.startswith("visual.") for b in blocks) and any(not b.startswith("visual.") for b in blocks)
    for block in blocks:
        assert {f"{block}.attn.in_proj_weight", f"{block}.attn.out_proj.weight", f"{block}.mlp.c_fc.weight",
                f"{block}.mlp.c_proj.weight"} <= set(delta.factors)
    params = dict(vit.model.named_parameters())
    for name, f in delta.factors.items():
        assert f.rank == 4 and f.scale == 2.0 and f.shape == tuple(params[name].shape)
    assert delta.num_values == sum(f.a.numel() + f.b.numel() for f in delta.factors.values())
    assert delta.num_values < sum(params[n].numel() for n in delta.factors) / 4  # low-rank: far fewer values
    only_mlp = saft.finetune(vit.model, dataset, vit_prompts, config=_cfg(method="lora", lora_targets=("mlp.c_fc",)),
                             progress=False).delta
    assert only_mlp.factors and all(n.endswith("mlp.c_fc.weight") for n in only_mlp.factors)


def test_lora_targets_that_match_nothing_are_refused_and_the_model_is_untouched(vit, dataset, vit_prompts):
    with pytest.raises(ValueError, match="match no module"):
        saft.finetune(vit.model, dataset, vit_prompts, config=_cfg(method="lora", lora_targets=("qkv",)),
                      progress=False)
    assert saft.fingerprint_model(vit.model) == vit.fingerprint and "peft_config" not in vars(vit.model)


def _trained_adapters(model):
    """Adapters with nonzero B (a fresh LoRA is the identity): a few random steps' worth."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def test_lora_export_equals_the_adapted_models_outputs_and_peft_merge(vit, tokens):
    """The delta applied to the base gives the PEFT-adapted model's outputs, and the weights PEFT's merge gives (its
    Linear merge for the MLP and output projections, its in_proj update for the fused q/k/v)."""
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    base_out = _outputs(vit.model, images, tokens)
    cfg = _cfg(method="lora", lora_rank=4, lora_alpha=8.0)
    with lora_adapters(vit.model, cfg, seed=3):
        _trained_adapters(vit.model)
        adapted = _outputs(vit.model, images, tokens)
        delta = lora_delta(vit.model, vit.fingerprint)
        merged_copy = copy.deepcopy(vit.model)
    assert not torch.allclose(adapted[0], base_out[0])  # the adapters change what the model computes
    unload_adapters(merged_copy, merge=True)
    peft_merged = dict(merged_copy.named_parameters())

    saft.apply_delta(vit.model, delta)
    ours = _outputs(vit.model, images, tokens)
    for a, b in zip(ours, adapted):  # base(x) + B(A(x)) * s in PEFT's Linear vs (W + s B A) x: fp32 rounding apart
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for name, p in vit.model.named_parameters():
        assert torch.equal(p, peft_merged[name]), name  # bit for bit the weights PEFT merges
    saft.remove_delta(vit.model, delta)
    assert saft.fingerprint_model(vit.model) == vit.fingerprint
    assert all(torch.equal(a, b) for a, b in zip(_outputs(vit.model, images, tokens), base_out))


def test_lora_attention_computes_each_update_once_and_never_writes_the_base():
    """The fused q/k/v and the output projection: a plain nn.MultiheadAttention with W + dW is the reference (PEFT
    0.21.2's own layer adds the output projection's update twice, and writes W + dW - dW around every call)."""
    torch.manual_seed(0)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    block, x = Block(), torch.randn(2, 5, 16)
    w_in, w_out = block.attn.in_proj_weight.detach().clone(), block.attn.out_proj.weight.detach().clone()
    with lora_adapters(block, _cfg(method="lora", lora_rank=2, lora_alpha=4.0, lora_targets=("attn",))):
        _trained_adapters(block)
        for _ in range(3):
            out = block(x)
            out.sum().backward()
        delta = lora_delta(block, "fp")
        assert torch.equal(block.attn.base_layer.in_proj_weight, w_in)  # never written, not even by rounding
        assert torch.equal(block.attn.base_layer.out_proj.base_layer.weight, w_out)
        assert all(p.grad is not None for n, p in block.named_parameters() if "lora_" in n)
    reference = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    reference.load_state_dict(block.attn.state_dict())
    with torch.no_grad():
        reference.in_proj_weight.add_(delta.factors["attn.in_proj_weight"].product())
        reference.out_proj.weight.add_(delta.factors["attn.out_proj.weight"].product())
        torch.testing.assert_close(out, reference(x, x, x, need_weights=False)[0], rtol=0, atol=1e-6)


def test_lora_delta_round_trips_through_a_v2_file_and_scales_with_alpha(vit, tmp_path, tokens):
    cfg = _cfg(method="lora", lora_rank=2)
    with lora_adapters(vit.model, cfg):
        _trained_adapters(vit.model)
        delta = lora_delta(vit.model, vit.fingerprint, {"method": "lora"})
    path = delta.save(tmp_path / "lora.safetensors")
    back = Delta.load(path)
    assert back.meta["method"] == "lora" and set(back.factors) == set(delta.factors)
    for name, f in delta.factors.items():
        assert torch.equal(back.factors[name].a, f.a) and torch.equal(back.factors[name].b, f.b)
        assert back.factors[name].scale == f.scale
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata()["format"] == DELTA_FORMAT_V2  # a reader that knows only v1 refuses it
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    base = _outputs(vit.model, images, tokens)[0]
    saft.apply_delta(vit.model, back, 0.0)
    assert torch.equal(_outputs(vit.model, images, tokens)[0], base)
    saft.remove_delta(vit.model, back)
    base_weights = _state(vit.model)
    saft.apply_delta(vit.model, back, 0.5)
    half = dict(vit.model.named_parameters())
    for name, f in back.factors.items():
        torch.testing.assert_close(half[name], base_weights[name] + 0.5 * f.product(), rtol=0, atol=1e-6)
    saft.remove_delta(vit.model, back)
    assert saft.fingerprint_model(vit.model) == vit.fingerprint


def test_lora_runs_are_seeded(vit, dataset, vit_prompts):
    a = saft.finetune(vit.model, dataset, vit_prompts, config=_cfg(method="lora"), progress=False).delta
    b = saft.finetune(vit.model, dataset, vit_prompts, config=_cfg(method="lora"), progress=False).delta
    c = saft.finetune(vit.model, dataset, vit_prompts, config=_cfg(method="lora", seed=1), progress=False).delta
    assert all(torch.equal(a.factors[n].a, b.factors[n].a) and torch.equal(a.factors[n].b, b.factors[n].b)
               for n in a.factors)
    assert not all(torch.equal(a.factors[n].a, c.factors[n].a) for n in a.factors)  # A is drawn from the seed


def test_lpft_probe_leaves_the_encoders_unchanged(vit, dataset, vit_prompts):
    before = _state(vit.model)
    cfg = _cfg(method="lpft", probe_steps=50, probe_lr=1e-2)
    offsets, summary = linear_probe(vit.model, dataset, vit_prompts, cfg, device=torch.device("cpu"))
    assert all(torch.equal(p, before[n]) for n, p in vit.model.named_parameters())
    assert all(p.grad is None for p in vit.model.parameters())
    assert offsets.shape == (len(CLASS_NAMES), vit_prompts_dim(vit)) and offsets.abs().sum() > 0
    assert summary["probe_loss_end"] < summary["probe_loss_start"]


def test_lpft_starts_its_fine_tuning_from_the_probe(vit, dataset, vit_prompts):
    """With a rate of ~0 in the second stage, LP-FT's delta is the probe's head alone."""
    cfg = _cfg(method="lpft", lr=1e-12, probe_steps=30, probe_lr=1e-2, weight_decay=0.0)
    delta = saft.finetune(vit.model, dataset, vit_prompts, config=cfg, progress=False).delta
    offsets, _ = linear_probe(vit.model, dataset, vit_prompts, cfg, device=torch.device("cpu"))
    torch.testing.assert_close(delta.head, offsets, rtol=1e-4, atol=1e-6)
    assert float(delta.meta["probe_loss_end"]) < float(delta.meta["probe_loss_start"])


def test_head_offsets_follow_class_names_and_alpha():
    head = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    delta = Delta({}, {}, "fp", head=head, head_classes=("a", "b", "c"))
    rows = delta.head_offsets(["c", "new", "a"], alpha=0.5)
    assert torch.equal(rows, torch.tensor([[2.0, 2.5], [0.0, 0.0], [0.0, 0.5]]))
    assert Delta({}, {}, "fp").head_offsets(["a"]) is None
    with pytest.raises(ValueError, match="rows but name"):
        Delta({}, {}, "fp", head=head, head_classes=("a",))


def test_lpft_delta_round_trips_and_a_sparse_delta_keeps_format_1(tmp_path):
    head = torch.randn(3, 4)
    delta = Delta({"w": torch.randn(2, 2)}, {}, "fp", {"method": "lpft"}, head=head, head_classes=("x", "y", "z"))
    back = Delta.load(delta.save(tmp_path / "lpft.safetensors"))
    assert torch.equal(back.head, head) and back.head_classes == ("x", "y", "z") and torch.equal(back.values["w"],
                                                                                                  delta.values["w"])
    assert back.num_values == 4 + 12
    sparse = Delta({"w": torch.ones(2)}, {"w": torch.tensor([0, 3])}, "fp")
    from safetensors import safe_open

    with safe_open(str(sparse.save(tmp_path / "s.safetensors")), framework="pt") as fh:
        assert fh.metadata()["format"] == DELTA_FORMAT


def test_low_rank_entry_shape_is_checked_on_apply(vit):
    name = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    shape = dict(vit.model.named_parameters())[name].shape
    bad = Delta({}, {}, vit.fingerprint, factors={name: LowRank(torch.zeros(2, shape[1] + 1), torch.zeros(shape[0], 2),
                                                                  1.0)})
    with pytest.raises(ValueError, match="low-rank delta"):
        saft.apply_delta(vit.model, bad)


@pytest.mark.parametrize("method", ["lora", "lpft"])
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, vit, dataset, vit_prompts, method):
    cfg = _cfg(method=method, steps=5, checkpoint_every=2, lr=1e-3)
    straight = saft.finetune(vit.model, dataset, vit_prompts, config=cfg, progress=False).delta

    class Killed(Exception):
        pass

    def kill_at_4(record):
        if record["step"] == 4:
            raise Killed()

    with pytest.raises(Killed):
        saft.finetune(vit.model, dataset, vit_prompts, config=cfg, checkpoint_dir=tmp_path, progress=False,
                      callback=kill_at_4)
    assert saft.fingerprint_model(vit.model) == vit.fingerprint
    resumed = saft.finetune(vit.model, dataset, vit_prompts, config=cfg, checkpoint_dir=tmp_path, resume=True,
                            progress=False).delta
    for name in straight.values:
        assert torch.equal(resumed.values[name], straight.values[name]), name
    for name, f in straight.factors.items():
        assert torch.equal(resumed.factors[name].b, f.b) and torch.equal(resumed.factors[name].a, f.a), name
    if straight.head is not None:
        assert torch.equal(resumed.head, straight.head)


def test_a_mask_is_refused_by_methods_that_train_none(vit, dataset, vit_prompts):
    shapes = {n: tuple(p.shape) for n, p in saft.Eligibility().select(vit.model).items()}
    mask = saft.random_mask(shapes, 0.01, seed=0)
    with pytest.raises(ValueError, match="trains no mask"):
        saft.finetune(vit.model, dataset, vit_prompts, mask=mask, config=_cfg(method="lora"), progress=False)
    assert saft.fingerprint_model(vit.model) == vit.fingerprint
