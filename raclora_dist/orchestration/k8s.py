"""KubeRay manifests from a run config: ``raclora k8s render CFG`` -> ConfigMap + RayJob.

The training config travels in a ConfigMap mounted at ``/etc/raclora``; the RayJob's
entrypoint is exactly ``raclora train /etc/raclora/train.yaml``. Run folder and Ray storage
go to durable storage: a ReadWriteMany PVC mounted on every pod (default), or an
object-store URI whose credentials come from a Secret by reference. A retried job (each
retry a new Ray cluster) then finds the previous attempt's checkpoints under the same
``ray.name`` and resumes. Pods run as non-root with no privilege escalation.

The cluster's front door is locked twice. Ray token authentication (KubeRay ``authOptions``,
mode ``token``) takes its token from a Secret the user creates (``<name>-ray-token``, key
``auth_token``; never rendered, never in git): the operator sets ``RAY_AUTH_MODE`` and
``RAY_AUTH_TOKEN`` on every Ray container. A NetworkPolicy admits to the cluster's pods only
the pods of the same run (head, workers, the job's submitter) on any port, and pods labelled
``raclora.io/ray-client: "true"`` on the dashboard/job port (8265) and the client port
(10001): an outside ``raclora submit`` runs in such a pod, or through ``kubectl port-forward``.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from raclora_dist import __version__
from raclora_dist.config import RunConfig, with_values

DEFAULT_IMAGE = f"ghcr.io/raclora/raclora-dist:{__version__}"
CONFIG_DIR = "/etc/raclora"
CONFIG_KEY = "train.yaml"
STORAGE_DIR = "/mnt/raclora"
MODELS_DIR = "/mnt/models"  # --model-volume: a PVC of pretrained weights, read-only on every Ray pod
# /dev/shm: a container's default is 64 MB, too small for NCCL's buffers and Ray's object
# store; a memory-backed emptyDir instead, counted in the pod's memory (a quarter to a half).
SHM = {"head": "1Gi", "cpu-worker": "2Gi", "gpu-worker": "16Gi"}
IMAGE_DATA = "/opt/raclora/data/stdlib_docstrings.jsonl"  # built into the image (k8s/Dockerfile)
CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
CLIENT_LABEL = "raclora.io/ray-client"
CLIENT_PORTS = (8265, 10001)  # dashboard + job submission, Ray client

POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 100, "fsGroup": 100,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "privileged": False,
                      "capabilities": {"drop": ["ALL"]}}


def cluster_config(cfg: RunConfig, name: str, storage_uri: str | None, workers: int | None = None,
                   gpu: bool = False, model_volume: str | None = None) -> RunConfig:
    """The config as the cluster runs it: paths inside the pods, Ray on, durable storage, the
    workers and devices the manifest asks for; validated again as a whole.

    Raises:
        ConfigError: the config cannot run that way (e.g. ``train.batch_size`` is not a
            multiple of the workers, or ``model.name_or_path`` is not a path the pods see);
            names the field, here rather than on the cluster.
    """
    _check_model_path(cfg, storage_uri, model_volume)
    storage = {"run.dir": f"/tmp/raclora/runs/{name}", "ray.storage_path": storage_uri} if storage_uri else {
        "run.dir": f"{STORAGE_DIR}/runs/{name}", "ray.storage_path": f"{STORAGE_DIR}/ray"}
    changes: dict[str, Any] = {
        "ray.enabled": True,
        "ray.address": None,  # the RayJob's own cluster (RAY_ADDRESS inside the job)
        "ray.name": name, **storage,
        "distributed.workers": workers or cfg.distributed.workers,
        "ray.use_gpu": gpu, "ray.resources_per_worker": {"GPU": 1.0} if gpu else {"CPU": 1.0},
    }
    if isinstance(cfg.data.path, str) and cfg.data.path.endswith("stdlib_docstrings.jsonl"):
        changes["data.path"] = IMAGE_DATA
    if cfg.distributed.strategy == "single":
        # Pods are workers: a one-process config becomes the engine that keeps its meaning
        # (link sync needs whole replicas; otherwise shard).
        changes["distributed.strategy"] = "ddp" if cfg.distributed.sync == "link" else "fsdp2"
    if node_groups(cfg):
        # A pod per group: PACK puts a pod's workers on it together, contiguous ranks.
        changes["ray.placement_strategy"] = "PACK"
    if gpu:
        changes.update({"distributed.backend": "nccl", "distributed.mixed_precision": "bf16"})
        if cfg.model.quantization.enabled:
            changes["model.quantization.compute_dtype"] = "bfloat16"  # QLoRA's GPU setting (CPU configs say float32)
    return with_values(cfg, changes, source=f"raclora k8s render {name}")


def node_groups(cfg: RunConfig) -> int | None:
    """The groups a config shards within and not across (HSDP's ``replicas``, or link-sync's
    ``sync_groups`` under fsdp2), rendered one pod (one node) each; None: one pod per worker."""
    d = cfg.distributed
    if d.strategy == "fsdp2" and d.sync == "link" and d.sync_groups:
        return d.sync_groups
    return d.replicas if d.replicas > 1 else None


def _check_model_path(cfg: RunConfig, storage_uri: str | None, model_volume: str | None) -> None:
    """A pretrained model must sit where every pod sees it: the model volume, or the run's
    storage PVC. (An object-store bucket mounted by a CSI driver is such a volume too.)"""
    from raclora_dist.data.sources import kind

    path = cfg.model.name_or_path
    if path is None or kind(path) != "path":
        return  # a Hub name or URI: every pod fetches it (HF_TOKEN, storage credentials)
    seen = ([MODELS_DIR] if model_volume else []) + ([] if storage_uri else [STORAGE_DIR])
    if not any(path == d or path.startswith(d + "/") for d in seen):
        where = " or ".join(seen) if seen else "nowhere (no volume is mounted)"
        from raclora_dist.config import ConfigError

        raise ConfigError(f"raclora k8s render: model.name_or_path: {path!r} is not on a volume the pods mount "
                          f"({where}); put the weights on a PVC, pass --model-volume CLAIM, and set "
                          f"model.name_or_path={MODELS_DIR}/<folder> (docs: k8s/README.md)")


def _container(name: str, image: str, cpu: str, memory: str, gpus: int, env: list, mounts: list) -> dict:
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    return {"name": name, "image": image, "imagePullPolicy": "IfNotPresent",
            "resources": {"requests": dict(limits), "limits": limits},
            "securityContext": copy.deepcopy(CONTAINER_SECURITY), "env": env, "volumeMounts": mounts}


def render(cfg: RunConfig, *, name: str = "raclora-quickstart", image: str = DEFAULT_IMAGE, gpu: bool = False,
           workers: int | None = None, storage_uri: str | None = None, credentials_secret: str = "raclora-storage-credentials",
           pvc: str = "raclora-storage", model_volume: str | None = None,
           hf_token_secret: str | None = None) -> list[dict]:
    """ConfigMap (+ PVC) + RayJob for ``cfg``.

    Args:
        cfg: the run config. name: the RayJob's (and Ray run's) name.
        image: container image with raclora-dist installed. gpu: one GPU per worker.
        workers: workers (default ``distributed.workers``): a pod each, or with HSDP
            (``replicas``) or link-sync groups under fsdp2 a pod per group holding its workers
            (:func:`node_groups`).
        storage_uri: an object-store URI for checkpoints (credentials from
            ``credentials_secret`` by reference); default a ReadWriteMany PVC ``pvc``.
        model_volume: a PVC holding pretrained weights, mounted read-only at
            :data:`MODELS_DIR` on the head (the driver checks the model) and every worker.
        hf_token_secret: a Secret whose key ``token`` becomes ``HF_TOKEN`` on the Ray pods (a
            gated Hub model); with the storage PVC the Hub cache (``HF_HOME``) is on it, so the
            pods and the job's retries download a model once.
    """
    c = cluster_config(cfg, name, storage_uri, workers, gpu, model_volume)
    n = c.distributed.workers
    # One pod per worker, or per group of workers (a node holding a group's GPUs).
    groups = node_groups(c)
    pods, per_pod = (groups, n // groups) if groups else (n, 1)
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-config"},
                  "data": {CONFIG_KEY: c.to_yaml()}}
    env: list[dict[str, Any]] = [{"name": "OMP_NUM_THREADS", "value": "1"}]
    if storage_uri:
        env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": credentials_secret, "key": k}}} for k in CREDENTIAL_KEYS]
    else:
        env.append({"name": "HF_HOME", "value": f"{STORAGE_DIR}/hf"})  # one Hub cache for every pod and retry
    if hf_token_secret:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": hf_token_secret, "key": "token"}}})
    mounts = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}]
    volumes: list[dict] = [{"name": "config", "configMap": {"name": f"{name}-config"}}]
    if not storage_uri:
        mounts.append({"name": "storage", "mountPath": STORAGE_DIR})
        volumes.append({"name": "storage", "persistentVolumeClaim": {"claimName": pvc}})
    if model_volume:
        mounts.append({"name": "models", "mountPath": MODELS_DIR, "readOnly": True})
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": model_volume, "readOnly": True}})
    ray_mounts = [*mounts, {"name": "dshm", "mountPath": "/dev/shm"}]

    labels = {"app.kubernetes.io/name": "raclora", "app.kubernetes.io/instance": name}

    def pod(container: dict, extra: dict | None = None, shm: str | None = None) -> dict:
        own = copy.deepcopy(volumes) if container["volumeMounts"] else []
        if shm:
            own.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}})
        spec = {"securityContext": copy.deepcopy(POD_SECURITY), "containers": [container], "volumes": own}
        return {"metadata": {"labels": dict(labels)}, "spec": {**spec, **(extra or {})}}

    head = _container("ray-head", image, "1", "4Gi", 0, env, ray_mounts)
    head["ports"] = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                     {"containerPort": 10001, "name": "client"}]
    worker = _container("ray-worker", image, str((8 if gpu else 2) * per_pod), f"{(64 if gpu else 6) * per_pod}Gi",
                        per_pod if gpu else 0, env, ray_mounts)
    worker_extra = {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]} if gpu else None
    submitter = _container("ray-job-submitter", image, "500m", "512Mi", 0, [], [])
    rayjob = {
        "apiVersion": "ray.io/v1", "kind": "RayJob",
        "metadata": {"name": name, "labels": dict(labels)},
        "spec": {
            "entrypoint": f"raclora train {CONFIG_DIR}/{CONFIG_KEY}",
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 3600,
            "activeDeadlineSeconds": 86400 if gpu else 7200,
            "backoffLimit": 2,  # each retry is a new cluster; it resumes from durable storage
            "rayClusterSpec": {
                "rayVersion": "2.60.0",
                "authOptions": {"mode": "token", "secretName": f"{name}-ray-token"},
                "headGroupSpec": {"rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
                                  "template": pod(head, shm=SHM["head"])},
                "workerGroupSpecs": [{"groupName": "gpu-workers" if gpu else "workers", "replicas": pods,
                                      "minReplicas": pods, "maxReplicas": pods,
                                      "rayStartParams": {"num-gpus": str(per_pod)} if gpu else {"num-cpus": str(per_pod)},
                                      "template": pod(worker, worker_extra,
                                                      shm=SHM["gpu-worker" if gpu else "cpu-worker"])}],
            },
            "submitterPodTemplate": pod(submitter, {"restartPolicy": "Never"}),
        },
    }
    docs = [config_map]
    if not storage_uri:
        docs.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": pvc},
                     "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "20Gi"}}}})
    return [*docs, network_policy(name, labels), rayjob]


def network_policy(name: str, labels: dict[str, str]) -> dict:
    """Ingress to the run's pods: from the run's own pods (Ray uses many ports between head
    and workers), and from ``raclora.io/ray-client`` pods on the job and client ports only."""
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": f"{name}-ray", "labels": dict(labels)},
        "spec": {
            "podSelector": {"matchLabels": dict(labels)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": dict(labels)}}]},
                {"from": [{"podSelector": {"matchLabels": {CLIENT_LABEL: "true"}}}],
                 "ports": [{"protocol": "TCP", "port": p} for p in CLIENT_PORTS]},
            ],
        },
    }


def render_cluster(cfg: RunConfig, **kw) -> list[dict]:
    """A long-lived RayCluster (same pods, storage and config) for ``raclora submit``."""
    docs = render(cfg, **kw)
    job = docs[-1]
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster",
               "metadata": {**job["metadata"], "name": job["metadata"]["name"] + "-cluster"},
               "spec": job["spec"]["rayClusterSpec"]}
    return [*docs[:-1], cluster]


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None  # the embedded config stays readable YAML
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(docs: list[dict]) -> str:
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False)
