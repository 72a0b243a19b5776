"""An expert-parallel decoder behind the real serving path: the pipeline application (what
`kimi-vl serve --ep N` deploys) on Ray Serve, asked over HTTP with the official `openai` client,
answers with the greedy ids of the offline path (EP = 1, one process); a rank killed mid-request
gives a retriable error, and the replaced group answers correctly again."""

from __future__ import annotations

import json
import threading
import time

import openai
import pytest
import torch

from services.common.checkpoint import write_checkpoint
from services.decoder.engine.llm_engine import EngineConfig
from services.decoder.engine.params import SamplingParams
from services.offline import OfflinePipeline
from services.pipeline.local import ONE_REPLICA

pytest_plugins = ["services_fixtures", "redis_fixtures"]

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.slow]
MODEL = "ep-tiny"
ENGINE = {"block_size": 16, "kv_cache_tokens": 4096, "max_num_seqs": 8, "max_num_batched_tokens": 256}
PROMPTS = [
    "Tell me about experts.",
    "One more, please: how do ranks talk?",
    "Short.",
    "A fourth prompt here.",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ep-serving") / MODEL, dtype=torch.float32)


@pytest.fixture(scope="module")
def offline(checkpoint) -> OfflinePipeline:
    return OfflinePipeline(checkpoint, dtype=torch.float32, engine_config=EngineConfig(**ENGINE))


def offline_ids(offline: OfflinePipeline, text: str, max_tokens: int = 8) -> list[int]:
    messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    return offline.generate(
        messages, [], SamplingParams(max_new_tokens=max_tokens, ignore_eos=True)
    ).token_ids


def deploy(serve_instance, checkpoint, size: int, app: str, placement_file: str | None = None):
    import ray
    from ray import serve

    from services.pipeline import build_app

    zero = {"ray_actor_options": {"num_cpus": 0}, "autoscaling_config": ONE_REPLICA}
    names = ("ChatIngress", "PreprocessServer", "VisionEncoderServer")
    node_id = ray.get_runtime_context().get_node_id()  # the ranks' bundles must match this node's label
    decoder = {**zero, "health_check_period_s": 1, "health_check_timeout_s": 10}
    args = {
        "checkpoint_dir": str(checkpoint),
        "decoder": {
            "engine": ENGINE, "num_threads": 1, "enable_fault_injection": True,
            "ep": {"size": size, "cpus_per_rank": 0.01, "step_timeout_s": 20, "collective_timeout_s": 15,
                   "placement_file": placement_file, "label_selector": {"ray.io/node-id": node_id}},
        },
        "deployment_options": {**{n: zero for n in names}, "DecoderServer": decoder},
    }  # fmt: skip
    serve.run(build_app(args), name=app, route_prefix=f"/{app}")
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{serve_instance.http_port}/{app}/v1", api_key="x", max_retries=0
    )


def ask(client: openai.OpenAI, text: str, max_tokens: int = 8) -> list[int]:
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )  # fmt: skip
    return response.choices[0].model_extra["token_ids"]


# the tiny preset's MoE layers are 1 and 2, with 8 experts each
PLACEMENTS = {
    2: {"1": [[0, 3, 5, 6], [1, 2, 4, 7]], "2": [[7, 6, 1, 0], [5, 4, 3, 2]]},  # scattered
    4: {"1": [[0, 1, 2], [3, 4, 0], [5, 6, 1], [7, 0, 1]], "2": [[0, 1, 7], [2, 3, 7], [4, 5, 6], [6, 7, 0]]},
}  # EP = 4: three slots per rank, experts 0, 1 (layer 1) and 0, 6, 7 (layer 2) on several ranks


@pytest.mark.parametrize("size", [2, 4])
def test_ep_group_answers_as_the_offline_path(serve_instance, checkpoint, offline, tmp_path, size):
    """EP = 2 starts from a placement file that scatters the experts; EP = 4 from one that
    replicates some (a token uses its own rank's copy, or another chosen by token)."""
    from ray import serve

    app = f"ep{size}"
    placement = tmp_path / "placement.json"
    placement.write_text(json.dumps({"ranks": size, "layers": PLACEMENTS[size]}))
    client = deploy(serve_instance, checkpoint, size, app, str(placement))
    try:
        want = [offline_ids(offline, p) for p in PROMPTS]
        assert ask(client, PROMPTS[0]) == want[0]  # one request: the other ranks step empty
        results: list[list[int] | None] = [None] * len(PROMPTS)

        def run(i: int) -> None:
            results[i] = ask(client, PROMPTS[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results == want  # a mixed batch over the ranks, some of them idle at times
        stats = serve.get_deployment_handle("DecoderServer", app).stats.remote().result()
        tokens = stats["expert_tokens_per_layer"]
        assert sorted(tokens) == [1, 2] and all(len(row) == 8 and sum(row) > 0 for row in tokens.values())
        assert stats["expert_rank_imbalance"] >= 1.0
    finally:
        serve.delete(app)


@pytest.mark.parametrize("fault", ["kill_rank", "stall_rank"])
def test_a_lost_rank_gives_a_retriable_error_and_the_group_is_replaced(
    serve_instance, checkpoint, offline, fault
):
    """A rank that dies, or hangs so its peers wait in a collective past the timeouts."""
    from ray import serve

    app = f"ep-{fault.replace('_', '-')}"
    client = deploy(serve_instance, checkpoint, 2, app)
    try:
        errors: list[BaseException] = []

        def long_request() -> None:
            try:
                ask(client, PROMPTS[1], max_tokens=3000)
            except openai.APIStatusError as e:
                errors.append(e)

        runner = threading.Thread(target=long_request)
        runner.start()
        time.sleep(2.0)
        serve.get_deployment_handle("DecoderServer", app).inject_fault.remote(fault).result()
        runner.join(60)
        assert not runner.is_alive(), "the request hung after its rank died"
        assert errors and errors[0].status_code == 503, errors
        assert errors[0].response.headers.get("retry-after")
        deadline = time.monotonic() + 120
        while True:  # Serve replaces the unhealthy replica, with a new group
            try:
                assert ask(client, PROMPTS[2]) == offline_ids(offline, PROMPTS[2])
                break
            except openai.APIStatusError:
                assert time.monotonic() < deadline, "the group was not replaced"
                time.sleep(1.0)
    finally:
        serve.delete(app)
