import copy
import os

import pytest
import torch
import torch.nn as nn
from synthetic import batches

import saft
from saft.sparse.kernels import patchify, sparse_linear
from saft.sparse.mask import Mask
from saft.sparse.objective import classification_loss


def _mask_and_update(loaded, dataset, prompts, density=0.02):
    scores = saft.importance_scores(loaded.model, batches(dataset, 16), prompts, progress=False)
    update = saft.SparseUpdate(saft.select_mask(scores, density))
    with torch.no_grad():
        for v in update.values:
            v.normal_(0, 1e-2, generator=torch.Generator().manual_seed(v.numel()))
    return update


def _merged_copy(model, update):
    ref = copy.deepcopy(model)
    named = dict(ref.named_parameters())
    with torch.no_grad():
        for n, w in update.effective_state(model).items():
            named[n].copy_(w)
    return ref


def test_value_gradients_equal_dense_gradients_at_indices(loaded, dataset, prompts):
    model = loaded.model.eval()
    update = _mask_and_update(loaded, dataset, prompts)
    images, labels = dataset.tensors
    with update.attached(model):
        loss, logits = classification_loss(model, images, labels, prompts)
    loss.backward()

    ref = _merged_copy(model, update)
    ref_loss, ref_logits = classification_loss(ref, images, labels, prompts)
    ref_loss.backward()
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    named = dict(ref.named_parameters())
    patched, shadows = update._plan(model)
    assert patched, "the fast kernels should handle some tensors"
    for name, idx, values in update.items():
        dense = named[name].grad.reshape(-1)[idx]
        scale = float(dense.abs().max()) or 1.0
        torch.testing.assert_close(values.grad, dense, rtol=0, atol=1e-4 * scale, msg=name)
    # base parameters never get gradients
    assert all(p.grad is None for p in model.parameters())


def test_attached_is_undone_on_exit(vit, dataset, vit_prompts):
    model = vit.model
    update = _mask_and_update(vit, dataset, vit_prompts)
    with update.attached(model):
        assert any("forward" in m.__dict__ for m in model.modules())
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert all(n not in m.__dict__ for m in model.modules() for n, _ in m.named_parameters(recurse=False))
    assert saft.fingerprint_model(model) == vit.fingerprint


def test_tensors_without_selection_get_no_gradient_and_only_values_train(vit, dataset, vit_prompts):
    update = _mask_and_update(vit, dataset, vit_prompts, density=0.001)
    trainable = [p for p in update.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == update.num_values() == sum(v.numel() for v in update.values)
    assert update.num_values() < 0.01 * sum(p.numel() for p in vit.model.parameters())


def _mha_inputs(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first)
    x = torch.randn(3, 5, 16)
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
    return mha, x


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [False, True])
def test_attention_paths_match_stock_attention(batch_first, need_weights):
    mha, x = _mha_inputs(batch_first)
    causal = torch.full((5, 5), float("-inf")).triu(1)
    shapes = {n: tuple(p.shape) for n, p in mha.named_parameters()}
    idx = {"in_proj_weight": torch.tensor([0, 17, 300, 700]), "in_proj_bias": torch.tensor([2, 40]),
           "out_proj.weight": torch.tensor([5, 100]), "out_proj.bias": torch.tensor([3])}
    update = saft.SparseUpdate(Mask(idx, shapes))
    with torch.no_grad():
        for i, v in enumerate(update.values):
            v.copy_(torch.linspace(-0.5, 0.5, v.numel()) + i)
    ref = _merged_copy(mha, update)
    with update.attached(mha):
        out = mha(x, x, x, need_weights=need_weights, attn_mask=causal)[0]
    out.square().sum().backward()
    ref_out = ref(x, x, x, need_weights=need_weights, attn_mask=causal)[0]
    ref_out.square().sum().backward()
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    named = dict(ref.named_parameters())
    for name, index, values in update.items():
        torch.testing.assert_close(values.grad, named[name].grad.reshape(-1)[index], rtol=1e-4, atol=1e-5)


def test_sparse_linear_matches_dense_linear_for_all_grads():
    torch.manual_seed(1)
    x = torch.randn(4, 7, 6, requires_grad=True)
    w, b = torch.randn(5, 6), torch.randn(5)
    wi, bi = torch.tensor([0, 11, 29]), torch.tensor([4])
    wv, bv = torch.randn(3, requires_grad=True), torch.randn(1, requires_grad=True)
    y = sparse_linear(x, w, b, wv, wi, bv, bi)
    gy = torch.randn_like(y)
    y.backward(gy)
    w_ref = w.clone().reshape(-1).index_add(0, wi, wv.detach()).view_as(w).requires_grad_(True)
    b_ref = b.clone().index_add(0, bi, bv.detach()).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x_ref, w_ref, b_ref).backward(gy)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(wv.grad, w_ref.grad.reshape(-1)[wi])
    torch.testing.assert_close(bv.grad, b_ref.grad[bi])


