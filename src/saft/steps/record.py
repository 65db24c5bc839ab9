"""Skipping re-runs: a step's output folder remembers what produced it.

Each step writes ``step.json`` beside its outputs: the step name, a key (sha256 over
the step's parameters and the bytes of its input files) and the list of outputs. A
later call with the same key finds every output in place and returns the recorded
summary instead of recomputing; any change of parameters or input bytes, or a missing
output, runs the step again. ``step.json`` is written last, after every output has been
renamed into place, so a crash mid-step never leaves a record that claims it finished.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable

from saft.io import write_json
from saft.sparse.distributed import SINGLE, Dist
from saft.layout import STEP_RECORD

RECORD_FILE = STEP_RECORD


def content_hash(paths: Iterable[str | Path]) -> str:
    """sha256 over the files (folders: every file below, by relative path) in order."""
    digest = hashlib.sha256()
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: input of a step does not exist")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            if f.name == RECORD_FILE:
                continue
            digest.update(f.relative_to(path).as_posix().encode() if path.is_dir() else f.name.encode())
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def step_key(step: str, params: dict, inputs: Iterable[str | Path] = ()) -> str:
    blob = json.dumps({"step": step, "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(f"{blob}|{content_hash(inputs)}".encode()).hexdigest()


def _up_to_date(out: Path, key: str) -> dict | None:
    record_path = out / RECORD_FILE
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError:
        return None
    if record.get("key") == key and all((out / o).exists() for o in record.get("outputs", [])):
        return record
    return None


def run_once(step: str, out_dir: str | Path, params: dict, inputs: Iterable[str | Path], outputs: list[str],
             compute: Callable[[], dict], *, log: Callable[[str], None] | None = None, dist: Dist = SINGLE) -> dict:
    """``compute()`` unless ``out_dir`` already holds this step's outputs for the same key.

    Under ``dist`` (a step run by torchrun) rank 0 decides for every rank whether the step
    is up to date, every rank computes, and rank 0 alone checks the outputs and writes
    the record (``compute`` writes outputs on rank 0 only).
    """
    out = Path(out_dir)
    key = step_key(step, params, list(inputs))
    record_path = out / RECORD_FILE
    record = _up_to_date(out, key) if dist.is_main else None
    if dist.broadcast_flag(record is not None):
        if log and dist.is_main:
            log(f"{step}: up to date in {out} (same inputs and parameters), skipped")
        record = record or json.loads(record_path.read_text())
        return {**record.get("summary", {}), "skipped": True}
    if dist.is_main and record_path.is_file():
        record_path.unlink()  # outputs are about to change; the old record no longer describes them
    summary = compute()
    dist.barrier()  # rank 0's outputs are in place
    if dist.is_main:
        missing = [o for o in outputs if not (out / o).exists()]
        if missing:
            raise RuntimeError(f"{step}: finished without writing {', '.join(missing)} in {out}")
        write_json(record_path, {"step": step, "key": key, "params": params, "outputs": outputs, "summary": summary})
    return {**summary, "skipped": False}
