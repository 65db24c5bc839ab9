"""Load open_clip models from a model spec, with safe deserialization only.

A model spec is ``ARCH@SOURCE``:

* ``ViT-B-16@openai``            open_clip architecture + pretrained tag (downloads
                                  from the hub on machines that can reach it)
* ``ViT-B-16@/models/b16.bin``   architecture + local weights file (.safetensors,
                                  .bin/.pt/.pth read with ``weights_only=True``)
* ``ViT-B-32@random`` or ``ViT-B-32``  random initialisation (seeded), for tests and
                                  benchmarks of the machinery

The activation is part of the architecture. A pretrained tag builds the activation its
weights were trained with: ``ViT-B-16@openai`` is built with QuickGELU because the tag's
pretrained config says so (open_clip itself would build GELU and only warn). A local
weights file carries no such record, so for an architecture whose published weights
were trained with both activations (``ViT-B-16``: ``openai`` QuickGELU, ``laion2b_*``
GELU) the spec must say which: ``ViT-B-16-quickgelu@/path`` or ``ViT-B-16-gelu@/path``;
a plain ``ViT-B-16@/path`` is refused with that advice. The suffixes ``-quickgelu`` and
``-gelu`` work on every architecture (``saft-tiny-vit-quickgelu``).

The project's own small architectures (``saft-tiny-vit``, ``saft-tiny-rn``) are
registered with open_clip on import.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import open_clip
import torch

from saft.models.fingerprint import CONFIG_ATTR, fingerprint_state_dict
from saft.models.tiny import ARCH as TINY_ARCH
from saft.models.tiny import tiny_tokenizer
from saft.progress import quiet_logger
from saft.io import shorten

CONFIG_DIR = Path(__file__).parent / "configs"
RANDOM_SOURCE = "random"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
QUICKGELU, GELU = "quickgelu", "gelu"
_ACTIVATION_SUFFIXES = {f"-{QUICKGELU}": QUICKGELU, f"-{GELU}": GELU}

open_clip.add_model_config(CONFIG_DIR)


class ModelSpecError(ValueError):
    """A model spec that cannot be resolved to an architecture and weights."""


@dataclass(frozen=True)
class ModelSpec:
    """``ARCH@SOURCE``; ``activation`` is set when the spec names it (``ARCH-quickgelu``, ``ARCH-gelu``)."""

    arch: str
    source: str = RANDOM_SOURCE
    activation: str | None = None

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
        name, _, source = text.partition("@")
        name, source = name.strip(), source.strip() or RANDOM_SOURCE
        known = open_clip.list_models()
        arch, activation = name, None
        if name not in known:
            for suffix, kind in _ACTIVATION_SUFFIXES.items():
                if name.endswith(suffix) and name[: -len(suffix)] in known:
                    arch, activation = name[: -len(suffix)], kind
        if arch not in known:
            import difflib

            close = difflib.get_close_matches(name, ["tiny", *known], n=3, cutoff=0.6)
            close += [m for m in known if name.lower() in m.lower() and m not in close][:8 - len(close)]
            hint = f" Did you mean {', '.join(close)}?" if close else " `open_clip.list_models()` lists them."
            raise ModelSpecError(f"unknown architecture {name!r} in model spec {text!r}.{hint}")
        if activation == GELU and _config_quick_gelu(arch):
            raise ModelSpecError(f"model spec {text!r}: {arch} is a QuickGELU architecture by definition; "
                                 f"name a GELU architecture with -gelu")
        return cls(arch, source, activation)

    @property
    def is_random(self) -> bool:
        return self.source == RANDOM_SOURCE

    @property
    def is_file(self) -> bool:
        return "/" in self.source or self.source.endswith(_WEIGHT_SUFFIXES)

    @property
    def name(self) -> str:
        """The architecture as the spec names it, activation suffix included."""
        return self.arch + (f"-{self.activation}" if self.activation else "")

    def __str__(self) -> str:
        return f"{self.name}@{self.source}"


def _unreachable_weights(spec: ModelSpec, cache_dir, quick_gelu: bool, why: str) -> ModelSpecError:
    as_file = spec.arch if _config_quick_gelu(spec.arch) else f"{spec.arch}-{QUICKGELU if quick_gelu else GELU}"
    where = f" ({cache_dir})" if cache_dir else ""
    return ModelSpecError(
        f"model spec {spec}: the pretrained weights are not in the local hub cache{where} and cannot be downloaded "
        f"({why}). On a machine without a model hub, copy the hub cache (HF_HOME) from a machine that has the "
        f"weights and set HF_HUB_OFFLINE=1, or save the weights as a file and use "
        f"{as_file}@/path/to/weights.safetensors.")


def _hub_host() -> tuple[str, int]:
    from urllib.parse import urlsplit

    url = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def _check_weights_reachable(spec: ModelSpec, cache_dir, quick_gelu: bool) -> None:
    """Fail in seconds, not after a minute of retries, when the weights are neither cached nor downloadable.

    Only the Hugging Face hub path is checked (open_clip prefers it); weights in the local
    cache, or a hub that answers a TCP connection within 3 s, go on to the real download.
    """
    cfg = open_clip.get_pretrained_cfg(spec.arch, spec.source) or {}
    hub = cfg.get("hf_hub", "")
    if not hub or cfg.get("file"):
        return
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # no hub client: open_clip downloads from the URL itself
        return
    repo_id, filename = os.path.split(hub)
    names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    for name in names:
        found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
        if isinstance(found, str):
            return
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise _unreachable_weights(spec, cache_dir, quick_gelu, "HF_HUB_OFFLINE is set")
    import socket

    host, port = _hub_host()
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        raise _unreachable_weights(spec, cache_dir, quick_gelu, f"{host}:{port} is unreachable: {exc}") from None


def _config_quick_gelu(arch: str) -> bool:
    return bool((open_clip.get_model_config(arch) or {}).get("quick_gelu", False))


def _tag_activations(arch: str) -> dict[str, bool]:
    """Pretrained tag -> whether its weights were trained with QuickGELU."""
    return {tag: bool(open_clip.get_pretrained_cfg(arch, tag).get("quick_gelu", False))
            for tag in open_clip.list_pretrained_tags_by_model(arch)}


def resolve_quick_gelu(spec: ModelSpec, *, from_weights: bool) -> bool:
    """Whether ``spec`` must be built with QuickGELU; refuses specs that leave it ambiguous.

    A tag decides by its pretrained config; a named activation decides for weights from a
    file or from memory; otherwise the architecture's config decides unless published
    weights of that architecture were trained with the other activation (then the spec
    must name one). Random initialisation follows the config.
    """
    config_quick = _config_quick_gelu(spec.arch)
    named = None if spec.activation is None else spec.activation == QUICKGELU
    if not (spec.is_random or spec.is_file or from_weights):  # a pretrained tag
        tags = _tag_activations(spec.arch)
        tag_quick = tags[spec.source]
        if named is not None and named != tag_quick:
            trained = QUICKGELU if tag_quick else GELU
            raise ModelSpecError(f"model spec {spec}: the {spec.source!r} weights of {spec.arch} were trained with "
                                 f"{trained.upper()}, not {spec.activation.upper()}; use {spec.arch}@{spec.source}")
        return tag_quick
    if named is not None:
        return named
    if spec.is_random and not from_weights:
        return config_quick
    tags = _tag_activations(spec.arch)
    other = sorted(tag for tag, quick in tags.items() if quick != config_quick)
    if other:
        same = sorted(tag for tag, quick in tags.items() if quick == config_quick)
        current, alternative = (QUICKGELU, GELU) if config_quick else (GELU, QUICKGELU)
        where = spec.source if spec.is_file else "the given state_dict"
        raise ModelSpecError(
            f"model spec {spec}: which activation were these weights trained with? Published {spec.arch} weights "
            f"use {alternative.upper()} ({', '.join(other)})"
            + (f" and {current.upper()} ({', '.join(same)})" if same else "")
            + f", and a weights file does not record it. Name it: {spec.arch}-{QUICKGELU}@{where} (OpenAI's "
            f"CLIP weights) or {spec.arch}-{GELU}@{where}. A wrong choice loads without error but computes "
            "another function."
        )
    return config_quick


def model_config(arch: str, quick_gelu: bool, preprocess_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """What the fingerprint covers besides the weights (see :mod:`saft.models.fingerprint`)."""
    cfg = copy.deepcopy(open_clip.get_model_config(arch) or {})
    cfg["quick_gelu"] = bool(quick_gelu)
    return {"open_clip": cfg, "preprocess": dict(preprocess_cfg or {})}


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
        raise ModelSpecError(f"{origin}: weights do not match the architecture ({shorten(str(exc))})") from exc
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
    The fingerprint covers the weights and the configuration that changes outputs
    (:mod:`saft.models.fingerprint`), computed after loading.
    """
    spec = ModelSpec.parse(spec)
    from_weights = state_dict is not None
    if not (spec.is_random or spec.is_file or from_weights):
        known = open_clip.list_pretrained_tags_by_model(spec.arch)
        if spec.source not in known:
            raise ModelSpecError(
                f"unknown pretrained tag {spec.source!r} for {spec.arch}; known tags: {known}"
            )
    quick_gelu = resolve_quick_gelu(spec, from_weights=from_weights)
    build = {"force_quick_gelu": True} if quick_gelu and not _config_quick_gelu(spec.arch) else {}
    if spec.is_random or from_weights or spec.is_file:
        torch.manual_seed(seed)  # random init must be reproducible for fingerprints
        with quiet_logger():  # it warns that no pretrained weights were loaded: intended here
            model, _, preprocess = open_clip.create_model_and_transforms(spec.arch, pretrained=None, **build)
        if state_dict is not None:
            _load_into(model, state_dict, "state_dict")
        elif spec.is_file:
            _load_into(model, read_state_dict(spec.source), spec.source)
    else:
        _check_weights_reachable(spec, cache_dir, quick_gelu)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.arch, pretrained=spec.source, cache_dir=cache_dir, weights_only=True, **build
            )
        except RuntimeError as exc:
            if "download" not in str(exc).lower():
                raise
            raise _unreachable_weights(spec, cache_dir, quick_gelu, str(exc)) from exc
    model = model.to(device).eval()
    model.saft_model_spec = str(spec)  # masks and deltas record which base they belong to
    setattr(model, CONFIG_ATTR, model_config(spec.arch, quick_gelu, getattr(model.visual, "preprocess_cfg", None)))
    if spec.arch == TINY_ARCH:
        tokenizer = tiny_tokenizer()
    else:
        tokenizer = open_clip.get_tokenizer(spec.arch)
    fingerprint = fingerprint_state_dict(model.state_dict(), getattr(model, CONFIG_ATTR))
    return LoadedModel(model, preprocess, tokenizer, fingerprint, spec)
