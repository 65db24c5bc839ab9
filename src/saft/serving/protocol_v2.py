"""KServe's V2 protocol (the Open Inference Protocol, OIP) for the served image classifier.

The model has one input and two outputs (``GET /v2/models/NAME`` says the same)::

    input   image          BYTES  [-1]      one encoded image file (PNG, JPEG, ...) per element
    output  labels         BYTES  [-1, -1]  the top k class names of each image, most probable first
    output  probabilities  FP32   [-1, -1]  their probabilities

Request (``POST /v2/models/NAME/infer``), JSON form: BYTES elements are base64 text, as
KServe's own custom predictors read them::

    {"id": "42", "inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                             "data": ["<base64 PNG>", "<base64 JPEG>"]}],
     "parameters": {"top_k": 3}, "outputs": [{"name": "labels"}]}

Binary form (the OIP's binary tensor data extension; what KServe's Python client sends for
``InferInput.set_data_from_numpy`` with its default ``binary_data=True``): the body is the
JSON header followed by the tensor's bytes, the header ``Inference-Header-Content-Length``
gives the JSON's length, the input carries ``"parameters": {"binary_data_size": N}`` and no
``data``, and each BYTES element is a 4-byte little-endian length followed by the file.

``shape`` is ``[N]`` (or ``[N, 1]``); ``data`` is flat or nested by that shape. ``id``,
``outputs`` and ``parameters`` are optional; so are ``model_name`` and ``model_version``,
which KServe's client puts in the body (the URL names the model). Outputs are always
JSON: ``binary_data_output`` / an output's ``binary_data`` set to true are refused.

Response::

    {"model_name": "saft-tiny", "model_version": "4", "id": "42",
     "outputs": [{"name": "labels", "datatype": "BYTES", "shape": [2, 3], "data": ["star", "ring", ...]},
                 {"name": "probabilities", "datatype": "FP32", "shape": [2, 3], "data": [0.83, 0.09, ...]}]}

Refusals are ``{"error": "..."}`` with the statuses of :mod:`saft.serving.protocol`.
"""

from __future__ import annotations

from saft.serving.protocol import (ImageInput, Limits, PredictRequest, RequestError, check_fields, check_body_size,
                                   check_count, check_top_k, decode_b64, default_top_k, load_json)

INPUT = "image"
LABELS, PROBABILITIES = "labels", "probabilities"
OUTPUTS = (LABELS, PROBABILITIES)
PLATFORM = "pytorch_saft"
BINARY_EXTENSION = "binary_tensor_data"
HEADER_LENGTH = "inference-header-content-length"  # HTTP headers are case-insensitive
REQUEST_FIELDS = ("id", "inputs", "outputs", "parameters", "model_name", "model_version")
INPUT_FIELDS = ("name", "shape", "datatype", "parameters", "data")
OUTPUT_FIELDS = ("name", "parameters")
REQUEST_PARAMETERS = ("top_k", "binary_data_output")
INPUT_PARAMETERS = ("binary_data_size",)
OUTPUT_PARAMETERS = ("binary_data",)
MAX_ID = 256


def server_metadata(version: str) -> dict:
    return {"name": "saft", "version": version, "extensions": [BINARY_EXTENSION]}


def model_metadata(name: str, version: str | None) -> dict:
    doc = {"name": name, "platform": PLATFORM,
           "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
           "outputs": [{"name": LABELS, "datatype": "BYTES", "shape": [-1, -1]},
                       {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, -1]}]}
    if version:
        doc["versions"] = [version]
    return doc


def header_length(value: str | None, body_size: int) -> int | None:
    """The JSON length an ``Inference-Header-Content-Length`` header gives, checked against the body."""
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit() or len(text) > 19:
        raise RequestError(f"the Inference-Header-Content-Length header must be the byte length of the JSON header, "
                           f"got {value[:40]!r}")
    length = int(text)
    if length > body_size:
        raise RequestError(f"the Inference-Header-Content-Length header says {length} bytes of JSON, but the body has "
                           f"{body_size}")
    return length


def _object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise RequestError(f"{where} must be a JSON object, got {type(value).__name__}")
    return value


