"""infra/: the Ray cluster launcher config passes Ray's own checks (what `ray up` runs before it contacts a node);
every Kubernetes manifest validates against the Kubernetes API schema (kubernetes-validate, offline), the KubeRay
resources' pod templates too; NetworkPolicies admit each pod's clients only; no credential is written in any
manifest, the MinIO root and MLflow admin Secrets reach only their servers and setup Jobs; MLflow runs with auth,
and `mlflow-server.sh` refuses to listen beyond loopback without it."""

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import time

import kubernetes_validate
import pytest
import yaml

from components.redact import redact
from tests.conftest import REPO, free_port, stop_group

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


SECRET_SECTION = re.compile(r"^# Secret ([a-z0-9-]+)")
CREDENTIAL_ENV = re.compile(r"(ACCESS_KEY_ID|SECRET|PASSWORD|TOKEN|USER|USERNAME)(_[A-Z]+)?$")
PORTS = (5000, 6379, 8265, 9000, 9001)  # MLflow, Ray GCS, Ray dashboard, MinIO S3, MinIO console


def _doc(name: str) -> dict:
    return next(doc for key, doc in _documents() if key.endswith(f":{name}"))


def _pods() -> dict[str, dict[str, str]]:
    """Every pod the manifests make, by workload: its labels (those Kubernetes and KubeRay add included)."""
    pods = {}
    for _, doc in _documents():
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind in ("Deployment", "Job"):
            labels = dict(doc["spec"]["template"]["metadata"].get("labels", {}))
            if kind == "Job":
                labels["batch.kubernetes.io/job-name"] = name
            pods[f"{kind}/{name}"] = labels
        elif kind == "RayCluster":
            pods["ray-head"] = {"ray.io/cluster": name, "ray.io/node-type": "head"}
            for group in doc["spec"]["workerGroupSpecs"]:
                pods[f"ray-worker/{group['groupName']}"] = {"ray.io/cluster": name, "ray.io/node-type": "worker",
                                                            "ray.io/group": group["groupName"]}
        elif kind == "RayJob":  # KubeRay's submitter Job carries the RayJob's name
            pods[f"Job/{name}"] = {"batch.kubernetes.io/job-name": name}
    return pods


