"""The KV cache sized to the machine (`kv_cache_tokens: auto`) and the limit it sets on one
sequence: the pure plan, and an engine that makes it without touching the memory it reserves."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from services.common.checkpoint import write_checkpoint
from services.common.devices import host_memory_available
from services.common.errors import InvalidInputError
from services.decoder.engine.kv_sizing import plan_kv_cache
from services.decoder.engine.llm_engine import EngineConfig, LLMEngine
from services.decoder.engine.params import SamplingParams
from services.decoder.loading import load_text_model

GIB = 1 << 30


def plan(**overrides: object):  # type: ignore[no-untyped-def]
    settings: dict[str, object] = dict(
        kv_cache_tokens="auto", memory_fraction=0.5, available_bytes=16 * GIB, bytes_per_token=30_000,
        block_size=16, max_model_len=None, model_max_len=131072, max_num_seqs=64,
    )  # fmt: skip
    settings.update(overrides)
    return plan_kv_cache(**settings)  # type: ignore[arg-type]


def test_auto_takes_a_share_of_the_available_memory_in_whole_blocks() -> None:
    p = plan()
    assert p.tokens == (8 * GIB // 30_000) // 16 * 16 == 286320
    assert p.max_model_len == 131072  # the checkpoint's length fits
    assert p.notes == ("KV cache: 286320 tokens, 8.00 GiB (0.5 of 16.0 GiB available)",)


def test_auto_never_takes_more_than_the_sequences_could_use() -> None:
    p = plan(bytes_per_token=576, max_num_seqs=4)
    assert p.tokens == 4 * 131072 and "4 sequences of 131072" in p.notes[0]


def test_a_cache_below_the_model_length_lowers_it_and_says_so() -> None:
    p = plan(available_bytes=2 * GIB)
    assert p.tokens == 35776 and p.max_model_len == 35776
    assert p.notes[-1] == "max_model_len lowered from 131072 to 35776: the KV cache holds no more"
    fixed = plan(kv_cache_tokens=65536)
    assert (fixed.tokens, fixed.max_model_len) == (65536, 65536)
    assert plan(max_model_len=1 << 20).max_model_len == 131072  # capped by the model, said in a note


def test_an_asked_for_length_that_does_not_fit_refuses_to_start() -> None:
    with pytest.raises(InvalidInputError, match="max_model_len 131072 does not fit the KV cache of 35776"):
        plan(available_bytes=2 * GIB, max_model_len=131072)
    with pytest.raises(InvalidInputError, match="max_model_len 100000 does not fit the KV cache of 65536"):
        plan(kv_cache_tokens=65536, max_model_len=100000)
    with pytest.raises(InvalidInputError, match="no room for a KV cache"):
        plan(available_bytes=100_000)


def test_settings_are_checked() -> None:
    for bad in ({"kv_cache_tokens": "lots"}, {"kv_cache_tokens": 0}, {"kv_cache_memory_fraction": 0.0},
                {"kv_cache_memory_fraction": 1.5}, {"max_model_len": 1}):  # fmt: skip
        with pytest.raises(InvalidInputError):
            EngineConfig(**bad)  # type: ignore[arg-type]


def _resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def test_the_engine_sizes_its_cache_and_reserves_it_without_touching_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = load_text_model(write_checkpoint(tmp_path / "ckpt", dtype=torch.float32), torch.float32, "cpu")
    before = _resident_bytes()
    with caplog.at_level(logging.INFO, logger="services.decoder.engine.llm_engine"):
        engine = LLMEngine(model, EngineConfig(kv_cache_memory_fraction=0.2, max_num_seqs=8))
    per_token = model.cfg.num_hidden_layers * model.cfg.latent_dim * 4
    budget = 0.2 * host_memory_available()  # read again: other processes move it a little
    assert engine.kv_plan.tokens == 8 * 131072 or abs(engine.kv_plan.tokens * per_token / budget - 1) < 0.05
    assert engine.cache.data.numel() * 4 >= engine.kv_plan.tokens * per_token
    assert f"KV cache: {engine.kv_plan.tokens} tokens" in caplog.text
    # calloc'd pages: the reservation costs nothing resident until sequences fill it
    assert _resident_bytes() - before < 64 << 20
    assert engine.cache.data[:, -1].abs().sum() == 0
    assert len(list(engine.generate([5, 6, 7], SamplingParams(max_new_tokens=2)))) == 2
