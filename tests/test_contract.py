"""The join of the two wings: what the operator writes for a run's pods is what the trainer's own code reads.

The operator's pure manifest functions render a sample run's trainer Job, ConfigMap and rollout StatefulSet; the
trainer's CLI parser, config loader, rollout factory, tracking and status reporter then read them as a pod would
(the ConfigMap file at its mount path, the container's environment), with no server started.
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path
from typing import Any

import pytest
from luffy_operator import manifests, reconcile
from luffy_operator.api import parse_spec
from luffy_operator.manifests import RunRef
from luffy_trainer import contract
from luffy_trainer.cli import build_parser
from luffy_trainer.config import load_config
from luffy_trainer.k8s_status import ProgressReporter, run_identity
from luffy_trainer.rollout import build_rollout_engine
from luffy_trainer.rollout.control import read_token
from luffy_trainer.rollout.factory import rollout_server_urls, weight_sync_address
from luffy_trainer.tracking import resolve_tracking_uri

sys.path.insert(0, str(Path(__file__).parent / "operator"))
from luffyrun_samples import valid_run

REF = RunRef(name="demo", namespace="team-a", uid="0b5e7a9e-1111-2222-3333-444455556666")
MLFLOW_RUN_ID = "run-42"
CONTROL_TOKEN = "c0ffee" * 8
SPEC = parse_spec(
    valid_run(
        rollout={"replicas": 3, "gpusPerReplica": 0, "temperature": 0.7, "maxTokens": 48},
        trainer={"nodes": 2, "gpusPerNode": 0, "weightSyncPort": 31000},
        mlflow={"trackingUri": "http://mlflow:5000", "experimentName": "exp"},
        checkpoint={"size": "1Gi", "everySteps": 5, "accessMode": "ReadWriteMany"},
    )["spec"]
)


def trainer_container(job: dict[str, Any]) -> dict[str, Any]:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


class Pod:
    """A trainer pod as the kubelet would start it: the ConfigMap's files at their mount paths, the literal env."""

    def __init__(self, root: Path) -> None:
        self.job = manifests.trainer_job(REF, SPEC, attempt=0, mlflow_run_id=MLFLOW_RUN_ID)
        self.container = trainer_container(self.job)
        self.root = root
        cm = manifests.config_map(REF, SPEC)
        volumes = {v["name"]: v for v in self.job["spec"]["template"]["spec"]["volumes"]}
        secret = manifests.with_control_token(manifests.control_secret(REF), CONTROL_TOKEN)
        for mount in self.container["volumeMounts"]:
            source = volumes[mount["name"]].get("configMap")
            if source is not None and source["name"] == cm["metadata"]["name"]:
                for item in source["items"]:
                    self.path(f"{mount['mountPath']}/{item['path']}").write_text(cm["data"][item["key"]])
            source = volumes[mount["name"]].get("secret")
            if source is not None and source["secretName"] == secret["metadata"]["name"]:
                for item in source["items"]:
                    data = base64.b64decode(secret["data"][item["key"]]).decode()
                    self.path(f"{mount['mountPath']}/{item['path']}").write_text(data)
        self.env = {e["name"]: e["value"] for e in self.container["env"] if "value" in e}

    def path(self, in_pod: str) -> Path:
        out = self.root / in_pod.lstrip("/")
        out.parent.mkdir(parents=True, exist_ok=True)
        return out

    def train_args(self):
        """`luffy train ...` as torchrun runs it (`-m luffy_trainer.cli train CONFIG`), parsed by the trainer's CLI."""
        args = self.container["args"]
        assert args[args.index("-m") + 1] == "luffy_trainer.cli"
        return build_parser().parse_args(args[args.index("-m") + 2 :])


@pytest.fixture
def pod(tmp_path: Path) -> Pod:
    return Pod(tmp_path)