def _int(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RequestError(f"{where} must be a non-negative integer, got {value!r}")
    return value


def _json_outputs_only(value, where: str) -> None:
    if not isinstance(value, bool):
        raise RequestError(f"{where} must be true or false, got {value!r}")
    if value:
        raise RequestError(f"{where}: this server answers outputs as JSON only; leave it out or set it to false")


def _requested_outputs(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        raise RequestError('"outputs" must be a non-empty list like [{"name": "labels"}]')
    names = []
    for i, item in enumerate(value):
        where = f"outputs[{i}]"
        item = _object(item, where)
        check_fields(item, OUTPUT_FIELDS, where)
        name = item.get("name")
        if name not in OUTPUTS:
            raise RequestError(f"{where}.name is {name!r}; this model's outputs are {', '.join(map(repr, OUTPUTS))}")
        params = _object(item.get("parameters", {}), f"{where}.parameters")
        check_fields(params, OUTPUT_PARAMETERS, f"{where}.parameters")
        if "binary_data" in params:
            _json_outputs_only(params["binary_data"], f"{where}.parameters.binary_data")
        if name not in names:
            names.append(name)
    return tuple(names)


def _shape(value, limits: Limits) -> tuple[int, list[int]]:
    where = "inputs[0].shape"
    if not isinstance(value, list) or not value:
        raise RequestError(f"{where} must be a list of integers like [2], got {value!r}")
    dims = [_int(d, where) for d in value]
    if len(dims) > 2 or (len(dims) == 2 and dims[1] != 1):
        raise RequestError(f"{where} is {dims}; images go as [N] (or [N, 1]): one encoded file per element")
    if dims[0] < 1:
        raise RequestError(f"{where} is {dims}: send at least one image")
    check_count(dims[0], limits, "images")
    return dims[0], dims


def _flat(data, n: int, dims: list[int]) -> list:
    """The ``n`` elements of ``data``, given flat (row-major) or nested by ``dims``."""
    if not isinstance(data, list):
        raise RequestError(f"inputs[0].data must be a list of base64 strings, got {type(data).__name__}")
    flat = []
    for i, element in enumerate(data):
        if isinstance(element, list):
            if len(dims) != 2 or len(element) != 1:
                raise RequestError(f"inputs[0].data[{i}] is a list; for shape {dims} give the elements flat "
                                   '(["<base64>", ...])')
            element = element[0]
        flat.append(element)
    if len(flat) != n:
        raise RequestError(f"inputs[0].shape {dims} says {n} element{'s' if n != 1 else ''}, data has {len(flat)}")
    return flat


def _split_bytes(view: memoryview, n: int, limits: Limits) -> list[bytes]:
    """The ``n`` elements of a binary BYTES tensor: each a 4-byte little-endian length, then the bytes."""
    elements, offset = [], 0
    for i in range(n):
        where = f"inputs[0] element {i} (binary data)"
        if offset + 4 > len(view):
            raise RequestError(f"{where}: the binary data ends after {i} of {n} elements")
        size = int.from_bytes(view[offset:offset + 4], "little")
        offset += 4
        if size == 0:
            raise RequestError(f"{where} is empty: expected an encoded image file")
        if size > limits.max_image_bytes:
            raise RequestError(f"{where}: the image is {size / 2**20:.1f} MiB, more than the "
                               f"{limits.max_image_bytes / 2**20:g} MiB limit per image", 413)
        if offset + size > len(view):
            raise RequestError(f"{where} declares {size} bytes but only {len(view) - offset} follow")
        elements.append(bytes(view[offset:offset + size]))
        offset += size
    if offset != len(view):
        raise RequestError(f"inputs[0]: {len(view) - offset} bytes follow its {n} binary elements")
    return elements


def parse_infer_request(body: bytes, limits: Limits, n_classes: int, json_length: int | None = None) -> PredictRequest:
    """Validate a V2 inference request completely, before any image is decoded.

    ``json_length`` is the ``Inference-Header-Content-Length`` (:func:`header_length`) of a
    request in the binary form, else None.
    """
    check_body_size(len(body), limits)
    view = memoryview(body)
    binary = view[json_length:] if json_length is not None else view[:0]
    try:
        doc = load_json(view[:json_length] if json_length is not None else view, limits,
                        "the JSON header" if json_length is not None else "request body")
    except RequestError as exc:
        if json_length is None and "not valid JSON" in str(exc):
            raise RequestError(f"{exc}; a body in the binary tensor data form (JSON, then tensor bytes) needs the "
                               "Inference-Header-Content-Length header giving the length of its JSON part") from None
        raise
    if not isinstance(doc, dict):
        raise RequestError('request body must be a JSON object: {"inputs": [{"name": "image", ...}]}')
    check_fields(doc, REQUEST_FIELDS, "request")
    request_id = doc.get("id")
    if request_id is not None and (not isinstance(request_id, str) or len(request_id) > MAX_ID):
        raise RequestError(f'"id" must be a string of at most {MAX_ID} characters')
    for key in ("model_name", "model_version"):
        if key in doc and not isinstance(doc[key], str):
            raise RequestError(f'"{key}" must be a string (the URL names the model; this field is not needed)')
    params = _object(doc.get("parameters", {}), "parameters")
    check_fields(params, REQUEST_PARAMETERS, "parameters")
    top_k = check_top_k(params["top_k"], n_classes) if "top_k" in params else default_top_k(n_classes)
    if "binary_data_output" in params:
        _json_outputs_only(params["binary_data_output"], "parameters.binary_data_output")
    outputs = _requested_outputs(doc.get("outputs"))

    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise RequestError(f'"inputs" must be a list of exactly one input, {{"name": "{INPUT}", "datatype": "BYTES", '
                           '"shape": [N], "data": [...]}: this model takes its images in one tensor')
    tensor = _object(inputs[0], "inputs[0]")
    check_fields(tensor, INPUT_FIELDS, "inputs[0]")
    if tensor.get("name") != INPUT:
        raise RequestError(f"inputs[0].name is {tensor.get('name')!r}; this model's input is {INPUT!r} (BYTES, one "
                           "encoded image file per element)")
    if tensor.get("datatype") != "BYTES":
        raise RequestError(f"inputs[0].datatype is {tensor.get('datatype')!r}; images go as \"BYTES\" (encoded files, "
                           "not pixel arrays)")
    n, dims = _shape(tensor.get("shape"), limits)
    tensor_params = _object(tensor.get("parameters", {}), "inputs[0].parameters")
    check_fields(tensor_params, INPUT_PARAMETERS, "inputs[0].parameters")
    if ("data" in tensor) == ("binary_data_size" in tensor_params):
        raise RequestError("inputs[0] needs either \"data\" (base64 strings) or \"parameters\": {\"binary_data_size\": "
                           "N} with the bytes after the JSON header, not both and not neither")
    if "data" in tensor:
        if json_length is not None and len(binary):
            raise RequestError(f"{len(binary)} bytes follow the JSON header, but no input declares binary_data_size")
        files = [decode_b64(text, f"inputs[0].data[{i}]", limits) for i, text in enumerate(_flat(tensor["data"], n, dims))]
    else:
        size = _int(tensor_params["binary_data_size"], "inputs[0].parameters.binary_data_size")
        if json_length is None:
            raise RequestError("inputs[0] declares binary_data_size, but the request has no "
                               "Inference-Header-Content-Length header giving the length of its JSON part")
        if size != len(binary):
            raise RequestError(f"inputs[0].parameters.binary_data_size is {size}, but {len(binary)} bytes follow the "
                               "JSON header")
        files = _split_bytes(binary, n, limits)
    return PredictRequest([ImageInput(i, data=f) for i, f in enumerate(files)], top_k, request_id, outputs)


def infer_response(model_name: str, version: str | None, request: PredictRequest, rows: list[dict]) -> dict:
    """The inference response of ``rows`` (``{"labels", "probabilities"}`` per image, top k each)."""
    shape = [len(rows), request.top_k]
    tensors = {LABELS: {"name": LABELS, "datatype": "BYTES", "shape": shape,
                        "data": [label for row in rows for label in row["labels"]]},
               PROBABILITIES: {"name": PROBABILITIES, "datatype": "FP32", "shape": shape,
                               "data": [p for row in rows for p in row["probabilities"]]}}
    doc: dict = {"model_name": model_name}
    if version:
        doc["model_version"] = version
    if request.request_id is not None:
        doc["id"] = request.request_id
    doc["outputs"] = [tensors[name] for name in request.outputs or OUTPUTS]
    return doc
