"""The batched classifier: dynamic batches give the same answers, bf16 path, the project's decoder."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from serving_support import shape_images

from saft.serving.bundle import HEAD_FILE, MODEL_REF_FILE, load_classifier, read_reference
from saft.serving.fetch import FetchPolicy
from saft.serving.predictor import Batcher, ImagePool, autocast_dtype
from saft.serving.protocol import ImageInput, Limits, RequestError


@pytest.fixture(scope="module")
def classifiers(served_folder):
    artifacts = served_folder / "model" / "artifacts"
    ref = read_reference(artifacts / MODEL_REF_FILE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFT_CACHE_DIR", str(served_folder / "cache"))
        return {p: load_classifier(ref, artifacts / "delta.safetensors", artifacts / HEAD_FILE, precision=p)
                for p in ("fp32", "bf16")}


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pixels(classifiers):
    return torch.stack([classifiers["fp32"].preprocess(im) for im in shape_images(10)])


def test_prepared_bytes_normalise_to_the_preprocess_exactly(classifiers) -> None:
    """Decode threads hand over 8-bit pixels; ToTensor + Normalize happen on the batch, same arithmetic."""
    classifier = classifiers["fp32"]
    images = shape_images(3)
    prepared = torch.from_numpy(np.stack([classifier.prepare(im) for im in images]))
    assert prepared.dtype == torch.uint8
    assert torch.equal(classifier._normalise(prepared), torch.stack([classifier.preprocess(im) for im in images]))
    assert torch.allclose(classifier.probabilities(prepared),
                          classifier.probabilities(torch.stack([classifier.preprocess(im) for im in images])))


def test_concurrent_requests_share_forward_passes_and_get_their_own_rows(classifiers, pixels) -> None:
    classifier = classifiers["fp32"]
    expected = classifier.probabilities(pixels)
    batcher = Batcher(classifier, max_batch=8, max_wait_s=0.2)
    try:
        singles = [batcher.submit(pixels[i:i + 1], 5)[0] for i in range(6)]  # six requests of one image
        got = [f.result(timeout=30)[0] for f in singles]
        assert batcher.batches < 6 and batcher.images_seen == 6
        for row, want in zip(got, classifier.top_k(expected[:6], 5)):
            assert row["labels"] == want["labels"] and row["probabilities"] == pytest.approx(want["probabilities"])
        chunks = batcher.submit(pixels, 2)  # ten images: two forward passes of at most eight
        assert [len(f.result(timeout=30)) for f in chunks] == [8, 2]
        rows = [row for f in chunks for row in f.result()]
        assert [r["labels"] for r in rows] == [r["labels"] for r in classifier.top_k(expected, 2)]
    finally:
        batcher.close()
    top = classifier.top_k(expected[:2], 3)
    for row, probs in zip(top, expected[:2]):
        assert row["probabilities"] == sorted(row["probabilities"], reverse=True)
        assert row["labels"][0] == classifier.classes[int(probs.argmax())]
        assert row["probabilities"][0] == pytest.approx(float(probs.max()))


def test_bf16_is_the_gpu_default_and_agrees_with_fp32(classifiers, pixels) -> None:
    assert autocast_dtype(torch.device("cuda"), "auto") is torch.bfloat16
    assert autocast_dtype(torch.device("cpu"), "auto") is None
    assert classifiers["bf16"].autocast is torch.bfloat16  # the CUDA code path, run on the CPU here
    fp32, bf16 = classifiers["fp32"].probabilities(pixels), classifiers["bf16"].probabilities(pixels)
    assert bf16.dtype == torch.float32 and torch.allclose(bf16.sum(-1), torch.ones(len(pixels)), atol=1e-5)
    assert (fp32 - bf16).abs().max() < 0.05
    assert (fp32.argmax(-1) == bf16.argmax(-1)).float().mean() >= 0.9
    with pytest.raises(ValueError, match="precision"):
        autocast_dtype(torch.device("cpu"), "fp8")


def test_images_go_through_the_projects_decoder(classifiers, monkeypatch) -> None:
    """A 16-bit PNG is scaled to 8 bits, not clipped white; the call is saft.data.images.load_rgb."""
    import saft.data.images as images

    classifier = classifiers["fp32"]
    calls = []
    real = images.load_rgb
    monkeypatch.setattr(images, "load_rgb", lambda data, name=None: calls.append(name) or real(data, name))
    wide = Image.fromarray((np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16))
    data = _png(wide)
    pool = ImagePool(classifier.prepare, Limits(), FetchPolicy(), workers=2)
    try:
        got = classifier._normalise(pool.tensors([ImageInput(0, data=data)]))[0]
    finally:
        pool.close()
    assert calls == ["instances[0]"]
    assert torch.equal(got, classifier.preprocess(real(data)))
    assert not torch.equal(got, classifier.preprocess(wide.convert("RGB")))  # Pillow's own convert clips


def test_oversized_and_undecodable_images_are_refused_before_decoding(classifiers, monkeypatch) -> None:
    import saft.data.images as images

    classifier = classifiers["fp32"]
    monkeypatch.setattr(images, "load_rgb", lambda *a, **k: pytest.fail("decoded an image it should refuse"))
    pool = ImagePool(classifier.prepare, Limits(max_image_pixels=100 * 100), FetchPolicy(), workers=2)
    try:
        big = ImageInput(1, data=_png(Image.new("RGB", (200, 120))))
        junk = ImageInput(0, data=b"GIF89a but not really")
        with pytest.raises(RequestError) as err:
            pool.tensors([junk, big])
        assert err.value.status == 400 and "instances[0]" in str(err.value)  # the first failing instance
        with pytest.raises(RequestError) as err:
            pool.tensors([big])
        assert err.value.status == 413 and "200 x 120 pixels" in str(err.value)
    finally:
        pool.close()
