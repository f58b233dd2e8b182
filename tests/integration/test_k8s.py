"""KubeRay manifests, offline: rendered by kustomize and by `raclora k8s render`, validated
against the Kubernetes schemas (kubernetes-validate) and the KubeRay CRDs (vendored in k8s/crds)."""

from __future__ import annotations

import copy
import functools
import itertools
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from raclora_dist.config import build_config, parse_overrides
from tests.helpers import ROOT

K8S = ROOT / "k8s"
CRDS = K8S / "crds"  # vendored KubeRay CRDs (k8s/crds/README.md)
FOLDERS = ["quickstart-cpu", "gpu", "raycluster"]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
K8S_VERSION = "1.32"
SECRETISH = ("SECRET", "TOKEN", "PASSWORD", "ACCESS_KEY", "CREDENTIAL")


@functools.cache
def crd_validator(kind: str):
    """A validator of the vendored KubeRay CRD's v1 schema for ``kind``, built once: parsing the
    CRD and checking its schema take about 2.5 s, which validating one manifest then does not."""
    path = CRDS / f"ray.io_{kind.lower()}s.yaml"
    crd = yaml.safe_load(path.read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def kustomize(folder: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is needed to render k8s/ offline"
    out = subprocess.run([kubectl, "kustomize", str(K8S / folder)], capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def render(*args: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "raclora_dist", "k8s", "render", *args], capture_output=True,
                         text=True, check=True, cwd=ROOT)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def manifest_sets() -> dict[str, list[dict]]:
    sets = {f"kustomize:{f}": kustomize(f) for f in FOLDERS}
    for c in CONFIGS:
        rel = str(c.relative_to(ROOT))
        sets[f"render:{c.name}"] = render(rel)
        sets[f"render:{c.name}:gpu"] = render(rel, "--gpu", "--storage-uri", "s3://bucket/ray")
    return sets


@pytest.fixture(scope="module")
def sets():
    return manifest_sets()


def pod_specs(doc: dict) -> list[dict]:
    spec = doc["spec"]
    cluster = spec.get("rayClusterSpec", spec)
    pods = [cluster["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in cluster.get("workerGroupSpecs", [])]
    if "submitterPodTemplate" in spec:
        pods.append(spec["submitterPodTemplate"]["spec"])
    return pods


@pytest.mark.slow  # kubeconform over every rendered combination: ~35 s
def test_every_manifest_validates(sets):
    for name, docs in sets.items():
        kinds = [d["kind"] for d in docs]
        assert "RayJob" in kinds or "RayCluster" in kinds, name
        for doc in docs:
            if doc["apiVersion"] == "ray.io/v1":
                crd_validator(doc["kind"]).validate(doc)
            else:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_schema_validation_catches_a_broken_rayjob(sets):
    job = copy.deepcopy(next(d for d in sets["kustomize:quickstart-cpu"] if d["kind"] == "RayJob"))
    job["spec"]["backoffLimit"] = "twice"
    with pytest.raises(jsonschema.ValidationError):
        crd_validator("RayJob").validate(job)


def test_entrypoint_is_raclora_train_on_the_mounted_config(sets):
    assert 'raclora = "raclora_dist.cli:main"' in (ROOT / "pyproject.toml").read_text()
    for name, docs in sets.items():
        for job in (d for d in docs if d["kind"] == "RayJob"):
            argv = shlex.split(job["spec"]["entrypoint"])
            assert argv[:2] == ["raclora", "train"], name
            config_path = Path(argv[2])
            overrides = parse_overrides(argv[3:])
            pods = pod_specs(job)
            head = pods[0]
            vols = {v["name"]: v for v in head["volumes"]}
            mount = next(m for m in head["containers"][0]["volumeMounts"] if Path(m["mountPath"]) == config_path.parent)
            cm_name = vols[mount["name"]]["configMap"]["name"]
            cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == cm_name)
            data = yaml.safe_load(cm["data"][config_path.name])
            cfg = build_config({**data, **overrides}, name)  # the mounted config is a valid run config
            assert cfg.ray.enabled and cfg.ray.name == job["metadata"]["name"]
            # durable storage: a PVC mounted where the checkpoints go, or an object-store URI
            if "://" not in cfg.ray.storage_path:
                assert any(v.get("persistentVolumeClaim") for v in head["volumes"])
                assert any(cfg.ray.storage_path.startswith(m["mountPath"]) for m in head["containers"][0]["volumeMounts"])
            spec = job["spec"]
            assert spec["shutdownAfterJobFinishes"] and spec["ttlSecondsAfterFinished"] > 0
            assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 1


def test_no_root_no_privilege_no_inline_secret(sets):
    for name, docs in sets.items():
        assert not [d for d in docs if d["kind"] == "Secret"], f"{name}: secrets are referenced, never shipped"
        for doc in (d for d in docs if d["kind"] in ("RayJob", "RayCluster")):
            for pod in pod_specs(doc):
                for c in pod["containers"]:
                    sc = c["securityContext"]
                    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
                    assert sc["allowPrivilegeEscalation"] is False and not sc.get("privileged")
                    assert c["resources"]["requests"] and c["resources"]["limits"], (name, c["name"])
                    for env in c.get("env", []):
                        if any(s in env["name"].upper() for s in SECRETISH):
                            assert "value" not in env and "secretKeyRef" in env["valueFrom"], (name, env["name"])


def test_gpu_manifest_requests_gpus_and_tolerates_gpu_nodes(sets):
    job = next(d for d in sets["kustomize:gpu"] if d["kind"] == "RayJob")
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["tolerations"][0]["key"] == "nvidia.com/gpu"
    # the GPU job is QLoRA: a 4-bit NF4 base with bf16 compute, codes stored as uint8
    config_map = next(d for d in sets["kustomize:gpu"] if d["kind"] == "ConfigMap")
    cfg = build_config(yaml.safe_load(next(iter(config_map["data"].values()))))
    q = cfg.model.quantization
    assert (q.method, q.compute_dtype, q.storage, cfg.distributed.mixed_precision) == ("nf4", "bfloat16", "uint8", "bf16")
    # ... of a pretrained model whose weights come from a read-only volume every Ray pod mounts
    assert cfg.model.config is None and cfg.model.name_or_path == "/mnt/models/Llama-3.1-8B"
    ray_pods = [job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"], worker]
    for spec in ray_pods:
        (models,) = [v for v in spec["volumes"] if v["name"] == "models"]
        assert models["persistentVolumeClaim"] == {"claimName": "raclora-models", "readOnly": True}
        mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "models")
        assert mount == {"name": "models", "mountPath": "/mnt/models", "readOnly": True}


@pytest.mark.parametrize("folder", FOLDERS)
def test_ray_pods_have_a_memory_backed_dev_shm_within_their_memory(sets, folder):
    """NCCL and Ray's object store need more than a container's default 64 MB /dev/shm."""
    from raclora_dist.orchestration.k8s import SHM

    def gib(q: str) -> float:
        return float(q[:-2]) if q.endswith("Gi") else float(q[:-2]) / 1024

    job = next(d for d in sets[f"kustomize:{folder}"] if d["kind"] in ("RayJob", "RayCluster"))
    cluster = job["spec"].get("rayClusterSpec", job["spec"])
    specs = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for spec in specs:
        (shm,) = [v for v in spec["volumes"] if v["name"] == "dshm"]
        assert shm["emptyDir"]["medium"] == "Memory"
        container = spec["containers"][0]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
        assert gib(shm["emptyDir"]["sizeLimit"]) <= gib(container["resources"]["limits"]["memory"]) / 2
    gpu = folder == "gpu"
    worker_shm = next(v for v in specs[-1]["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"]
    assert worker_shm == SHM["gpu-worker" if gpu else "cpu-worker"]


def test_render_refuses_a_model_path_no_pod_mounts(tmp_path):
    from raclora_dist.config import ConfigError, load_config
    from raclora_dist.orchestration import k8s

    pretrained = ["model.config=null", f"model.name_or_path={tmp_path}/my-model"]
    cfg = load_config(ROOT / "configs/quickstart.yaml", pretrained)
    with pytest.raises(ConfigError, match=r"model.name_or_path: .*my-model' is not on a volume the pods mount"):
        k8s.render(cfg, model_volume="models")
    cfg = load_config(ROOT / "configs/quickstart.yaml", ["model.config=null", "model.name_or_path=/mnt/models/m"])
    with pytest.raises(ConfigError, match=r"--model-volume"):
        k8s.render(cfg, storage_uri="s3://b/ray")  # no volume at all
    k8s.render(cfg, storage_uri="s3://b/ray", model_volume="models")


def test_image_is_set_in_one_place(sets):
    images = {c["image"] for name, docs in sets.items() if name.startswith("kustomize:")
              for d in docs if d["kind"] in ("RayJob", "RayCluster") for p in pod_specs(d) for c in p["containers"]}
    component = yaml.safe_load((K8S / "components" / "image" / "kustomization.yaml").read_text())["images"][0]
    assert images == {f"{component['newName']}:{component['newTag']}"}


@pytest.mark.parametrize("folder", FOLDERS)
def test_committed_manifests_are_the_renderer_output(folder):
    text = (K8S / folder / "manifests.yaml").read_text()
    first = text.splitlines()[0]
    args = shlex.split(first.split("raclora k8s render", 1)[1].split("(a test", 1)[0])
    assert [d for d in yaml.safe_load_all(text) if d] == render(*args), f"regenerate k8s/{folder}/manifests.yaml"


def pod_labels(doc: dict) -> list[dict]:
    spec = doc["spec"]
    cluster = spec.get("rayClusterSpec", spec)
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster.get("workerGroupSpecs", [])]
    if "submitterPodTemplate" in spec:
        templates.append(spec["submitterPodTemplate"])
    return [t.get("metadata", {}).get("labels", {}) for t in templates]


def test_the_clusters_front_door_is_locked(sets):
    """Ray token auth with the token from a user-created Secret (never shipped), and a
    NetworkPolicy that admits only the run's own pods, and ray-client pods on 8265/10001."""
    for name, docs in sets.items():
        ray_doc = next(d for d in docs if d["kind"] in ("RayJob", "RayCluster"))
        cluster = ray_doc["spec"].get("rayClusterSpec", ray_doc["spec"])
        auth = cluster["authOptions"]
        assert auth["mode"] == "token" and auth["secretName"].endswith("-ray-token"), name
        assert not [d for d in docs if d["kind"] == "Secret"], name
        (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
        selector = policy["spec"]["podSelector"]["matchLabels"]
        for labels in pod_labels(ray_doc):  # it covers the head, the workers and the submitter
            assert selector.items() <= labels.items(), (name, labels)
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        rules = policy["spec"]["ingress"]
        assert all(r.get("from") for r in rules), "a rule without 'from' would admit every pod"
        own, clients = rules
        assert own["from"] == [{"podSelector": {"matchLabels": selector}}] and "ports" not in own
        assert clients["from"] == [{"podSelector": {"matchLabels": {"raclora.io/ray-client": "true"}}}]
        assert sorted(p["port"] for p in clients["ports"]) == [8265, 10001]


# Overrides a user may add on top of a bundled config before rendering (each with every flag).
USER_CHANGES = [[], ["train.batch_size=8"], ["distributed.sync=link"], ["model.quantization=nf4"],
                ["model.quantization={method: nf4, storage_dtype: float32}"]]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_render_never_writes_a_config_the_cluster_would_refuse(config):
    """Every combination of the render flags, over each bundled config with each user change
    it accepts, either fails here, naming a field, or yields a ConfigMap whose config the job
    validates as is."""
    from raclora_dist.config import ConfigError, load_config
    from raclora_dist.orchestration import k8s

    rendered = refused = 0
    for changes in USER_CHANGES:
        try:
            cfg = load_config(config, changes)
        except ConfigError:
            continue  # the user's own config, already refused on their machine
        flags = itertools.product([None, 1, 2, 3, 4], [False, True], [None, "s3://bucket/ray"])
        for workers, gpu, storage in flags:
            try:
                docs = k8s.render(cfg, workers=workers, gpu=gpu, storage_uri=storage)
            except ConfigError as err:
                assert "raclora k8s render" in str(err) and re.search(r"\b[a-z_]+\.[a-z_]+", str(err)), str(err)
                refused += 1
                if changes == ["train.batch_size=8"]:
                    assert workers == 3 and "train.batch_size (8)" in str(err), str(err)
                continue
            text = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["train.yaml"]
            build_config(yaml.safe_load(text))  # what `raclora train /etc/raclora/train.yaml` does first
            rendered += 1
    assert rendered >= 40 and refused >= 4, (rendered, refused)  # batch 8 over 3 workers, 4 ways at least


def test_render_refuses_on_the_users_machine_naming_the_field(tmp_path):
    """The case from the issue: batch 8 rendered for 3 workers failed only on the cluster."""
    proc = subprocess.run([sys.executable, "-m", "raclora_dist", "k8s", "render", "configs/quickstart.yaml",
                           "train.batch_size=8", "--workers", "3"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and not proc.stdout
    assert "train.batch_size (8) must be a multiple of distributed.workers (3)" in proc.stderr


def test_a_one_process_link_sync_config_renders_to_replicas_not_shards():
    from raclora_dist.config import load_config
    from raclora_dist.orchestration import k8s

    cfg = load_config(ROOT / "configs/quickstart.yaml", ["distributed.strategy=single", "distributed.workers=1",
                                                          "distributed.sync=link"])
    text = next(d for d in k8s.render(cfg, workers=2) if d["kind"] == "ConfigMap")["data"]["train.yaml"]
    assert yaml.safe_load(text)["distributed"]["strategy"] == "ddp"


@pytest.mark.parametrize("overrides", [["distributed.replicas=2"],
                                       ["distributed.sync=link", "distributed.sync_groups=2"]])
def test_groups_render_as_one_pod_per_node_holding_the_groups_gpus(overrides):
    """HSDP and link-sync over fsdp2, 8 workers in 2 groups: 2 worker pods of 4 GPUs (a node
    each), Ray told each pod has 4, and PACK placement so a pod's workers are a group."""
    from raclora_dist.config import load_config
    from raclora_dist.orchestration import k8s

    cfg = load_config(ROOT / "configs/quickstart.yaml", ["distributed.strategy=fsdp2", "distributed.workers=8",
                                                          "train.batch_size=16", *overrides])
    docs = k8s.render(cfg, gpu=True)
    job = next(d for d in docs if d["kind"] == "RayJob")
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (2, 2, 2)
    assert group["rayStartParams"] == {"num-gpus": "4"}
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
    text = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["train.yaml"]
    ran = yaml.safe_load(text)
    assert ran["distributed"]["workers"] == 8 and ran["ray"]["placement_strategy"] == "PACK"
    assert ran["ray"]["resources_per_worker"] == {"GPU": 1.0}
    # without groups: a pod per worker, as before
    plain = k8s.render(load_config(ROOT / "configs/quickstart.yaml", ["distributed.workers=8",
                                                                       "train.batch_size=16"]), gpu=True)
    (group,) = next(d for d in plain if d["kind"] == "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == 8 and group["rayStartParams"] == {"num-gpus": "1"}


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["pvc", "object-store"])
def test_a_retried_rayjob_resumes_from_its_storage(storage, tmp_path, small_data):
    """A RayJob retry is a new Ray cluster running the same entrypoint on the same ConfigMap:
    the rendered config, run twice against the same storage, resumes the second time. With a
    PVC the run folder survives; with an object store it was on the lost pod (removed here)
    and the checkpoint comes back from storage."""
    import uuid

    from raclora_dist.checkpoint.folder import find_latest
    from raclora_dist.config import load_config
    from raclora_dist.orchestration import k8s
    from tests.helpers import faults, run_cli

    name = f"raclora-retry-{uuid.uuid4().hex[:8]}"
    cfg = load_config(ROOT / "configs/quickstart.yaml", [
        f"data.path={small_data}", "data.seq_len=32", "raclora.links=2", "raclora.steps_per_link=3",
        "train.batch_size=4", "train.eval_batches=1", "ray.max_failures=0"])
    uri = (tmp_path / "bucket").as_uri() if storage == "object-store" else None
    docs = k8s.render(cfg, name=name, storage_uri=uri)
    text = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["train.yaml"]
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["spec"]["entrypoint"] == "raclora train /etc/raclora/train.yaml" and job["spec"]["backoffLimit"] >= 1
    text = text.replace(k8s.STORAGE_DIR, str(tmp_path / "pvc"))  # where the PVC is mounted here
    (tmp_path / "train.yaml").write_text(text)
    run_dir = Path(yaml.safe_load(text)["run"]["dir"])

    first = run_cli("train", str(tmp_path / "train.yaml"), faults(crash_at_step=5), cwd=tmp_path)  # the pod fails
    assert first.returncode != 0
    if storage == "object-store":
        assert run_dir.is_relative_to("/tmp/raclora/runs")
        shutil.rmtree(run_dir)  # the run folder was on the failed pod's own disk
    second = run_cli("train", str(tmp_path / "train.yaml"), cwd=tmp_path)  # the retry: same command, new cluster
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert "resumed" in second.stdout + second.stderr and "at link 2 (step 3)" in second.stdout + second.stderr
    assert json.loads((find_latest(run_dir) / "meta.json").read_text())["merged"] == [0, 1]
    shutil.rmtree(run_dir, ignore_errors=True)


def test_a_hub_model_or_an_object_store_model_renders_with_the_token_from_a_secret():
    """The three ways a pod gets weights: a volume (above), the Hub (HF_TOKEN from a Secret, the
    Hub cache on the storage PVC so that pods and retries download once), object storage."""
    from raclora_dist.config import load_config
    from raclora_dist.orchestration import k8s

    hub = load_config(ROOT / "configs/quickstart.yaml", ["model.config=null", "model.name_or_path=meta-llama/Llama-3.1-8B"])
    docs = k8s.render(hub, hf_token_secret="hf-token")
    job = next(d for d in docs if d["kind"] == "RayJob")
    for spec in pod_specs(job)[:2]:  # head, workers
        env = {e["name"]: e for e in spec["containers"][0]["env"]}
        assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
        assert env["HF_HOME"]["value"] == "/mnt/raclora/hf"
    text = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["train.yaml"]
    assert yaml.safe_load(text)["model"]["name_or_path"] == "meta-llama/Llama-3.1-8B"
    s3 = load_config(ROOT / "configs/quickstart.yaml", ["model.config=null", "model.name_or_path=s3://models/llama"])
    k8s.render(s3, storage_uri="s3://bucket/ray")  # its credentials: the storage Secret's
