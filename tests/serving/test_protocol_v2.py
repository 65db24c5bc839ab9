"""The V2 Open Inference Protocol's request forms (JSON and binary tensor data) and every refusal."""

from __future__ import annotations

import base64
import json
import struct

import pytest

from saft.serving.protocol import Limits, PredictRequest, RequestError, example_image_b64
from saft.serving.protocol_v2 import (OUTPUTS, header_length, infer_response, model_metadata,
                                      parse_infer_request)

LIMITS = Limits(max_body_bytes=1 << 16, max_instances=3, max_image_bytes=2048)
IMAGE = example_image_b64(8)
RAW = base64.b64decode(IMAGE)


def _doc(**changes) -> dict:
    tensor = {"name": "image", "shape": [2], "datatype": "BYTES", "data": [IMAGE, IMAGE]}
    tensor.update(changes.pop("tensor", {}))
    doc = {"id": "r1", "inputs": [tensor], "parameters": {"top_k": 2}}
    doc.update(changes)
    return doc


def _parse(doc, n_classes: int = 5):
    return parse_infer_request(json.dumps(doc).encode(), LIMITS, n_classes)


def _binary(files: list[bytes], extra: bytes = b"", size: int | None = None, **changes) -> tuple[bytes, int]:
    """A body in the binary tensor data form: JSON header, then each file as <uint32 LE length><bytes>."""
    tensor = b"".join(struct.pack("<I", len(f)) + f for f in files) + extra
    doc = {"inputs": [{"name": "image", "shape": [len(files)], "datatype": "BYTES",
                       "parameters": {"binary_data_size": len(tensor) if size is None else size}}]}
    doc.update(changes)
    head = json.dumps(doc, separators=(",", ":")).encode()
    return head + tensor, len(head)


def test_the_json_form_flat_and_nested_and_the_binary_form_give_the_same_images() -> None:
    flat = _parse(_doc())
    assert [i.data for i in flat.images] == [RAW, RAW] and flat.top_k == 2 and flat.request_id == "r1"
    assert flat.outputs == ()
    nested = _parse(_doc(tensor={"shape": [2, 1], "data": [[IMAGE], [IMAGE]]}))
    assert [i.data for i in nested.images] == [RAW, RAW]
    body, length = _binary([RAW, RAW[:-1] + b"x"])
    binary = parse_infer_request(body, LIMITS, 5, length)
    assert [i.data for i in binary.images] == [RAW, RAW[:-1] + b"x"] and [i.index for i in binary.images] == [0, 1]
    assert binary.top_k == 5  # default: min(5, classes)
    # what KServe's client adds to the body is accepted
    assert _parse(_doc(model_name="saft-tiny", model_version="3", outputs=[{"name": "labels"}])).outputs == ("labels",)


@pytest.mark.parametrize("doc, needles", [
    (_doc(extra=1), ["unknown field", "'extra'"]),
    (_doc(inputs=[]), ["exactly one input"]),
    (_doc(inputs="image"), ["exactly one input"]),
    (_doc(tensor={"name": "input-0"}), ["'input-0'", "'image'"]),
    (_doc(tensor={"datatype": "FP32"}), ["'FP32'", "BYTES"]),
    (_doc(tensor={"shape": [2, 3]}), ["[N]"]),
    (_doc(tensor={"shape": "2"}), ["list of integers"]),
    (_doc(tensor={"shape": [True]}), ["non-negative integer"]),
    (_doc(tensor={"shape": [0], "data": []}), ["at least one image"]),
    (_doc(tensor={"shape": [3]}), ["says 3 elements, data has 2"]),
    (_doc(tensor={"data": {"0": IMAGE}}), ["must be a list"]),
    (_doc(tensor={"data": [IMAGE, 7]}), ["inputs[0].data[1]", "base64 text"]),
    (_doc(tensor={"data": [IMAGE, "not base64!"]}), ["inputs[0].data[1]", "not valid base64"]),
    (_doc(tensor={"data": [[IMAGE], [IMAGE]]}), ["give the elements flat"]),
    (_doc(tensor={"caption": "x"}), ["inputs[0]", "'caption'"]),
    (_doc(tensor={"parameters": {"content_type": "str"}}), ["'content_type'"]),
    (_doc(tensor={"parameters": {"binary_data_size": 4}}), ["not both"]),
    (_doc(parameters={"top_k": 6}), ["5 classes"]),
    (_doc(parameters={"top_k": "3"}), ["integer"]),
    (_doc(parameters={"topk": 3}), ["'topk'"]),
    (_doc(parameters=[1]), ["parameters must be a JSON object"]),
    (_doc(parameters={"binary_data_output": True}), ["JSON only"]),
    (_doc(outputs=[{"name": "logits"}]), ["'logits'", "'labels'"]),
    (_doc(outputs=[{"name": "labels", "parameters": {"binary_data": True}}]), ["JSON only"]),
    (_doc(outputs=[]), ["non-empty list"]),
    (_doc(id=42), ['"id" must be a string']),
    (_doc(id="x" * 300), ["at most 256"]),
    (_doc(model_name=["a"]), ['"model_name" must be a string']),
    ([_doc()], ["JSON object"]),
])
def test_bad_v2_requests_are_refused_with_a_reason(doc, needles) -> None:
    with pytest.raises(RequestError) as err:
        _parse(doc)
    assert err.value.status == 400, str(err.value)
    for needle in needles:
        assert needle in str(err.value)


