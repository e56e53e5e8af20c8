"""The manifests against the code: flags, ports, probes, env names, metric names, drains, policies.

`test_manifests_agree_with_code` runs every check of `manifest_checks` on each rendered overlay. The mutation table
below shows that each kind of drift fails them: a copy of the rendered objects is broken in one place (a wrong
port, an unknown flag, a misspelt env name, a metric the code does not export, ...) and the checks must say so.
"""

import manifest_checks as mc
import pytest


def test_manifests_agree_with_code(objects):
    assert mc.drift_problems(objects) == []


def test_every_service_is_parsed_by_the_real_cli(objects):
    # Guards the checks against passing vacuously: each service's command line went through `internvl-serve`.
    servers = mc.servers(objects)
    assert set(servers) == set(mc.SERVER_COMMANDS)
    for inv in servers.values():
        assert inv.argv[0] == mc.entry_point() == "internvl-serve"
        assert inv.args.port and inv.args.metrics_port


# ------------------------------------------------------------------------------------------------- mutations


def container(objects, workload: str, name: str | None = None, init: bool = False) -> dict:
    w = next(o for o in mc.workloads(objects) if o["metadata"]["name"] == workload)
    spec = mc.pod_template(w)["spec"]
    found = spec.get("initContainers" if init else "containers") or []
    return next(c for c in found if name is None or c["name"] == name)


def replace_arg(objects, workload: str, old: str, new: str | None, init: bool = False) -> None:
    c = container(objects, workload, init=init)
    assert old in c["args"], c["args"]
    c["args"] = [a for a in (new if a == old else a for a in c["args"]) if a is not None]


def set_port(objects, workload: str, port_name: str, number: int) -> None:
    next(p for p in container(objects, workload)["ports"] if p["name"] == port_name)["containerPort"] = number


def rename_env(objects, workload: str, old: str, new: str) -> None:
    next(e for e in container(objects, workload)["env"] if e["name"] == old)["name"] = new


def add_env(objects, workload: str, name: str, value: str) -> None:
    container(objects, workload)["env"].append({"name": name, "value": value})


def configmap_key(objects, key: str, value: str) -> None:
    mc.one(objects, "ConfigMap", "internvl-config")["data"][key] = value


def probe(objects, workload: str, kind: str) -> dict:
    return container(objects, workload)[kind]


def hpa_metric(objects, hpa: str, name: str) -> None:
    mc.one(objects, "HorizontalPodAutoscaler", hpa)["spec"]["metrics"][0]["pods"]["metric"]["name"] = name


def adapter_rules(objects, old: str, new: str) -> None:
    cm = mc.one(objects, "ConfigMap", "prometheus-adapter-rules")
    cm["data"]["config.yaml"] = cm["data"]["config.yaml"].replace(old, new)


def alert_expr(objects, alert: str, old: str, new: str) -> None:
    rules = mc.one(objects, "PrometheusRule", "internvl")["spec"]["groups"][0]["rules"]
    rule = next(r for r in rules if r["alert"] == alert)
    assert old in rule["expr"], rule["expr"]
    rule["expr"] = rule["expr"].replace(old, new)


def redis_conf_line(objects, config_map: str, line: str) -> None:
    cm = mc.one(objects, "ConfigMap", config_map)
    assert f"{line}\n" in cm["data"]["redis.conf"]
    cm["data"]["redis.conf"] = cm["data"]["redis.conf"].replace(f"{line}\n", "")


def close_cluster_bus(objects) -> None:
    rule = mc.one(objects, "NetworkPolicy", "redis-cluster-ingress")["spec"]["ingress"][1]
    rule["ports"] = [p for p in rule["ports"] if p["port"] != "bus"]


def open_llm_to_vision(objects) -> None:
    policy = mc.one(objects, "NetworkPolicy", "llm-ingress")
    policy["spec"]["ingress"][0]["from"].append({"podSelector": {"matchLabels": {"app.kubernetes.io/name": "vision"}}})


def grace(objects, workload: str, seconds: int) -> None:
    w = next(o for o in mc.workloads(objects) if o["metadata"]["name"] == workload)
    mc.pod_template(w)["spec"]["terminationGracePeriodSeconds"] = seconds


def service_port(objects, service: str, port_name: str, **changes) -> None:
    next(p for p in mc.one(objects, "Service", service)["spec"]["ports"] if p["name"] == port_name).update(changes)


# The components/redis-cluster URL: its six nodes by their pod DNS names.
CLUSTER_URL = "redis+cluster://" + ",".join(f"redis-cluster-{i}.redis-cluster:6379" for i in range(6))