def test_the_trainer_loads_the_config_map_the_operator_mounted(pod: Pod) -> None:
    args = pod.train_args()
    assert args.command == "train" and not args.overrides
    config = load_config(pod.path(args.config))
    assert config == manifests.train_config(REF, SPEC)
    assert (config.model, config.data, config.algorithm) == (SPEC.model, SPEC.data, SPEC.algorithm)
    assert (config.rollout.temperature, config.rollout.max_tokens) == (0.7, 48)
    assert config.rollout.backend == "vllm-server"
    mounts = {m["name"]: m["mountPath"] for m in pod.container["volumeMounts"]}
    assert config.checkpoint.dir.startswith(mounts["checkpoints"] + "/")
    assert config.output_dir.startswith(mounts["checkpoints"] + "/")


def test_the_trainer_reaches_every_rollout_server_the_operator_runs(pod: Pod) -> None:
    config = load_config(pod.path(pod.train_args().config))
    urls = rollout_server_urls(config.rollout)
    assert urls == REF.rollout_urls(SPEC.rollout.replicas)
    sts = manifests.rollout_statefulset(REF, SPEC, SPEC.rollout.replicas)
    service = manifests.rollout_service(REF)
    (rollout,) = sts["spec"]["template"]["spec"]["containers"]
    serve = build_parser().parse_args(rollout["args"])
    assert serve.command == "serve-rollout"
    hosts = [f"{sts['metadata']['name']}-{i}.{service['metadata']['name']}.{REF.namespace}.svc" for i in range(3)]
    assert urls == [f"http://{host}:{serve.port}" for host in hosts]
    assert serve.port == contract.ROLLOUT_PORT == service["spec"]["ports"][0]["port"]
    assert serve.port == rollout["ports"][0]["containerPort"]
    # The rollout servers' context is the trainer's own derived default.
    data = config.data
    assert serve.max_model_len == contract.max_model_len(
        config.rollout.max_model_len, data.max_prompt_length, data.max_response_length
    )
    config.rollout.control_token_file = str(pod.path(config.rollout.control_token_file))  # where this test mounts it
    engine = build_rollout_engine(config, model_path="unused")  # the client; nothing is contacted yet
    try:
        assert [s.url for s in engine.replica_stats()] == urls
    finally:
        engine.close()


def test_the_trainer_and_the_rollout_servers_read_the_same_control_token_file(pod: Pod) -> None:
    config = load_config(pod.path(pod.train_args().config))
    sts = manifests.rollout_statefulset(REF, SPEC, SPEC.rollout.replicas)
    pod_spec = sts["spec"]["template"]["spec"]
    (rollout,) = pod_spec["containers"]
    serve = build_parser().parse_args(rollout["args"])
    assert serve.control_token_file == config.rollout.control_token_file == contract.CONTROL_TOKEN_FILE
    for container, volumes in (
        (rollout, pod_spec["volumes"]),
        (pod.container, pod.job["spec"]["template"]["spec"]["volumes"]),
    ):
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == contract.CONTROL_TOKEN_DIR]
        (volume,) = [v for v in volumes if v["name"] == mount["name"]]
        assert mount["readOnly"] and volume["secret"]["secretName"] == contract.control_secret_name(REF.name)
        assert volume["secret"]["items"] == [{"key": contract.CONTROL_TOKEN_KEY, "path": contract.CONTROL_TOKEN_KEY}]
    assert read_token(pod.path(config.rollout.control_token_file)) == CONTROL_TOKEN
    assert CONTROL_TOKEN not in manifests.config_map(REF, SPEC)["data"]["config.yaml"]  # only the path travels there


def test_the_weight_sync_ports_the_trainer_listens_on_are_the_ones_the_operator_opened(pod: Pod) -> None:
    config = load_config(pod.path(pod.train_args().config))
    host, first = weight_sync_address(config.rollout, SPEC.rollout.replicas)
    assert (host, first) == (REF.trainer_rank0_host, 31000)
    listening = [contract.weight_sync_port(first, i) for i in range(SPEC.rollout.replicas)]
    assert listening == [31000, 31001, 31002]
    opened = [p["containerPort"] for p in pod.container["ports"] if p["name"].startswith("weight-sync-")]
    service = manifests.trainer_service(REF, SPEC)
    exposed = [p["port"] for p in service["spec"]["ports"] if p["name"].startswith("weight-sync-")]
    assert listening == opened == exposed
    # Trainer rank 0 is where the rollout servers look for it: pod 0 of the Job behind the trainer Service.
    pod_spec = pod.job["spec"]["template"]["spec"]
    assert host == f"{REF.trainer}-0.{pod_spec['subdomain']}.{REF.namespace}.svc"


