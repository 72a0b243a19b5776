"""The cluster configs in cluster/: Serve configs against Ray Serve's own schema, the KubeRay
RayService against the vendored CRD, and the RayService's embedded Serve config against
cluster/pipeline.yaml. Starts no Ray and never imports services.pipeline (only the builders'
deployment-name constants of the three stage servers)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
PIPELINE = CLUSTER / "pipeline.yaml"
RAYSERVICE = CLUSTER / "rayservice.yaml"
CRD = CLUSTER / "schemas" / "kuberay-1.7.0" / "ray.io_rayservices.yaml"
# services/pipeline.py's build_app creates these (it is not imported here)
PIPELINE_DEPLOYMENTS = {"ChatIngress", "PreprocessServer", "VisionEncoderServer", "DecoderServer"}
SECRET_ENV = {"KIMI_VL_API_KEY", "KIMI_VL_ENCODER_TOKEN"}
STAGE_DEPLOYMENT = {"encoder": "VisionEncoderServer", "decoder": "DecoderServer"}  # GPU group label


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


SERVE_CONFIGS = sorted(p.name for p in CLUSTER.glob("*.yaml") if "applications" in (_load(p) or {}))


def _deployment_names(import_path: str) -> set[str]:
    """The deployment names the builder at `import_path` creates."""
    module = import_path.split(":")[0]
    if module == "services.pipeline":
        return PIPELINE_DEPLOYMENTS
    return {importlib.import_module(module).DEPLOYMENT_NAME}


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of an OpenAPI schema whose objects refuse fields they do not list.

    The API server silently prunes unknown fields, so a misspelled optional field would pass
    unnoticed; `kubectl apply` (field validation Strict) rejects it, and so does this."""
    out = dict(schema)
    if "properties" in schema:
        out["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            out[key] = _strict(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            out[key] = [_strict(s) for s in schema[key]]
    return out


@pytest.fixture(scope="module")
def rayservice_validator() -> jsonschema.Draft4Validator:
    # the CRD is ~1 MB: libyaml's parser takes a tenth of the pure-Python one's time
    loader = yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader
    crd = yaml.load(CRD.read_text(), Loader=loader)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1" and v["served"]]
    # OpenAPI v3.0's schema objects are closest to JSON Schema draft 4
    return jsonschema.Draft4Validator(_strict(v1["schema"]["openAPIV3Schema"]))


def _errors(validator: jsonschema.Draft4Validator, doc: Any) -> list[str]:
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc))


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_serve_config_validates_with_serve_schema(name: str) -> None:
    ServeDeploySchema.model_validate(_load(CLUSTER / name))


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_deployment_names_are_those_the_builder_creates(name: str) -> None:
    for app in _load(CLUSTER / name)["applications"]:
        unknown = {d["name"] for d in app.get("deployments", [])} - _deployment_names(app["import_path"])
        assert not unknown, f"{name}: {app['name']} configures deployments its builder lacks: {unknown}"


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_grpc_services_are_registered_cancel_safe(name: str) -> None:
    """Serve's generated-servicer registration lets cancelled streams run on (services.common.grpc_proxy)."""
    for path in _load(CLUSTER / name)["grpc_options"]["grpc_servicer_functions"]:
        module, function = path.rsplit(".", 1)
        assert module == "services.common.grpc_proxy", f"{name}: {path} is not a cancel-safe registration"
        assert callable(getattr(importlib.import_module(module), function))


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_ep_ranks_go_where_the_decoder_goes(name: str) -> None:
    """The ranks' placement-group bundles hold the GPUs, so they need the decoder's node labels."""
    for app in _load(CLUSTER / name)["applications"]:
        ep = app.get("args", {}).get("decoder", {}).get("ep")
        if ep is None:
            continue
        (decoder,) = [d for d in app["deployments"] if d["name"] == "DecoderServer"]
        assert ep["label_selector"] == decoder["ray_actor_options"]["label_selector"], name


