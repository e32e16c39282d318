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
