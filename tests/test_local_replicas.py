"""`kimi-vl serve --replicas`: parsing the flag and splitting one machine's CPUs between the
stages' replicas (pure arithmetic, no Ray)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from services.common.errors import InvalidInputError
from services.pipeline.local import app_args
from services.pipeline.replicas import STAGE_DEPLOYMENTS, describe, parse_replicas, split_cpus


def namespace(**overrides: object) -> argparse.Namespace:
    values = {"config": None, "redis": None, "served_model_name": None, "api_key": None, "device": None,
              "ep": 1, "replicas": None, **overrides}  # fmt: skip
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


def test_replicas_override_a_configs_autoscaling_for_the_stages_they_name(tmp_path: Path):
    out = app_args(namespace(config="cluster/pipeline.yaml", replicas="decoder=2"), tmp_path / "ck", 4)
    placement = out["deployment_options"]
    assert placement["DecoderServer"]["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 2}
    kept = placement["PreprocessServer"]["autoscaling_config"]  # not named: the config's, from one
    assert kept["min_replicas"] == 1 and kept["target_ongoing_requests"] == 2
    assert "label_selector" not in placement["DecoderServer"]["ray_actor_options"]


def test_decoder_replicas_under_expert_parallelism(tmp_path: Path):
    out = app_args(namespace(replicas="decoder=2", ep=2), tmp_path / "ck", num_cpus=5)
    assert out["decoder"]["ep"]["cpus_per_rank"] == 1.0 and out["decoder"]["num_threads"] == 1
    assert out["deployment_options"]["DecoderServer"]["ray_actor_options"]["num_cpus"] == 0
