"""Request parsing: every refusal names what is wrong and carries the right 4xx status."""

from __future__ import annotations

import base64
import json

import pytest

from saft.serving.protocol import Limits, RequestError, example_image_b64, parse_request

LIMITS = Limits(max_body_bytes=4096, max_instances=3, max_image_bytes=1024)


def _parse(doc, n_classes: int = 5, limits: Limits = LIMITS):
    return parse_request(json.dumps(doc).encode(), limits, n_classes)


def _refused(doc, status: int, *needles: str, raw: bytes | None = None) -> None:
    with pytest.raises(RequestError) as err:
        parse_request(raw, LIMITS, 5) if raw is not None else _parse(doc)
    assert err.value.status == status, str(err.value)
    for needle in needles:
        assert needle in str(err.value)


def test_a_valid_request_gives_decoded_bytes_urls_and_top_k() -> None:
    image = example_image_b64(8)
    wrapped = "\n".join(image[i:i + 76] for i in range(0, len(image), 76))  # as `base64` prints it
    req = _parse({"instances": [{"b64": image}, {"url": "http://img.example/a.png"},
                                {"b64": "data:image/png;base64," + wrapped}], "parameters": {"top_k": 2}})
    assert req.top_k == 2
    assert [i.index for i in req.images] == [0, 1, 2]
    assert req.images[0].data == base64.b64decode(image) == req.images[2].data
    assert req.images[1].url == "http://img.example/a.png" and req.images[1].data is None
    assert _parse({"instances": [{"b64": image}]}, n_classes=3).top_k == 3  # default 5, capped by the class count


@pytest.mark.parametrize("doc, status, needles", [
    ({"instances": [{"b64": "AAAA"}], "extra": 1}, 400, ["unknown field", "'extra'"]),
    ({"instances": [{"b64": "AAAA", "caption": "x"}]}, 400, ["instances[0]", "'caption'"]),
    ({"instances": [{"b64": "AAAA"}], "parameters": {"top_k": 2, "temperature": 1}}, 400, ["'temperature'"]),
    ({"instances": []}, 400, ["non-empty list"]),
    ({"inputs": [1]}, 400, ["unknown field", "'inputs'"]),
    ([1, 2], 400, ["JSON object"]),
    ({"instances": ["AAAA"]}, 400, ["instances[0] must be an object"]),
    ({"instances": [{"b64": "AAAA", "url": "http://x/y"}]}, 400, ["exactly one"]),
    ({"instances": [{"b64": "not base64!"}]}, 400, ["instances[0].b64", "not valid base64"]),
    ({"instances": [{"b64": ""}]}, 400, ["empty"]),
    ({"instances": [{"b64": 12}]}, 400, ["base64 text"]),
    ({"instances": [{"url": ""}]}, 400, ["non-empty string"]),
    ({"instances": [{"b64": "AAAA"}], "parameters": {"top_k": 0}}, 400, ["from 1 to 5"]),
    ({"instances": [{"b64": "AAAA"}], "parameters": {"top_k": 6}}, 400, ["5 classes"]),
    ({"instances": [{"b64": "AAAA"}], "parameters": {"top_k": True}}, 400, ["integer"]),
    ({"instances": [{"b64": "AAAA"}], "parameters": {"top_k": 2.0}}, 400, ["integer"]),
    ({"instances": [{"b64": "AAAA"}] * 4}, 413, ["4 instances", "limit of 3"]),
    ({"instances": [{"b64": "A" * 2000}]}, 413, ["per image"]),
])
def test_bad_requests_are_refused_with_a_reason(doc, status, needles) -> None:
    _refused(doc, status, *needles)


def test_bodies_that_are_not_json_or_too_large_are_refused() -> None:
    _refused(None, 400, "not valid JSON", raw=b"{not json")
    _refused(None, 400, "not valid JSON", raw=b"\xff\xfe")
    _refused(None, 413, "MiB limit", raw=b" " * 5000)


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_instances"):
        Limits(max_instances=0)


@pytest.mark.parametrize("raw, needle", [
    (b"[" * 100_000, "JSON objects, arrays and separators"),  # deep nesting, refused before parsing
    (b"[{}" + b",{}" * 5_000_000 + b"]", "JSON objects, arrays and separators"),  # millions of objects from 20 MB
    (b'{"instances": [{"b64": "AAAA"}], "parameters": {"top_k": ' + b"7" * 5000 + b"}}", "5000 digits"),
    (b'{"instances": [{"b64": "AAAA"}], "parameters": {"top_k": -' + b"7" * 40 + b"}}", "40 digits"),
    (b'{"instances": [{"b64": "AAAA"}], "parameters": {"top_k": 1e400}}', "integer"),
    (b'{"instances": [{"b64": "AAAA"}], "parameters": {"top_k": NaN}}', "integer"),
    (b'{"instances": {"b64": "AAAA"}}', "non-empty list"),
    (b'{"instances": [[{"b64": "AAAA"}]]}', "must be an object"),
    (b'{"instances": [{"b64": ["AAAA"]}]}', "base64 text"),
    (b'{"instances": [{"url": {"href": "x"}}]}', "non-empty string"),
    (b'"instances"', "JSON object"),
    (b"null", "JSON object"),
    (b"", "not valid JSON"),
    (b'{"instances": [{"b64": "AAAA"}]', "not valid JSON"),
    (b'{"instances": [{"b64": "\xff\xfe"}]}', "not valid JSON"),
])
def test_json_of_any_shape_is_a_400(raw, needle) -> None:
    limits = Limits(max_body_bytes=64 << 20)
    with pytest.raises(RequestError) as err:
        parse_request(raw, limits, 5)
    assert err.value.status == 400 and needle in str(err.value), str(err.value)


def test_nesting_too_deep_for_the_parser_is_a_400_too() -> None:
    """With a structure budget large enough to reach the parser's own recursion limit."""
    limits = Limits(max_instances=100_000)
    with pytest.raises(RequestError, match="nested too deeply"):
        parse_request(b"[" * 50_000 + b"]" * 50_000, limits, 5)
