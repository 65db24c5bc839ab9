"""saft: Sparse Adaptation for Fine-Tuning of CLIP models.

    import saft
    model, preprocess, tokenizer, fp = saft.load_model("ViT-B-16@openai")
    prompts = saft.ClassPrompts.build(tokenizer, class_names, templates)
    mask = saft.select_mask(saft.importance_scores(model, loader, prompts), density=0.001)
    delta = saft.finetune(model, train_set, prompts, mask=mask).delta
    saft.apply_delta(model, delta)
"""

import os

from saft.lazy import exports
from saft.version import __version__

# A frozen linear layer fed a non-contiguous 3-D input (nn.MultiheadAttention's in-projection
# with batch_first, every open_clip tower) otherwise goes through a batched matmul whose CPU
# bf16 kernel copies its operands: the floor of a step at ViT-B-32 x 10 classes took 2.5 s under
# bf16 autocast against 1.2 s for full fine-tuning, whose trainable weights take the flattened
# path. Flattened, the floor took 0.77 s (fp32 1.46 -> 1.22 s). torch reads this once, at the
# first such call (pytorch/pytorch#96761); a value the user set is kept.
os.environ.setdefault("TORCH_LINEAR_FLATTEN_3D", "1")

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
