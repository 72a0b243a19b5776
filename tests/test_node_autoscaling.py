"""Node autoscaling, the whole loop, with Ray's fake multi-node provider (autoscaler v1, the way
Ray's docs test autoscaling locally): node types are rayservice.yaml's groups (resources, labels,
min nodes), the pipeline is cluster/pipeline.yaml through the CPU-nodes overlay, deployed with
`serve deploy`.

Load rises, Serve's decoder policy asks for a second replica, it does not fit on the decoder node,
the autoscaler adds a node of the decoder group (chosen by the replica's label selector), the
replica starts there and takes traffic. The load ends, Serve scales the decoder back, the node
sits idle and the autoscaler removes it. No request fails on the way.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
import yaml
from node_groups import fake_autoscaler_config, node_groups
from ray_nodes import RayNodes
from serve_process import stream_tokens

from services.common.checkpoint import write_checkpoint
from services.loadtest.serve_metrics import fetch_page, replica_requests

pytest_plugins = ["redis_fixtures"]

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.ray]
API_KEY = "autoscaler-key-0123456789"
ENCODER_TOKEN = "autoscaler-encoder-token-0123456789"
IDLE_TIMEOUT_S = 10.0  # the test's pace; rayservice.yaml keeps a decoder pod 300 s
DECODER = "applications.kimi-vl.deployments.DecoderServer.autoscaling_config"
FAST_SCALING = [f"{DECODER}.upscale_delay_s=0", f"{DECODER}.downscale_delay_s=4",
                f"{DECODER}.metrics_interval_s=0.5", f"{DECODER}.look_back_period_s=2",
                f"{DECODER}.policy.policy_kwargs.running_per_replica=4",
                f"{DECODER}.policy.policy_kwargs.waiting_per_replica=1"]  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    nodes = RayNodes(env={"KIMI_VL_API_KEY": API_KEY, "KIMI_VL_ENCODER_TOKEN": ENCODER_TOKEN})
    config = tmp_path_factory.mktemp("autoscaler") / "fake-cluster.yaml"
    # one node of each group at start (their minReplicas), a second decoder node at most
    caps = {"cpu": 1, "gpu-encoder": 1, "gpu-decoder": 2}
    config.write_text(yaml.safe_dump(fake_autoscaler_config(nodes.port, caps, IDLE_TIMEOUT_S)))
    head, _ = node_groups()
    try:
        nodes.start_head(head.num_cpus, head.labels, f"--autoscaling-config={config}",
                         env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})  # fmt: skip
        _wait(lambda: nodes.nodes_by_stage().get("decoder") == 1 and nodes.nodes_by_stage().get("cpu") == 1
              and nodes.nodes_by_stage().get("encoder") == 1, 180, "the groups' minimum nodes")  # fmt: skip
        yield nodes
    finally:
        nodes.stop()


def _wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(1.0)


def test_load_adds_a_decoder_node_and_its_end_removes_it(cluster, redis_server, tmp_path):
    redis_server.ensure_running()
    checkpoint = write_checkpoint(tmp_path / "autoscaler-tiny", dtype=torch.float32)
    url = cluster.deploy_pipeline(Path(checkpoint), redis_server.url, FAST_SCALING)
    where = cluster.replica_nodes()
    assert [stage for stage, _ in where["DecoderServer"]] == ["decoder"]
    assert cluster.nodes_by_stage().get("decoder") == 1
    api = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
    model = api.models.list().data[0].id

    stop = threading.Event()
    results: list[tuple[int, str | None]] = []

    def client_loop(i: int) -> None:
        n = 0
        while not stop.is_set():
            results.append(stream_tokens(api, model, f"client {i} request {n}", 32))
            n += 1

    with ThreadPoolExecutor(8) as pool:
        loops = [pool.submit(client_loop, i) for i in range(8)]
        try:
            started = time.monotonic()
            _wait(lambda: cluster.nodes_by_stage().get("decoder") == 2 or any(f.done() for f in loops), 240,
                  "second decoder node")  # fmt: skip
            node_added_s = time.monotonic() - started
            _wait(lambda: len(cluster.replica_nodes().get("DecoderServer", [])) == 2, 240, "second replica")
            decoders = cluster.replica_nodes()["DecoderServer"]
            assert [stage for stage, _ in decoders] == ["decoder", "decoder"]
            assert len({node for _, node in decoders}) == 2  # the new replica runs on the new node
            _wait(
                lambda: len(replica_requests(fetch_page(url, API_KEY), "DecoderServer")) == 2,
                120,
                "traffic on the new replica",
            )
            print(f"decoder node added {node_added_s:.1f} s after the load began")
        finally:
            stop.set()
        for loop in loops:
            loop.result()
    assert results and all(r == (32, "length") for r in results), results

    # the load is gone: one replica again, then its node idles out and goes away
    _wait(
        lambda: len(cluster.replica_nodes().get("DecoderServer", [])) == 1, 120, "scale-down to one replica"
    )
    _wait(lambda: cluster.nodes_by_stage().get("decoder") == 1, 120, "the idle decoder node removed")
    assert stream_tokens(api, model, "still served", 32) == (32, "length")
