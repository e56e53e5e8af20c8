"""What each overlay must carry, visible in its rendered objects (issue 6, points 2 and 3)."""

import manifest_checks as mc
import pytest

POOLS = ("vision", "llm")
# Kinds that take no namespace (kustomize's namespace transformer skips them), among those a deployment may carry.
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass", "StorageClass",
                  "PersistentVolume", "CustomResourceDefinition"}


def pod_spec(objects, name: str) -> dict:
    return mc.pod_template(mc.one(objects, "Deployment", name))["spec"]


def main_container(objects, name: str) -> dict:
    return pod_spec(objects, name)["containers"][0]


def volume(spec: dict, name: str) -> dict:
    return next(v for v in spec["volumes"] if v["name"] == name)


def test_every_overlay_renders(objects):
    ids = [mc.object_id(o) for o in objects]
    assert len(ids) == len(set(ids))
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "ServiceAccount", "ConfigMap", "Service", "Deployment", "StatefulSet"} <= kinds
    for obj in objects:
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"]["namespace"] == "internvl", mc.object_id(obj)
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "internvl", mc.object_id(obj)
        # kustomize leaves images it was not told about alone; every image of ours must have been retagged.
        for c in mc.containers(obj) if mc.pod_template(obj) else []:
            assert c["image"] not in ("internvl-serve", mc.VLLM_IMAGE), \
                f"{mc.object_id(obj)} {c['name']}: image not set by overlay"


def test_pools_sit_behind_headless_services(objects):
    for pool in POOLS:
        service = mc.one(objects, "Service", f"{pool}-headless")
        assert service["spec"]["clusterIP"] == "None"
        # Only ready pods in DNS: loading and draining pods never join a gateway's pool.
        assert service["spec"].get("publishNotReadyAddresses") is False
    args = main_container(objects, "gateway")["args"]
    assert "--vision-target=dns:///vision-headless:50052" in args
    assert "--llm-target=dns:///llm-headless:50053" in args


def test_routing_is_configured(objects):
    gateway = mc.servers(objects)["gateway"].args
    config = mc.one(objects, "ConfigMap", "internvl-config")["data"]
    assert (gateway.llm_routing, gateway.routing_epsilon) == (config["llm-routing"], float(config["routing-epsilon"]))
    assert gateway.llm_routing == "affinity"
    assert gateway.resolve_interval_s == 5


