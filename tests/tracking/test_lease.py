"""The registry lease on its own (SQLite store): exclusion, a dead holder's lease broken once, running out."""

from __future__ import annotations

import time

import pytest

from saft.tracking.lease import EXPIRES_TAG, OWNER_TAG, PURPOSE_TAG, LeaseLost, RegistryLease, lease_name


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from saft.tracking.config import TrackingConfig, make_client

    db = tmp_path_factory.mktemp("lease") / "mlflow.db"
    return make_client(TrackingConfig(f"sqlite:///{db}", None))


def _names(client, prefix: str) -> list[str]:
    return sorted(m.name for m in client.search_registered_models(f"name LIKE '{prefix}%'"))


def test_a_held_lease_keeps_others_out_and_is_gone_after(client):
    with RegistryLease(client, "m1", "gate of v1") as lease:
        assert lease.remaining() > 100 and _names(client, "m1") == [lease_name("m1")]
        tags = client.get_registered_model(lease_name("m1")).tags
        assert tags[OWNER_TAG] == lease.owner and tags[PURPOSE_TAG] == "gate of v1"
        with pytest.raises(RuntimeError) as err:
            RegistryLease(client, "m1", "gate of v2", wait=0.5).acquire()
        message = str(err.value)
        assert f"held by {lease.owner} (gate of v1" in message and "delete the registered model m1.saft-lease" in message
    assert _names(client, "m1") == []
    with RegistryLease(client, "m1", "gate of v2"):  # free again
        pass


def test_the_lease_of_a_dead_holder_is_broken_once_it_expired(client):
    dead = "host:1:dead"
    client.create_registered_model(lease_name("m2"), tags={OWNER_TAG: dead, EXPIRES_TAG: f"{time.time() - 60:.3f}",
                                                           PURPOSE_TAG: "gate of v9"})
    started = time.monotonic()
    with RegistryLease(client, "m2", "gate of v3", wait=10) as lease:
        assert time.monotonic() - started < 5
        assert client.get_registered_model(lease_name("m2")).tags[OWNER_TAG] == lease.owner
    [marker] = [n for n in _names(client, "m2") if ".broken-" in n]
    assert client.get_registered_model(marker).tags[OWNER_TAG] == dead  # the record of who was broken
    # a lease that has not expired is never broken
    client.create_registered_model(lease_name("m2"), tags={OWNER_TAG: "alive", EXPIRES_TAG: f"{time.time() + 60:.3f}"})
    with pytest.raises(RuntimeError, match="held by alive"):
        RegistryLease(client, "m2", "gate of v4", wait=0.5).acquire()


def test_a_holder_whose_lease_ran_out_stops_and_leaves_it(client):
    lease = RegistryLease(client, "m3", "gate of v1", ttl=11)
    lease.acquire()
    lease.expires = time.time() + 3  # as if the gate had been stuck for 8 s
    with pytest.raises(LeaseLost, match="Run the step again"):
        lease.check()
    lease.release()
    assert _names(client, "m3") == [lease_name("m3")]  # left for the next holder to break, not deleted
    with pytest.raises(ValueError, match="more than 10 s"):
        RegistryLease(client, "m4", "x", ttl=5)


def test_a_lease_released_while_the_store_answered_a_refusal_is_taken_on_the_next_try(client):
    """SQLite refuses the insert, then MLflow looks the holder up: released in between, it answers 'not found'."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    class Racing:
        refusals = 0

        def __getattr__(self, name):
            return getattr(client, name)

        def create_registered_model(self, name, **kwargs):
            if self.refusals == 0:
                self.refusals += 1
                raise MlflowException(f"Registered Model with name={name} not found",
                                      error_code=RESOURCE_DOES_NOT_EXIST)
            return client.create_registered_model(name, **kwargs)

    racing = Racing()
    with RegistryLease(racing, "m5", "gate of v1", wait=5) as lease:
        assert racing.refusals == 1 and lease.remaining() > 100
    assert _names(client, "m5") == []
