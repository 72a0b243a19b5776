"""`kimi-vl serve --replicas`: parsing the flag and splitting one machine's CPUs between the
stages' replicas (pure arithmetic, no Ray)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from services.common.errors import InvalidInputError
from services.pipeline.local import app_args
from services.pipeline.replicas import (
    PROCESS_BYTES,
    STAGE_DEPLOYMENTS,
    autoscale_caps,
    describe,
    parse_replicas,
    replica_bytes,
    split_cpus,
)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    import torch

    from services.common.checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("replicas") / "tiny", dtype=torch.float32)


def namespace(**overrides: object) -> argparse.Namespace:
    values = {"config": None, "redis": None, "served_model_name": None, "api_key": None, "device": None,
              "ep": 1, "replicas": None, "autoscale": False, **overrides}  # fmt: skip
    return argparse.Namespace(**values)


def test_the_flag_names_stages_and_counts():
    assert parse_replicas(None) == {}
    assert parse_replicas("decoder=3, encoder=2,ingress=1") == {"decoder": 3, "encoder": 2, "ingress": 1}


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("decoder", "STAGE=N"),
        ("llm=2", "ingress, preprocess, encoder, decoder"),
        ("decoder=0", "from 1 to 32"),
        ("decoder=two", "from 1 to 32"),
        ("decoder=99", "from 1 to 32"),
        ("decoder=2,decoder=3", "twice"),
        ("", "STAGE=N"),
    ],
)
def test_a_bad_flag_says_what_is_wrong(text, says):
    with pytest.raises(InvalidInputError, match=says):
        parse_replicas(text)


@pytest.mark.parametrize("num_cpus", [1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize("decoders", [1, 2, 3, 5])
@pytest.mark.parametrize("encoders", [1, 2, 3])
@pytest.mark.parametrize("ep", [1, 2])
def test_every_replica_fits_on_the_machine(num_cpus, decoders, encoders, ep):
    shares = split_cpus(num_cpus, {"decoder": decoders, "encoder": encoders, "preprocess": 4}, ep=ep)
    reserved = sum(s.replicas * s.num_cpus for s in shares.values())
    reserved += decoders * ep * (shares["decoder"].rank_cpus or 0.0)
    assert reserved <= num_cpus + 1e-9
    assert shares["decoder"].replicas == decoders and shares["preprocess"].replicas == 4
    assert shares["ingress"].replicas == 1  # a stage not named runs one replica
    for stage in ("encoder", "decoder"):
        threads = shares[stage].torch_threads
        assert threads is not None and 1 <= threads <= num_cpus
    # the decoder keeps all CPUs but one, split over its replicas (or its ranks under EP)
    decoder_cpus = decoders * (shares["decoder"].num_cpus + ep * (shares["decoder"].rank_cpus or 0.0))
    assert decoder_cpus == pytest.approx(max(num_cpus - 1, 1), abs=decoders * ep * 1e-4)


def test_three_decoders_on_two_cpus():
    shares = split_cpus(2, {"decoder": 3})
    assert shares["decoder"].num_cpus == 0.3333 and shares["decoder"].torch_threads == 1
    assert shares["encoder"].num_cpus == 1.0 and shares["encoder"].torch_threads == 2
    assert shares["ingress"].num_cpus == 0.0 and shares["ingress"].torch_threads is None
    line = describe(shares, 2)
    assert "decoder 3x 0.3333 CPU, 1 torch thread" in line and "encoder 1x 1 CPU, 2 torch threads" in line


def test_one_replica_each_is_the_placement_serve_always_had():
    shares = split_cpus(4, {})
    assert {s.replicas for s in shares.values()} == {1}
    assert shares["decoder"].num_cpus == 3 and shares["decoder"].torch_threads == 4
    assert shares["encoder"].torch_threads == 4


def test_replicas_become_fixed_autoscaling_and_threads(tmp_path: Path):
    out = app_args(namespace(replicas="decoder=3,preprocess=2"), tmp_path / "ck", num_cpus=2)
    placement = out["deployment_options"]
    assert set(placement) == set(STAGE_DEPLOYMENTS.values())
    decoder = placement["DecoderServer"]
    # autoscaling between N and N (Serve cancels gRPC streams only for autoscaled deployments)
    assert decoder["autoscaling_config"] == {"min_replicas": 3, "max_replicas": 3}
    assert decoder["ray_actor_options"]["num_cpus"] == 0.3333 and out["decoder"]["num_threads"] == 1
    assert placement["PreprocessServer"]["autoscaling_config"]["max_replicas"] == 2
    assert placement["ChatIngress"]["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 1}
    assert out["encoder"]["num_threads"] == 2
    # an `auto` KV cache takes a share of free memory: three decoders split the default share;
    # on CPU a step that decodes carries at most 512 prompt tokens
    assert out["decoder"]["engine"] == {"kv_cache_memory_fraction": 0.5 / 3, "max_prefill_with_decodes": 512}
    assert app_args(namespace(), tmp_path / "ck", num_cpus=2)["decoder"]["engine"] == {
        "max_prefill_with_decodes": 512
    }
    assert "engine" not in app_args(namespace(device="cuda"), tmp_path / "ck", num_cpus=2)["decoder"]


def test_without_autoscale_a_configs_autoscaling_is_not_used(tmp_path: Path):
    out = app_args(namespace(config="cluster/pipeline.yaml"), tmp_path / "ck", 4)
    for options in out["deployment_options"].values():
        assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 1}
        assert "label_selector" not in options["ray_actor_options"]  # a cluster's, not this machine's


def test_autoscale_takes_the_configs_sections_capped_here(tmp_path: Path, tiny_root: Path):
    args = namespace(config="cluster/pipeline.yaml", autoscale=True, replicas="ingress=1")
    out = app_args(args, tiny_root, 2)
    placement = out["deployment_options"]
    decoder = placement["DecoderServer"]["autoscaling_config"]
    # the shipped config's policy and delays, started at one replica, at most one per CPU here
    assert decoder["policy"]["policy_function"] == "services.scaling.serve_policies:DecoderScalingPolicy"
    assert decoder["min_replicas"] == 1 and decoder["max_replicas"] == 2
    assert placement["DecoderServer"]["ray_actor_options"]["num_cpus"] == 0.5  # 1 CPU over 2
    assert out["decoder"]["num_threads"] == 1
    assert placement["PreprocessServer"]["autoscaling_config"]["min_replicas"] == 1  # config: 2
    assert placement["ChatIngress"]["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 1}


def test_autoscale_caps_say_which_limit_binds():
    gib = 1 << 30
    caps = autoscale_caps(16, {"decoder": 8, "encoder": 4}, 25 * gib, {"decoder": 6 * gib, "encoder": gib})
    # 20 GiB usable: one encoder kept aside, three decoders of 6 GiB; the encoder gets what is left
    assert caps["decoder"].max_replicas == 3 and caps["decoder"].reason.startswith("memory for 3")
    assert caps["encoder"].max_replicas == 2 and caps["encoder"].reason.startswith("memory for 2")
    assert caps["ingress"].max_replicas == 1 and caps["ingress"].reason.startswith("config max 1")
    small = autoscale_caps(2, {"decoder": 8}, 25 * gib, {"decoder": gib, "encoder": gib})
    assert small["decoder"].max_replicas == 2 and small["decoder"].reason.startswith(
        "2 CPUs (and config max 8"
    )
    # a replica that does not fit at all still gets one: the stage cannot run without it
    assert autoscale_caps(2, {"decoder": 8}, gib, {"decoder": 4 * gib})["decoder"].max_replicas == 1


def test_a_replicas_footprint_comes_from_the_checkpoint(tiny_root: Path):
    sizes = replica_bytes(tiny_root, {"decoder": {"engine": {"kv_cache_tokens": 1024}}})
    assert PROCESS_BYTES < sizes["encoder"] < sizes["decoder"] < PROCESS_BYTES + (64 << 20)
    bigger = replica_bytes(tiny_root, {"decoder": {"engine": {"kv_cache_tokens": 1 << 20}}})
    # 3 layers x (32 + 16) latents x 4 bytes per token, fp32 on CPU
    assert bigger["decoder"] - sizes["decoder"] == ((1 << 20) - 1024) * 3 * 48 * 4
    # `auto` fills what is left: a replica must hold at least one sequence of the longest length
    auto = replica_bytes(tiny_root, {"decoder": {"engine": {"max_model_len": 4096}}})
    assert auto["decoder"] - sizes["decoder"] == (4096 - 1024) * 3 * 48 * 4


def test_decoder_replicas_under_expert_parallelism(tmp_path: Path):
    out = app_args(namespace(replicas="decoder=2", ep=2), tmp_path / "ck", num_cpus=5)
    assert out["decoder"]["ep"]["cpus_per_rank"] == 1.0 and out["decoder"]["num_threads"] == 1
    assert out["deployment_options"]["DecoderServer"]["ray_actor_options"]["num_cpus"] == 0
    assert out["decoder"]["engine"]["kv_cache_memory_fraction"] == 0.5 / 4  # a cache per rank
