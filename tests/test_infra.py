"""infra/: the Ray cluster launcher config passes Ray's own checks (what `ray up` runs before it contacts a node);
every Kubernetes manifest validates against the Kubernetes API schema (kubernetes-validate, offline), the KubeRay
resources' pod templates too; no credential is written in any of them."""

import subprocess

import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO

INFRA = REPO / "infra"
K8S_VERSION = "1.33.0"
MANIFESTS = sorted((INFRA / "k8s").glob("*.yaml"))


def _documents() -> list[tuple[str, dict]]:
    return [(f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc)
            for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_ray_cluster_launcher_config_passes_rays_checks():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    prepared = prepare_config(config)  # merges Ray's defaults for the provider, checks head_ip/worker_ips
    validate_config(prepared)  # Ray's ray-schema.json
    assert set(prepared["available_node_types"]) == {"local.cluster.node"}
    head = " ".join(prepared["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "ray start --head" in head


@pytest.mark.parametrize("name,doc", _documents(), ids=lambda v: v if isinstance(v, str) else "")
def test_kubernetes_manifest_validates(name, doc):
    if doc["apiVersion"].startswith("ray.io/"):
        _validate_kuberay(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert doc["metadata"].get("namespace", "firesight") == "firesight"
    if doc["kind"] == "Service":
        assert doc["spec"]["type"] == "ClusterIP", "no Firesight service is exposed outside the cluster"


def _validate_kuberay(doc: dict) -> None:
    """The fields the KubeRay operator requires, and each pod template against the core v1 PodTemplate schema
    (the KubeRay CRD schemas themselves are not available offline)."""
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        assert isinstance(spec["entrypoint"], str) and spec["entrypoint"]
        assert spec.get("clusterSelector") or spec.get("rayClusterSpec")
        spec = spec.get("rayClusterSpec")
        if spec is None:
            return
    assert doc["kind"] in ("RayCluster", "RayJob")
    templates = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    for group, group_spec in templates:
        assert all(isinstance(v, str) for v in group_spec["rayStartParams"].values()), f"{group}: rayStartParams are strings"
        if group != "head":
            assert 0 <= group_spec["minReplicas"] <= group_spec["replicas"] <= group_spec["maxReplicas"]
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group},
                                      "template": group_spec["template"]}, K8S_VERSION, strict=True)


def test_manifests_take_credentials_from_a_secret_only():
    example = dict(line.split("=", 1) for line in (INFRA / "k8s" / "secrets.example.env").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert set(example) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} and not any(example.values())
    for name, doc in _documents():
        for env in _env_entries(doc):
            if env["name"] in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"):
                assert "value" not in env and env["valueFrom"]["secretKeyRef"]["name"] == "firesight-s3", name
    ignored = subprocess.run(["git", "check-ignore", "-q", "infra/k8s/secrets.env"], cwd=REPO)
    assert ignored.returncode == 0, "infra/k8s/secrets.env must be git-ignored"


def _env_entries(node) -> list[dict]:
    if isinstance(node, dict):
        found = [e for e in node.get("env", []) if isinstance(e, dict)] if isinstance(node.get("env"), list) else []
        return found + [e for v in node.values() for e in _env_entries(v)]
    if isinstance(node, list):
        return [e for v in node for e in _env_entries(v)]
    return []


def test_mlflow_server_script_binds_loopback_by_default():
    script = INFRA / "mlflow-server.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert '--host "${HOST:-127.0.0.1}"' in script.read_text()
