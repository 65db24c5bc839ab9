"""Shared fixtures: small random-init open_clip models, a synthetic labelled set, and a
local S3 endpoint (moto's server on 127.0.0.1, so the boto3 code path is production's;
AWS settings are set per test and restored afterwards)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from services import ServiceError, start_moto
from synthetic import CLASS_NAMES, make_dataset
from torch.utils.data import TensorDataset

import saft

ARCHS = ("saft-tiny-vit", "saft-tiny-rn")


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def loaded(arch) -> saft.LoadedModel:
    return saft.load_model(arch, seed=0)


@pytest.fixture
def vit() -> saft.LoadedModel:
    return saft.load_model("saft-tiny-vit", seed=0)


@pytest.fixture
def dataset() -> TensorDataset:
    return make_dataset()


@pytest.fixture
def prompts(loaded) -> saft.ClassPrompts:
    return saft.ClassPrompts.build(loaded.tokenizer, CLASS_NAMES, ["a photo of a {}.", "a drawing of a {}."])


@pytest.fixture
def vit_prompts(vit) -> saft.ClassPrompts:
    return saft.ClassPrompts.build(vit.tokenizer, CLASS_NAMES, ["a photo of a {}."])


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1:<free port>, stopped by its pid at session end."""
    pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    try:
        service = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    except ServiceError as exc:
        pytest.fail(str(exc))
    try:
        yield service.url.removesuffix("/moto-api/")
    finally:
        service.stop()


@pytest.fixture
def s3_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """AWS settings pointing at the local endpoint for one test (restored afterwards)."""
    for key in list(os.environ):
        if key.startswith("AWS_") or key.upper().endswith("_PROXY"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("SAFT_CACHE_DIR", str(tmp_path / "blob-cache"))
    return moto_endpoint


@pytest.fixture
def s3_bucket(s3_env: str):
    """A fresh bucket on the local endpoint; returns (boto3 client, bucket name)."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_env)
    name = f"saft-test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return client, name
