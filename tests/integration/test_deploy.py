"""The Kubernetes manifests in deploy/, rendered, validated and cross-checked without a cluster.

The real kustomize renders deploy/base and deploy/overlays/redis: the one built into kubectl
(``kubectl kustomize``, what ``kubectl apply -k`` runs), which needs no cluster. Every rendered
object and both Secret templates then pass ``kubernetes-validate --strict`` against the
Kubernetes schemas of the oldest and the newest version we support, and the gateway config in
the ConfigMap passes ``oidc-gateway check`` with exactly the environment the Deployment gives the
gateway container. The remaining tests catch what a schema cannot and a user would otherwise
find in a cluster: a Service or policy that selects no pod, a probe on the wrong port, a
``${VAR}`` the pod never sets, memory sessions shared by several replicas, a missing hardening
setting, or an unfilled Secret that would start anyway.
"""

from __future__ import annotations

import base64
import copy
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway import __version__
from gateway.config import Config, load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUSTOMIZATIONS = {"base": DEPLOY / "base", "redis": DEPLOY / "overlays" / "redis"}
# Oldest and newest Kubernetes whose schemas kubernetes-validate ships that we promise to support.
K8S_VERSIONS = ("1.30.0", "1.37.0")
GATEWAY_CONTAINER = "oidc-gateway"
CONFIG_DIR = "/etc/oidc-gateway"  # the directory of the Dockerfile's CMD config path
RUN_TIMEOUT = 120

Doc = dict[str, Any]

# How a person fills each key of a Secret template, as its comments and the README say.
SECRET_FILLERS: dict[str, Callable[[], str]] = {
    "client-secret": lambda: secrets.token_urlsafe(24),
    "session-key": lambda: base64.b64encode(secrets.token_bytes(32)).decode(),
    "redis-password": lambda: secrets.token_hex(32),
}


@dataclass(frozen=True)
class Rendered:
    """One kustomization as ``kubectl apply -k`` would send it, and its Secret template."""

    name: str
    directory: Path
    docs: list[Doc]
    secret_template: Doc
    secret: dict[str, str]  # the template filled in as an operator would

    def of_kind(self, kind: str) -> list[Doc]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str) -> Doc:
        found = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.name}: expected one {kind} {name}, found {len(found)}"
        return found[0]

    def gateway_deployment(self) -> Doc:
        found = [d for d in self.of_kind("Deployment") if _container(d, GATEWAY_CONTAINER)]
        assert len(found) == 1, f"{self.name}: expected one Deployment with the gateway sidecar"
        return found[0]

    def gateway_config_text(self) -> str:
        """The config.yaml of the ConfigMap mounted at the gateway's config directory."""
        deployment = self.gateway_deployment()
        pod = deployment["spec"]["template"]["spec"]
        gw = _container(deployment, GATEWAY_CONTAINER)
        assert gw is not None
        mounts = [m for m in gw.get("volumeMounts", []) if m["mountPath"] == CONFIG_DIR]
        assert len(mounts) == 1, f"{self.name}: nothing mounted at {CONFIG_DIR}"
        assert "subPath" not in mounts[0], "a subPath mount never sees ConfigMap updates"
        volume = next(v for v in pod["volumes"] if v["name"] == mounts[0]["name"])
        config_map = self.one("ConfigMap", volume["configMap"]["name"])
        text = config_map["data"]["config.yaml"]
        assert isinstance(text, str)
        return text


def _container(deployment: Doc, name: str) -> Doc | None:
    for c in deployment["spec"]["template"]["spec"]["containers"]:
        if c["name"] == name:
            return c  # type: ignore[no-any-return]
    return None


def _kubectl() -> str:
    path = shutil.which("kubectl")
    assert path, (
        "kubectl not found: deploy/ is rendered with `kubectl kustomize` (kustomize v5 is "
        "built into kubectl 1.27+); install kubectl from your distribution or Kubernetes' "
        "package repository"
    )
    return path


