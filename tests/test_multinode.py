"""The whole pipeline on a Ray cluster of labelled nodes on this machine (`ray start`, nodes shaped
like rayservice.yaml's groups, their GPUs logical), deployed with `serve deploy` from the shipped
cluster/pipeline.yaml through the CPU-nodes overlay (`kimi-vl render-config`), with a real
redis-server and both secrets in the nodes' environment as in production:

- every stage's replicas run on the nodes of its label, scaled-up ones included;
- answers, whose patches cross from the cpu node to the encoder node over its gRPC server and
  whose embeddings reach the decoder node through Redis, are the offline path's greedy ids;
- under a load step the decoder scales from one replica to two on its node group, the new one
  takes traffic, and after the load it scales back while a stream runs on each replica: no
  request fails and no stream is cut.
"""

from __future__ import annotations

import io
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import redis
import torch
from node_groups import node_groups
from PIL import Image
from ray_nodes import RayNodes
from serve_process import stream_tokens
from test_pipeline_e2e import image_part, png, user

from services.common.checkpoint import write_checkpoint
from services.decoder.engine.params import SamplingParams
from services.loadtest.serve_metrics import fetch_page, replica_requests
from services.offline import OfflinePipeline

pytest_plugins = ["redis_fixtures"]

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.ray]
ROOT = Path(__file__).resolve().parent.parent
API_KEY = "multinode-key-0123456789"
ENCODER_TOKEN = "multinode-encoder-token-0123456789"
NODES = ["cpu", "gpu-encoder", "gpu-decoder", "gpu-decoder"]  # rayservice.yaml's groups: one node each
DECODER = "applications.kimi-vl.deployments.DecoderServer.autoscaling_config"
# the test's own pace: the shipped delays are tens of seconds, its target 48 sequences a replica
FAST_SCALING = [f"{DECODER}.upscale_delay_s=0", f"{DECODER}.downscale_delay_s=4",
                f"{DECODER}.metrics_interval_s=0.5", f"{DECODER}.look_back_period_s=2",
                f"{DECODER}.policy.policy_kwargs.running_per_replica=4",
                f"{DECODER}.policy.policy_kwargs.waiting_per_replica=1"]  # fmt: skip
SHORT, LONG = 32, 3000


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("multinode") / "multinode-tiny", dtype=torch.float32)


@pytest.fixture(scope="module")
def cluster():
    nodes = RayNodes(env={"KIMI_VL_API_KEY": API_KEY, "KIMI_VL_ENCODER_TOKEN": ENCODER_TOKEN})
    try:
        head, groups = node_groups()
        nodes.start_head(head.num_cpus, head.labels)  # Serve's controller and proxy only
        for name in NODES:
            group = groups[name]
            nodes.add_node(group.num_cpus, group.labels, group.num_gpus)
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture(scope="module")
def deployed(cluster, redis_server, checkpoint):
    redis_server.ensure_running()
    return cluster.deploy_pipeline(checkpoint, redis_server.url, FAST_SCALING)


def placement(cluster: RayNodes) -> dict[str, list[str]]:
    return {name: [stage for stage, _ in where] for name, where in cluster.replica_nodes().items()}


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)


def test_each_stage_runs_on_its_labelled_nodes(cluster, deployed):
    where = placement(cluster)
    expected = {"ChatIngress": "cpu", "PreprocessServer": "cpu", "VisionEncoderServer": "encoder",
                "DecoderServer": "decoder"}  # fmt: skip
    assert set(where) == set(expected), where
    for name, stage in expected.items():
        assert where[name] and set(where[name]) == {stage}, where


def test_answers_across_nodes_are_the_offline_ids(deployed, checkpoint, redis_server):
    offline = OfflinePipeline(checkpoint, dtype=torch.float32)
    api = client(deployed)
    model = api.models.list().data[0].id
    for seed, text in ((11, "What is in this picture?"), (12, "Describe it.")):
        image = png(seed)
        response = api.chat.completions.create(
            model=model, messages=[user(image_part(image), text)], max_tokens=8, temperature=0,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )  # fmt: skip
        expected = offline.generate(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
            [Image.open(io.BytesIO(image))],
            SamplingParams(max_new_tokens=8, ignore_eos=True),
        )
        assert response.choices[0].model_extra["token_ids"] == expected.token_ids
    # the embeddings went through Redis, the media manifests too
    keys = redis.Redis.from_url(redis_server.url).keys("*")
    assert any(k.startswith(b"kimi-vl:media:v1:") for k in keys), keys[:10]
    assert len(keys) > 2


def _wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(1.0)


def test_the_decoder_scales_on_its_nodes_and_back_losing_nothing(cluster, deployed):
    api = client(deployed)
    model = api.models.list().data[0].id
    assert placement(cluster)["DecoderServer"] == ["decoder"]
    stop = threading.Event()
    results: list[tuple[int, str | None]] = []

    def client_loop(i: int) -> None:
        n = 0
        while not stop.is_set():
            results.append(stream_tokens(api, model, f"client {i} request {n}", SHORT))
            n += 1

    with ThreadPoolExecutor(8) as pool:
        loops = [pool.submit(client_loop, i) for i in range(8)]
        try:
            _wait(lambda: len(placement(cluster).get("DecoderServer", [])) == 2
                  or any(f.done() for f in loops), 180, "second decoder replica")  # fmt: skip
            assert placement(cluster)["DecoderServer"] == ["decoder", "decoder"]
            _wait(
                lambda: len(replica_requests(fetch_page(deployed, API_KEY), "DecoderServer")) == 2,
                90,
                "traffic on the new replica",
            )
        finally:
            stop.set()
        for loop in loops:
            loop.result()
    assert results and all(r == (SHORT, "length") for r in results), results

    with ThreadPoolExecutor(2) as pool:
        long = [pool.submit(stream_tokens, api, model, f"long {i}", LONG) for i in range(2)]
        downscaled = re.compile(r"Downscaling .*DecoderServer.* from 2 to 1")
        _wait(lambda: downscaled.search(cluster.serve_logs("controller")) is not None, 180, "scale-down")
        in_flight_at_downscale = sum(not f.done() for f in long)
        assert [f.result() for f in long] == [(LONG, "length")] * 2
    assert in_flight_at_downscale == 2, "the streams ended before the scale-down began"
    _wait(lambda: len(placement(cluster).get("DecoderServer", [])) == 1, 120, "scale-down to one replica")
