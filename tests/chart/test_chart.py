"""The Helm chart as Helm v4 renders it (helm-sdkpy): lint, strict Kubernetes schemas, values.schema.json, the CRD
from crds/, and the operator Deployment checked against the operator's own CLI and settings."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import urllib.parse

import kubernetes_validate
import pytest
import yaml
from chart_cases import DIGEST, INVALID, NAMESPACE, VALID
from chart_render import (
    CHART,
    CRD_FILE,
    HELM_PYTHON,
    RENDER_SCRIPT,
    env_of,
    find,
    fullname,
    one,
    release_objects,
    render_all,
)
from luffy_operator.cli import build_parser
from luffy_operator.settings import OperatorSettings

# The oldest Kubernetes the chart claims (Chart.yaml kubeVersion) and the newest schemas kubernetes-validate has.
KUBE_VERSIONS = ["1.29", "1.37"]  # the CRD's CEL uses fieldPath (1.28) and the quantity library (1.29)
ERROR_SEVERITY = 3  # Helm's support.ErrorSev; 1 is INFO (e.g. "icon is recommended"), 2 WARNING


def test_helm_lint_passes() -> None:
    lint = render_all().lint
    assert lint["TotalChartsLinted"] == 1
    assert not lint["Errors"], lint
    assert max(m["Severity"] for m in lint["Messages"]) < 2, lint["Messages"]


def test_helm_lint_catches_a_broken_template() -> None:
    """Negative control: Lint reports no message text, only severities, so show that it can fail at all."""
    assert max(m["Severity"] for m in render_all().broken_lint["Messages"]) == ERROR_SEVERITY


@pytest.mark.parametrize("release", sorted(VALID))
def test_valid_values_render(release: str) -> None:
    assert release not in render_all().errors
    assert release_objects(release)


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("release", sorted(VALID))
def test_every_rendered_object_is_valid_kubernetes(release: str, version: str) -> None:
    for obj in release_objects(release):
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("release", sorted(INVALID))
def test_bad_values_fail_naming_the_field(release: str) -> None:
    rendered = render_all()
    assert release not in rendered.objects
    assert INVALID[release][1] in rendered.errors[release], rendered.errors[release]


def test_bad_replicas_error_is_a_schema_error() -> None:
    assert "values don't meet the specifications of the schema" in render_all().errors["bad-replicas-type"]


# --- the CRD --------------------------------------------------------------------------------------------------------


def test_chart_crd_is_a_link_to_the_generated_file() -> None:
    link = CHART / "files" / "crds" / CRD_FILE.name
    assert link.is_symlink()
    assert link.resolve() == CRD_FILE.resolve()


def test_rendered_crd_is_the_generated_crd_kept_on_uninstall() -> None:
    generated = yaml.safe_load(CRD_FILE.read_text())
    crd = one(release_objects("luffy"), "CustomResourceDefinition")
    assert crd["metadata"]["name"] == generated["metadata"]["name"]
    assert crd["spec"] == generated["spec"]
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert generated["metadata"]["labels"].items() <= crd["metadata"]["labels"].items()


def test_packaged_chart_carries_the_crd_as_a_file() -> None:
    """`helm package` resolves the link: the archive stands alone and installs the same objects."""
    rendered = render_all()
    assert rendered.archive_members[f"luffy/files/crds/{CRD_FILE.name}"] is True
    assert rendered.packaged_objects == release_objects("luffy")


def test_crd_keep_and_install_switches() -> None:
    assert "annotations" not in one(release_objects("keepless"), "CustomResourceDefinition")["metadata"]
    assert not find(release_objects("customized"), "CustomResourceDefinition")


# --- the operator Deployment ----------------------------------------------------------------------------------------


def operator_deployment(release: str) -> dict:
    return one(release_objects(release), "Deployment", namespace=NAMESPACE, name=f"{fullname(release)}-operator")


def operator_container(release: str) -> dict:
    (container,) = operator_deployment(release)["spec"]["template"]["spec"]["containers"]
    return container


def parsed_command(release: str):
    """The container's command line as the real `luffy-operator` CLI parses it."""
    container = operator_container(release)
    assert container["command"] == ["luffy-operator"]
    return build_parser().parse_args(container["args"])


