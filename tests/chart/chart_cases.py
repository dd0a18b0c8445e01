"""Values the chart tests install with: valid variants by release name, and invalid ones with the error they must get.

Every release name is also the case's name; all of them install into NAMESPACE.
"""

from __future__ import annotations

from typing import Any

NAMESPACE = "luffy-system"

POSTGRES = {"type": "postgres", "postgres": {"existingSecret": "mlflow-db", "uriKey": "uri"}}
S3 = {
    "type": "s3",
    "s3": {
        "destination": "s3://luffy-artifacts/mlflow",
        "endpointUrl": "http://minio.minio.svc:9000",
        "region": "us-east-1",
        "existingSecret": "mlflow-s3",
    },
}
DIGEST = "sha256:" + "0123456789abcdef" * 4
OWN_MLFLOW_IMAGE = {"repository": "registry.example.com/luffy-mlflow", "tag": "0.1.0", "pullPolicy": "Always"}

VALID: dict[str, dict[str, Any]] = {
    "luffy": {},
    "namespaced": {"operator": {"watchNamespaces": ["team-a", "team-b"]}},
    "mlflow-sqlite": {"mlflow": {"enabled": True}},
    "mlflow-postgres-s3": {
        "mlflow": {"enabled": True, "image": OWN_MLFLOW_IMAGE, "backendStore": POSTGRES, "artifacts": S3},
    },
    "mlflow-postgres-pvc": {
        "mlflow": {
            "enabled": True,
            "image": OWN_MLFLOW_IMAGE,
            "backendStore": POSTGRES,
            "extraAllowedHosts": ["ml.example.com"],
            "resources": {"requests": {"cpu": "1", "memory": "2Gi", "ephemeral-storage": "8Gi"}},
            "tmpSizeLimit": "4Gi",
            "networkPolicy": {"from": [{"namespaceSelector": {"matchLabels": {"team": "ml"}}}]},
        },
    },
    "mlflow-sqlite-s3": {
        "mlflow": {
            "enabled": True,
            "image": OWN_MLFLOW_IMAGE,
            "artifacts": S3,
            "persistence": {"existingClaim": "mlflow-data"},
        },
    },
    # The official image with Postgres: valid, but NOTES.txt warns that the image lacks the driver.
    "mlflow-official-postgres": {"mlflow": {"enabled": True, "backendStore": POSTGRES}},
    "customized": {
        "fullnameOverride": "lr-ctl",
        "crds": {"install": False},
        "rbac": {"create": False},
        "networkPolicy": {"create": False},
        "serviceAccount": {"create": False, "name": "platform-operator"},
        "operator": {
            "replicas": 0,
            "verbose": True,
            "image": {
                "repository": "registry.example.com:5000/luffy-operator",
                "tag": "dev",
                "digest": DIGEST,
                "pullPolicy": "Always",
            },
            "imagePullSecrets": ["regcred"],
            "settings": {
                "resyncSeconds": 2.5,
                "requestTimeoutSeconds": 15,
                "watchServerTimeoutSeconds": 60,
                "watchClientTimeoutSeconds": 90,
                "mlflowTimeoutSeconds": 5,
                "workers": 4,
            },
            "extraEnv": [{"name": "TZ", "value": "UTC"}],
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "control", "effect": "NoSchedule"}],
            "podAnnotations": {"example.com/team": "ml-platform"},
            "priorityClassName": "system-cluster-critical",
            "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"cpu": "500m", "memory": "256Mi"}},
            "tmpSizeLimit": "32Mi",
            "readinessProbe": {"periodSeconds": 30},
        },
    },
    "keepless": {"crds": {"keep": False}},
    "operator-credentials": {
        "operator": {
            "mlflow": {
                "trackingUri": "https://mlflow.example.com",
                "credentialsSecret": "operator-mlflow",
                "usernameKey": "user",
            },
            "runEgress": [
                {"to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}], "ports": [{"protocol": "TCP", "port": 6443}]},
            ],
        },
    },
}

# values -> a fragment every error message for them must contain (the field at fault, or the cause).
INVALID: dict[str, tuple[dict[str, Any], str]] = {
    "bad-replicas-type": ({"operator": {"replicas": "two"}}, "/operator/replicas"),
    "bad-replicas-ha": ({"operator": {"replicas": 2}}, "/operator/replicas"),
    "bad-image-digest": ({"operator": {"image": {"digest": "latest"}}}, "/operator/image/digest"),
    "bad-namespace": ({"operator": {"watchNamespaces": ["Team_A"]}}, "/operator/watchNamespaces/0"),
    "bad-workers": ({"operator": {"settings": {"workers": 0}}}, "/operator/settings/workers"),
    "bad-resync": ({"operator": {"settings": {"resyncSeconds": -1}}}, "/operator/settings/resyncSeconds"),
    "bad-typo": ({"operator": {"replica": 1}}, "replica"),
    "bad-root": ({"operator": {"runAsUser": 0}}, "/operator/runAsUser"),
    "bad-account": ({"serviceAccount": {"create": False, "name": ""}}, "/serviceAccount/name"),
    "bad-postgres": (
        {"mlflow": {"enabled": True, "backendStore": {"type": "postgres"}}},
        "/mlflow/backendStore",
    ),
    "bad-s3-secret": (
        {"mlflow": {"enabled": True, "artifacts": {"type": "s3", "s3": {"destination": "s3://b"}}}},
        "/mlflow/artifacts/s3",
    ),
    "bad-s3-uri": (
        {
            "mlflow": {
                "enabled": True,
                "artifacts": {"type": "s3", "s3": {"destination": "bucket", "existingSecret": "s"}},
            }
        },
        "/mlflow/artifacts/s3/destination",
    ),
    "bad-port": ({"mlflow": {"service": {"port": 70000}}}, "/mlflow/service/port"),
    "bad-operator-credentials-http": (
        {"operator": {"mlflow": {"trackingUri": "http://mlflow:5000", "credentialsSecret": "creds"}}},
        "credentials go over https only",
    ),
    "bad-operator-credentials-nowhere": (
        {"operator": {"mlflow": {"credentialsSecret": "creds"}}},
        "operator.mlflow.credentialsSecret needs operator.mlflow.trackingUri",
    ),
    "bad-run-egress": ({"operator": {"runEgress": [{"from": []}]}}, "/operator/runEgress/0"),
    "bad-watch-timeouts": (
        {"operator": {"settings": {"watchServerTimeoutSeconds": 300, "watchClientTimeoutSeconds": 300}}},
        "watchClientTimeoutSeconds (300) must be greater than watchServerTimeoutSeconds (300)",
    ),
}
