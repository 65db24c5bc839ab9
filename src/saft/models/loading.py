"""Load open_clip models from a model spec, with safe deserialization only.

A model spec is ``ARCH@SOURCE``:

* ``ViT-B-16@openai``            open_clip architecture + pretrained tag (downloads
                                  from the hub on machines that can reach it)
* ``ViT-B-16@/models/b16.bin``   architecture + local weights file (.safetensors,
                                  .bin/.pt/.pth read with ``weights_only=True``)
* ``ViT-B-32@random`` or ``ViT-B-32``  random initialisation (seeded), for tests and
                                  benchmarks of the machinery

The project's own small architectures (``saft-tiny-vit``, ``saft-tiny-rn``) are
registered with open_clip on import.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import open_clip
import torch

from saft.models.fingerprint import fingerprint_state_dict
from saft.models.tiny import ARCH as TINY_ARCH
from saft.models.tiny import tiny_tokenizer
from saft.progress import quiet_logger

CONFIG_DIR = Path(__file__).parent / "configs"
RANDOM_SOURCE = "random"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

open_clip.add_model_config(CONFIG_DIR)


class ModelSpecError(ValueError):
    """A model spec that cannot be resolved to an architecture and weights."""


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    source: str = RANDOM_SOURCE

    @classmethod
    def parse(cls, spec: str | "ModelSpec") -> "ModelSpec":
        if isinstance(spec, ModelSpec):
            return spec
        text = str(spec).strip()
        if text == "tiny":  # the embedded model shipped with the package
            from saft.models.tiny import ARCH, CHECKPOINT

            return cls(ARCH, str(CHECKPOINT))
        if not text:
            raise ModelSpecError("empty model spec: expected ARCH@TAG, ARCH@/path/weights or ARCH@random")
        arch, _, source = text.partition("@")
        arch, source = arch.strip(), source.strip() or RANDOM_SOURCE
        if arch not in open_clip.list_models():
            close = [m for m in open_clip.list_models() if arch.lower() in m.lower()][:8]
            hint = f" Close matches: {', '.join(close)}." if close else ""
            raise ModelSpecError(f"unknown architecture {arch!r} in model spec {text!r}.{hint}")
        return cls(arch, source)

    @property
    def is_random(self) -> bool:
        return self.source == RANDOM_SOURCE

    @property
    def is_file(self) -> bool:
        return "/" in self.source or self.source.endswith(_WEIGHT_SUFFIXES)

    def __str__(self) -> str:
        return f"{self.arch}@{self.source}"


@dataclass
class LoadedModel:
    """What every step needs from a base model."""

    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    fingerprint: str
    spec: ModelSpec

    def __iter__(self):  # allows ``model, preprocess, tokenizer, fp = load_model(...)``
        return iter((self.model, self.preprocess, self.tokenizer, self.fingerprint))


def unsafe_pickle_reason(exc: BaseException) -> str:
    """The line of a refused ``torch.load(weights_only=True)`` that says what was found.

    PyTorch's message suggests retrying with ``weights_only=False``, which is exactly the
    unsafe load being refused; only its diagnosis (e.g. ``unsupported GLOBAL posix.system``)
    is worth showing.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "nsupported" in line:
            return line.split(". Please use")[0][:300]  # drop torch's how-to-allow-it advice
    return f"{type(exc).__name__}: {lines[0][:300] if lines else 'unreadable'}"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file without ever unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types
        raise ModelSpecError(
            f"{path}: cannot be read safely ({unsafe_pickle_reason(exc)}). Loading it fully could run "
            "arbitrary code, so it is refused. Only tensors may be stored; convert the file to .safetensors "
            "where its source is trusted, or get the weights as .safetensors."
        ) from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelSpecError(f"{path}: expected a mapping of parameter names to tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _load_into(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], origin: str) -> None:
    try:
        missing, unexpected = model.load_state_dict(dict(state_dict), strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ModelSpecError(f"{origin}: weights do not match the architecture ({str(exc)[:300]})") from exc
    if missing or unexpected:
        raise ModelSpecError(
            f"{origin}: weights do not match the architecture "
            f"(missing: {sorted(missing)[:5]}, unexpected: {sorted(unexpected)[:5]})"
        )


def load_model(
    spec: str | ModelSpec,
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    cache_dir: str | None = None,
) -> LoadedModel:
    """Build the model for ``spec`` and return it with its preprocess, tokenizer and fingerprint.

    ``state_dict`` overrides the spec's weight source (weights already in memory).
    The fingerprint is the sha256 of the base weights, computed after loading.
    """
    spec = ModelSpec.parse(spec)
    if spec.is_random or state_dict is not None or spec.is_file:
        torch.manual_seed(seed)  # random init must be reproducible for fingerprints
        with quiet_logger():  # it warns that no pretrained weights were loaded: intended here
            model, _, preprocess = open_clip.create_model_and_transforms(spec.arch, pretrained=None)
        if state_dict is not None:
            _load_into(model, state_dict, "state_dict")
        elif spec.is_file:
            _load_into(model, read_state_dict(spec.source), spec.source)
    else:
        known = open_clip.list_pretrained_tags_by_model(spec.arch)
        if spec.source not in known:
            raise ModelSpecError(
                f"unknown pretrained tag {spec.source!r} for {spec.arch}; known tags: {known}"
            )
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.arch, pretrained=spec.source, cache_dir=cache_dir, weights_only=True
        )
    model = model.to(device).eval()
    model.saft_model_spec = str(spec)  # masks and deltas record which base they belong to
    if spec.arch == TINY_ARCH:
        tokenizer = tiny_tokenizer()
    else:
        tokenizer = open_clip.get_tokenizer(spec.arch)
    return LoadedModel(model, preprocess, tokenizer, fingerprint_state_dict(model.state_dict()), spec)
