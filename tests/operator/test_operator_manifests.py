"""The children of a LuffyRun, built by pure functions: valid Kubernetes objects that fit together."""

from __future__ import annotations

import base64
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes.utils import parse_quantity
from luffy_operator import manifests
from luffy_operator.api import parse_spec
from luffy_operator.manifests import RunRef
from luffy_trainer import contract
from luffy_trainer.config import RolloutConfig, parse_config
from luffyrun_samples import valid_run
from operator_harness import REPO

REF = RunRef(name="demo", namespace="team-a", uid="0b5e7a9e-1111-2222-3333-444455556666")


def spec_of(**overrides: Any):
    return parse_spec(valid_run(**overrides)["spec"])


def all_children(spec) -> list[dict[str, Any]]:
    return [
        *manifests.supporting_children(REF, spec),
        manifests.rollout_statefulset(REF, spec, spec.rollout.replicas),
        manifests.trainer_job(REF, spec, attempt=0, mlflow_run_id="abc123"),
    ]


def by_kind(children: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    found = [
        c for c in children if c["kind"] == kind and component in (None, c["metadata"]["labels"]["luffy.dev/component"])
    ]
    assert len(found) == 1, (kind, component, [c["metadata"]["name"] for c in found])
    return found[0]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def example_spec(name: str):
    docs = yaml.safe_load_all((REPO / "examples" / name).read_text())
    return parse_spec(next(d for d in docs if d and d["kind"] == "LuffyRun")["spec"])


SPECS = {
    "small": spec_of(),
    "full": spec_of(
        mlflow={"trackingUri": "http://mlflow:5000", "credentialsSecret": {"name": "mlflow-creds"}},
        scheduling={
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "priorityClassName": "training",
            "queueName": "team-a",
        },
        dataVolume={"claimName": "datasets"},
        modelCache={"claimName": "hf-cache"},
        rollout={"replicas": 3, "gpusPerReplica": 2, "tensorParallelSize": 2, "extraArgs": ["--max-num-seqs=64"]},
        trainer={"nodes": 2, "gpusPerNode": 8, "env": [{"name": "NCCL_DEBUG", "value": "INFO"}]},
        checkpoint={"size": "100Gi", "accessMode": "ReadWriteMany", "storageClassName": "fast"},
    ),
    "sft": spec_of(algorithm={"mode": "sft", "nOnPolicy": 0}),
    **{path.stem: example_spec(path.name) for path in sorted((REPO / "examples").glob("luffyrun-*.yaml"))},
}


@pytest.mark.parametrize("name", SPECS)
def test_every_child_is_a_valid_kubernetes_object(name: str) -> None:
    for child in all_children(SPECS[name]):
        kubernetes_validate.validate(child, "1.32", strict=True)


@pytest.mark.parametrize("name", SPECS)
def test_children_are_owned_labelled_and_namespaced(name: str) -> None:
    spec = SPECS[name]
    for child in all_children(spec):
        md = child["metadata"]
        assert md["namespace"] == REF.namespace
        assert md["name"].startswith(REF.name + "-")
        assert md["labels"]["luffy.dev/run"] == REF.name
        assert md["labels"]["app.kubernetes.io/managed-by"] == "luffy-operator"
        (owner,) = md["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == ("LuffyRun", "demo", REF.uid, True)


def test_pods_run_as_non_root() -> None:
    children = all_children(SPECS["full"])
    for workload in (by_kind(children, "StatefulSet"), by_kind(children, "Job")):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert sc["readOnlyRootFilesystem"] is True
            assert {"/tmp", "/dev/shm"} <= {m["mountPath"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"


def test_rollout_statefulset_serves_vllm_with_probes() -> None:
    spec = SPECS["full"]
    sts = manifests.rollout_statefulset(REF, spec, replicas=3)
    service = manifests.rollout_service(REF)
    pod = sts["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert container["command"] == ["luffy"]
    args = container["args"]
    assert args[:7] == ["serve-rollout", "--model", "/workspace/model", "--host", "0.0.0.0", "--port", "8000"]
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert args[args.index("--max-model-len") + 1] == str(64 + 64)
    assert args[args.index("--") + 1 :] == ["--enforce-eager", "--max-num-seqs=64"]
    assert env_of(container)["VLLM_SERVER_DEV_MODE"] == "1"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    startup = container["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= spec.rollout.startup_timeout_seconds
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == "hf-cache"
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "datasets", "readOnly": True}
    assert pod["spec"]["automountServiceAccountToken"] is False


def test_rollout_on_cpu_has_no_gpu_request_and_a_model_cache_emptydir() -> None:
    sts = manifests.rollout_statefulset(REF, SPECS["small"], replicas=2)
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert "--gpu-memory-utilization" not in container["args"]
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["model-cache"]


def pods(spec) -> dict[str, dict[str, Any]]:
    """component -> the pod spec of its workload."""
    return {
        "rollout": manifests.rollout_statefulset(REF, spec, 1)["spec"]["template"]["spec"],
        "trainer": manifests.trainer_job(REF, spec, 0, None)["spec"]["template"]["spec"],
    }


@pytest.mark.parametrize("name", SPECS)
def test_every_container_and_emptydir_is_bounded(name: str) -> None:
    spec = SPECS[name]
    for component, pod in pods(spec).items():
        (container,) = pod["containers"]
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        for resource in ("cpu", "memory"):
            assert requests[resource] and limits[resource], (component, resource)
        gpus = {k: v for k, v in limits.items() if k == spec.scheduling.gpu_resource_name}
        assert {k: requests[k] for k in gpus} == gpus, component
        volumes = {v["name"]: v for v in pod["volumes"]}
        empty_dirs = {n: v["emptyDir"] for n, v in volumes.items() if "emptyDir" in v}
        assert all(d.get("sizeLimit") for d in empty_dirs.values()), (component, empty_dirs)
        assert empty_dirs["dshm"]["medium"] == "Memory"
        # What /dev/shm holds counts against the memory limit: it must leave room for the process.
        assert parse_quantity(empty_dirs["dshm"]["sizeLimit"]) < parse_quantity(limits["memory"]), component
        on_disk = sum(parse_quantity(d["sizeLimit"]) for d in empty_dirs.values() if d.get("medium") != "Memory")
        assert parse_quantity(requests["ephemeral-storage"]) == on_disk, component


def test_resource_defaults_fill_what_the_spec_leaves_out() -> None:
    bare = spec_of(rollout={"gpusPerReplica": 1}, trainer={"gpusPerNode": 2})
    rollout, trainer = (pod["containers"][0]["resources"] for pod in pods(bare).values())
    assert rollout == {
        "requests": {"cpu": "4", "memory": "32Gi", "ephemeral-storage": "116Gi", "nvidia.com/gpu": 1},
        "limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": 1},
    }
    assert trainer["requests"] == {"cpu": "8", "memory": "64Gi", "ephemeral-storage": "116Gi", "nvidia.com/gpu": 2}
    assert trainer["limits"] == {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": 2}
    volumes = {v["name"]: v for v in pods(bare)["rollout"]["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert volumes["tmp"]["emptyDir"] == {"sizeLimit": "16Gi"}
    assert volumes["model-cache"]["emptyDir"] == {"sizeLimit": "100Gi"}


def test_a_request_alone_is_the_limit_and_a_limit_alone_the_request() -> None:
    spec = spec_of(
        rollout={
            "gpusPerReplica": 0,
            "resources": {"requests": {"cpu": "2"}, "limits": {"memory": "6Gi"}},
            "shmSizeLimit": "1Gi",
            "tmpSizeLimit": "512Mi",
        },
        trainer={"gpusPerNode": 0, "resources": {"requests": {"ephemeral-storage": "1Ti"}}},
        modelCache={"sizeLimit": "20Gi"},
    )
    rollout, trainer = pods(spec).values()
    assert rollout["containers"][0]["resources"] == {
        "requests": {"cpu": "2", "memory": "6Gi", "ephemeral-storage": "20992Mi"},
        "limits": {"cpu": "2", "memory": "6Gi"},
    }
    volumes = {v["name"]: v["emptyDir"] for v in rollout["volumes"] if "emptyDir" in v}
    assert (volumes["dshm"]["sizeLimit"], volumes["tmp"]["sizeLimit"]) == ("1Gi", "512Mi")
    assert volumes["model-cache"]["sizeLimit"] == "20Gi"
    assert trainer["containers"][0]["resources"]["requests"]["ephemeral-storage"] == "1Ti"  # the user's own


def test_a_model_cache_claim_needs_no_ephemeral_storage_for_it() -> None:
    spec = spec_of(modelCache={"claimName": "hf-cache"})
    for pod in pods(spec).values():
        assert pod["containers"][0]["resources"]["requests"]["ephemeral-storage"] == "16Gi"  # /tmp only


def test_trainer_job_is_an_indexed_torchrun_gang() -> None:
    spec = SPECS["full"]
    job = manifests.trainer_job(REF, spec, attempt=2, mlflow_run_id="run-42")
    service = manifests.trainer_service(REF, spec)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert job["spec"]["backoffLimit"] == 0
    assert pod["restartPolicy"] == "Never"
    assert pod["subdomain"] == service["metadata"]["name"] == REF.trainer
    assert job["metadata"]["annotations"]["luffy.dev/attempt"] == "2"
    assert job["metadata"]["annotations"]["luffy.dev/rollout-replicas"] == "3"
    rendezvous = f"{REF.trainer}-0.{REF.trainer}.{REF.namespace}.svc"
    assert container["command"] == ["torchrun"]
    assert container["args"] == [
        "--nnodes", "2", "--nproc-per-node", "8", "--node-rank", "$(JOB_COMPLETION_INDEX)",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{rendezvous}:29500", "--rdzv-id", REF.uid,
        "--max-restarts", "0", "-m", "luffy_trainer.cli", "train", "/etc/luffy/config.yaml",
    ]  # fmt: skip
    names = [e["name"] for e in container["env"]]
    assert names.index("JOB_COMPLETION_INDEX") < names.index("PET_NODE_RANK")  # $(VAR) expands earlier entries only
    env = env_of(container)
    assert env["JOB_COMPLETION_INDEX"]["fieldRef"]["fieldPath"].endswith("['batch.kubernetes.io/job-completion-index']")
    assert (env["PET_NNODES"], env["PET_NPROC_PER_NODE"], env["PET_NODE_RANK"]) == ("2", "8", "$(JOB_COMPLETION_INDEX)")
    assert env["PET_MASTER_ADDR"] == env["MASTER_ADDR"] == rendezvous
    assert env["PET_MASTER_PORT"] == env["MASTER_PORT"] == "29500"
    assert not [name for name in env if name.startswith(("LUFFY_ROLLOUT", "LUFFY_WEIGHT_SYNC"))]  # in the config
    assert (env["LUFFY_RUN_NAME"], env["LUFFY_RUN_NAMESPACE"]) == ("demo", "team-a")
    assert env["MLFLOW_RUN_ID"] == "run-42"
    assert "MLFLOW_TRACKING_URI" not in env and "MLFLOW_EXPERIMENT_NAME" not in env  # the config's tracking section
    for var, key in (("USERNAME", "username"), ("PASSWORD", "password"), ("TOKEN", "token")):
        assert env[f"MLFLOW_TRACKING_{var}"]["secretKeyRef"] == {"name": "mlflow-creds", "key": key, "optional": True}
    assert env["NCCL_DEBUG"] == "INFO"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert pod["serviceAccountName"] == REF.trainer
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/etc/luffy"]]["configMap"]["name"] == REF.config_map
    assert volumes[mounts["/checkpoints"]]["persistentVolumeClaim"]["claimName"] == REF.checkpoints
    assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == "datasets"


def test_rollout_urls_name_each_statefulset_pod_through_the_headless_service() -> None:
    spec = SPECS["full"]
    sts = manifests.rollout_statefulset(REF, spec, spec.rollout.replicas)
    urls = manifests.train_config(REF, spec).rollout.server_urls
    name, service, port = sts["metadata"]["name"], sts["spec"]["serviceName"], contract.ROLLOUT_PORT
    assert urls == [f"http://{name}-{i}.{service}.{REF.namespace}.svc:{port}" for i in range(3)]
    assert urls[0] == "http://demo-rollout-0.demo-rollout.team-a.svc:8000"


def test_trainer_service_exposes_rendezvous_and_one_weight_sync_port_per_replica() -> None:
    service = manifests.trainer_service(REF, SPECS["full"])
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert [p["port"] for p in service["spec"]["ports"]] == [29500, 29600, 29601, 29602]
    assert manifests.mutable_projection(service) == {"spec": {"ports": service["spec"]["ports"]}}
    assert manifests.mutable_projection(manifests.rollout_service(REF)) is None


def test_the_config_map_follows_the_rollout_replicas() -> None:
    """A rescaled run's next trainer reads the new server URLs from the ConfigMap, so it is kept up to date."""
    cm = manifests.config_map(REF, SPECS["full"])
    assert manifests.mutable_projection(cm) == {"data": cm["data"]}


def test_config_map_holds_the_trainer_config_for_the_pods() -> None:
    spec = SPECS["full"]
    cm = manifests.config_map(REF, spec)
    config = parse_config(yaml.safe_load(cm["data"]["config.yaml"]))
    assert config == manifests.train_config(REF, spec)
    assert config.rollout.backend == "vllm-server"
    assert config.rollout.tensor_parallel_size == 2
    assert config.checkpoint.dir == "/checkpoints/demo/checkpoints"
    assert config.checkpoint.every_steps == spec.checkpoint.every_steps
    assert config.output_dir == "/checkpoints/demo/outputs"
    assert config.tracking.tracking_uri == "http://mlflow:5000" and config.tracking.run_name == "demo"
    assert config.model == spec.model and config.algorithm == spec.algorithm and config.data == spec.data


def test_network_policies_admit_only_the_runs_own_pods() -> None:
    children = all_children(SPECS["full"])
    sts, job = by_kind(children, "StatefulSet"), by_kind(children, "Job")
    rollout_pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    trainer_pod_labels = job["spec"]["template"]["metadata"]["labels"]
    rollout_np = by_kind(children, "NetworkPolicy", "rollout")
    trainer_np = by_kind(children, "NetworkPolicy", "trainer")
    assert rollout_np["spec"]["podSelector"]["matchLabels"].items() <= rollout_pod_labels.items()
    (rule,) = rollout_np["spec"]["ingress"]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"].items() <= trainer_pod_labels.items()
    assert not peer["podSelector"]["matchLabels"].items() <= rollout_pod_labels.items()
    assert "ports" not in rule  # NCCL needs ephemeral ports
    (rule,) = trainer_np["spec"]["ingress"]
    (peer,) = rule["from"]
    selected = peer["podSelector"]["matchLabels"].items()
    assert selected <= trainer_pod_labels.items() and selected <= rollout_pod_labels.items()


# An installation's extra egress (OperatorSettings.run_egress): MLflow in its namespace, the API server, a proxy, and
# two careless blocks that contain the cloud metadata addresses.
EXTRA_EGRESS = (
    {
        "to": [
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "luffy-system"}},
                "podSelector": {"matchLabels": {"app.kubernetes.io/component": "mlflow"}},
            }
        ],
        "ports": [{"protocol": "TCP", "port": 5000}],
    },
    {"to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}], "ports": [{"protocol": "TCP", "port": 6443}]},
    {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}, {"ipBlock": {"cidr": "::/0"}}]},
)


def test_network_policies_limit_egress_to_the_run_dns_and_the_installations_rules() -> None:
    spec = SPECS["full"]
    policies = manifests.network_policies(REF, spec, EXTRA_EGRESS)
    assert [p["metadata"]["name"] for p in policies] == ["demo-trainer", "demo-rollout"]
    pods = {c: by_kind(all_children(spec), k)["spec"]["template"]["metadata"]["labels"] for c, k in
            (("trainer", "Job"), ("rollout", "StatefulSet"))}  # fmt: skip
    for policy in policies:
        kubernetes_validate.validate(policy, "1.32", strict=True)
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
        own, dns, mlflow, api, wide = policy["spec"]["egress"]
        (peer,) = own["to"]
        assert "ports" not in own and all(
            peer["podSelector"]["matchLabels"].items() <= p.items() for p in pods.values()
        )
        assert dns["to"] == [
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
            }
        ]
        assert dns["ports"] == [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
        assert (mlflow, api) == EXTRA_EGRESS[:2]
        v4, v6 = (peer["ipBlock"] for peer in wide["to"])
        assert v4 == {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "169.254.169.254/32"]}
        assert v6 == {"cidr": "::/0", "except": ["fd00:ec2::254/128"]}
    assert EXTRA_EGRESS[2]["to"][1]["ipBlock"] == {"cidr": "::/0"}  # the settings themselves are not changed
    # Without extra rules: the run's pods and DNS, nothing else (no MLflow, no internet, no metadata).
    for policy in manifests.network_policies(REF, spec):
        assert len(policy["spec"]["egress"]) == 2
    assert [p["metadata"]["name"] for p in manifests.network_policies(REF, SPECS["sft"])] == ["demo-trainer"]


def test_the_control_token_secret_is_made_once_and_mounted_as_a_file() -> None:
    spec = SPECS["full"]
    children = manifests.supporting_children(REF, spec)
    secret = children[0]  # before anything that mounts it
    assert manifests.is_control_secret(secret) and secret["metadata"]["name"] == "demo-control"
    assert secret["immutable"] is True and "data" not in secret  # the controller adds the random token
    filled = manifests.with_control_token(secret, "ab" * 32)
    kubernetes_validate.validate(filled, "1.32", strict=True)
    assert base64.b64decode(filled["data"][contract.CONTROL_TOKEN_KEY]).decode() == "ab" * 32
    assert "data" not in secret
    sts = manifests.rollout_statefulset(REF, spec, 3)
    job = manifests.trainer_job(REF, spec, 0, None)
    for workload in (sts, job):
        pod = workload["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "control-token"]
        assert mount == {"name": "control-token", "mountPath": contract.CONTROL_TOKEN_DIR, "readOnly": True}
        (volume,) = [v for v in pod["volumes"] if v["name"] == "control-token"]
        assert volume["secret"]["secretName"] == "demo-control" and volume["secret"]["defaultMode"] == 0o440
        assert not [e for e in container["env"] if "control" in e["name"].lower()]  # a file, not the environment
    args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--control-token-file") + 1] == contract.CONTROL_TOKEN_FILE
    assert args.index("--control-token-file") < args.index("--")  # serve-rollout's own option, not vLLM's
    assert manifests.train_config(REF, spec).rollout.control_token_file == contract.CONTROL_TOKEN_FILE
    sft = SPECS["sft"]
    assert not [c for c in manifests.supporting_children(REF, sft) if c["kind"] == "Secret"]
    pod = manifests.trainer_job(REF, sft, 0, None)["spec"]["template"]["spec"]
    assert "control-token" not in {v["name"] for v in pod["volumes"]}
    assert manifests.train_config(REF, sft).rollout.control_token_file is None


def test_trainer_may_patch_only_its_progress_config_map() -> None:
    children = all_children(SPECS["small"])
    role = by_kind(children, "Role")
    binding = by_kind(children, "RoleBinding")
    account = by_kind(children, "ServiceAccount")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["demo-progress"], "verbs": ["patch"]}
    ]
    progress = next(c for c in children if c["metadata"]["name"] == "demo-progress")
    assert progress["kind"] == "ConfigMap" and progress["data"] == {}
    assert manifests.mutable_projection(progress) is None  # a full reconcile never resets the trainer's report
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "team-a"}
    ]


