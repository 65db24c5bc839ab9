"""A lease held in the registry itself: one writer at a time per registered model.

The promotion gate reads the champion, decides and moves the alias; registration looks
for a candidate key and creates a version. Both are read-then-write, so two overlapping
pipeline runs could interleave them (two champions in a row judged against the same
old one, two versions of one candidate). MLflow offers no compare-and-set on tags or
aliases, but creating a registered model is atomic on every store (a unique name:
SQLite and PostgreSQL refuse the second insert, the server answers
``RESOURCE_ALREADY_EXISTS``). So the lease on ``NAME`` is the registered model
``NAME.saft-lease``: created by its holder, deleted on release. Its tags say who holds
it, for what, and until when (``saft.lease.*``).

Expiry: a holder that died leaves its lease behind; once it is past its expiry (plus
``SKEW_S`` for clocks that disagree) a waiter breaks it. Breaking is itself a
create-if-absent (``NAME.saft-lease.broken-<id of the stale lease>``, left behind as a
record), so two waiters never both break one lease and delete the lease a third process
took meanwhile. A holder calls :meth:`RegistryLease.check` before each write it guards
and stops (``LeaseLost``) once its lease is within ``SKEW_S`` of expiring; it deletes
the lease on release only while it is still its own.

``SAFT_REGISTRY_LEASE_S`` (default 120) is how long a lease lasts; the sections it
guards take a few calls. ``SAFT_REGISTRY_WAIT_S`` (default 300) is how long a process
waits for one before it fails, naming the holder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import socket
import time
import uuid
from datetime import datetime, timezone

from saft.tracking.config import TrackingError, _float_env

log = logging.getLogger(__name__)

SUFFIX = ".saft-lease"
BROKEN = ".broken-"
LEASE_ENV, WAIT_ENV = "SAFT_REGISTRY_LEASE_S", "SAFT_REGISTRY_WAIT_S"
DEFAULT_LEASE_S, DEFAULT_WAIT_S = 120.0, 300.0
SKEW_S = 5.0
OWNER_TAG, EXPIRES_TAG, PURPOSE_TAG, KIND_TAG = "saft.lease.owner", "saft.lease.expires", "saft.lease.purpose", \
    "saft.kind"
_TRANSIENT = ("database is locked", "database table is locked", "deadlock", "could not serialize")


class LeaseLost(TrackingError):
    """The lease expired while its holder was still working: nothing more is written."""


def lease_name(model_name: str) -> str:
    return f"{model_name}{SUFFIX}"


def _code(exc: Exception) -> str:
    return str(getattr(exc, "error_code", ""))


def _transient(exc: Exception) -> bool:
    text = str(exc).lower()
    return any(t in text for t in _TRANSIENT)


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


class RegistryLease:
    """``with RegistryLease(client, "saft-tiny", "promotion gate of v3") as lease: ...; lease.check()``."""

    def __init__(self, client, model_name: str, purpose: str, *, ttl: float | None = None,
                 wait: float | None = None, where: str = "the MLflow registry"):
        self.client, self.model_name, self.purpose, self.where = client, model_name, purpose, where
        self.name = lease_name(model_name)
        self.ttl = _float_env(LEASE_ENV, DEFAULT_LEASE_S) if ttl is None else float(ttl)
        self.wait = _float_env(WAIT_ENV, DEFAULT_WAIT_S) if wait is None else float(wait)
        if self.ttl <= 2 * SKEW_S:
            raise ValueError(f"{LEASE_ENV}={self.ttl:g}: a lease must last more than {2 * SKEW_S:g} s")
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.expires: float | None = None
        self.waited_s = 0.0

    # -- holding
    def __enter__(self) -> "RegistryLease":
        self.acquire()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.release()
        except Exception as err:  # noqa: BLE001 - never hide the error that ended the block
            if exc_type is None:
                raise
            log.warning("could not release the lease %s: %s", self.name, err)

    def remaining(self) -> float:
        return -1.0 if self.expires is None else self.expires - time.time()

    def check(self) -> None:
        """Raise ``LeaseLost`` unless the lease is held with more than ``SKEW_S`` to go."""
        if self.remaining() <= SKEW_S:
            raise LeaseLost(f"the lease {self.name} on {self.where} ran out during the {self.purpose} "
                            f"(held {self.ttl:g} s, {LEASE_ENV}); nothing more was written. Run the step again: "
                            "registration and the gate are idempotent")

    def acquire(self) -> None:
        from mlflow.exceptions import MlflowException

        start = time.monotonic()
        delay = 0.05
        while True:
            expires = time.time() + self.ttl
            try:
                self.client.create_registered_model(
                    self.name, tags={OWNER_TAG: self.owner, EXPIRES_TAG: f"{expires:.3f}", PURPOSE_TAG: self.purpose,
                                     KIND_TAG: "lease"},
                    description=f"lease of saft's {self.purpose} on {self.model_name}, held by {self.owner} until "
                                f"{_stamp(expires)}; deleted by its holder, broken by the next one after it expires")
                self.expires = expires
                self.waited_s = time.monotonic() - start
                return
            except MlflowException as exc:
                # SQLite: the insert is refused, then MLflow looks the holder up; if it released in
                # between, that lookup answers "does not exist": free again, try after the short wait below
                if _code(exc) not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST") and not _transient(exc):
                    raise
            holder = self._holder()
            if holder is not None and time.time() > holder[1] + SKEW_S:
                self._break(*holder)
                continue
            if time.monotonic() - start > self.wait:
                who = f"{holder[0]} ({holder[2]}, until {_stamp(holder[1])})" if holder else "another process"
                raise TrackingError(
                    f"waited {self.wait:g} s ({WAIT_ENV}) for the lease {self.name} on {self.where}, held by {who}. "
                    f"If no saft process holds it, delete the registered model {self.name}")
            time.sleep(delay * (0.5 + random.random()))
            delay = min(1.0, delay * 1.6)

    def _holder(self) -> tuple[str, float, str] | None:
        """(owner, expiry, purpose) of the lease as it stands, None when it is gone."""
        from mlflow.exceptions import MlflowException

        try:
            tags = self.client.get_registered_model(self.name).tags or {}
        except MlflowException as exc:
            if _code(exc) == "RESOURCE_DOES_NOT_EXIST" or _transient(exc):
                return None
            raise
        try:
            expires = float(tags.get(EXPIRES_TAG, "0"))
        except ValueError:
            expires = 0.0
        return tags.get(OWNER_TAG, "unknown"), expires, tags.get(PURPOSE_TAG, "unknown purpose")

    def _break(self, owner: str, expires: float, purpose: str) -> None:
        """Delete a stale lease, unless another waiter is already breaking this same one."""
        from mlflow.exceptions import MlflowException

        marker = self.name + BROKEN + hashlib.sha256(f"{owner}|{expires:.3f}".encode()).hexdigest()[:16]
        try:
            self.client.create_registered_model(
                marker, tags={KIND_TAG: "broken-lease", OWNER_TAG: owner, EXPIRES_TAG: f"{expires:.3f}"},
                description=f"{self.owner} broke the lease of {owner} ({purpose}), expired at {_stamp(expires)}")
        except MlflowException as exc:
            if _code(exc) == "RESOURCE_ALREADY_EXISTS" or _transient(exc):
                return  # someone else breaks it
            raise
        log.warning("breaking the expired lease %s of %s (%s, expired %s)", self.name, owner, purpose,
                    _stamp(expires))
        current = self._holder()
        if current is not None and current[0] == owner:
            try:
                self.client.delete_registered_model(self.name)
            except MlflowException as exc:
                if _code(exc) != "RESOURCE_DOES_NOT_EXIST":
                    raise

    def release(self) -> None:
        from mlflow.exceptions import MlflowException

        if self.expires is None:
            return
        mine, self.expires = self.remaining() > SKEW_S, None
        if not mine:  # a waiter may have broken it and a successor taken it: leave it to expire
            log.warning("the lease %s ran out before its release; left for the next holder to break", self.name)
            return
        for attempt in range(5):
            try:
                self.client.delete_registered_model(self.name)
                return
            except MlflowException as exc:
                if _code(exc) == "RESOURCE_DOES_NOT_EXIST":
                    return
                if not _transient(exc) or attempt == 4:
                    raise
                time.sleep(0.1 * (attempt + 1))