def test_operator_runs_one_replica_recreated() -> None:
    spec = operator_deployment("luffy")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert operator_deployment("customized")["spec"]["replicas"] == 0


def test_operator_command_line_is_accepted_by_the_operator_cli() -> None:
    args = parsed_command("luffy")
    assert (args.command, args.standalone, args.namespace, args.verbose) == ("run", True, [], False)
    namespaced = parsed_command("namespaced")
    assert namespaced.namespace == VALID["namespaced"]["operator"]["watchNamespaces"]
    assert parsed_command("customized").verbose


def test_liveness_probe_targets_kopfs_liveness_endpoint() -> None:
    container = operator_container("luffy")
    endpoint = urllib.parse.urlsplit(parsed_command("luffy").liveness)
    probe = container["livenessProbe"]["httpGet"]
    (port,) = [p for p in container["ports"] if p["name"] == probe["port"]]
    assert (probe["path"], port["containerPort"]) == (endpoint.path, endpoint.port)
    assert endpoint.hostname == "0.0.0.0"  # the kubelet probes the pod IP


# The settings from operator.settings (the numbers); the operator's MLflow credentials come by secretKeyRef, if at all.
TUNABLES = {f.name for f in dataclasses.fields(OperatorSettings) if type(f.default) in (int, float)}
CREDENTIALS = {f"LUFFY_OPERATOR_MLFLOW_{k}" for k in ("USERNAME", "PASSWORD", "TOKEN")}


@pytest.mark.parametrize("release", ["luffy", "customized", "operator-credentials"])
def test_operator_settings_reach_the_operator(release: str) -> None:
    env = {name: e["value"] for name, e in env_of(operator_container(release)).items() if "value" in e}
    settings = OperatorSettings.from_env(env)
    given = VALID[release].get("operator", {}).get("settings")
    expected = OperatorSettings() if given is None else OperatorSettings(**{_snake(k): v for k, v in given.items()})
    assert {n: getattr(settings, n) for n in TUNABLES} == {n: getattr(expected, n) for n in TUNABLES}
    names = {f"LUFFY_OPERATOR_{f.name.upper()}" for f in dataclasses.fields(OperatorSettings)}
    assert names - CREDENTIALS == {n for n in env if n.startswith("LUFFY_OPERATOR_")}


def test_the_operators_mlflow_credentials_come_from_its_own_secret() -> None:
    env = env_of(operator_container("operator-credentials"))
    for var, key in (("USERNAME", "user"), ("PASSWORD", "password"), ("TOKEN", "token")):
        ref = {"name": "operator-mlflow", "key": key, "optional": True}
        assert env[f"LUFFY_OPERATOR_MLFLOW_{var}"] == {
            "name": f"LUFFY_OPERATOR_MLFLOW_{var}",
            "valueFrom": {"secretKeyRef": ref},
        }
    literal = {name: e["value"] for name, e in env.items() if "value" in e}
    settings = OperatorSettings.from_env(literal)
    assert settings.mlflow_tracking_uri == "https://mlflow.example.com" and not settings.mlflow_allow_http
    assert settings.run_egress == tuple(VALID["operator-credentials"]["operator"]["runEgress"])
    for release in ("luffy", "mlflow-sqlite"):  # no credentials: no secretKeyRef in the operator's environment
        assert not CREDENTIALS & env_of(operator_container(release)).keys()


