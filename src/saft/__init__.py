"""saft: Sparse Adaptation for Fine-Tuning of CLIP models.

    import saft
    model, preprocess, tokenizer, fp = saft.load_model("ViT-B-16@openai")
    prompts = saft.ClassPrompts.build(tokenizer, class_names, templates)
    mask = saft.select_mask(saft.importance_scores(model, loader, prompts), density=0.001)
    delta = saft.finetune(model, train_set, prompts, mask=mask).delta
    saft.apply_delta(model, delta)
"""

from saft.lazy import exports
from saft.version import __version__

# Loaded on first use, so `import saft.steps...` in a light pipeline task does not pay
# for torch and open_clip unless the task needs them.
__getattr__, __dir__ = exports(__name__, {
    "saft.models": ("LoadedModel", "ModelSpec", "ModelSpecError", "fingerprint_model", "load_model"),
    "saft.sparse": ("METHODS", "SCORE_RULES", "ClassPrompts", "Delta", "Eligibility", "FinetuneConfig",
                    "FinetuneResult", "FingerprintMismatch", "Mask", "Scores", "SparseUpdate", "apply_delta",
                    "finetune", "importance_scores", "load_delta", "random_mask", "remove_delta", "save_delta",
                    "select_mask"),
})


__all__ = [
    "METHODS", "SCORE_RULES", "ClassPrompts", "Delta", "Eligibility", "FinetuneConfig", "FinetuneResult",
    "FingerprintMismatch", "LoadedModel", "Mask", "ModelSpec", "ModelSpecError", "Scores", "SparseUpdate",
    "__version__", "apply_delta", "finetune", "fingerprint_model", "importance_scores", "load_delta",
    "load_model", "random_mask", "remove_delta", "save_delta", "select_mask",
]