MUTATIONS = [
    # (overlay, what breaks, mutation, a phrase the problem report must contain)
    ("gpu", "vision containerPort differs from --port",
     lambda o: set_port(o, "vision", "grpc", 50059), "containerPort grpc=50059"),
    ("gpu", "llm --port differs from the probes and the Service",
     lambda o: replace_arg(o, "llm", "--port=50053", "--port=50054"), "probes port 50053"),
    ("gpu", "gateway --http-port differs from its containerPort",
     lambda o: replace_arg(o, "gateway", "--http-port=8000", "--http-port=8080"), "containerPort http=8000"),
    ("gpu", "metrics port not declared",
     lambda o: set_port(o, "vision", "metrics", 9091), "containerPort metrics=9091"),
    ("gpu", "a flag the vision service does not have",
     lambda o: replace_arg(o, "vision", "--max-batch-tiles=$(INTERNVL_MAX_BATCH_TILES)",
                           "--max-batch-size=$(INTERNVL_MAX_BATCH_TILES)"), "unrecognized arguments"),
    ("gpu", "a misspelt flag that argparse would take as an abbreviation",
     lambda o: replace_arg(o, "vision", "--max-batch-tiles=$(INTERNVL_MAX_BATCH_TILES)",
                           "--max-batch-tile=$(INTERNVL_MAX_BATCH_TILES)"), "--max-batch-tile is only a prefix"),
    ("gpu", "a flag of another service",
     lambda o: replace_arg(o, "llm", "--kv-cache-budget-mb=$(INTERNVL_KV_CACHE_BUDGET_MB)",
                           "--session-ttl-s=60"), "unrecognized arguments"),
    ("gpu", "a value the flag's type refuses",
     lambda o: configmap_key(o, "llm-max-batch-size", "thirty-two"), "invalid int value"),
    ("gpu", "a value the service's config refuses",
     lambda o: configmap_key(o, "cache-namespace", "a:b"), "refuses the flags"),
    ("gpu", "misspelt env name (the $(VAR) no longer resolves)",
     lambda o: rename_env(o, "gateway", "INTERNVL_REDIS_URL", "INTERNVL_REDIS_ULR"),
     "$(INTERNVL_REDIS_URL) is not defined"),
    ("gpu", "an env var nothing reads",
     lambda o: add_env(o, "llm", "INTERNVL_MAX_BATCH", "64"), "env INTERNVL_MAX_BATCH is neither"),
    ("gpu", "a ConfigMap key that does not exist",
     lambda o: mc.one(o, "ConfigMap", "internvl-config")["data"].pop("session-ttl-s"),
     "key session-ttl-s, which the rendered objects do not have"),
    ("gpu", "readiness on a service name the server does not register",
     lambda o: probe(o, "vision", "readinessProbe")["grpc"].update(service="internvl.vision.v1.Vision"),
     "expected 'internvl.vision.v1.VisionService'"),
    ("gpu", "liveness on the service name (would restart loading pods)",
     lambda o: probe(o, "llm", "livenessProbe")["grpc"].update(service="internvl.llm.v1.LLMService"),
     "livenessProbe asks for health service 'internvl.llm.v1.LLMService', expected ''"),
    ("gpu", "a TCP probe instead of gRPC",
     lambda o: container(o, "gateway").update(readinessProbe={"tcpSocket": {"port": 50051}}),
     "readinessProbe must be a native grpc probe"),
    ("gpu", "a startup probe shorter than the weight load",
     lambda o: probe(o, "llm", "startupProbe").update(failureThreshold=30), "less than a 600 s load"),
    ("gpu", "a grace period shorter than preStop + drain",
     lambda o: grace(o, "llm", 60), "terminationGracePeriodSeconds 60"),
    ("gpu", "a drain shorter than the longest stream",
     lambda o: replace_arg(o, "llm", "--drain-seconds=300", "--drain-seconds=60"), "shorter than the longest stream"),
    ("gpu", "gateway target on the wrong port",
     lambda o: replace_arg(o, "gateway", "--vision-target=dns:///vision-headless:50052",
                           "--vision-target=dns:///vision-headless:50053"), "has no port 50053"),
    ("gpu", "gateway target pointing at the other pool",
     lambda o: replace_arg(o, "gateway", "--llm-target=dns:///llm-headless:50053",
                           "--llm-target=dns:///vision-headless:50052"), "not the llm service"),
    ("gpu", "gateway target without dns:///",
     lambda o: replace_arg(o, "gateway", "--vision-target=dns:///vision-headless:50052",
                           "--vision-target=vision-headless:50052"), "is not dns:///SERVICE:PORT"),
    ("gpu", "a ClusterIP Service for a pool (kube-proxy would pin connections)",
     lambda o: mc.one(o, "Service", "llm-headless")["spec"].pop("clusterIP"), "must be headless"),
    ("gpu", "a Service targetPort no container declares",
     lambda o: service_port(o, "vision-headless", "grpc", targetPort="grcp"), "which no selected container declares"),
    ("gpu", "a Service selecting nothing",
     lambda o: mc.one(o, "Service", "redis")["spec"]["selector"].update({"app.kubernetes.io/name": "rediss"}),
     "Service/redis: its selector matches no pod template"),
    ("gpu", "a Redis URL on the wrong port",
     lambda o: configmap_key(o, "redis-url", "redis://redis:6380/0"), "does not reach a Redis StatefulSet"),
    ("gpu", "vision and gateway disagreeing on the cache namespace",
     lambda o: replace_arg(o, "gateway", "--namespace=$(INTERNVL_CACHE_NAMESPACE)", "--namespace=other"),
     "cache namespaces differ"),
    ("gpu", "an HPA on a metric no adapter rule provides",
     lambda o: hpa_metric(o, "vision", "internvl_vision_queue_depth"), "no prometheus-adapter rule provides"),
    ("gpu", "an adapter rule on a metric the code does not export",
     lambda o: adapter_rules(o, "internvl_llm_waiting_sequences", "internvl_llm_waiting_requests"),
     "no service exports"),
    ("gpu", "an HPA on another service's metric",
     lambda o: hpa_metric(o, "vision", "internvl_llm_running_sequences"), "is not a gauge exported by the vision"),
    ("gpu", "an HPA without scale-down stabilisation",
     lambda o: mc.one(o, "HorizontalPodAutoscaler", "llm")["spec"].pop("behavior"), "no scale-down stabilisation"),
    ("gpu", "a Deployment fighting its HPA over replicas",
     lambda o: mc.one(o, "Deployment", "vision")["spec"].update(replicas=2), "sets spec.replicas"),
    ("gpu", "the metrics port renamed in a Service",
     lambda o: service_port(o, "llm-headless", "metrics", name="prometheus"),
     "no ServiceMonitor endpoint reaches the llm"),
    ("gpu", "vision opened to the llm pool",
     open_llm_to_vision, "vision -> llm:grpc is allowed, expected denied"),
    ("gpu", "Redis opened to every pod",
     lambda o: mc.one(o, "NetworkPolicy", "redis-ingress")["spec"]["ingress"][0].pop("from"),
     "another pod of the namespace -> redis:redis is allowed"),
    ("gpu", "the gateway closed to clients",
     lambda o: mc.one(o, "NetworkPolicy", "gateway-ingress")["spec"]["ingress"].pop(0),
     "outside the cluster -> gateway:grpc is denied"),
    ("gpu", "an LLM routing policy the gateway does not have",
     lambda o: configmap_key(o, "llm-routing", "sticky"), "invalid choice: 'sticky'"),
    ("gpu", "a routing epsilon the gateway's config refuses",
     lambda o: configmap_key(o, "routing-epsilon", "-0.5"), "--routing-epsilon must be >= 0"),
    ("gpu", "a routing flag spelt as an abbreviation",
     lambda o: replace_arg(o, "gateway", "--llm-routing=$(INTERNVL_LLM_ROUTING)", "--llm-rout=$(INTERNVL_LLM_ROUTING)"),
     "--llm-rout is only a prefix"),
    ("gpu", "DNS re-resolved less often than the preStop sleep allows",
     lambda o: replace_arg(o, "gateway", "--resolve-interval-s=5", "--resolve-interval-s=30"),
     "exceed the llm preStop sleep"),
    ("gpu", "a pool Service publishing pods that are not ready",
     lambda o: mc.one(o, "Service", "llm-headless")["spec"].update(publishNotReadyAddresses=True),
     "publishes not-ready addresses"),
    ("gpu", "an alert on a metric the code does not export",
     lambda o: alert_expr(o, "InternVLPoolWithoutReadyReplica", "internvl_gateway_endpoints{",
                          "internvl_gateway_replicas{"),
     "reads internvl_gateway_replicas, which no service exports"),
    ("gpu", "an alert on a label value the code never sets",
     lambda o: alert_expr(o, "InternVLAffinityOftenOverloaded", 'reason="overload"', 'reason="overloaded"'),
     "reason='overloaded' never occurs"),
    ("gpu", "an alert on a label the metric does not have",
     lambda o: alert_expr(o, "InternVLPoolWithoutReadyReplica", 'state="ready"', 'status="ready"'),
     "has no label 'status'"),
    ("gpu", "an alert whose annotation names a label its aggregation drops",
     lambda o: alert_expr(o, "InternVLPoolWithoutReadyReplica", "by (namespace, pool)", "by (namespace)"),
     "names $labels.pool, which its aggregation drops"),
    ("gpu", "a ServiceMonitor that renames the gateway's own endpoint label",
     lambda o: mc.one(o, "ServiceMonitor", "internvl")["spec"]["endpoints"][0].pop("honorLabels"),
     "stored as exported_endpoint"),
    ("gpu-redis-cluster", "a cluster URL leaving a node out",
     lambda o: configmap_key(o, "redis-url", CLUSTER_URL.rsplit(",", 1)[0]), "leaves out redis-cluster-5"),
    ("gpu-redis-cluster", "one service on another Redis than the others",
     lambda o: replace_arg(o, "vision", "--redis-url=$(INTERNVL_REDIS_URL)", "--redis-url=" + CLUSTER_URL.replace(
         "redis-cluster-0.", "redis-cluster-1.", 1)), "use different Redis URLs"),
    ("gpu-redis-cluster", "too few cluster pods for three masters with a replica each",
     lambda o: mc.one(o, "StatefulSet", "redis-cluster")["spec"].update(replicas=4), "do not make at least 3 masters"),
    ("gpu-redis-cluster", "cluster nodes without cluster-enabled",
     lambda o: redis_conf_line(o, "redis-cluster-config", "cluster-enabled yes"), "lacks cluster-enabled yes"),
    ("gpu-redis-cluster", "cluster identity on a volume that dies with the pod",
     lambda o: mc.one(o, "StatefulSet", "redis-cluster")["spec"].pop("volumeClaimTemplates"),
     "not on a volumeClaimTemplate"),
    ("gpu-redis-cluster", "cluster node names that resolve only once the cluster is formed",
     lambda o: mc.one(o, "Service", "redis-cluster")["spec"].pop("publishNotReadyAddresses"),
     "must publish not-ready addresses"),
    ("gpu-redis-cluster", "nothing forms the cluster",
     lambda o: o.remove(mc.one(o, "Job", "redis-cluster-create")), "no Job runs `redis-cli --cluster create"),
    ("gpu-redis-cluster", "the cluster bus closed between the nodes",
     close_cluster_bus, "redis-cluster -> redis-cluster:bus is denied"),
    ("gpu-redis-cluster", "a cluster node open to any pod",
     lambda o: mc.one(o, "NetworkPolicy", "redis-cluster-ingress")["spec"]["ingress"][0].pop("from"),
     "another pod of the namespace -> redis-cluster:redis is allowed"),
    ("gpu", "the vLLM engine on the image without vLLM",
     lambda o: container(o, "llm").update(image="registry.example.com/internvl-serve:0.1.0-cuda"),
     "vLLM is only in the Dockerfile's `vllm` target"),
    ("gpu-large", "tensor parallelism over more GPUs than the pod gets",
     lambda o: replace_arg(o, "llm", "--tensor-parallel-size=4", "--tensor-parallel-size=8"),
     "--tensor-parallel-size 8, but the container gets 4 GPUs"),
    ("gpu-large", "a sharded model without a memory-backed /dev/shm",
     lambda o: container(o, "llm")["volumeMounts"].remove(
         next(m for m in container(o, "llm")["volumeMounts"] if m["mountPath"] == "/dev/shm")),
     "without a memory-backed /dev/shm"),
    ("cpu-demo", "Redis maxmemory above its memory limit",
     lambda o: configmap_key(o, "redis-maxmemory", "1gb"), "must be at most 80% of the memory limit"),
    ("cpu-demo", "a model path outside the mounted volume",
     lambda o: configmap_key(o, "model", "/opt/tiny"), "is not under any of its volume mounts"),
    ("cpu-demo", "make-tiny seeds that differ between vision and llm",
     lambda o: replace_arg(o, "llm", "--seed=0", "--seed=1", init=True), "make-tiny runs differ"),
    ("cpu-demo", "make-tiny writing somewhere else than --model",
     lambda o: replace_arg(o, "vision", "--out=$(INTERNVL_MODEL)", "--out=/models/other", init=True),
     "make-tiny writes /models/other"),
]


@pytest.mark.parametrize("overlay_name, what, mutate, phrase", MUTATIONS, ids=[m[1] for m in MUTATIONS])
def test_a_drifted_copy_fails(overlay_name, what, mutate, phrase):
    objects = mc.render(overlay_name)
    assert mc.drift_problems(objects) == []
    mutate(objects)
    problems = mc.drift_problems(objects)
    assert any(phrase in p for p in problems), f"{what}: expected a problem mentioning {phrase!r}, got {problems}"
