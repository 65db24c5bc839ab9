"""SAFT as a plain PyTorch library: scores, masks, sparse training, deltas.

Imports neither orchestration nor tracking code: usable from any notebook or script.
"""

from saft.sparse.delta import Delta, FingerprintMismatch, apply_delta, load_delta, remove_delta, save_delta
from saft.sparse.mask import Mask, random_mask, select_mask
from saft.sparse.objective import ClassPrompts, class_embeddings, classification_loss, clip_logits
from saft.sparse.scores import SCORE_RULES, Eligibility, Scores, importance_scores
from saft.sparse.trainer import METHODS, FinetuneConfig, FinetuneResult, finetune
from saft.sparse.update import SparseUpdate

__all__ = [
    "METHODS", "SCORE_RULES", "ClassPrompts", "Delta", "Eligibility", "FinetuneConfig", "FinetuneResult",
    "FingerprintMismatch", "Mask", "Scores", "SparseUpdate", "apply_delta", "class_embeddings",
    "classification_loss", "clip_logits", "finetune", "importance_scores", "load_delta", "random_mask",
    "remove_delta", "save_delta", "select_mask",
]
