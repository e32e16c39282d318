"""``ray_session``: one context manager starts or joins Ray for an entry point and stops only
what it started, for real (a local cluster with its dashboard on 127.0.0.1)."""

from __future__ import annotations

import os

import pytest
import ray
from ray.util.state import list_nodes

from codebook.ray_glue.session import ray_session

pytestmark = pytest.mark.slow


def test_starts_a_local_cluster_leaves_a_running_one_and_stops_what_it_started(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert not ray.is_initialized()
    with pytest.raises(RuntimeError, match="body failed"), ray_session(num_cpus=1):
        api = os.environ["RAY_API_SERVER_ADDRESS"]
        assert api.startswith("http://127.0.0.1:")
        # the pinned address is this cluster's state API (what Ray Train's cleaner asks)
        nodes = list_nodes(address=api)
        assert [n.node_id for n in nodes] == [ray.get_runtime_context().get_node_id()]
        assert ray.cluster_resources()["CPU"] == 1
        with ray_session():  # Ray already runs in this process: used, then left running
            assert ray.is_initialized()
        assert ray.is_initialized() and os.environ["RAY_API_SERVER_ADDRESS"] == api
        raise RuntimeError("body failed")
    assert not ray.is_initialized()  # stopped even though the body raised
    assert "RAY_API_SERVER_ADDRESS" not in os.environ  # the dead dashboard is forgotten


def test_a_caller_set_api_address_is_kept(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:1")
    with ray_session(address="local", num_cpus=1, include_dashboard=False):
        assert ray.is_initialized()
    assert not ray.is_initialized()
    assert os.environ["RAY_API_SERVER_ADDRESS"] == "http://127.0.0.1:1"  # not ours to drop


def test_a_local_start_that_times_out_is_started_once_more(monkeypatch, capsys):
    """Ray gives a new node a fixed 30 s to register, which a loaded 2-core machine can miss:
    ``init_local`` starts the cluster once more (here the first ``ray.init`` fails as Ray's
    does, then the real one runs); other errors, and a second timeout, are raised as they are."""
    from codebook.ray_glue import session

    real_init = ray.init
    calls: list[dict] = []

    def first_times_out(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise Exception("The current node timed out during startup. This could happen ...")
        return real_init(**kwargs)

    monkeypatch.setattr(ray, "init", first_times_out)
    session.init_local(num_cpus=1, include_dashboard=False)
    try:
        assert ray.is_initialized() and ray.cluster_resources()["CPU"] == 1
    finally:
        ray.shutdown()
    assert len(calls) == 2 and all(c["address"] == "local" for c in calls)
    assert "starting it once more" in capsys.readouterr().out

    def always(message):
        def init(**kwargs):
            calls.append(kwargs)
            raise Exception(message)
        return init

    calls.clear()
    monkeypatch.setattr(ray, "init", always("The current node timed out during startup."))
    with pytest.raises(Exception, match="timed out during startup"):
        session.init_local(num_cpus=1)
    assert len(calls) == session.LOCAL_START_ATTEMPTS
    calls.clear()
    monkeypatch.setattr(ray, "init", always("port 6379 is taken"))
    with pytest.raises(Exception, match="port 6379"):
        session.init_local(num_cpus=1)
    assert len(calls) == 1
