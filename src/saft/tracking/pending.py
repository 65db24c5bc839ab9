"""Runs that could not be closed because the store was down, closed when it answers again.

A step that fails because the tracking store went away cannot mark its run FAILED on
that store. Instead the run's id, the status it should have and the error are written
to a small journal on this machine (``$SAFT_CACHE_DIR/tracking/unclosed-runs.json``,
default ``~/.cache/saft``); the next tracking connection to the same store, from any
process (the retried step, the next command), closes them first. The journal holds no
credentials: a store is named by its redacted URI.

On a cluster, where the retried step runs in a fresh pod, the pipeline's last task closes
what its steps left open instead (``runs.close_orphans``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

JOURNAL = "unclosed-runs.json"


def journal_path() -> Path:
    base = os.environ.get("SAFT_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "saft") / "tracking" / JOURNAL


@contextlib.contextmanager
def _locked() -> Iterator[list[dict]]:
    """The journal's entries, under an exclusive lock; what the block leaves in the list is written back."""
    path = journal_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            try:
                entries = json.loads(path.read_text()) if path.is_file() else []
            except (OSError, ValueError):
                entries = []
            before = json.dumps(entries, sort_keys=True)
            yield entries
            if json.dumps(entries, sort_keys=True) != before:
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
                os.replace(tmp, path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def remember(store: str, run_id: str, status: str, error: str) -> None:
    """Record that ``run_id`` on ``store`` (a redacted URI) should end ``status``; never raises."""
    try:
        with _locked() as entries:
            entries[:] = [e for e in entries if not (e.get("store") == store and e.get("run_id") == run_id)]
            entries.append({"store": store, "run_id": run_id, "status": status, "error": error[:2000],
                            "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()})
        log.warning("run %s stays open on %s until the store answers again: the next tracking call closes it %s",
                    run_id, store, status)
    except OSError as exc:
        log.warning("could not record the unclosed run %s (%s): close it by hand as %s", run_id, exc, status)


def pending(store: str) -> list[dict]:
    try:
        with _locked() as entries:
            return [dict(e) for e in entries if e.get("store") == store]
    except OSError:
        return []


def close_pending(client, store: str) -> list[str]:
    """Close the journal's runs on ``store`` that are still RUNNING; returns their ids. Quiet on failure."""
    closed = []
    try:
        with _locked() as entries:
            keep = []
            for entry in entries:
                if entry.get("store") != store:
                    keep.append(entry)
                    continue
                try:
                    run = client.get_run(entry["run_id"])
                    if run.info.status == "RUNNING":
                        client.set_tag(entry["run_id"], "saft.error", entry.get("error", "")[:4000])
                        client.set_terminated(entry["run_id"], entry.get("status", "FAILED"))
                        closed.append(entry["run_id"])
                except Exception as exc:  # noqa: BLE001 - the store is still away, or the run is gone
                    if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                        keep.append(entry)
            entries[:] = keep
    except OSError as exc:
        log.warning("could not read the journal of unclosed runs %s: %s", journal_path(), exc)
    for run_id in closed:
        log.warning("closed run %s on %s, left open when the store was unreachable", run_id, store)
    return closed