def test_patchify_matches_strided_convolution():
    conv = nn.Conv2d(3, 8, kernel_size=4, stride=4, bias=False)
    x = torch.randn(2, 3, 18, 17)  # not a multiple of the patch: the remainder is dropped
    patches, gh, gw = patchify(x, 4)
    y = (patches @ conv.weight.reshape(8, -1).t()).transpose(1, 2).reshape(2, 8, gh, gw)
    torch.testing.assert_close(y, conv(x), rtol=1e-5, atol=1e-5)


def test_mask_for_other_architecture_is_refused(vit):
    rn = saft.load_model("saft-tiny-rn")
    mask = Mask({"visual.conv1.weight": torch.tensor([0])}, {"visual.conv1.weight": (64, 3, 8, 8)})
    with pytest.raises(ValueError, match="another architecture"):
        with saft.SparseUpdate(mask).attached(rn.model):
            pass
    mask = Mask({"nope.weight": torch.tensor([0])}, {"nope.weight": (4,)})
    with pytest.raises(KeyError, match="not a parameter"):
        with saft.SparseUpdate(mask).attached(vit.model):
            pass


def test_token_embedding_entries_cost_a_lookup_not_a_dense_copy(vit, dataset, vit_prompts):
    """Selected token-embedding entries: the matrix is patched (no base + scatter shadow), the lookup
    is bit-identical to the merged matrix's, and the values' gradient equals the dense one at the indices."""
    model = vit.model.eval()
    update = _mask_and_update(vit, dataset, vit_prompts)
    assert "token_embedding.weight" in update.names
    patched, shadows = update._plan(model)
    assert model.token_embedding in patched
    assert all(name != "token_embedding.weight" for name in (update.names[i] for _, _, i in shadows))
    tokens = vit_prompts.tokens
    ref = _merged_copy(model, update)
    with update.attached(model):
        assert "weight" not in model.token_embedding.__dict__  # no shadowed dense effective matrix
        out = model.token_embedding(tokens)
    assert torch.equal(out, ref.token_embedding(tokens))
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.token_embedding(tokens).backward(grad)
    dense = ref.token_embedding.weight.grad.reshape(-1)[update.index("token_embedding.weight")]
    torch.testing.assert_close(update.value("token_embedding.weight").grad, dense, rtol=0, atol=1e-6)


def test_sparse_linear_under_autocast_saves_the_autocast_dtype_and_matches_dense_gradients():
    """bf16 autocast (on the CPU here, the same code as CUDA): output and saved input in bf16, no fp32 copy
    of the weight, and value gradients equal to the masked dense gradient of the same bf16 computation."""
    torch.manual_seed(0)
    x = torch.randn(6, 5, 32)
    weight, bias = torch.randn(24, 32), torch.randn(24)
    idx = torch.tensor([0, 7, 33, 100, 767], dtype=torch.long)
    values = torch.nn.Parameter(torch.randn(5) * 0.1)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = sparse_linear(x, weight, bias, values, idx)
    assert y.dtype == torch.bfloat16
    assert all(t.dtype != torch.float32 or t.numel() <= idx.numel() for t in saved), [t.dtype for t in saved]
    y.float().sum().backward()

    dense = weight.clone().reshape(-1)
    dense[idx] += values.detach()
    dense = dense.view_as(weight).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.linear(x, dense, bias)
    ref.float().sum().backward()
    torch.testing.assert_close(y.float(), ref.float(), rtol=0, atol=0)
    torch.testing.assert_close(values.grad, dense.grad.reshape(-1)[idx], rtol=1e-2, atol=1e-2)


def test_sparse_kernels_run_in_deterministic_mode(vit, dataset, vit_prompts):
    """index_put with unique indices (not index_add's atomics): torch's deterministic mode accepts every op."""
    update = _mask_and_update(vit, dataset, vit_prompts)
    images, labels = dataset.tensors
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            for v in update.values:
                v.grad = None
            with update.attached(vit.model):
                classification_loss(vit.model.eval(), images[:8], labels[:8], vit_prompts)[0].backward()
            grads.append([v.grad.clone() for v in update.values])
    finally:
        torch.use_deterministic_algorithms(previous)
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_backend_flags_are_set_explicitly(monkeypatch):
    from saft.sparse.backends import configure_backends

    previous = torch.are_deterministic_algorithms_enabled()
    monkeypatch.setenv("SAFT_DETERMINISTIC", "1")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        assert configure_backends(torch.device("cpu"), autocast=False) == {"deterministic": True}
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(previous)
    monkeypatch.setenv("SAFT_DETERMINISTIC", "0")
    assert configure_backends(torch.device("cpu"), autocast=True) == {"deterministic": False}