def render(directory: Path) -> list[Doc]:
    out = subprocess.run(
        [_kubectl(), "kustomize", str(directory)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False,
    )
    assert out.returncode == 0, f"kubectl kustomize {directory} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=sorted(KUSTOMIZATIONS))
def rendered(request: pytest.FixtureRequest) -> Rendered:
    name: str = request.param
    directory = KUSTOMIZATIONS[name]
    template = yaml.safe_load((directory / "secret.example.yaml").read_text())
    return Rendered(name, directory, render(directory), template, filled_secret(template))


def filled_secret(template: Doc) -> dict[str, str]:
    """The Secret's data as an operator fills it in (every key must have a known filler)."""
    data: dict[str, str] = template["stringData"]
    unknown = set(data) - set(SECRET_FILLERS)
    assert not unknown, f"this test does not know how to fill Secret keys {sorted(unknown)}"
    return {key: SECRET_FILLERS[key]() for key in data}


def container_env(container: Doc, secret_name: str, secret: dict[str, str]) -> dict[str, str]:
    """The environment Kubernetes gives the container: plain values and secretKeyRefs."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        ref = item["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret_name, f"{item['name']} reads an unknown Secret {ref['name']}"
        assert ref["key"] in secret, f"{item['name']} reads {ref['key']!r}, not in the template"
        env[item["name"]] = secret[ref["key"]]
    return env


def gateway_env(r: Rendered, secret: dict[str, str]) -> dict[str, str]:
    gw = _container(r.gateway_deployment(), GATEWAY_CONTAINER)
    assert gw is not None
    return container_env(gw, r.secret_template["metadata"]["name"], secret)


def run_check(
    config_text: str, env: dict[str, str], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """``oidc-gateway check`` with only the pod's environment (plus PATH to start Python)."""
    path = tmp_path / "config.yaml"
    path.write_text(config_text)
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check", "-c", str(path)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False,
        env={"PATH": "/usr/bin:/bin", **env},
    )


def pod_templates(r: Rendered) -> Iterator[tuple[Doc, Doc]]:
    """(workload, pod template) for every Deployment/StatefulSet in the render."""
    for d in r.docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            yield d, d["spec"]["template"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def named_port(container: Doc, port: int | str) -> int:
    """A probe's or Service's port (number or name) → the container's port number."""
    if isinstance(port, int):
        assert any(p["containerPort"] == port for p in container.get("ports", [])), port
        return port
    numbers = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert len(numbers) == 1, f"container {container['name']} has no port named {port!r}"
    return int(numbers[0])


def validate(paths: list[Path], version: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet",
         "-k", version, *map(str, paths)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False,
    )


# ---------------------------------------------------------------------------------------------
# Schema validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_is_valid_kubernetes(
    rendered: Rendered, version: str, tmp_path: Path
) -> None:
    manifest = tmp_path / f"{rendered.name}.yaml"
    manifest.write_text(yaml.safe_dump_all(rendered.docs))
    out = validate([manifest, rendered.directory / "secret.example.yaml"], version)
    assert out.returncode == 0, out.stdout + out.stderr
    kinds = {d["kind"] for d in rendered.docs}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= kinds


def test_the_validation_rejects_a_misspelt_field(tmp_path: Path) -> None:
    """The check above can fail: one typo in the rendered Deployment is refused."""
    docs = render(KUSTOMIZATIONS["base"])
    broken = copy.deepcopy(docs)
    deployment = next(d for d in broken if d["kind"] == "Deployment")
    gw = _container(deployment, GATEWAY_CONTAINER)
    assert gw is not None
    gw["securityContxt"] = gw.pop("securityContext")
    manifest = tmp_path / "broken.yaml"
    manifest.write_text(yaml.safe_dump_all(broken))
    out = validate([manifest], K8S_VERSIONS[-1])
    assert out.returncode != 0
    assert "securityContxt" in out.stdout + out.stderr


