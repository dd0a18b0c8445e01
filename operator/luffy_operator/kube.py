"""A small generic client for the few Kubernetes calls the operator makes: get, create, merge-patch, delete.

It rides on the `kubernetes` package's ApiClient (auth, TLS, kubeconfig / in-cluster config) but addresses objects by
apiVersion + kind through a fixed table, so one code path serves every child kind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import kubernetes
from luffy_trainer.contract import API_VERSION, KIND, PLURAL

# (apiVersion, kind) -> plural; the cluster-scoped ones are read with namespace "".
RESOURCES: dict[tuple[str, str], str] = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("v1", "ServiceAccount"): "serviceaccounts",
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaims",
    ("v1", "Secret"): "secrets",
    ("apps/v1", "StatefulSet"): "statefulsets",
    ("batch/v1", "Job"): "jobs",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
    ("rbac.authorization.k8s.io/v1", "Role"): "roles",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebindings",
    ("v1", "Event"): "events",
    (API_VERSION, KIND): PLURAL,
    ("kueue.x-k8s.io/v1beta2", "Workload"): "workloads",
    ("kueue.x-k8s.io/v1beta2", "ResourceFlavor"): "resourceflavors",
    ("scheduling.k8s.io/v1", "PriorityClass"): "priorityclasses",
}


class ApiError(Exception):
    """A Kubernetes API call that failed; `status` is the HTTP status (0 when the server was not reached)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ObjectKey:
    api_version: str
    kind: str
    namespace: str
    name: str

    @classmethod
    def of(cls, obj: dict[str, Any]) -> ObjectKey:
        md = obj["metadata"]
        return cls(obj["apiVersion"], obj["kind"], md["namespace"], md["name"])

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"

    def path(self, collection: bool = False) -> str:
        plural = RESOURCES[(self.api_version, self.kind)]
        prefix = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        path = f"{prefix}/namespaces/{self.namespace}/{plural}" if self.namespace else f"{prefix}/{plural}"
        return path if collection else f"{path}/{self.name}"


def load_api_client() -> kubernetes.client.ApiClient:
    """In-cluster service account when running in a pod, else the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    config = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=config)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=config)
    return kubernetes.client.ApiClient(config)


class KubeClient:
    """get / create / patch / delete of namespaced objects; 404 on get and delete, 409 on create are not errors."""

    def __init__(self, api_client: kubernetes.client.ApiClient, timeout_s: float = 30.0) -> None:
        self.api_client = api_client
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        serialized = self.api_client.param_serialize(
            method=method, resource_path=path, header_params=headers, body=body, auth_settings=["BearerToken"]
        )
        try:
            response = self.api_client.call_api(*serialized, _request_timeout=self.timeout_s)
            data = response.read()
        except Exception as exc:  # urllib3 errors: connection refused, timeouts, TLS
            raise ApiError(0, f"{method} {path}: {exc}") from exc
        if response.status >= 400:
            raise ApiError(response.status, f"{method} {path}: {response.status} {_status_message(data)}")
        return json.loads(data) if data else None

    def get(self, key: ObjectKey) -> dict[str, Any] | None:
        try:
            return self._call("GET", key.path())
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    def create(self, obj: dict[str, Any]) -> bool:
        """Create `obj`; False if it already exists."""
        key = ObjectKey.of(obj)
        try:
            self._call("POST", key.path(collection=True), obj)
        except ApiError as err:
            if err.status == 409:
                return False
            raise
        return True

    def patch(self, key: ObjectKey, patch: dict[str, Any], subresource: str = "") -> dict[str, Any]:
        """JSON merge patch (RFC 7386): dicts merge, lists and scalars replace, None deletes."""
        path = f"{key.path()}/{subresource}" if subresource else key.path()
        return self._call("PATCH", path, patch, "application/merge-patch+json")

    def delete(self, key: ObjectKey, propagation: str = "Background") -> bool:
        """Delete with the given propagation policy; False if it was already gone."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
        try:
            self._call("DELETE", key.path(), body)
        except ApiError as err:
            if err.status == 404:
                return False
            raise
        return True


def _status_message(data: bytes) -> str:
    try:
        status = json.loads(data)
    except ValueError:
        return data[:200].decode(errors="replace")
    if isinstance(status, dict):
        return f"{status.get('reason', '')}: {status.get('message', '')}".strip(": ")
    return str(status)[:200]
