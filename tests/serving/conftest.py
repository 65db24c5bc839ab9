"""Fixtures for the serving tests: a servable tiny model (no registry) and a server running it.

* ``served_folder``: the embedded tiny model + a small sparse delta at alpha 0.5, its base
  stored next to it and its head built, as ``saft.tracking.pyfunc.build_model_folder``
  writes it; once per session.
* ``server``: ``saft serve``'s application on 127.0.0.1 in this process (uvicorn in a
  thread), URL fetching on for 127.0.0.1 only; stopped at the end of the module.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from serving_support import ALPHA, CLASSES, TEMPLATES, InProcessServer, small_delta


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-core machine shared with other workers
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def served_folder(tmp_path_factory) -> Path:
    """``folder/model`` (the MLflow model), ``folder/base``, ``folder/delta.safetensors``."""
    from saft.models import load_model
    from saft.tracking.pyfunc import build_model_folder

    folder = tmp_path_factory.mktemp("served")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFT_CACHE_DIR", str(folder / "cache"))
        delta = small_delta(load_model("tiny"), folder / "trained" / "delta.safetensors")
        build_model_folder(folder, base_model="tiny", classes=CLASSES, templates=TEMPLATES, delta_path=delta,
                           alpha=ALPHA)
    return folder


@pytest.fixture(scope="module")
def server(served_folder):
    from saft.serving.fetch import FetchPolicy
    from saft.serving.protocol import Limits
    from saft.serving.server import ServeConfig

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFT_CACHE_DIR", str(served_folder / "cache"))
        cfg = ServeConfig(str(served_folder / "model"), name="shapes", device="cpu", max_batch=8,
                          limits=Limits(max_body_bytes=2 << 20, max_instances=8, max_image_pixels=512 * 512),
                          policy=FetchPolicy(enabled=True, allow_hosts=("127.0.0.1",), allow_private=True,
                                             max_bytes=1 << 20, timeout_s=2.0))
        running = InProcessServer(cfg)
    try:
        yield running
    finally:
        running.stop()