def test_scheduling_reaches_both_pod_templates_and_no_child_is_a_kueue_job() -> None:
    """The run's own Workload is what Kueue admits (luffy_operator.kueue): a queue label on a child would make Kueue
    build a second Workload for it, and the operator creates the Job only once admitted, so it is never suspended."""
    children = all_children(SPECS["full"])
    for workload in (by_kind(children, "StatefulSet"), by_kind(children, "Job")):
        pod = workload["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"pool": "gpu"}
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert pod["priorityClassName"] == "training"
        assert not any(k.startswith("kueue.x-k8s.io/") for k in workload["metadata"]["labels"])
    assert "suspend" not in by_kind(children, "Job")["spec"]
    pod = by_kind(children, "Job")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 300  # the trainer's time to checkpoint on SIGTERM


def test_checkpoint_claim_new_retained_or_existing() -> None:
    claim = manifests.checkpoint_claim(REF, SPECS["full"])
    assert claim["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "100Gi"}},
        "storageClassName": "fast",
    }
    retained = manifests.checkpoint_claim(REF, spec_of(checkpoint={"size": "1Gi", "retainClaim": True}))
    assert "ownerReferences" not in retained["metadata"]
    existing = spec_of(checkpoint={"existingClaim": "shared"})
    assert manifests.checkpoint_claim(REF, existing) is None
    assert not [c for c in manifests.supporting_children(REF, existing) if c["kind"] == "PersistentVolumeClaim"]
    pod = manifests.trainer_job(REF, existing, 0, None)["spec"]["template"]["spec"]
    assert {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "shared"}} in pod["volumes"]


