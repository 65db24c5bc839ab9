"""Every value-gradient strategy against the dense weight gradient, in fp32 and under bf16 autocast."""

import copy

import pytest
import torch
from synthetic import batches

import saft
import saft.sparse.value_grad as vg
from saft.sparse.kernels import sparse_linear
from saft.sparse.objective import classification_loss
from saft.sparse.value_grad import EntryLayout, forced_strategy, value_grad

# every strategy, and for the product every way of cutting it
CHOICES = [vg.Choice("gather"), vg.Choice("dense"), vg.Choice("product", True, True),
           vg.Choice("product", True, False), vg.Choice("product", False, True)]


def _clustered_idx(out_features, in_features, k, gen):
    """Entries concentrated in a few rows and columns, as a gradient-scored mask's are."""
    rows = torch.randperm(out_features, generator=gen)[: max(1, out_features // 4)]
    cols = torch.randperm(in_features, generator=gen)[: max(1, in_features // 3)]
    cells = (rows[:, None] * in_features + cols[None, :]).reshape(-1)
    return cells[torch.randperm(cells.numel(), generator=gen)[:k]].sort().values


@pytest.mark.parametrize("choice", CHOICES, ids=lambda c: c.name)
def test_each_strategy_equals_the_dense_weight_gradient_at_the_entries_fp32(choice):
    gen = torch.Generator().manual_seed(0)
    gy, x = torch.randn(300, 24, generator=gen), torch.randn(300, 40, generator=gen)
    idx = _clustered_idx(24, 40, 50, gen)
    layout = EntryLayout(idx, 24, 40)
    dense = (gy.double().t() @ x.double()).reshape(-1)[idx]
    got = value_grad(gy, x, layout, choice)
    assert got.dtype == torch.float32 and got.shape == idx.shape
    torch.testing.assert_close(got.double(), dense, rtol=1e-5, atol=1e-5 * float(dense.abs().max()))


@pytest.mark.parametrize("choice", CHOICES, ids=lambda c: c.name)
def test_each_strategy_equals_the_bf16_dense_weight_gradient(choice):
    """bf16 activations (autocast's): within bf16 rounding of the exact sums; ``gather`` sums in fp32."""
    gen = torch.Generator().manual_seed(1)
    gy = torch.randn(256, 32, generator=gen).bfloat16()
    x = torch.randn(256, 48, generator=gen).bfloat16()
    idx = _clustered_idx(32, 48, 60, gen)
    exact = (gy.double().t() @ x.double()).reshape(-1)[idx]
    got = value_grad(gy, x, EntryLayout(idx, 32, 48), choice)
    scale = float(exact.abs().max())
    tol = 1e-5 if choice.strategy == "gather" else 1e-2  # an fp32 sum vs a bf16-rounded product
    torch.testing.assert_close(got.double(), exact, rtol=tol, atol=tol * scale)
    bf16_dense = (gy.t() @ x).reshape(-1)[idx].double()  # what the masked-dense reference computes
    torch.testing.assert_close(got.double(), bf16_dense, rtol=1e-2, atol=1e-2 * scale)


@pytest.mark.parametrize("choice", CHOICES[1:], ids=lambda c: c.name)
def test_a_product_over_token_chunks_equals_one_product(choice, monkeypatch):
    gen = torch.Generator().manual_seed(2)
    gy, x = torch.randn(500, 16, generator=gen), torch.randn(500, 20, generator=gen)
    layout = EntryLayout(_clustered_idx(16, 20, 30, gen), 16, 20)
    whole = value_grad(gy, x, layout, choice)
    monkeypatch.setattr(vg, "GATHER_BUDGET", 700)  # a few dozen tokens per chunk
    torch.testing.assert_close(value_grad(gy, x, layout, choice), whole, rtol=1e-5, atol=1e-5)


def test_the_choice_follows_the_cost_and_is_made_once():
    gen = torch.Generator().manual_seed(3)
    # concentrated: 400 entries in 20 rows x 20 columns of a 512 x 2048 weight -> a product over R x C
    rows, cols = torch.randperm(512, generator=gen)[:20], torch.randperm(2048, generator=gen)[:20]
    concentrated = EntryLayout((rows[:, None] * 2048 + cols[None, :]).reshape(-1).sort().values, 512, 2048)
    choice = concentrated.choose("cpu", torch.float32)
    assert (choice.strategy, choice.rows, choice.cols) == ("product", True, True)
    assert concentrated.choose("cpu", torch.float32) is choice  # cached: one choice per tensor and dtype
    # spread: 300 entries in 300 distinct rows and columns -> R x C = 90,000 products for 300 entries
    spread = EntryLayout(torch.arange(300) * 2048 + torch.randperm(2048, generator=gen)[:300], 512, 2048)
    assert spread.choose("cpu", torch.float32).strategy == "gather"
    # nearly every row and column: the whole product, no copies of the activations
    full = EntryLayout(torch.arange(0, 64 * 64, 2), 64, 64)
    assert full.choose("cpu", torch.float32).strategy == "dense"
    # forcing picks the cheapest of that strategy
    assert concentrated.choose("cpu", torch.float32, "gather").strategy == "gather"
    with pytest.raises(ValueError, match="strategy must be auto or one of"):
        with forced_strategy("fast"):
            pass


@pytest.mark.parametrize("strategy", ["gather", "product", "dense"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_sparse_linear_value_gradients_equal_the_masked_dense_gradients(strategy, autocast):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 30, 32, generator=gen)
    weight, bias = torch.randn(24, 32, generator=gen), torch.randn(24, generator=gen)
    idx = _clustered_idx(24, 32, 40, gen)
    values = torch.nn.Parameter(torch.randn(40, generator=gen) * 0.1)
    gy = torch.randn(4, 30, 24, generator=gen)
    with forced_strategy(strategy), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = sparse_linear(x, weight, bias, values, idx)
    y.float().backward(gy)

    dense = weight.clone().reshape(-1)
    dense[idx] += values.detach()
    dense = dense.view_as(weight).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ref = torch.nn.functional.linear(x, dense, bias)
    ref.float().backward(gy)
    expected = dense.grad.reshape(-1)[idx]
    tol = 2e-2 if autocast else 1e-5
    torch.testing.assert_close(y.float(), ref.float(), rtol=0, atol=0)
    torch.testing.assert_close(values.grad, expected, rtol=tol, atol=tol * float(expected.abs().max()))


@pytest.mark.parametrize("strategy", ["auto", "gather", "product", "dense"])
def test_whole_model_value_gradients_equal_the_merged_models_under_every_strategy(vit, dataset, vit_prompts,
                                                                                  strategy):
    model = vit.model.eval()
    scores = saft.importance_scores(model, batches(dataset, 16), vit_prompts, progress=False)
    update = saft.SparseUpdate(saft.select_mask(scores, 0.05))
    images, labels = dataset.tensors
    with forced_strategy(strategy):
        with update.attached(model):
            loss = classification_loss(model, images, labels, vit_prompts)[0]
        loss.backward()
    ref = copy.deepcopy(model)
    named = dict(ref.named_parameters())
    with torch.no_grad():
        for n, w in update.effective_state(model).items():
            named[n].copy_(w)
    classification_loss(ref, images, labels, vit_prompts)[0].backward()
    for name, idx, values in update.items():
        dense = named[name].grad.reshape(-1)[idx]
        scale = float(dense.abs().max()) or 1.0
        torch.testing.assert_close(values.grad, dense, rtol=0, atol=1e-4 * scale, msg=name)


def test_the_strategy_forced_at_the_forward_is_the_backwards(monkeypatch):
    """A benchmark forces a strategy around the forward; the backward runs later, outside the block."""
    used = []
    monkeypatch.setattr(vg, "_gathered", lambda *a: used.append("gather") or torch.zeros(a[2].k))
    monkeypatch.setattr(vg, "_block_product", lambda *a: used.append(a[3:]) or torch.zeros(a[2].k))
    x, weight = torch.randn(5, 8), torch.randn(6, 8)
    values = torch.nn.Parameter(torch.zeros(3))
    idx = torch.tensor([1, 9, 40])
    for strategy, expected in (("gather", "gather"), ("dense", (False, False))):
        with forced_strategy(strategy):
            y = sparse_linear(x, weight, None, values, idx)
        y.sum().backward()
        assert used.pop() == expected