def test_applying_never_overwrites_the_real_secret(rendered: Rendered) -> None:
    """The Secret is a template applied once by hand, never part of ``kubectl apply -k``."""
    assert rendered.of_kind("Secret") == []
    assert rendered.secret_template["kind"] == "Secret"
    values = rendered.secret_template["stringData"].values()
    assert all(v.startswith("REPLACE-ME") for v in values)


# ---------------------------------------------------------------------------------------------
# The embedded gateway config
# ---------------------------------------------------------------------------------------------


def test_the_gateway_config_passes_check_with_the_pods_environment(
    rendered: Rendered, tmp_path: Path
) -> None:
    env = gateway_env(rendered, rendered.secret)
    out = run_check(rendered.gateway_config_text(), env, tmp_path)
    assert (out.returncode, out.stdout.strip()) == (0, "ok"), out.stderr


def test_an_unfilled_secret_keeps_the_gateway_from_starting(
    rendered: Rendered, tmp_path: Path
) -> None:
    """Applied with its placeholders, the template gives a config that fails, naming the key."""
    placeholders = {k: str(v) for k, v in rendered.secret_template["stringData"].items()}
    out = run_check(rendered.gateway_config_text(), gateway_env(rendered, placeholders), tmp_path)
    assert out.returncode == 2
    assert "session.keys[0]" in out.stderr
    assert "gen-key" in out.stderr


def loaded_config(r: Rendered) -> Config:
    env = gateway_env(r, r.secret)
    return load_config(r.gateway_config_text(), env)


def test_the_config_listens_where_the_pod_and_service_send_traffic(rendered: Rendered) -> None:
    config = loaded_config(rendered)
    deployment = rendered.gateway_deployment()
    gw = _container(deployment, GATEWAY_CONTAINER)
    assert gw is not None
    host, port = config.server.listen_address
    assert host == "0.0.0.0"  # the kubelet's probes and the Service reach the pod IP
    assert named_port(gw, gw["livenessProbe"]["httpGet"]["port"]) == port
    assert named_port(gw, gw["readinessProbe"]["httpGet"]["port"]) == port
    assert gw["livenessProbe"]["httpGet"]["path"] == "/ping"
    assert gw["readinessProbe"]["httpGet"]["path"] == "/ready"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    services = [s for s in rendered.of_kind("Service") if selects(s["spec"]["selector"], labels)]
    assert len(services) == 1
    (svc_port,) = services[0]["spec"]["ports"]
    assert svc_port["port"] == 80
    assert named_port(gw, svc_port["targetPort"]) == port


def test_the_app_is_reachable_only_through_the_gateway(rendered: Rendered) -> None:
    """Routes go to loopback; the app container publishes no port; only the gateway's is open."""
    config = loaded_config(rendered)
    for route in config.routes:
        assert urlsplit(route.upstream).hostname == "127.0.0.1", route.name
    deployment = rendered.gateway_deployment()
    others = [
        c for c in deployment["spec"]["template"]["spec"]["containers"]
        if c["name"] != GATEWAY_CONTAINER
    ]
    assert others, "the base runs an app container beside the gateway"
    for c in others:
        assert "ports" not in c, f"{c['name']} must not publish a port"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (policy,) = [
        p for p in rendered.of_kind("NetworkPolicy")
        if selects(p["spec"]["podSelector"]["matchLabels"], labels)
    ]
    gw = _container(deployment, GATEWAY_CONTAINER)
    assert gw is not None
    allowed = [
        named_port(gw, p["port"]) for rule in policy["spec"]["ingress"] for p in rule["ports"]
    ]
    assert allowed == [config.server.listen_address[1]]