def test_sft_runs_without_rollout_servers() -> None:
    spec = SPECS["sft"]
    children = manifests.supporting_children(REF, spec)
    assert not [c for c in children if c["metadata"]["labels"]["luffy.dev/component"] == "rollout"]
    rollout = manifests.train_config(REF, spec).rollout
    assert rollout.server_urls == [] and rollout.weight_sync_host == RolloutConfig().weight_sync_host


def test_paper_example_is_the_released_run() -> None:
    """The released objective needs the released layout: 8 FSDP ranks (the rollout servers come on top)."""
    spec = SPECS["luffyrun-qwen2.5-math-7b"]
    assert spec.trainer.nodes * spec.trainer.gpus_per_node == 8
    a, o = spec.algorithm, spec.optimization
    assert (a.mode, a.n_on_policy, a.n_off_policy, a.gamma, a.clip_eps) == ("luffy", 7, 1, 0.1, None)
    assert (a.aggregation, a.loss_scale, a.entropy_coeff, a.normalize_std) == ("token-sum", "released", 0.001, False)
    assert (o.lr, o.prompts_per_step, o.optimizer_steps_per_batch, o.total_steps) == (1e-6, 128, 2, 500)
    assert (spec.data.max_prompt_length, spec.data.max_response_length, spec.rollout.max_model_len) == (
        1024,
        8192,
        9216,
    )


