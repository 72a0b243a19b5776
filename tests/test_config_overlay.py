"""`kimi-vl render-config`: overlays merged into the shipped Serve config (pure data), and the
CPU-nodes overlay rendering a config Serve's own schema accepts, with every stage still on its
labelled node group."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.common.errors import InvalidInputError
from services.pipeline.config_overlay import overlay_config, render, set_value

ROOT = Path(__file__).resolve().parent.parent
CPU_NODES = ROOT / "cluster" / "overlays" / "cpu-nodes.yaml"


def test_mappings_merge_and_null_removes():
    base = {"a": {"x": 1, "y": 2}, "b": [1, 2], "c": 3}
    out = overlay_config(base, {"a": {"y": 5, "z": 6}, "b": [9], "c": None})
    assert out == {"a": {"x": 1, "y": 5, "z": 6}, "b": [9]}
    assert base == {"a": {"x": 1, "y": 2}, "b": [1, 2], "c": 3}  # untouched


def test_named_lists_merge_by_name():
    base = {"deployments": [{"name": "A", "n": 1, "opts": {"cpu": 4, "gpu": 1}}, {"name": "B", "n": 2}]}
    out = overlay_config(base, {"deployments": [{"name": "A", "opts": {"gpu": None}}, {"name": "C", "n": 3}]})
    assert out["deployments"] == [{"name": "A", "n": 1, "opts": {"cpu": 4}}, {"name": "B", "n": 2},
                                  {"name": "C", "n": 3}]  # fmt: skip


def test_set_addresses_list_items_by_name():
    config = {"applications": [{"name": "kimi-vl", "args": {"redis_url": "redis://x"}}]}
    out = set_value(config, "applications.kimi-vl.args.redis_url", "redis://127.0.0.1:1/0")
    assert out["applications"][0]["args"]["redis_url"] == "redis://127.0.0.1:1/0"
    assert set_value(config, "http_options.port", 8123)["http_options"] == {"port": 8123}
    with pytest.raises(InvalidInputError, match="no list item named 'other'"):
        set_value(config, "applications.other.args", 1)


def test_the_cpu_nodes_overlay_keeps_the_shipped_config_and_serve_accepts_it():
    from ray.serve.schema import ServeDeploySchema

    shipped = yaml.safe_load((ROOT / "cluster" / "pipeline.yaml").read_text())
    sets = ["applications.kimi-vl.args.checkpoint_dir=/models/tiny", "http_options.port=8123"]
    config = render(ROOT / "cluster" / "pipeline.yaml", [CPU_NODES], sets)
    ServeDeploySchema.model_validate(config)
    assert config["proxy_location"] == "HeadOnly" and config["http_options"]["host"] == "127.0.0.1"
    assert config["http_options"]["port"] == 8123
    (app,), (shipped_app,) = config["applications"], shipped["applications"]
    assert app["args"]["checkpoint_dir"] == "/models/tiny"
    assert (
        app["args"]["decoder"]["device"] == "cpu"
        and app["args"]["frontend"] == shipped_app["args"]["frontend"]
    )
    for deployment, original in zip(app["deployments"], shipped_app["deployments"], strict=True):
        options = deployment["ray_actor_options"]
        # the cluster's resources and node groups: the nodes carry those (GPUs as logical ones)
        assert options == original["ray_actor_options"]
        # the autoscaling policy and its targets are the shipped ones
        assert deployment["autoscaling_config"].get("policy") == original["autoscaling_config"].get("policy")


def test_the_command_writes_the_config(tmp_path):
    out = tmp_path / "pipeline-cpu.yaml"
    subprocess.run(
        [sys.executable, "-m", "services.cli", "render-config", "--overlay", str(CPU_NODES),
         "--set", "applications.kimi-vl.args.redis_url=null", "--out", str(out)],
        check=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert yaml.safe_load(out.read_text())["applications"][0]["args"]["redis_url"] is None
    bad = subprocess.run([sys.executable, "-m", "services.cli", "render-config", "--set", "nonsense"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert bad.returncode == 2 and "--set takes PATH=VALUE" in bad.stderr