def test_too_many_or_too_large_images_are_413() -> None:
    for doc, needle in ((_doc(tensor={"shape": [4], "data": [IMAGE] * 4}), "limit of 3"),
                        (_doc(tensor={"shape": [1], "data": ["A" * 4000]}), "per image")):
        with pytest.raises(RequestError) as err:
            _parse(doc)
        assert err.value.status == 413 and needle in str(err.value)
    body, length = _binary([b"x" * 3000])
    with pytest.raises(RequestError) as err:
        parse_infer_request(body, LIMITS, 5, length)
    assert err.value.status == 413 and "per image" in str(err.value)


def _truncated() -> tuple[bytes, int]:
    """One element declaring more bytes than follow (binary_data_size agrees with what was sent)."""
    tensor = struct.pack("<I", len(RAW) + 10) + RAW
    head = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(tensor)}}]}).encode()
    return head + tensor, len(head)


@pytest.mark.parametrize("make, needle", [
    (lambda: _binary([RAW], extra=b"zz"), "bytes follow its 1 binary elements"),
    (lambda: _binary([RAW], size=3), "binary_data_size is 3"),
    (_truncated, "declares"),
    (lambda: _binary([b""]), "is empty"),
    (lambda: _binary([RAW, RAW])[:1] + (3,), "not valid JSON"),
])
def test_bad_binary_tensors_are_refused(make, needle) -> None:
    body, length = make()
    with pytest.raises(RequestError) as err:
        parse_infer_request(body, LIMITS, 5, length)
    assert err.value.status == 400 and needle in str(err.value), str(err.value)


def test_the_binary_header_is_checked() -> None:
    body, length = _binary([RAW])
    with pytest.raises(RequestError, match="needs the Inference-Header-Content-Length header"):
        parse_infer_request(body, LIMITS, 5, None)  # the header was forgotten: the JSON part is not the body
    with pytest.raises(RequestError, match="has no Inference-Header-Content-Length header"):
        parse_infer_request(body[:length], LIMITS, 5, None)  # ... and the tensor bytes too
    assert header_length(None, 10) is None and header_length(" 7 ", 10) == 7
    for value, needle in (("-1", "byte length"), ("1e3", "byte length"), ("9" * 30, "byte length"), ("11", "has 10")):
        with pytest.raises(RequestError, match=needle):
            header_length(value, 10)
    with pytest.raises(RequestError, match="no input declares"):
        parse_infer_request(json.dumps(_doc()).encode() + b"tail", LIMITS, 5, len(json.dumps(_doc()).encode()))


def test_the_response_holds_the_outputs_asked_for_in_row_major_order() -> None:
    rows = [{"labels": ["a", "b"], "probabilities": [0.7, 0.2]}, {"labels": ["b", "a"], "probabilities": [0.6, 0.3]}]
    doc = infer_response("m", "4", PredictRequest([], 2, "r1"), rows)
    assert doc == {"model_name": "m", "model_version": "4", "id": "r1", "outputs": [
        {"name": "labels", "datatype": "BYTES", "shape": [2, 2], "data": ["a", "b", "b", "a"]},
        {"name": "probabilities", "datatype": "FP32", "shape": [2, 2], "data": [0.7, 0.2, 0.6, 0.3]}]}
    only = infer_response("m", None, PredictRequest([], 2, None, ("probabilities",)), rows)
    assert "model_version" not in only and "id" not in only  # unversioned servers leave it out (the spec)
    assert [o["name"] for o in only["outputs"]] == ["probabilities"]
    meta = model_metadata("m", "4")
    assert meta["versions"] == ["4"] and [o["name"] for o in meta["outputs"]] == list(OUTPUTS)
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
