"""Model loading (open_clip spec, local file, in-memory state dict) and fingerprints."""

from saft.models.fingerprint import fingerprint_model, fingerprint_state_dict
from saft.models.loading import LoadedModel, ModelSpec, ModelSpecError, load_model, read_state_dict

__all__ = [
    "LoadedModel",
    "ModelSpec",
    "ModelSpecError",
    "fingerprint_model",
    "fingerprint_state_dict",
    "load_model",
    "read_state_dict",
]
