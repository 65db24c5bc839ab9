"""Model loading (open_clip spec, local file, in-memory state dict) and fingerprints."""

from saft.lazy import exports

__getattr__, __dir__ = exports(__name__, {
    "saft.models.fingerprint": ("fingerprint_model", "fingerprint_state_dict"),
    "saft.models.loading": ("LoadedModel", "ModelSpec", "ModelSpecError", "load_model", "read_state_dict"),
})

__all__ = [
    "LoadedModel",
    "ModelSpec",
    "ModelSpecError",
    "fingerprint_model",
    "fingerprint_state_dict",
    "load_model",
    "read_state_dict",
]
