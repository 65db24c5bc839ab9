"""Constants and helpers shared by the tracking tests (conftest.py holds only fixtures).

A module of its own, because several test folders have a conftest.py and a plain
``from conftest import ...`` would pick whichever was imported first.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from services import Service

AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
SUITE = "mini-shift"
FEW_SHOT = 8  # training images per class
TEST_PER_CLASS = 20
ALPHA = 0.5  # the registered candidate: base + 0.5 * delta (ID up, OOD kept on this world)


@dataclass(frozen=True)
class Candidate:
    root: Path
    data_dir: Path
    mask: Path
    mask_stats: Path
    delta: Path
    history: Path
    eval_dir: Path

    @property
    def metrics(self) -> Path:
        return self.eval_dir / "metrics.json"

    def doc(self) -> dict:
        return json.loads(self.metrics.read_text())

    def classes(self) -> list[str]:
        return json.loads((self.data_dir / "classes.json").read_text())


@dataclass(frozen=True)
class MlflowServer:
    url: str
    bucket: str
    s3_endpoint: str
    log: Path

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.url)

    def s3_keys(self, prefix: str = "mlflow/") -> list[str]:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.s3_endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        keys, token = [], None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = s3.list_objects_v2(**kwargs)
            keys += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return keys
            token = page["NextContinuationToken"]


def stop_service(service: Service) -> None:
    """Stop the process by its pid, then anything it forked (its own session, pgid == pid)."""
    service.stop()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(service.process.pid, signal.SIGKILL)


def shifted_document(doc: dict, *, ood: float = 0.0, id: float = 0.0, model: str = "saft", alpha: float = ALPHA,
                     rename: str | None = None, suite: str | None = None) -> dict:
    """A metrics document derived from a real one: ``model``@``alpha``'s ID/OOD top-1 moved by
    ``id``/``ood`` (clamped to [0, 1]), optionally renamed or on another suite; aggregates recomputed."""
    from dataclasses import replace

    from saft.eval.metrics import metrics_document, records_from_document

    records = []
    for r in records_from_document(doc):
        if r.model == model and r.alpha == alpha:
            shift = ood if r.role == "ood" else id if r.role == "id" else 0.0
            r = replace(r, top1=min(1.0, max(0.0, r.top1 + shift)), model=rename or r.model)
        records.append(r)
    meta = {**doc["meta"], **({"suite": suite} if suite else {})}
    return metrics_document(records, meta)


def png_b64(image) -> str:
    """A PIL image as the base64 PNG text a served model takes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_document(path: Path, doc: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path