def test_paper_baselines_differ_from_the_luffy_run_only_where_the_paper_does() -> None:
    luffy = SPECS["luffyrun-qwen2.5-math-7b"]
    grpo, rl_sft, sft = (SPECS[f"luffyrun-qwen2.5-math-7b-{n}"] for n in ("grpo", "rl-sft-loss", "sft"))
    then_rl = SPECS["luffyrun-qwen2.5-math-7b-sft-then-rl"]
    assert (grpo.algorithm.mode, grpo.algorithm.n_on_policy, grpo.algorithm.clip_eps) == ("grpo", 8, 0.2)
    assert (rl_sft.algorithm.mode, rl_sft.algorithm.n_on_policy, rl_sft.algorithm.clip_eps) == ("rl_sft_loss", 7, None)
    for run in (grpo, rl_sft, then_rl):
        assert run.optimization == luffy.optimization and run.data.max_response_length == 8192
        assert run.algorithm.loss_scale == "released" and run.trainer == luffy.trainer
    assert (sft.algorithm.mode, sft.optimization.lr, sft.optimization.prompts_per_step) == ("sft", 5e-5, 64)
    assert sft.optimization.total_steps == 3 * 720 and sft.optimization.warmup_steps == 216  # 3 epochs, 10% warmup
    assert not sft.uses_rollouts and not sft.data.val_files
    # SFT then RL: GRPO from the SFT run's final model, read from the claim the SFT run wrote it to.
    assert then_rl.algorithm == grpo.algorithm
    assert sft.checkpoint.existing_claim == then_rl.data_volume.claim_name == "luffy-runs"
    sft_dir = manifests.run_directory(RunRef("qwen25-math-7b-sft", REF.namespace, REF.uid), sft)
    written = manifests.train_config(RunRef("qwen25-math-7b-sft", REF.namespace, REF.uid), sft).output_dir + "/final"
    assert written.startswith(sft_dir)
    assert then_rl.model.path == then_rl.data_volume.mount_path + written.removeprefix(manifests.CHECKPOINT_MOUNT)