def test_memory_sessions_run_one_replica_and_redis_sessions_several(rendered: Rendered) -> None:
    """Memory sessions with several replicas would sign users out at random: never shipped."""
    config = loaded_config(rendered)
    replicas = rendered.gateway_deployment()["spec"]["replicas"]
    if rendered.name == "base":
        assert (config.session.store, replicas) == ("memory", 1)
        return
    assert config.session.store == "redis"
    assert replicas >= 2
    # redis_url names this overlay's Redis Service and port, and that Service has a Redis pod.
    url = urlsplit(config.session.redis_url)
    service = rendered.one("Service", str(url.hostname))
    assert url.port in [p["port"] for p in service["spec"]["ports"]]
    redis_pods = [
        (w, t) for w, t in pod_templates(rendered)
        if selects(service["spec"]["selector"], t["metadata"]["labels"])
    ]
    assert len(redis_pods) == 1
    workload, template = redis_pods[0]
    assert workload["spec"]["replicas"] == 1
    (redis,) = template["spec"]["containers"]
    assert any(p["containerPort"] == url.port for p in redis["ports"])
    # The password in redis_url is the one Redis requires.
    redis_env = container_env(redis, rendered.secret_template["metadata"]["name"], rendered.secret)
    assert url.password == redis_env["REDIS_PASSWORD"]
    args = redis["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"


# ---------------------------------------------------------------------------------------------
# Wiring and hardening
# ---------------------------------------------------------------------------------------------


def test_every_selector_selects_a_pod(rendered: Rendered) -> None:
    labels = [t["metadata"]["labels"] for _, t in pod_templates(rendered)]
    for workload, template in pod_templates(rendered):
        assert selects(workload["spec"]["selector"]["matchLabels"], template["metadata"]["labels"])
    selectors = [
        (s["metadata"]["name"], s["spec"]["selector"]) for s in rendered.of_kind("Service")
    ]
    selectors += [
        (p["metadata"]["name"], p["spec"]["selector"]["matchLabels"])
        for p in rendered.of_kind("PodDisruptionBudget")
    ]
    selectors += [
        (p["metadata"]["name"], p["spec"]["podSelector"]["matchLabels"])
        for p in rendered.of_kind("NetworkPolicy")
    ]
    for policy in rendered.of_kind("NetworkPolicy"):
        for rule in policy["spec"]["ingress"]:
            selectors += [
                (policy["metadata"]["name"], peer["podSelector"]["matchLabels"])
                for peer in rule.get("from", [])
            ]
    assert selectors
    for name, selector in selectors:
        assert any(selects(selector, lab) for lab in labels), f"{name} selects no pod"
    pdbs = rendered.of_kind("PodDisruptionBudget")
    gateway_labels = rendered.gateway_deployment()["spec"]["template"]["metadata"]["labels"]
    assert any(selects(p["spec"]["selector"]["matchLabels"], gateway_labels) for p in pdbs)


def test_every_pod_is_hardened(rendered: Rendered) -> None:
    for workload, template in pod_templates(rendered):
        name = workload["metadata"]["name"]
        pod = template["spec"]
        assert pod["automountServiceAccountToken"] is False, name
        pod_sc = pod["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, name
        assert pod_sc["runAsUser"] > 0, name
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for c in pod["containers"]:
            where = f"{name}/{c['name']}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            for kind in ("requests", "limits"):
                assert set(c["resources"][kind]) == {"cpu", "memory"}, where
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1], f"{where}: pin the image's tag"
            assert not image.endswith(":latest"), f"{where}: pin the image's tag"


def dockerfile_user() -> int:
    users = [
        line.split()[1] for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith("USER ")
    ]
    assert len(users) == 1
    return int(users[0].split(":")[0])


def test_the_gateway_container_runs_this_image_as_its_user(rendered: Rendered) -> None:
    deployment = rendered.gateway_deployment()
    pod = deployment["spec"]["template"]["spec"]
    gw = _container(deployment, GATEWAY_CONTAINER)
    assert gw is not None
    assert gw["image"] == f"oidc-gateway:{__version__}"
    uid = gw.get("securityContext", {}).get("runAsUser", pod["securityContext"]["runAsUser"])
    assert uid == dockerfile_user() == 10001
    # No args: the image's CMD reads the config from the mounted directory.
    assert "command" not in gw
    assert "args" not in gw
    # The preStop pause and the gateway's drain fit in the grace period.
    config = loaded_config(rendered)
    pause = int(gw["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pause + config.server.shutdown_timeout < pod["terminationGracePeriodSeconds"]
