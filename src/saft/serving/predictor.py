"""Batched zero-shot classification with a stored head: decoding in a pool, inference in batches.

The classifier holds only what serving needs: the image tower of the fine-tuned model, its
preprocess, the stored class embeddings (``[n_classes, dim]``, kept in float32 on the
device; they are stored as float16) and the class names. Logits are
``logit_scale * normalize(image_features) @ head.T`` in float32; probabilities are their
softmax over the served classes. The image tower runs under bf16 autocast on CUDA
(``precision="auto"``), in float32 on the CPU; ``bf16`` forces autocast anywhere.

Images are fetched (URLs), decoded with the project's one decoder
(``saft.data.images.load_rgb``: EXIF orientation, 16-bit, alpha, palettes), resized and
cropped in a thread pool (Pillow releases the GIL for that work) and handed over as
8-bit tensors. The float conversion and normalisation (the preprocess's ``ToTensor`` and
``Normalize``, the same arithmetic) happen on the whole batch in the inference thread, on
the device: no torch kernel runs in the decode threads, whose OpenMP teams would otherwise
compete with the model's for the same cores (measured: concurrent requests on 2 cores
were several times slower), and a GPU receives a quarter of the bytes.
:class:`Batcher` gathers images of concurrent requests into one forward pass of at most
``max_batch`` images, waiting at most ``max_wait_s`` for company, so a GPU under many
small requests still runs full batches.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from saft.serving.fetch import FetchPolicy, fetch_url
from saft.serving.protocol import ImageInput, Limits, RequestError, prediction

log = logging.getLogger(__name__)
PRECISIONS = ("auto", "fp32", "bf16")


def serving_device(name: str | None = None) -> str:
    """``name`` (``auto``, empty or None: CUDA when visible, else the CPU)."""
    if name and name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def decode_image(data: bytes, where: str, limits: Limits):
    """An RGB PIL image from bytes, refusing files over the pixel limit before decoding them."""
    from PIL import Image, UnidentifiedImageError

    from saft.data.images import ImageDecodeError, load_rgb

    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            width, height = probe.size
    except UnidentifiedImageError:
        raise RequestError(f"{where} is not a readable image: no format this server reads (PNG, JPEG, WebP, TIFF, "
                           f"BMP, GIF, ...) matches its {len(data)} bytes starting {data[:8]!r}") from None
    except Exception as exc:  # Pillow raises many types for damaged headers
        raise RequestError(f"{where} is not a readable image ({type(exc).__name__}: {exc})") from None
    if width * height > limits.max_image_pixels:
        raise RequestError(f"{where} is {width} x {height} pixels, more than the limit of "
                           f"{limits.max_image_pixels:,} pixels: send a smaller image", 413)
    try:
        return load_rgb(data, where)
    except ImageDecodeError as exc:
        raise RequestError(f"{where} is not a readable image ({exc})") from None


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
        self.autocast = autocast_dtype(self.device, precision)
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

        self.probabilities(_batch([self.prepare(Image.new("RGB", (64, 64), (128, 128, 128)))]))


def _batch(items: list) -> torch.Tensor:
    if items and isinstance(items[0], np.ndarray):
        return torch.from_numpy(np.stack(items))  # numpy copies: no torch kernel in this thread
    return torch.stack(items)


class ImagePool:
    """Fetch, decode and prepare (``Classifier.prepare``) the images of a request in worker threads."""

    def __init__(self, prepare: Callable, limits: Limits, policy: FetchPolicy, workers: int | None = None):
        self.prepare, self.limits, self.policy = prepare, limits, policy
        self.workers = workers or min(8, os.cpu_count() or 1)
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="saft-decode")

    def _one(self, item: ImageInput) -> torch.Tensor:
        where = f"instances[{item.index}]"
        data = item.data
        if data is None:
            data = fetch_url(item.url, self.policy)
            where = f"{where}.url ({item.url})"
        return self.prepare(decode_image(data, where, self.limits))

    def tensors(self, items: Sequence[ImageInput]) -> torch.Tensor:
        """The prepared batch; the first failing instance (by index) raises its RequestError."""
        futures = [self.pool.submit(self._one, item) for item in items]
        results, first_error = [], None
        for fut in futures:
            try:
                results.append(fut.result())
            except RequestError as exc:
                first_error = first_error or exc
        if first_error:
            raise first_error
        return _batch(results)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


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

    def __init__(self, classifier: Classifier, max_batch: int = 32, max_wait_s: float = 0.0):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.classifier, self.max_batch, self.max_wait_s = classifier, max_batch, max_wait_s
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
                for j, result in zip(jobs, results):
                    j.future.set_result(result)

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=30)