SCALED_ON_LOAD = {
    "DecoderServer": "services.scaling.serve_policies:DecoderScalingPolicy",
    "PreprocessServer": "services.scaling.serve_policies:MediaScalingPolicy",
    "VisionEncoderServer": "services.scaling.serve_policies:MediaScalingPolicy",
}


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_stages_scale_on_their_own_load(name: str) -> None:
    """The decoder on its engine's figures, the media stages on pending items (not requests), with
    targets the policies accept; and a replica being removed is given time to finish its work."""
    seen = 0
    for app in _load(CLUSTER / name)["applications"]:
        for deployment in app.get("deployments") or []:
            policy_path = SCALED_ON_LOAD.get(deployment["name"])
            if policy_path is None or "autoscaling_config" not in deployment:
                continue
            policy = deployment["autoscaling_config"]["policy"]
            assert policy["policy_function"] == policy_path, (name, deployment["name"])
            module, attr = policy_path.split(":")
            getattr(importlib.import_module(module), attr)(**policy.get("policy_kwargs", {}))
            assert "target_ongoing_requests" not in deployment["autoscaling_config"]
            if name in ("pipeline.yaml", "pipeline-ep8.yaml"):
                assert deployment.get("graceful_shutdown_timeout_s", 0) >= 60, (name, deployment["name"])
            seen += 1
    assert seen


def test_pipeline_names_match_the_stage_servers() -> None:
    for module in ("preprocess.server", "vision_encoder.server", "decoder.service.server"):
        assert _deployment_names(f"services.{module}:build_app") <= PIPELINE_DEPLOYMENTS


def test_rayservice_validates_against_kuberay_crd(rayservice_validator: jsonschema.Draft4Validator) -> None:
    assert _errors(rayservice_validator, _load(RAYSERVICE)) == []


def test_embedded_serve_config_is_pipeline_yaml() -> None:
    embedded = yaml.safe_load(_load(RAYSERVICE)["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    assert embedded == _load(PIPELINE)


def test_rayservice_containers_get_secrets_models_and_ray_version() -> None:
    cluster = _load(RAYSERVICE)["spec"]["rayClusterConfig"]
    # the Serve configs were validated with this Ray's schema: the image must run the same Ray
    assert cluster["rayVersion"] == ray.__version__
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        (container,) = group["template"]["spec"]["containers"]
        from_secret = {e["name"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
        assert SECRET_ENV <= from_secret, container["name"]
        assert {"mountPath": "/models", "name": "models", "readOnly": True} in container["volumeMounts"]
        assert f"ray{cluster['rayVersion']}" in container["image"]


def test_gpu_groups_can_hold_every_replica_serve_may_start() -> None:
    rayservice = _load(RAYSERVICE)
    app = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]
    max_replicas = {d["name"]: d["autoscaling_config"]["max_replicas"] for d in app["deployments"]}
    for group in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        deployment = STAGE_DEPLOYMENT.get(group["labels"]["kimi-vl/stage"])
        if deployment is None:
            continue
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1  # one replica per pod
        assert group["maxReplicas"] >= max_replicas[deployment]


def test_head_exposes_the_serve_ports() -> None:
    rayservice = _load(RAYSERVICE)
    serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    (head,) = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    # KubeRay's serve Service takes the head's ports named `serve` and `serve-*`
    assert ports["serve"] == serve["http_options"]["port"]
    assert ports["serve-grpc"] == serve["grpc_options"]["port"]


@pytest.mark.parametrize(
    ("typo", "expected"),
    [
        (("groupName: cpu", "groupname: cpu"), "'groupName' is a required property"),
        # an optional field's misspelling is caught only because _strict refuses unknown fields
        (("enableInTreeAutoscaling: true", "enableInTreeAutoScaling: true"), "'enableInTreeAutoScaling' was"),
        (("maxReplicas: 4", 'maxReplicas: "4"'), "'4' is not of type 'integer'"),
        (("upscalingMode: Default", "upscalingMode: Fast"), "'Fast' is not one of"),
        (("serveConfigV2: |", "serveConfigV2:"), "is not of type 'string'"),  # a mapping, not a string
    ],
    ids=["required-field", "optional-field", "wrong-type", "bad-enum", "serve-config-not-a-string"],
)
def test_crd_validation_catches_typos(
    rayservice_validator: jsonschema.Draft4Validator, typo: tuple[str, str], expected: str
) -> None:
    text = RAYSERVICE.read_text()
    assert text.count(typo[0]) == 1
    rayservice = yaml.safe_load(text.replace(*typo))
    assert expected in "\n".join(_errors(rayservice_validator, rayservice))