def test_with_the_charts_mlflow_the_runs_may_reach_its_pods() -> None:
    literal = {n: e["value"] for n, e in env_of(operator_container("mlflow-sqlite")).items() if "value" in e}
    settings = OperatorSettings.from_env(literal)
    name = f"{fullname('mlflow-sqlite')}-mlflow"
    assert settings.mlflow_tracking_uri == f"http://{name}.{NAMESPACE}.svc:5000"
    (rule,) = settings.run_egress
    (peer,) = rule["to"]
    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}}
    mlflow_pod = one(release_objects("mlflow-sqlite"), "Deployment", name)["spec"]["template"]
    assert peer["podSelector"]["matchLabels"].items() <= mlflow_pod["metadata"]["labels"].items()
    (port,) = mlflow_pod["spec"]["containers"][0]["ports"]
    assert rule["ports"] == [{"protocol": "TCP", "port": port["containerPort"]}]
    assert (
        OperatorSettings.from_env(
            {n: e["value"] for n, e in env_of(operator_container("luffy")).items() if "value" in e}
        ).run_egress
        == ()
    )


def _snake(camel: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in camel)


def test_operator_customizations() -> None:
    objects = release_objects("customized")
    pod = operator_deployment("customized")["spec"]["template"]
    values = VALID["customized"]["operator"]
    container = operator_container("customized")
    assert container["image"] == f"registry.example.com:5000/luffy-operator:dev@{DIGEST}"
    assert container["imagePullPolicy"] == "Always"
    assert env_of(container)["TZ"] == {"name": "TZ", "value": "UTC"}
    assert pod["spec"]["serviceAccountName"] == "platform-operator"
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["spec"]["nodeSelector"] == values["nodeSelector"]
    assert pod["spec"]["tolerations"] == values["tolerations"]
    assert pod["spec"]["priorityClassName"] == values["priorityClassName"]
    assert pod["metadata"]["annotations"] == values["podAnnotations"]
    assert not find(objects, "ServiceAccount") and not find(objects, "ClusterRole") and not find(objects, "Role")


def test_default_operator_image_is_the_chart_app_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert operator_container("luffy")["image"].endswith(f"/luffy-operator:{chart['appVersion']}")


# --- security -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("release", sorted(VALID))
def test_every_pod_is_locked_down(release: str) -> None:
    for deployment in find(release_objects(release), "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] > 0 and ctx["runAsGroup"] > 0
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not {"hostNetwork", "hostPID", "hostIPC"} & pod.keys()
        assert all("hostPath" not in v for v in pod.get("volumes", []))
        for container in pod["containers"]:
            assert container["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "runAsNonRoot": True,
                "capabilities": {"drop": ["ALL"]},
            }
            assert container["resources"]["requests"]["memory"] and container["resources"]["limits"]["memory"]
            # A read-only root filesystem needs a writable /tmp, where HOME points.
            assert {"name": "HOME", "value": "/tmp"} in container["env"]
            assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}


def test_no_secret_values_in_the_rendered_chart() -> None:
    """Credentials only come in by secretKeyRef: no Secret objects, no literal credentials in env."""
    for release in VALID:
        objects = release_objects(release)
        assert not find(objects, "Secret")
        for deployment in find(objects, "Deployment"):
            for container in deployment["spec"]["template"]["spec"]["containers"]:
                for name, var in env_of(container).items():
                    if any(word in name for word in ("PASSWORD", "SECRET", "TOKEN", "URI")) and "value" in var:
                        assert not var["value"].startswith(("postgresql://", "mysql://")), (release, name)
                        assert "PASSWORD" not in name and "SECRET" not in name, (release, name)


def test_render_needs_helm_memory_driver() -> None:
    """The render script refuses to run without HELM_DRIVER=memory instead of failing obscurely."""
    env = {k: v for k, v in os.environ.items() if k != "HELM_DRIVER"}
    proc = subprocess.run(
        [str(HELM_PYTHON), str(RENDER_SCRIPT), "/nonexistent", "/nonexistent"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0 and "HELM_DRIVER=memory" in proc.stderr