def test_lifecycle_is_visible(objects):
    for name in (*POOLS, "gateway"):
        c = main_container(objects, name)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert "grpc" in c[probe], (name, probe)
        assert c["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
        assert pod_spec(objects, name)["terminationGracePeriodSeconds"] > 30


def test_redis_is_a_bounded_lru_cache(objects):
    servers = [w for w in mc.find(objects, "StatefulSet") if mc.is_redis_server(w)]
    assert servers
    for redis in servers:
        container = mc.pod_template(redis)["spec"]["containers"][0]
        assert "--maxmemory" in container["command"]
        assert mc.conf_value(mc.redis_conf(redis, container, objects), "maxmemory-policy") == "allkeys-lru"


def test_redis_cluster_overlay_replaces_the_single_redis():
    objects = mc.render("gpu-redis-cluster")
    assert not mc.find(objects, "StatefulSet", "redis") and not mc.find(objects, "Service", "redis")
    nodes = mc.one(objects, "StatefulSet", "redis-cluster")
    assert nodes["spec"]["replicas"] == 6
    url = mc.one(objects, "ConfigMap", "internvl-config")["data"]["redis-url"]
    assert url == "redis+cluster://" + ",".join(f"redis-cluster-{i}.redis-cluster:6379" for i in range(6))
    assert {inv.args.redis_url for inv in mc.servers(objects).values()} == {url}
    assert mc.redis_servers(objects, url) == ([nodes], [])
    job = mc.one(objects, "Job", "redis-cluster-create")
    assert "--cluster-replicas 1 --cluster-yes" in mc.pod_template(job)["spec"]["containers"][0]["command"][2]
    # The same cache size as the gpu overlay's single Redis, over three masters.
    gpu = mc.one(mc.render("gpu"), "ConfigMap", "internvl-config")["data"]["redis-maxmemory"]
    per_node = mc.one(objects, "ConfigMap", "internvl-config")["data"]["redis-maxmemory"]
    assert int(gpu.removesuffix("gb")) == 3 * int(per_node.removesuffix("gb"))
    assert mc.one(objects, "PodDisruptionBudget", "redis-cluster")["spec"]["maxUnavailable"] == 1


def test_settings_identity_and_policies(objects):
    config = mc.one(objects, "ConfigMap", "internvl-config")["data"]
    assert {"model", "redis-url", "cache-namespace", "cache-ttl-s", "redis-maxmemory", "kv-cache-budget-mb"} <= \
        set(config)
    account = mc.one(objects, "ServiceAccount", "internvl")
    for name in (*POOLS, "gateway"):
        spec = pod_spec(objects, name)
        assert spec["serviceAccountName"] == account["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True
    assert len(mc.find(objects, "NetworkPolicy")) >= 5
    assert {p["metadata"]["name"] for p in mc.find(objects, "PodDisruptionBudget")} >= {*POOLS, "gateway"}


def test_gpu_overlay_runs_internvl2_5_8b_on_gpus():
    objects = mc.render("gpu")
    assert mc.one(objects, "ConfigMap", "internvl-config")["data"]["model"].endswith("InternVL2_5-8B")
    for pool in POOLS:
        spec = pod_spec(objects, pool)
        resources = spec["containers"][0]["resources"]
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] >= 1
        assert spec["nodeSelector"]
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
        shm = next(m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm")
        assert volume(spec, shm["name"])["emptyDir"]["medium"] == "Memory"
        # Weights from a volume, never from the image.
        models = volume(spec, "models")
        assert models["persistentVolumeClaim"]["claimName"] == "internvl-models" and "emptyDir" not in models
        assert mc.one(objects, "PersistentVolumeClaim", "internvl-models")
    for cpu_only in (pod_spec(objects, "gateway"), mc.pod_template(mc.one(objects, "StatefulSet", "redis"))["spec"]):
        assert "nvidia.com/gpu" not in str(cpu_only)


def test_gpu_overlays_run_the_llm_pool_on_vllm():
    for overlay in ("gpu", "gpu-redis-cluster", "gpu-large"):
        objects = mc.render(overlay)
        llm = mc.servers(objects)["llm"]
        assert llm.args.engine == "vllm", overlay
        assert mc.image_name(llm.container["image"]) == mc.VLLM_IMAGE
        assert mc.image_name(mc.servers(objects)["vision"].container["image"]) == "internvl-serve"
    assert mc.servers(mc.render("cpu-demo"))["llm"].args.engine == "transformers"


def test_gpu_large_overlay_shards_internvl2_5_78b_over_four_gpus():
    objects = mc.render("gpu-large")
    config = mc.one(objects, "ConfigMap", "internvl-config")["data"]
    assert config["model"].endswith("InternVL2_5-78B") and config["hub-model"] == "OpenGVLab/InternVL2_5-78B"
    llm, vision = mc.servers(objects)["llm"], mc.servers(objects)["vision"]
    assert llm.args.tensor_parallel_size == mc.gpu_count(llm.container) == 4
    assert mc.gpu_count(vision.container) == 1
    assert mc.one(objects, "PersistentVolumeClaim", "internvl-models")["spec"]["resources"]["requests"][
        "storage"] == "400Gi"
    assert llm.container["startupProbe"]["failureThreshold"] * llm.container["startupProbe"]["periodSeconds"] >= 1800


def test_gpu_overlay_scales_each_pool_on_its_own_queue():
    objects = mc.render("gpu")
    metrics = {h["metadata"]["name"]: {m.get("pods", m.get("resource", {})).get("metric", {}).get("name") or
                                       m["resource"]["name"] for m in h["spec"]["metrics"]}
               for h in mc.find(objects, "HorizontalPodAutoscaler")}
    assert metrics == {"vision": {"internvl_vision_queue_tiles"},
                       "llm": {"internvl_llm_running_sequences", "internvl_llm_waiting_sequences"},
                       "gateway": {"cpu"}}
    assert mc.one(objects, "ServiceMonitor", "internvl")
    assert mc.one(objects, "ConfigMap", "prometheus-adapter-rules")


def test_cpu_demo_overlay_runs_anywhere():
    objects = mc.render("cpu-demo")
    assert "nvidia.com" not in str(objects)
    assert not mc.find(objects, "PersistentVolumeClaim")
    init_args = []
    for pool in POOLS:
        spec = pod_spec(objects, pool)
        init = next(c for c in spec["initContainers"] if c["name"] == "make-tiny")
        assert init["command"] == ["internvl-serve"] and init["args"][0] == "make-tiny"
        assert "emptyDir" in volume(spec, "models")
        init_args.append(init["args"])
    assert init_args[0] == init_args[1]


@pytest.mark.parametrize("name", ["vision", "llm", "gateway"])
def test_no_replica_count_fights_the_autoscaler(objects, name):
    assert "replicas" not in mc.one(objects, "Deployment", name)["spec"]