def _matches(selector: dict, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are checked here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _peer_admits(peer: dict, labels: dict[str, str]) -> bool:
    """A `from` peer admits a pod of the firesight namespace with `labels`."""
    assert "ipBlock" not in peer, "no policy admits by IP"
    if "namespaceSelector" in peer and not _matches(peer["namespaceSelector"],
                                                    {"kubernetes.io/metadata.name": "firesight"}):
        return False
    return _matches(peer.get("podSelector", {}), labels)


def _admitted(policies: list[dict], target: dict[str, str], source: dict[str, str], port: int) -> bool:
    """Whether the NetworkPolicies let a pod with labels `source` connect to `port` of a pod with labels `target`."""
    policies = [p for p in policies if "Ingress" in p["policyTypes"] and _matches(p["podSelector"], target)]
    if not policies:
        return True  # a pod no policy selects admits everything
    return any(any(_peer_admits(peer, source) for peer in rule.get("from", [{}]))
               and (not rule.get("ports") or any(p["port"] == port for p in rule["ports"]))
               for policy in policies for rule in policy.get("ingress", []))


def test_network_policies_admit_each_pods_clients_only():
    pods = _pods()
    policies = [doc["spec"] for _, doc in _documents() if doc["kind"] == "NetworkPolicy"]
    assert set(pods) == {"Deployment/minio", "Deployment/mlflow", "Job/minio-users", "Job/mlflow-users",
                         "ray-head", "ray-worker/cpu", "Job/firesight-repro"}
    ray = {"ray-head", "ray-worker/cpu"}
    expected = {
        ("Deployment/mlflow", 5000): ray | {"Job/mlflow-users"},
        ("Deployment/minio", 9000): ray | {"Deployment/mlflow", "Job/minio-users"},
        ("ray-head", 8265): ray | {"Job/firesight-repro"},
        **{("ray-head", port): ray for port in PORTS if port != 8265},
        **{("ray-worker/cpu", port): ray for port in PORTS},
    }
    for target, target_labels in pods.items():
        for port in PORTS:
            admitted = {source for source, labels in pods.items() if _admitted(policies, target_labels, labels, port)}
            assert admitted == expected.get((target, port), set()), f"{target}:{port} admits {sorted(admitted)}"


def _secret_sections(text: str) -> dict[str, dict[str, str]]:
    """secrets.example.env's layout (create-secrets.sh reads the same): Secret name -> its KEY=value lines."""
    sections: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        if match := SECRET_SECTION.match(line):
            sections[match[1]] = {}
        elif line and not line.startswith("#"):
            key, value = line.split("=", 1)
            sections[list(sections)[-1]][key] = value
    return sections


def _secret_refs(node, found: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """Every (Secret name, key) a manifest node refers to; whole-Secret references (envFrom, volumes) are refused."""
    found = [] if found is None else found
    if isinstance(node, dict):
        assert "secretRef" not in node and "secret" not in node, "Secrets are referenced key by key"
        if "secretKeyRef" in node:
            found.append((node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]))
        for value in node.values():
            _secret_refs(value, found)
    elif isinstance(node, list):
        for value in node:
            _secret_refs(value, found)
    return found


def _strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def test_manifests_take_credentials_from_secrets_only():
    sections = _secret_sections((INFRA / "k8s" / "secrets.example.env").read_text())
    assert set(sections) == {"firesight-minio-root", "firesight-s3", "firesight-mlflow-admin", "firesight-mlflow"}
    assert not any(value for keys in sections.values() for value in keys.values()), "placeholders only"
    readers: dict[str, set[str]] = {}
    for name, doc in _documents():
        assert doc["kind"] != "Secret", f"{name}: Secrets are created from secrets.env, never committed"
        for secret, key in _secret_refs(doc):
            assert key in sections.get(secret, {}), f"{name}: {secret}/{key} is not in secrets.example.env"
            readers.setdefault(secret, set()).add(name.split(":")[1])
        for env in _env_entries(doc):
            if CREDENTIAL_ENV.search(env["name"]):
                assert "value" not in env and "secretKeyRef" in env["valueFrom"], f"{name}: {env['name']} is a literal"
        assert all(redact(s) == s for s in _strings(doc)), f"{name}: a credential in a URL"
    assert readers["firesight-minio-root"] == {"Deployment/minio", "Job/minio-users"}
    assert readers["firesight-mlflow-admin"] == {"Deployment/mlflow", "Job/mlflow-users"}
    assert readers["firesight-s3"] == {"Deployment/mlflow", "Job/minio-users", "RayCluster/firesight"}
    for path in ("infra/k8s/secrets.env", ".env", "mlflow-server.db", "basic_auth.db"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0, f"{path} is not git-ignored"


def _env_entries(node) -> list[dict]:
    if isinstance(node, dict):
        found = [e for e in node.get("env", []) if isinstance(e, dict)] if isinstance(node.get("env"), list) else []
        return found + [e for v in node.values() for e in _env_entries(v)]
    if isinstance(node, list):
        return [e for v in node for e in _env_entries(v)]
    return []


def test_the_pipeline_s3_user_is_limited_to_the_firesight_bucket():
    policy = json.loads(_doc("ConfigMap/minio-pipeline-policy")["data"]["firesight-pipeline.json"])
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        assert set(statement["Resource"]) <= {"arn:aws:s3:::firesight", "arn:aws:s3:::firesight/*"}
        assert not [a for a in statement["Action"] if "*" in a or re.match(r"s3:(Create|Delete|Put)Bucket", a)], \
            "no wildcard, no bucket creation, deletion or policy change"
    script = _doc("Job/minio-users")["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "mc admin policy attach firesight firesight-pipeline --user \"$AWS_ACCESS_KEY_ID\"" in script


def _mlflow_container() -> dict:
    return _doc("Deployment/mlflow")["spec"]["template"]["spec"]["containers"][0]


def _auth_ini() -> configparser.ConfigParser:
    ini = configparser.ConfigParser()
    ini.read_string(_doc("ConfigMap/mlflow-auth")["data"]["basic_auth.ini"])
    return ini


def test_mlflow_runs_with_auth_and_its_clients_log_in():
    container = _mlflow_container()
    assert "--app-name=basic-auth" in container["args"]
    env = {e["name"]: e for e in container["env"]}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "auth")
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == f"{mount['mountPath']}/basic_auth.ini"
    assert _auth_ini()["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    for key in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "firesight-mlflow-admin", "key": key}
    ray = _doc("RayCluster/firesight")["spec"]
    for template in [ray["headGroupSpec"]["template"]] + [g["template"] for g in ray["workerGroupSpecs"]]:
        client = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            assert client[key]["valueFrom"]["secretKeyRef"] == {"name": "firesight-mlflow", "key": key}


def test_create_secrets_makes_one_secret_per_section_and_never_passes_a_value_on_a_command_line(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(  # records its arguments and the env file it is given
        '#!/usr/bin/env bash\necho "$*" >> "$CALLS"\nfor a in "$@"; do case "$a" in --from-env-file=*) '
        'cat "${a#--from-env-file=}" >> "$CALLS";; esac; done\n')
    (bin_dir / "kubectl").chmod(0o755)
    example = (INFRA / "k8s" / "secrets.example.env").read_text()
    filled = re.sub(r"^([A-Z_]+)=$", lambda m: f"{m[1]}=value-of-{m[1]}", example, flags=re.MULTILINE)
    (tmp_path / "secrets.env").write_text(filled)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls")}
    script = str(INFRA / "k8s" / "create-secrets.sh")

    done = subprocess.run([script, str(tmp_path / "secrets.env")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    creates = [i for i, line in enumerate(calls) if line.startswith("-n firesight create secret generic")]
    made = {calls[i].split()[5]: set(calls[i + 1:(creates + [len(calls)])[n + 1]]) - {"apply -f -"}
            for n, i in enumerate(creates)}
    assert made == {name: {f"{k}=value-of-{k}" for k in keys} for name, keys in _secret_sections(example).items()}
    assert not any("value-of-" in line for line in calls if "secret generic" in line or line == "apply -f -")
    assert "value-of-" not in done.stdout + done.stderr

    (tmp_path / "secrets.env").write_text(filled.replace("MLFLOW_TRACKING_PASSWORD=value-of-MLFLOW_TRACKING_PASSWORD",
                                                         "MLFLOW_TRACKING_PASSWORD="))
    done = subprocess.run([script, str(tmp_path / "secrets.env")], env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == "create-secrets.sh: MLFLOW_TRACKING_PASSWORD of Secret firesight-mlflow is empty"


def _fake_checkout(tmp_path) -> tuple[str, str]:
    """infra/mlflow-server.sh in a checkout whose .venv/bin/mlflow only records its arguments."""
    (tmp_path / "infra").mkdir()
    shutil.copy2(INFRA / "mlflow-server.sh", tmp_path / "infra" / "mlflow-server.sh")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "mlflow").write_text('#!/usr/bin/env bash\necho "$*"\n')
    (tmp_path / ".venv" / "bin" / "mlflow").chmod(0o755)
    return str(tmp_path / "infra" / "mlflow-server.sh"), str(tmp_path)


@pytest.mark.parametrize("host, password, expected", [
    (None, None, "server --backend-store-uri sqlite:///mlflow.db --artifacts-destination ./mlartifacts "
                 "--host 127.0.0.1 --port 5000 --workers 1"),
    ("0.0.0.0", "admin-password-1", "server --app-name basic-auth --backend-store-uri sqlite:///mlflow.db "
                                    "--artifacts-destination ./mlartifacts --host 0.0.0.0 --port 5000 --workers 1"),
    ("0.0.0.0", None, "mlflow-server.sh: refusing to listen on 0.0.0.0 without auth"),
    ("10.0.0.5", "", "mlflow-server.sh: refusing to listen on 10.0.0.5 without auth"),
])
def test_mlflow_server_script_binds_loopback_and_needs_auth_beyond_it(tmp_path, host, password, expected):
    script, _ = _fake_checkout(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("HOST", "MLFLOW_AUTH_ADMIN_PASSWORD")}
    env.update({k: v for k, v in {"HOST": host, "MLFLOW_AUTH_ADMIN_PASSWORD": password}.items() if v is not None})
    done = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=30)
    if expected.startswith("server "):
        assert done.returncode == 0 and done.stdout.strip() == expected, done.stderr
    else:
        assert done.returncode == 2 and done.stderr.startswith(expected) and not done.stdout


def test_the_auth_config_and_users_job_work_on_a_real_mlflow_server(tmp_path, monkeypatch):
    """mlflow-server.sh with the cluster's auth settings; the mlflow-users Job's script creates the pipeline user,
    which then runs a stage; without credentials a stage fails with one line."""
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs mlflow[auth]")
    import mlflow

    from components import tracking
    from components.tracking import TrackingError

    ini = _auth_ini()
    ini["mlflow"]["database_uri"] = f"sqlite:///{tmp_path / 'mlflow-auth.db'}"
    with open(tmp_path / "basic_auth.ini", "w") as f:
        ini.write(f)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    admin = {"MLFLOW_AUTH_ADMIN_USERNAME": "firesight-admin", "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-password-1"}
    pipeline = {"MLFLOW_TRACKING_USERNAME": "firesight", "MLFLOW_TRACKING_PASSWORD": "pipeline-password-1"}
    server = subprocess.Popen(
        ["bash", str(INFRA / "mlflow-server.sh")], start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "server.log", "w"),
        env={**os.environ, **admin, "PORT": str(port), "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
             "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-key", "BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
             "ARTIFACTS_DESTINATION": str(tmp_path / "artifacts")})
    try:
        import requests

        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                if requests.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                assert time.monotonic() < deadline, "mlflow server not up after 300 s"
                time.sleep(1)
        job = _doc("Job/mlflow-users")["spec"]["template"]["spec"]["containers"][0]
        users = {"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": admin["MLFLOW_AUTH_ADMIN_USERNAME"],
                 "MLFLOW_TRACKING_PASSWORD": admin["MLFLOW_AUTH_ADMIN_PASSWORD"],
                 "PIPELINE_USERNAME": pipeline["MLFLOW_TRACKING_USERNAME"],
                 "PIPELINE_PASSWORD": pipeline["MLFLOW_TRACKING_PASSWORD"]}
        for expected in ("created MLflow user firesight", "MLflow user firesight exists; its password is set"):
            done = subprocess.run([sys.executable, "-c", job["args"][0]], env={**os.environ, **users},
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0 and done.stdout.strip() == expected, done.stderr[-2000:]

        before = mlflow.get_tracking_uri()
        for key, value in {"MLFLOW_TRACKING_URI": url, **pipeline}.items():
            monkeypatch.setenv(key, value)  # restored after the test, MLflow's own setting of the URI included
        try:
            tracking.configure("unused", "firesight")
            with tracking.stage_run("classify", {"lr": 0.1}):
                tracking.log_history([{"epoch": 0, "val_map": 0.5}])
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
            with pytest.raises(TrackingError, match=f"^MLflow at {url}: cannot open experiment firesight: "
                                                    "authentication failed"):
                tracking.configure("unused", "firesight")
        finally:
            mlflow.set_tracking_uri(before)
    finally:
        stop_group(server)
