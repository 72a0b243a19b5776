"""`kimi-vl serve --autoscale` as a user runs it: the decoder scales on its engine's own load
(`DecoderScalingPolicy`, from the shipped cluster/pipeline.yaml with faster delays and a small
target), up under a load step and back down after it, with every request served in full: a stream
running on the replica being removed finishes before that replica exits."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
import yaml
from serve_process import ServeProcess, stream_tokens

from services.common.checkpoint import write_checkpoint
from services.loadtest.serve_metrics import fetch_page, replica_requests

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
SHIPPED = Path(__file__).resolve().parent.parent / "cluster" / "pipeline.yaml"
SHORT, LONG = 48, 3000  # tokens of the load's requests, and of the streams that span the scale-down


def overlay(path: Path) -> Path:
    """cluster/pipeline.yaml for this machine and this test: the CPU and the tiny checkpoint, a
    small KV cache, and a decoder that scales at 4 sequences a replica within seconds."""
    config = yaml.safe_load(SHIPPED.read_text())
    (app,) = config["applications"]
    for stage in ("encoder", "decoder"):
        app["args"][stage].update({"device": "cpu", "dtype": "float32"})
    app["args"]["decoder"]["engine"]["kv_cache_tokens"] = 32768
    (decoder,) = [d for d in app["deployments"] if d["name"] == "DecoderServer"]
    scaling = decoder["autoscaling_config"]
    scaling.update({"max_replicas": 2, "upscale_delay_s": 0, "downscale_delay_s": 4,
                    "metrics_interval_s": 0.5, "look_back_period_s": 2})  # fmt: skip
    scaling["policy"]["policy_kwargs"].update({"running_per_replica": 4, "waiting_per_replica": 1})
    path.write_text(yaml.safe_dump(config))
    return path


def decoder_requests(http: int) -> dict[str, float]:
    return replica_requests(fetch_page(f"http://127.0.0.1:{http}"), "DecoderServer")


def wait_until(condition, timeout_s: float, what: str, output) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout_s} s\n{output()}"
        time.sleep(0.5)


def test_the_decoder_scales_up_under_load_and_down_after_it_losing_nothing(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "autoscale-tiny", dtype=torch.float32)
    config = overlay(tmp_path / "pipeline-local.yaml")
    serve = ServeProcess(checkpoint, "--config", str(config), "--autoscale",
                         "--replicas", "ingress=1,preprocess=1,encoder=1")  # fmt: skip
    try:
        ready = serve.wait_ready()
        decoder = ready["stages"]["decoder"]
        assert decoder["autoscaling"]["min_replicas"] == 1 and decoder["autoscaling"]["max_replicas"] == 2
        assert decoder["autoscaling"]["cap"].startswith("config max 2")
        assert decoder["num_cpus"] == 0.5 and decoder["torch_threads"] == 1
        assert "decoder autoscales 1-2 replicas" in serve.output
        assert serve.replicas("DecoderServer") == 1
        client = openai.OpenAI(base_url=ready["openai_base_url"], api_key="unused", max_retries=0)

        # a load step: 8 clients, each sending short streams back to back
        stop = threading.Event()
        results: list[tuple[int, str | None]] = []

        def client_loop(i: int) -> None:
            n = 0
            while not stop.is_set():
                results.append(stream_tokens(client, ready["model"], f"client {i} request {n}", SHORT))
                n += 1

        with ThreadPoolExecutor(8) as pool:
            loops = [pool.submit(client_loop, i) for i in range(8)]
            try:
                wait_until(
                    lambda: serve.replicas("DecoderServer") == 2 or any(f.done() for f in loops),
                    120, "a second decoder", lambda: serve.output,
                )  # fmt: skip
                # the new replica takes traffic: Serve's per-replica counters show two replicas served
                wait_until(
                    lambda: len(decoder_requests(serve.http)) == 2, 90, "traffic on both",
                    lambda: str(decoder_requests(serve.http)),
                )  # fmt: skip
            finally:
                stop.set()  # the clients stop, whatever failed above
            for loop in loops:
                loop.result()  # a client that saw an error raises it here
        assert results and all(r == (SHORT, "length") for r in results), results

        # the load ends: two long streams are left, one per replica (Serve sends each to the less
        # busy one); the policy now wants one replica, and the one removed must finish its stream
        with ThreadPoolExecutor(2) as pool:
            long = [pool.submit(stream_tokens, client, ready["model"], f"long {i}", LONG) for i in range(2)]
            wait_until(lambda: "Downscaling" in serve.serve_logs("controller"), 120, "a downscale",
                       lambda: serve.serve_logs("controller")[-3000:])  # fmt: skip
            in_flight_at_downscale = sum(not f.done() for f in long)
            assert [f.result() for f in long] == [(LONG, "length")] * 2
        assert in_flight_at_downscale == 2, "the streams ended before the scale-down began"
        wait_until(lambda: serve.replicas("DecoderServer") == 1, 120, "back to one decoder", lambda: "")
        assert re.search(r"Downscaling .*DecoderServer.* from 2 to 1", serve.serve_logs("controller"))
        serve.stop()
    finally:
        serve.kill()
