"""The node groups of cluster/rayservice.yaml, read from it (one place: the tests' nodes are the
production groups' shapes and labels, never a hand-kept copy): logical CPUs and GPUs per node, the
`kimi-vl/stage` label, min and max nodes, idle timeout. On this machine a GPU is a logical resource
of the node (the replicas run on the CPU: device cpu in the overlay), so the replicas ask for exactly
what they ask for in the cluster."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

RAYSERVICE = Path(__file__).resolve().parent.parent / "cluster" / "rayservice.yaml"


@dataclass(frozen=True)
class NodeGroup:
    name: str
    num_cpus: int  # Ray takes whole logical CPUs on `ray start`
    num_gpus: int
    labels: dict[str, str]
    min_nodes: int
    max_nodes: int
    idle_timeout_s: float


def _cpus(value: Any) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _group(spec: dict[str, Any], name: str, default_idle_s: float) -> NodeGroup:
    (container,) = spec["template"]["spec"]["containers"][:1]
    limits = (container.get("resources") or {}).get("limits") or {}
    params = spec.get("rayStartParams") or {}
    # Ray takes num-cpus when given, else the container's CPU limit (as on Kubernetes)
    cpus = _cpus(params.get("num-cpus", limits.get("cpu", 1)))
    return NodeGroup(
        name=name,
        num_cpus=int(cpus),
        num_gpus=int(limits.get("nvidia.com/gpu", 0)),
        labels=dict(spec.get("labels") or {}),
        min_nodes=int(spec.get("minReplicas", 0)),
        max_nodes=int(spec.get("maxReplicas", 1)),
        idle_timeout_s=float(spec.get("idleTimeoutSeconds", default_idle_s)),
    )


def node_groups(path: Path = RAYSERVICE) -> tuple[NodeGroup, dict[str, NodeGroup]]:
    """The head group, and the worker groups by name."""
    cluster = yaml.safe_load(path.read_text())["spec"]["rayClusterConfig"]
    idle = float((cluster.get("autoscalerOptions") or {}).get("idleTimeoutSeconds", 60))
    head = _group(cluster["headGroupSpec"], "head", idle)
    workers = {
        spec["groupName"]: _group(spec, spec["groupName"], idle) for spec in cluster["workerGroupSpecs"]
    }
    return head, workers


def fake_autoscaler_config(
    gcs_port: int, max_nodes: dict[str, int], idle_timeout_s: float, path: Path = RAYSERVICE
) -> dict[str, Any]:
    """A cluster config for Ray's fake multi-node provider (autoscaler v1) with one node type per
    worker group of the RayService, its resources and labels, each group's min nodes, `max_nodes`
    of each (this machine holds few), and `idle_timeout_s` for every group (the test's pace)."""
    head, workers = node_groups(path)
    types: dict[str, Any] = {
        "ray.head.default": {"resources": {"CPU": head.num_cpus}, "node_config": {}, "max_workers": 0},
    }
    for group in workers.values():
        resources: dict[str, float] = {"CPU": group.num_cpus}
        if group.num_gpus:
            resources["GPU"] = group.num_gpus
        cap = max_nodes.get(group.name, group.min_nodes)
        types[group.name] = {
            "resources": resources,
            "labels": group.labels,
            "node_config": {},
            "min_workers": min(group.min_nodes, cap),
            "max_workers": cap,
        }
    return {
        "cluster_name": "kimi-vl-fake",
        "max_workers": sum(t.get("max_workers", 0) for t in types.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_s / 60,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": f"127.0.0.1:{gcs_port}",
        },
        "available_node_types": types,
        "head_node_type": "ray.head.default",
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }
