"""Batched zero-shot classification with a stored head: decoding in a pool, inference in batches.

The classifier holds only what serving needs: the image tower of the fine-tuned model, its
preprocess, the stored class embeddings (``[n_classes, dim]``, kept in float32 on the
device; they are stored as float16) and the class names. Logits are
``logit_scale * normalize(image_features) @ head.T`` in float32; probabilities are their
softmax over the served classes. The image tower runs under bf16 autocast on CUDA
(``precision="auto"``), in float32 on the CPU; ``bf16`` forces autocast anywhere.

Images are fetched (URLs), decoded with the project's one decoder
(``saft.data.images.load_rgb``: EXIF orientation, 16-bit, alpha, palettes), resized and
cropped in the threads of :class:`saft.serving.decode.ImagePool` (Pillow releases the GIL
for that work; the pool bounds pixels and memory and takes requests in turns) and handed
over as 8-bit arrays. The float conversion and normalisation (the preprocess's ``ToTensor`` and
``Normalize``, the same arithmetic) happen on the whole batch in the inference thread, on
the device: no torch kernel runs in the decode threads, whose OpenMP teams would otherwise
compete with the model's for the same cores (measured: concurrent requests on 2 cores
were several times slower), and a GPU receives a quarter of the bytes.
:class:`Batcher` gathers images of concurrent requests into one forward pass of at most
``max_batch`` images, waiting at most ``max_wait_s`` for company, so a GPU under many
small requests still runs full batches.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from saft.serving.decode import ImagePool, stack  # noqa: F401  (ImagePool: imported from here by the pyfunc and server)
from saft.serving.protocol import prediction

log = logging.getLogger(__name__)
PRECISIONS = ("auto", "fp32", "bf16")


def serving_device(name: str | None = None, what: str = "--device") -> str:
    """The torch device to serve on: ``name`` checked, or for ``auto`` (empty, None) CUDA when visible, else CPU.

    A device this process cannot use is refused with the reason (``what`` names the
    setting in the message), never replaced by another: a server asked for ``cuda:3`` does
    not quietly serve on the CPU.
    """
    if not name or name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"{what} {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        seen = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        if not torch.cuda.is_available():
            raise ValueError(f"{what} {name}: no CUDA device is usable in this process{seen}: serve with "
                             f"{what} cpu, or run where a GPU is visible")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"{what} {name}: only {count} CUDA device{'s' if count != 1 else ''} visible{seen} "
                             f"(cuda:0 to cuda:{count - 1})")
    elif device.type != "cpu":
        raise ValueError(f"{what} {name}: serving runs on cpu or cuda devices, not {device.type}")
    return str(device)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def usable_autocast(device: torch.device, precision: str) -> torch.dtype | None:
    """:func:`autocast_dtype`, refusing bf16 on a GPU that cannot run it (instead of running it slowly or wrongly)."""
    dtype = autocast_dtype(device, precision)
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision {precision} means bf16 on {device} ({torch.cuda.get_device_name(device)}), which "
                         "has no bfloat16 support: use --precision fp32")
    return dtype


def precision_name(autocast: torch.dtype | None) -> str:
    """What actually runs: ``bf16`` (autocast) or ``fp32``."""
    return "bf16" if autocast is torch.bfloat16 else "fp32"


def split_preprocess(preprocess: Callable) -> tuple[Callable, tuple, tuple] | None:
    """``(PIL part, mean, std)`` of an open_clip preprocess ``Compose([..., ToTensor, Normalize])``, else None."""
    steps = list(getattr(preprocess, "transforms", []))
    if len(steps) < 2 or not type(steps[-2]).__name__.endswith("ToTensor") or not hasattr(steps[-1], "mean"):
        return None
    from torchvision.transforms import Compose

    return Compose(steps[:-2]), tuple(steps[-1].mean), tuple(steps[-1].std)


class Classifier:
    """Image tower + stored head over fixed classes; thread-safe for one caller at a time."""

    def __init__(self, model: torch.nn.Module, preprocess: Callable, head: torch.Tensor, classes: Sequence[str], *,
                 device: str | torch.device = "cpu", precision: str = "auto"):
        if head.ndim != 2 or head.shape[0] != len(classes):
            raise ValueError(f"head has shape {tuple(head.shape)} but there are {len(classes)} classes")
        self.device = torch.device(device)
        self.autocast = usable_autocast(self.device, precision)
        self.model = model.to(self.device).eval()
        self.preprocess = preprocess
        split = split_preprocess(preprocess)
        if split is None:
            log.warning("preprocess %r is not Compose([..., ToTensor, Normalize]): it runs whole in the decode threads",
                        preprocess)
            self._pil, self._mean, self._std = None, None, None
        else:
            self._pil = split[0]
            self._mean = torch.tensor(split[1], device=self.device).view(1, -1, 1, 1)
            self._std = torch.tensor(split[2], device=self.device).view(1, -1, 1, 1)
        self.head = F.normalize(head.to(self.device, torch.float32), dim=-1)
        self.classes = list(classes)
        scale = getattr(model, "logit_scale", None)
        self.scale = float(scale.detach().exp()) if isinstance(scale, torch.Tensor) else 100.0

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def prepare(self, image) -> np.ndarray | torch.Tensor:
        """A decoded image as model input: 8-bit ``[3, H, W]`` (normalised later, batched), or the float preprocess."""
        if self._pil is None:
            return self.preprocess(image)
        return np.asarray(self._pil(image), dtype=np.uint8).transpose(2, 0, 1)

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dtype != torch.uint8:
            return pixels  # already preprocessed
        return pixels.float().div_(255).sub_(self._mean).div_(self._std)

    @torch.inference_mode()
    def probabilities(self, pixels: torch.Tensor) -> torch.Tensor:
        """Softmax over the classes for a batch from :meth:`prepare` (or preprocessed floats); float32 on the CPU."""
        pixels = self._normalise(pixels.to(self.device, non_blocking=True))
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            features = self.model.encode_image(pixels)
        logits = self.scale * F.normalize(features.float(), dim=-1) @ self.head.t()
        return logits.softmax(-1).cpu()

    def top_k(self, probs: torch.Tensor, k: int) -> list[dict]:
        values, indices = probs.topk(k, dim=-1)
        return [prediction([self.classes[i] for i in row_i], [float(p) for p in row_p])
                for row_i, row_p in zip(indices.tolist(), values.tolist())]

    def warm_up(self) -> None:
        """One forward pass on a blank image, so the first request pays no lazy initialisation."""
        from PIL import Image

        self.probabilities(stack([self.prepare(Image.new("RGB", (64, 64), (128, 128, 128)))]))


_STOP = object()


@dataclass
class _Job:
    pixels: torch.Tensor
    k: int
    future: Future


class Batcher:
    """One inference thread serving batches gathered from every concurrent request.

    The thread also picks each request's top k, so every torch kernel of serving runs in it.
    """

    def __init__(self, classifier: Classifier, max_batch: int = 32, max_wait_s: float = 0.0,
                 on_batch: Callable[[int, float], None] | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.classifier, self.max_batch, self.max_wait_s = classifier, max_batch, max_wait_s
        self.on_batch = on_batch  # (images, seconds) of every forward pass: the server's metrics
        self._queue: queue.Queue = queue.Queue()
        self.batches = 0  # forward passes run; with images_seen, the mean batch size
        self.images_seen = 0
        self._thread = threading.Thread(target=self._loop, name="saft-inference", daemon=True)
        self._thread.start()

    def submit(self, pixels: torch.Tensor, k: int) -> list[Future]:
        """Futures of the top-k predictions (``Classifier.top_k``) of each chunk of at most ``max_batch`` images."""
        futures = []
        for start in range(0, len(pixels), self.max_batch):
            job = _Job(pixels[start:start + self.max_batch], k, Future())
            self._queue.put(job)
            futures.append(job.future)
        return futures

    def _gather(self, first: _Job) -> tuple[list[_Job], object]:
        """``first`` and the jobs queued within ``max_wait_s`` that fit; plus what did not fit (or None)."""
        jobs, size = [first], len(first.pixels)
        deadline = time.monotonic() + self.max_wait_s
        while size < self.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is _STOP or size + len(job.pixels) > self.max_batch:
                return jobs, job  # the stop mark, or the first job of the next batch
            jobs.append(job)
            size += len(job.pixels)
        return jobs, None

    def _loop(self) -> None:
        carried = None
        while True:
            job, carried = (carried if carried is not None else self._queue.get()), None
            if job is _STOP:
                return
            jobs, carried = self._gather(job)
            started = time.perf_counter()
            try:
                probs = self.classifier.probabilities(torch.cat([j.pixels for j in jobs]))
                results, start = [], 0
                for j in jobs:
                    results.append(self.classifier.top_k(probs[start:start + len(j.pixels)], j.k))
                    start += len(j.pixels)
            except Exception as exc:  # e.g. CUDA out of memory: every waiting request gets it
                log.exception("inference failed for a batch of %d images", sum(len(j.pixels) for j in jobs))
                for j in jobs:
                    j.future.set_exception(exc)
            else:
                self.batches += 1
                self.images_seen += len(probs)
                if self.on_batch is not None:
                    self.on_batch(len(probs), time.perf_counter() - started)
                for j, result in zip(jobs, results):
                    j.future.set_result(result)

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=30)
