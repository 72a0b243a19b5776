"""`kimi-vl serve --replicas` as a user runs it: a subprocess with its own local Ray, several
replicas of every stage (three decoders) on two CPUs, and no Redis, so a decoder reads embeddings
from whichever encoder replica made them. Concurrent requests spread over the decoder replicas
must give the offline path's greedy ids, then SIGTERM must leave no process behind."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from PIL import Image
from serve_process import ServeProcess
from test_pipeline_e2e import image_part, png, user

from services.common.checkpoint import write_checkpoint
from services.decoder.engine.params import SamplingParams
from services.decoder.service.server import ROUTING_STATS_PERIOD_S
from services.loadtest.serve_metrics import fetch_page, replica_requests
from services.offline import OfflinePipeline
from services.pipeline.replicas import STAGE_DEPLOYMENTS

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
REPLICAS = {"ingress": 2, "preprocess": 2, "encoder": 2, "decoder": 3}
MAX_TOKENS = 8


def requests() -> list[tuple[str, bytes | None]]:
    """Twelve distinct questions, half of them about an image of their own."""
    return [(f"Question {i}: what do you see?", png(300 + i) if i % 2 else None) for i in range(12)]


def offline_answers(checkpoint: Path) -> list[list[int]]:
    offline = OfflinePipeline(checkpoint, dtype=torch.float32)
    answers = []
    for text, image in requests():
        content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
        pictures = [Image.open(io.BytesIO(image))] if image else []
        result = offline.generate(
            [{"role": "user", "content": content}],
            pictures,
            SamplingParams(max_new_tokens=MAX_TOKENS, ignore_eos=True),
        )
        answers.append(result.token_ids)
    return answers


def served_answer(client: openai.OpenAI, text: str, image: bytes | None) -> list[int]:
    parts = [image_part(image), text] if image else [text]
    response = client.chat.completions.create(
        model="replicas-tiny", messages=[user(*parts)], max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )  # fmt: skip
    return response.choices[0].model_extra["token_ids"]


def chat(client: openai.OpenAI, messages: list[dict]) -> Any:
    return client.chat.completions.create(
        model="replicas-tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip


def router_routes(http: int) -> dict[str, float]:
    """The decoder router's requests by route (affinity, load), over every ingress and replica."""
    body = fetch_page(f"http://127.0.0.1:{http}")
    out: dict[str, float] = {}
    for labels, value in re.findall(
        r"^ray_kimi_vl_router_requests_total\{([^}]*)\} (\S+)$", body, re.MULTILINE
    ):
        route = dict(re.findall(r'(\w+)="([^"]*)"', labels)).get("route", "")
        out[route] = out.get(route, 0.0) + float(value)
    return out


def test_three_decoder_replicas_give_the_offline_ids(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "replicas-tiny", dtype=torch.float32)
    expected = offline_answers(checkpoint)
    flag = ",".join(f"{stage}={n}" for stage, n in REPLICAS.items())
    serve = ServeProcess(checkpoint, "--replicas", flag)
    try:
        ready = serve.wait_ready()
        stages = ready["stages"]
        assert {stage: s["replicas"] for stage, s in stages.items()} == REPLICAS
        assert stages["decoder"] == {"replicas": 3, "num_cpus": 0.3333, "torch_threads": 1}
        assert stages["encoder"] == {"replicas": 2, "num_cpus": 0.5, "torch_threads": 1}
        # each decoder sized its KV cache from a third of the default share of free memory; the
        # tiny model's 131,072 positions fit, so max_model_len is the checkpoint's
        assert ready["decoder"]["max_model_len"] == 131072
        assert ready["decoder"]["kv_cache_tokens"] >= 131072
        assert "placement on 2 CPUs: ingress 2x 0 CPU" in serve.output
        for stage, n in REPLICAS.items():
            assert serve.replicas(STAGE_DEPLOYMENTS[stage]) == n, stage

        client = openai.OpenAI(base_url=ready["openai_base_url"], api_key="unused", max_retries=0)
        with ThreadPoolExecutor(len(expected)) as pool:
            served = list(pool.map(lambda r: served_answer(client, *r), requests()))
        assert served == expected
        # the same requests one at a time: still the same ids, whichever replica takes each
        assert [served_answer(client, *r) for r in requests()[:4]] == expected[:4]

        # conversations, each about its own picture: every later turn goes where its earlier turns
        # are cached, whichever ingress replica (each runs its own router) takes it
        conversations = [
            [user(image_part(png(400 + c, (320, 320))), f"Conversation {c}: describe it.")] for c in range(6)
        ]
        previous = [0] * len(conversations)
        for turn in range(3):
            if turn:  # a user reads the answer; meanwhile every router hears what each replica cached
                time.sleep(3 * ROUTING_STATS_PERIOD_S)
            with ThreadPoolExecutor(len(conversations)) as pool:
                replies = list(pool.map(lambda m: chat(client, m), conversations))
            for c, reply in enumerate(replies):
                if turn:
                    cached = reply.usage.prompt_tokens_details.cached_tokens
                    assert cached >= previous[c] - 16, (turn, c, cached, previous[c])
                previous[c] = reply.usage.prompt_tokens
                conversations[c] += [
                    {"role": "assistant", "content": reply.choices[0].message.content},
                    user(f"Turn {turn + 2}: and then?"),
                ]

        deadline = time.monotonic() + 90  # Ray exports metrics every few seconds
        while (
            len(counts := replica_requests(fetch_page(f"http://127.0.0.1:{serve.http}"), "DecoderServer")) < 2
            and time.monotonic() < deadline
        ):
            time.sleep(2.0)
        assert len(counts) >= 2 and sum(counts.values()) >= len(expected), counts
        # 12 later turns by affinity, the first turns and the single questions by load
        while (routes := router_routes(serve.http)).get("affinity", 0) < 12 and time.monotonic() < deadline:
            time.sleep(2.0)
        assert routes.get("affinity", 0) >= 12 and routes.get("load", 0) >= len(expected), routes
        serve.stop()
    finally:
        serve.kill()


def test_a_bad_replicas_flag_is_refused_before_anything_starts(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "serve", "--replicas", "decoder=3,gpu=1"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode != 0
    assert "--replicas takes STAGE=N" in result.stderr and "'gpu=1'" in result.stderr
    assert not (tmp_path / "checkpoints").exists()  # refused before the default checkpoint is written
