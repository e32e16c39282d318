"""Ray for one entry point: ``with ray_session(): ...`` connects or starts, then stops it."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_API_ADDRESS = "RAY_API_SERVER_ADDRESS"
# Ray gives a new local node a fixed 30 s to register (ray/_private/node.py); on a loaded
# 2-core machine its raylet can miss that. A new local cluster is then started once more.
_STARTUP_TIMEOUT = "timed out during startup"
LOCAL_START_ATTEMPTS = 2
_OWNED_API_ADDRESS = "CODEBOOK_SET_RAY_API_SERVER_ADDRESS"


@contextmanager
def ray_session(**init_kwargs: Any) -> Iterator[None]:
    """Ray for the ``with`` body: the one this process already runs (left running), else the
    cluster in RAY_ADDRESS (as under ``ray job submit``), else a new local cluster whose
    dashboard listens on 127.0.0.1 only.

    ``init_kwargs`` go to ``ray.init`` (``address="local"`` always starts a new local cluster,
    e.g. for a benchmark with its own ``num_cpus``). On exit, even on an error, Ray is shut
    down if this call started or joined it, and the API address pinned for it is forgotten, so
    a later ``ray`` CLI call or cluster in this process does not talk to a dead dashboard.
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        yield
        return
    _connect(init_kwargs)
    try:
        yield
    finally:
        ray.shutdown()
        _forget_api_address()


def _connect(init_kwargs: dict[str, Any]) -> None:
    import ray

    address = init_kwargs.pop("address", None) or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, **init_kwargs)
        return
    if init_kwargs.get("include_dashboard") is False:
        init_local(**init_kwargs)
        return
    # A new local cluster for this process (RAY_ADDRESS=auto joins a running one). Its
    # dashboard address is pinned for the workers: Ray Train's PlacementGroupCleaner finds
    # the cluster through the state API and, with another Ray instance on the machine,
    # cannot tell which is ours.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ[_API_ADDRESS] = f"http://127.0.0.1:{port}"
    os.environ[_OWNED_API_ADDRESS] = "1"
    try:
        init_local(dashboard_host="127.0.0.1", dashboard_port=port, **init_kwargs)
    except BaseException:
        _forget_api_address()
        raise


def init_local(**init_kwargs: Any) -> None:
    """``ray.init(address="local", **init_kwargs)``: a new local cluster, started once more if
    its node misses Ray's fixed 30 s registration window (a loaded machine); any other
    failure, or a second timeout, is raised as Ray raised it."""
    import ray

    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        try:
            ray.init(address="local", **init_kwargs)
            return
        except Exception as err:
            if _STARTUP_TIMEOUT not in str(err) or attempt == LOCAL_START_ATTEMPTS:
                raise
            ray.shutdown()  # stops the half-started node's processes
            print(f"Ray: the local node {_STARTUP_TIMEOUT} (a loaded machine?); "
                  "starting it once more", flush=True)


def _forget_api_address() -> None:
    if os.environ.pop(_OWNED_API_ADDRESS, None):
        os.environ.pop(_API_ADDRESS, None)
