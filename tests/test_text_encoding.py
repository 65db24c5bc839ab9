"""Text encoding cut to the longest prompt equals the full-context encoding (fp32 rounding only)."""

import open_clip
import pytest
import torch

import saft
from saft.models.text import encode_text, exact_length

# Stated tolerance: the cut changes only the shapes of the matrix products, so the
# difference is fp32 rounding; measured max |diff| ~2e-6 on ViT-B-16 outputs of scale ~1.
TOLERANCE = 1e-5


def _imagenet_prompts(n_classes: int, n_templates: int) -> list[str]:
    names = open_clip.IMAGENET_CLASSNAMES[::1000 // n_classes][:n_classes]
    templates = open_clip.OPENAI_IMAGENET_TEMPLATES[::80 // n_templates][:n_templates]
    return [t(name) for name in names for t in templates]


@pytest.mark.slow
def test_vit_b_16_config_cut_encoding_equals_77_tokens():
    model, _, _ = open_clip.create_model_and_transforms("ViT-B-16")  # random init: the config is what matters
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    tokens = tokenizer(_imagenet_prompts(10, 4))
    assert tokens.shape[1] == 77
    length = exact_length(model.eval(), tokens)
    assert length is not None and length < 40  # ImageNet's prompts are far shorter than 77 tokens
    with torch.no_grad():
        full = model.encode_text(tokens)
        cut = encode_text(model, tokens)
    scale = float(full.abs().max())
    assert float((cut - full).abs().max()) <= TOLERANCE * scale


def test_tiny_model_cut_encoding_equals_full_context():
    loaded = saft.load_model("tiny")
    tokens = loaded.tokenizer(["a photo of a star", "a red circle", "a sketch of a crescent"])
    assert exact_length(loaded.model, tokens) < tokens.shape[1]  # eos pooling, pad id 0
    with torch.no_grad():
        full = loaded.model.encode_text(tokens)
        cut = encode_text(loaded.model, tokens)
    assert float((cut - full).abs().max()) <= TOLERANCE * float(full.abs().max())


def test_cut_is_not_applied_where_it_would_not_be_exact(vit):
    tokens = vit.tokenizer(["a photo of a dog."])
    model = vit.model
    model.text_pool_type = "last"  # the pooled position moves with the length
    try:
        assert exact_length(model, tokens) is None
    finally:
        model.text_pool_type = "argmax"
    mask = model.attn_mask
    model.attn_mask = None  # bidirectional attention: later tokens change earlier ones
    try:
        assert exact_length(model, tokens) is None
    finally:
        model.attn_mask = mask


def test_cut_reads_a_sparse_update_of_the_positional_embedding(vit, dataset, vit_prompts):
    """Under a sparse update the cut takes the updated positional embedding, and gradients reach it."""
    from synthetic import batches

    scores = saft.importance_scores(vit.model, batches(dataset, 16), vit_prompts, progress=False,
                                    eligibility=saft.Eligibility(include=["positional_embedding"]))
    update = saft.SparseUpdate(saft.select_mask(scores, density=0.2))
    with torch.no_grad():
        update.values[0].normal_(0, 0.1)
    with update.attached(vit.model):
        cut = encode_text(vit.model, vit_prompts.tokens)
        full = vit.model.encode_text(vit_prompts.tokens)
    assert float((cut - full).abs().max()) <= TOLERANCE * float(full.abs().max())
    cut.sum().backward()
    assert update.values[0].grad is not None and float(update.values[0].grad.abs().sum()) > 0
    assert "positional_embedding" not in vit.model.__dict__ and "attn_mask" not in vit.model.__dict__