def test_the_environment_carries_only_identity_rank_and_the_mlflow_run(pod: Pod) -> None:
    assert run_identity(pod.env) == (REF.name, REF.namespace)
    assert run_identity({}) is None
    luffy_names = {name for name in pod.env if name.startswith("LUFFY_")}
    assert luffy_names == {contract.ENV_RUN_NAME, contract.ENV_RUN_NAMESPACE}
    index = next(e for e in pod.container["env"] if e["name"] == contract.ENV_NODE_INDEX)
    assert index["valueFrom"]["fieldRef"]["fieldPath"].endswith("['batch.kubernetes.io/job-completion-index']")
    args = pod.container["args"]
    assert args[args.index("--node-rank") + 1] == f"$({contract.ENV_NODE_INDEX})"
    assert args[args.index("--rdzv-endpoint") + 1] == f"{REF.trainer_rank0_host}:{contract.RENDEZVOUS_PORT}"
    assert pod.env[contract.ENV_MLFLOW_RUN_ID] == MLFLOW_RUN_ID


def test_the_tracking_server_and_experiment_come_from_the_config(pod: Pod, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(contract.ENV_MLFLOW_TRACKING_URI, raising=False)
    config = load_config(pod.path(pod.train_args().config))
    assert resolve_tracking_uri(config.tracking) == "http://mlflow:5000"
    assert config.tracking.experiment_name == "exp"
    assert config.tracking.run_name == REF.name
    assert contract.ENV_MLFLOW_TRACKING_URI not in pod.env and contract.ENV_MLFLOW_EXPERIMENT_NAME not in pod.env


class RecordingApi:
    """Stands in for kubernetes' CoreV1Api: records the ConfigMap patches."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def patch_namespaced_config_map(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append(args)


def test_the_progress_report_is_what_the_operator_accepts_and_all_the_trainer_may_write(pod: Pod) -> None:
    name, namespace = run_identity(pod.env)
    attempt = next(e for e in pod.container["env"] if e["name"] == contract.ENV_ATTEMPT)["valueFrom"]
    assert attempt["fieldRef"]["fieldPath"] == f"metadata.annotations['{manifests.ATTEMPT_ANNOTATION}']"
    assert pod.job["spec"]["template"]["metadata"]["annotations"][manifests.ATTEMPT_ANNOTATION] == "0"
    api = RecordingApi()
    ProgressReporter(name, namespace, api, min_interval_s=0, attempt=0).report(step=3, total_steps=10, reward=0.5)
    ((config_map, ns, body),) = api.calls
    assert (config_map, ns) == (contract.progress_config_map(REF.name), REF.namespace)
    assert set(body) == {"data"} and set(body["data"]) == {contract.PROGRESS_KEY}
    # The operator checks the report against the spec and the running attempt, and shows it as status.progress.
    spec = parse_spec(valid_run(optimization={"totalSteps": 10})["spec"])
    raw = body["data"][contract.PROGRESS_KEY]
    checked = reconcile.check_report(spec, raw, attempt=0, same_attempt=None)
    assert checked is not None and (checked.step, checked.total_steps, checked.reward) == (3, 10, 0.5)
    assert reconcile.check_report(spec, raw, attempt=1, same_attempt=None) is None  # another attempt's: stale
    # The trainer's service account may patch exactly this ConfigMap, and nothing else: no LuffyRun, no status.
    role = next(m for m in manifests.trainer_rbac(REF) if m["kind"] == "Role")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [config_map], "verbs": ["patch"]}
    ]
    progress = next(c for c in manifests.supporting_children(REF, SPEC) if c["metadata"]["name"] == config_map)
    assert progress["metadata"]["ownerReferences"][0]["uid"] == REF.uid
    assert pod.job["spec"]["template"]["spec"]["serviceAccountName"] == REF.trainer
