"""SAFT as a plain PyTorch library: scores, masks, sparse training, deltas.

Imports neither orchestration nor tracking code: usable from any notebook or script.
"""

from saft.lazy import exports

__getattr__, __dir__ = exports(__name__, {
    "saft.sparse.config": ("METHODS", "SCORE_RULES", "FinetuneConfig", "default_lr"),
    "saft.sparse.delta": ("Delta", "FingerprintMismatch", "apply_delta", "load_delta", "remove_delta", "save_delta"),
    "saft.sparse.mask": ("Mask", "random_mask", "select_mask"),
    "saft.sparse.objective": ("ClassPrompts", "class_embeddings", "classification_loss", "clip_logits"),
    "saft.sparse.scores": ("Eligibility", "Scores", "importance_scores"),
    "saft.sparse.trainer": ("FinetuneResult", "finetune"),
    "saft.sparse.update": ("SparseUpdate",),
})

__all__ = [
    "METHODS", "SCORE_RULES", "ClassPrompts", "Delta", "Eligibility", "FinetuneConfig", "FinetuneResult",
    "FingerprintMismatch", "Mask", "Scores", "SparseUpdate", "apply_delta", "class_embeddings",
    "classification_loss", "clip_logits", "default_lr", "finetune", "importance_scores", "load_delta",
    "random_mask", "remove_delta", "save_delta", "select_mask",
]
