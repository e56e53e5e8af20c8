"""Cross-checks of the rendered manifests against the services' code.

Each `check_*` function takes rendered objects and returns a list of problems (empty: consistent), so the tests can
run it on the real output and on deliberately broken copies (tests/deploy/test_drift.py). The objects and the facts
from the code come from `manifest_objects`, re-exported here so that tests need one import.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from manifest_objects import (  # noqa: F401 - K8S, OVERLAYS, REPO, render_module and a few helpers are re-exported
    K8S,
    OVERLAYS,
    REPO,
    SERVER_COMMANDS,
    VAR_REF,
    Invocation,
    container_port,
    containers,
    entry_point,
    env_names_read,
    expand,
    exported_metrics,
    find,
    health_service_name,
    invocations,
    matches,
    one,
    parse_cli,
    parsed_invocations,
    pod_labels,
    pod_template,
    render,
    render_module,
    selected_workloads,
    servers,
    workloads,
)

# The requirement: a startup probe long enough for a 10-minute weight load.
WEIGHT_LOAD_S = 600
# Seconds a pod needs after its drain to free the model and exit (the grace period must cover it too).
EXIT_MARGIN_S = 5


# ---------------------------------------------------------------------------------------------------- checks


def prestop_sleep_s(container: dict) -> float:
    pre_stop = (container.get("lifecycle") or {}).get("preStop") or {}
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = (pre_stop.get("exec") or {}).get("command") or []
    return float(command[1]) if len(command) == 2 and command[0] == "sleep" else 0.0


def check_invocations(objects: list[dict]) -> list[str]:
    """Flags parse, env is used and defined, ConfigMap keys exist, model paths are mounted, make-tiny agrees."""
    problems = []
    invs = parsed_invocations(objects)
    mains = {inv.subcommand: inv for inv in invs if not inv.init and inv.args is not None}
    for inv in invs:
        problems += inv.problems
        referenced = {m.group(1) for item in (inv.container.get("command") or []) + (inv.container.get("args") or [])
                      for m in VAR_REF.finditer(str(item))}
        read = env_names_read(inv.subcommand) if inv.subcommand in SERVER_COMMANDS else frozenset()
        for name in inv.env:
            if name not in referenced and name not in read:
                problems.append(f"{inv.where}: env {name} is neither expanded into its command line nor read by "
                                f"the code")
        if inv.args is None:
            continue
        mounts = {m["mountPath"].rstrip("/"): m for m in inv.container.get("volumeMounts") or []}
        path = getattr(inv.args, "model", None) or getattr(inv.args, "out", None)
        if path is not None and not any(path == p or path.startswith(p + "/") for p in mounts):
            problems.append(f"{inv.where}: model path {path} is not under any of its volume mounts")
        if inv.subcommand == "make-tiny":
            main = next((m for m in mains.values() if m.workload is inv.workload), None)
            if main is None or getattr(main.args, "model", None) != inv.args.out:
                problems.append(f"{inv.where}: make-tiny writes {inv.args.out}, but the service loads "
                                f"{getattr(main.args, 'model', None) if main else None}")
    tiny = {tuple(i.argv) for i in invs if i.subcommand == "make-tiny"}
    if len(tiny) > 1:
        problems.append(f"make-tiny runs differ between pods ({sorted(tiny)}): vision and llm would load different "
                        "weights and refuse each other's model fingerprint")
    return problems


def check_ports_and_probes(objects: list[dict]) -> list[str]:
    """Container ports are the ports the process binds; native gRPC probes on them; startup long enough; the
    grace period covers preStop plus the drain."""
    problems = []
    for command, inv in servers(objects).items():
        where, c, a = inv.where, inv.container, inv.args
        bound = {"grpc": a.port, "metrics": a.metrics_port, "http": getattr(a, "http_port", None)}
        declared = {p.get("name"): p["containerPort"] for p in c.get("ports") or []}
        for name, number in declared.items():
            if name not in bound or bound[name] != number:
                problems.append(f"{where}: containerPort {name}={number}, but the process binds "
                                f"{ {k: v for k, v in bound.items() if v is not None} }")
        for name in ("grpc", "metrics"):
            if name not in declared:
                problems.append(f"{where}: no containerPort named {name}")
        ready_name = health_service_name(command)
        for probe_kind, want in (("startupProbe", ready_name), ("readinessProbe", ready_name),
                                 ("livenessProbe", "")):
            probe = c.get(probe_kind)
            if not probe or "grpc" not in probe:
                problems.append(f"{where}: {probe_kind} must be a native grpc probe")
                continue
            if probe["grpc"]["port"] != a.port:
                problems.append(f"{where}: {probe_kind} probes port {probe['grpc']['port']}, the server binds "
                                f"{a.port}")
            if probe["grpc"].get("service", "") != want:
                problems.append(f"{where}: {probe_kind} asks for health service {probe['grpc'].get('service')!r}, "
                                f"expected {want!r}")
        startup = c.get("startupProbe") or {}
        budget = startup.get("initialDelaySeconds", 0) + startup.get("periodSeconds", 10) * \
            startup.get("failureThreshold", 3)
        if budget < WEIGHT_LOAD_S:
            problems.append(f"{where}: the startup probe allows {budget} s, less than a {WEIGHT_LOAD_S} s load")
        grace = pod_template(inv.workload)["spec"].get("terminationGracePeriodSeconds", 30)
        needed = prestop_sleep_s(c) + a.drain_seconds + EXIT_MARGIN_S
        if grace < needed:
            problems.append(f"{where}: terminationGracePeriodSeconds {grace} < preStop {prestop_sleep_s(c)} + "
                            f"--drain-seconds {a.drain_seconds} + {EXIT_MARGIN_S}")
    return problems


def service_backends(objects: list[dict], service: dict, port: int) -> list[tuple[dict, dict, int | None]]:
    """For the Service port numbered `port`: (workload, main container, the container port it maps to or None) for
    each container of the selected pods."""
    spec = service["spec"]
    entry = next((p for p in spec.get("ports") or [] if p["port"] == port), None)
    if entry is None:
        return []
    target = entry.get("targetPort", entry["port"])
    result = []
    for workload in selected_workloads(objects, spec.get("selector")):
        for c in containers(workload, init=False):
            result.append((workload, c, container_port(c, target)))
    return result


def check_services(objects: list[dict]) -> list[str]:
    """Every Service selects pods, and each of its ports reaches a declared container port."""
    problems = []
    for service in find(objects, "Service"):
        name = service["metadata"]["name"]
        if not selected_workloads(objects, service["spec"].get("selector")):
            problems.append(f"Service/{name}: its selector matches no pod template")
        for entry in service["spec"].get("ports") or []:
            backends = service_backends(objects, service, entry["port"])
            if not any(number is not None for _, _, number in backends):
                problems.append(f"Service/{name}: port {entry.get('name')} targets {entry.get('targetPort')}, "
                                "which no selected container declares")
    return problems


DNS_TARGET = re.compile(r"^dns:///(?P<host>[a-z0-9-]+)(?:\.[a-z0-9.-]+)?:(?P<port>\d+)$")


def check_gateway_targets(objects: list[dict]) -> list[str]:
    """The gateway's --vision-target/--llm-target: dns:/// on a headless Service whose pods run that service on
    that port, and a gateway that balances over the addresses with round_robin."""
    problems = []
    srv = servers(objects)
    gateway = srv.get("gateway")
    if gateway is None:
        return ["no gateway container"]
    for flag, command in (("vision_target", "vision"), ("llm_target", "llm")):
        target = getattr(gateway.args, flag)
        m = DNS_TARGET.match(target)
        if not m:
            problems.append(f"gateway --{flag.replace('_', '-')} {target!r} is not dns:///SERVICE:PORT")
            continue
        services = find(objects, "Service", m["host"])
        if not services:
            problems.append(f"gateway --{flag.replace('_', '-')}: no Service {m['host']}")
            continue
        spec = services[0]["spec"]
        if spec.get("clusterIP") != "None":
            problems.append(f"Service/{m['host']} must be headless (clusterIP: None) for client-side round_robin")
        backends = service_backends(objects, services[0], int(m["port"]))
        if not backends:
            problems.append(f"gateway --{flag.replace('_', '-')}: Service/{m['host']} has no port {m['port']}")
        for workload, c, number in backends:
            inv = srv.get(command)
            if inv is None or inv.container is not c:
                problems.append(f"Service/{m['host']} selects {workload['metadata']['name']}, not the {command} "
                                "service")
            elif number != inv.args.port:
                problems.append(f"gateway --{flag.replace('_', '-')} reaches container port {number}, the {command} "
                                f"server binds {inv.args.port}")
    sources = "".join(p.read_text() for p in (REPO / "gateway").glob("*.py"))
    if '"round_robin"' not in sources:
        problems.append("the gateway code no longer sets the round_robin load-balancing policy")
    return problems


REDIS_URL = re.compile(r"^redis://(?P<host>[a-z0-9-]+)(?:\.[a-z0-9.-]+)?:(?P<port>\d+)(?:/\d+)?$")


def check_shared_settings(objects: list[dict]) -> list[str]:
    """Redis URL reaches Redis; cache key namespaces agree; drains outlast the longest stream."""
    problems = []
    srv = servers(objects)
    for command, inv in srv.items():
        url = inv.args.redis_url
        m = REDIS_URL.match(url or "")
        if not m:
            problems.append(f"{inv.where}: --redis-url {url!r} is not redis://SERVICE:PORT (without it the "
                            "service keeps its cache in-process, invisible to the other pool)")
            continue
        services = find(objects, "Service", m["host"])
        backends = service_backends(objects, services[0], int(m["port"])) if services else []
        if not any(w["kind"] == "StatefulSet" and w["metadata"]["name"] == "redis" and n for w, _, n in backends):
            problems.append(f"{inv.where}: --redis-url {url} does not reach the Redis StatefulSet")
    if "vision" in srv and "gateway" in srv and srv["vision"].args.namespace != srv["gateway"].args.namespace:
        problems.append(f"cache namespaces differ: vision {srv['vision'].args.namespace!r}, gateway "
                        f"{srv['gateway'].args.namespace!r}: every gateway lookup would miss")
    if "gateway" in srv:
        longest = srv["gateway"].args.default_timeout_s
        for command in ("llm", "gateway"):
            if command in srv and srv[command].args.drain_seconds < longest:
                problems.append(f"{command} --drain-seconds {srv[command].args.drain_seconds} is shorter than the "
                                f"longest stream (gateway --default-timeout-s {longest})")
    return problems


def adapter_rules(objects: list[dict]) -> dict[str, str]:
    """{custom metric name: series name} from the prometheus-adapter rules ConfigMap."""
    import yaml

    rules = {}
    for cm in find(objects, "ConfigMap", "prometheus-adapter-rules"):
        for rule in yaml.safe_load(cm["data"]["config.yaml"])["rules"]:
            series = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"]).group(1)
            rules[(rule.get("name") or {}).get("as") or series] = series
    return rules


def check_autoscaling(objects: list[dict]) -> list[str]:
    """HPAs target real Deployments; their Pods metrics come from an adapter rule over a gauge the target service
    exports; CPU targets have CPU requests; scale-down is stabilised."""
    problems = []
    rules = adapter_rules(objects)
    for series in rules.values():
        if not any(series in exported_metrics(c) for c in SERVER_COMMANDS):
            problems.append(f"prometheus-adapter rule reads {series}, which no service exports")
    srv = servers(objects)
    for hpa in find(objects, "HorizontalPodAutoscaler"):
        name, spec = hpa["metadata"]["name"], hpa["spec"]
        ref = spec["scaleTargetRef"]
        target = next((inv for inv in srv.values() if inv.workload["kind"] == ref["kind"]
                       and inv.workload["metadata"]["name"] == ref["name"]), None)
        if target is None:
            problems.append(f"HPA/{name}: scale target {ref['kind']}/{ref['name']} runs none of the services")
            continue
        if "replicas" in target.workload["spec"]:
            problems.append(f"HPA/{name}: {ref['name']} sets spec.replicas, which every apply would reset")
        if (spec.get("behavior") or {}).get("scaleDown", {}).get("stabilizationWindowSeconds", 0) < 300:
            problems.append(f"HPA/{name}: no scale-down stabilisation of at least 300 s")
        for metric in spec.get("metrics") or []:
            if metric["type"] == "Pods":
                metric_name = metric["pods"]["metric"]["name"]
                series = rules.get(metric_name)
                exported = exported_metrics(target.subcommand)
                if series is None:
                    problems.append(f"HPA/{name}: no prometheus-adapter rule provides {metric_name}")
                elif exported.get(series) != "gauge":
                    problems.append(f"HPA/{name}: {series} is not a gauge exported by the {target.subcommand} "
                                    f"service")
            elif metric["type"] == "Resource":
                resource = metric["resource"]["name"]
                if not all(resource in (c.get("resources") or {}).get("requests", {})
                           for c in containers(target.workload, init=False)):
                    problems.append(f"HPA/{name}: scales on {resource} but {ref['name']} requests none")
            else:
                problems.append(f"HPA/{name}: unexpected metric type {metric['type']}")
    return problems


def check_monitoring(objects: list[dict]) -> list[str]:
    """The ServiceMonitors reach every service's metrics port."""
    problems = []
    monitors = find(objects, "ServiceMonitor")
    if not monitors:
        return problems
    scraped = set()
    mains = servers(objects)
    for monitor in monitors:
        ports = {e.get("port") for e in monitor["spec"]["endpoints"]}
        for service in find(objects, "Service"):
            if not matches(monitor["spec"]["selector"], service["metadata"].get("labels") or {}):
                continue
            for entry in service["spec"]["ports"]:
                if entry.get("name") in ports:
                    for workload, c, number in service_backends(objects, service, entry["port"]):
                        inv = next((i for i in mains.values() if i.container is c), None)
                        if inv is not None and number == inv.args.metrics_port:
                            scraped.add(inv.subcommand)
    for command in mains:
        if command not in scraped:
            problems.append(f"no ServiceMonitor endpoint reaches the {command} service's --metrics-port")
    return problems


def check_disruption_budgets(objects: list[dict]) -> list[str]:
    problems = []
    for pdb in find(objects, "PodDisruptionBudget"):
        if not selected_workloads(objects, pdb["spec"]["selector"]):
            problems.append(f"PDB/{pdb['metadata']['name']}: selects no pods")
    return problems


MEMORY_UNITS = {"": 1, "k": 1000, "M": 1000**2, "G": 1000**3, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}
REDIS_UNITS = {"b": 1, "k": 1000, "kb": 1024, "m": 1000**2, "mb": 1024**2, "g": 1000**3, "gb": 1024**3}


def check_redis(objects: list[dict]) -> list[str]:
    """maxmemory below the container limit, allkeys-lru, no persistence."""
    problems = []
    for inv in invocations(objects):
        if inv.container["name"] != "redis":
            continue
        problems += inv.problems
        argv = inv.argv
        if "--maxmemory" not in argv:
            problems.append(f"{inv.where}: no --maxmemory")
            continue
        m = re.fullmatch(r"(\d+)([a-z]*)", argv[argv.index("--maxmemory") + 1].lower())
        maxmemory = int(m.group(1)) * REDIS_UNITS[m.group(2) or "b"] if m else None
        limit_text = str(((inv.container.get("resources") or {}).get("limits") or {}).get("memory", ""))
        lm = re.fullmatch(r"(\d+)([A-Za-z]*)", limit_text)
        limit = int(lm.group(1)) * MEMORY_UNITS[lm.group(2)] if lm else None
        if maxmemory is None or limit is None or maxmemory > 0.8 * limit:
            problems.append(f"{inv.where}: maxmemory {maxmemory} must be at most 80% of the memory limit {limit}")
        conf = "".join(cm["data"].get("redis.conf", "") for cm in find(objects, "ConfigMap", "redis-config"))
        if not re.search(r"^maxmemory-policy allkeys-lru$", conf, re.MULTILINE):
            problems.append("redis.conf lacks maxmemory-policy allkeys-lru")
        if inv.workload["kind"] != "StatefulSet":
            problems.append(f"{inv.where}: Redis should be a StatefulSet")
    return problems


# ------------------------------------------------------------------------------------------ network policies


@dataclass(frozen=True)
class Peer:
    """A traffic source: pod labels (None: not a pod, e.g. a client outside the cluster) in a namespace."""

    labels: dict | None
    namespace_labels: dict


def ingress_allowed(objects: list[dict], source: Peer, dest: dict, port_name: str) -> bool:
    """Whether the rendered NetworkPolicies admit `source` to the pods of workload `dest` on the named port."""
    namespace = dest["metadata"].get("namespace")
    dest_labels = pod_labels(dest)
    port = next((container_port(c, port_name) for c in containers(dest, init=False)
                 if container_port(c, port_name) is not None), None)
    policies = [p for p in find(objects, "NetworkPolicy") if p["metadata"].get("namespace") == namespace
                and "Ingress" in p["spec"].get("policyTypes", ["Ingress"]) and matches(p["spec"]["podSelector"] or
                                                                                       {"matchLabels": {}}, dest_labels)]
    if not policies:
        return True
    same_namespace = source.namespace_labels.get("kubernetes.io/metadata.name") == namespace
    for policy in policies:
        for rule in policy["spec"].get("ingress") or []:
            peers = rule.get("from")
            peer_ok = not peers or any(_peer_matches(peer, source, same_namespace) for peer in peers)
            ports = rule.get("ports")
            port_ok = not ports or any(
                (p.get("port") is None) or p["port"] == port or
                any(container_port(c, p["port"]) == port for c in containers(dest, init=False)) for p in ports)
            if peer_ok and port_ok:
                return True
    return False


def _peer_matches(peer: dict, source: Peer, same_namespace: bool) -> bool:
    if "ipBlock" in peer:
        return source.labels is None
    if source.labels is None:
        return False
    ns_ok = matches(peer["namespaceSelector"] or {"matchLabels": {}}, source.namespace_labels) \
        if "namespaceSelector" in peer else same_namespace
    pod_ok = matches(peer["podSelector"] or {"matchLabels": {}}, source.labels) if "podSelector" in peer else True
    return ns_ok and pod_ok


def check_network_policies(objects: list[dict]) -> list[str]:
    """Only the gateway reaches vision and llm; only the three services reach Redis; only the gateway is exposed;
    Prometheus reaches the metrics ports."""
    by_name = {w["metadata"]["name"]: w for w in workloads(objects)}
    if not {"vision", "llm", "gateway", "redis"} <= set(by_name):
        return ["missing one of the vision, llm, gateway, redis workloads"]
    namespace = by_name["vision"]["metadata"].get("namespace")
    here = {"kubernetes.io/metadata.name": namespace}
    sources = {name: Peer(pod_labels(by_name[name]), here) for name in ("vision", "llm", "gateway", "redis")}
    sources["another pod of the namespace"] = Peer({"app.kubernetes.io/name": "debug"}, here)
    sources["a pod of another namespace"] = Peer({"app.kubernetes.io/name": "gateway"},
                                                 {"kubernetes.io/metadata.name": "default"})
    sources["prometheus"] = Peer({"app.kubernetes.io/name": "prometheus"},
                                 {"kubernetes.io/metadata.name": "monitoring"})
    sources["outside the cluster"] = Peer(None, {})
    expected = {("vision", "grpc"): {"gateway"}, ("llm", "grpc"): {"gateway"},
                ("redis", "redis"): {"vision", "llm", "gateway"}, ("gateway", "grpc"): set(sources),
                ("gateway", "http"): set(sources)}
    for dest in ("vision", "llm", "gateway"):
        expected[(dest, "metrics")] = {"prometheus"}
    problems = []
    for (dest, port), allowed in expected.items():
        for source_name, source in sources.items():
            got = ingress_allowed(objects, source, by_name[dest], port)
            if got != (source_name in allowed):
                problems.append(f"NetworkPolicy: {source_name} -> {dest}:{port} is "
                                f"{'allowed' if got else 'denied'}, expected {'allowed' if not got else 'denied'}")
    return problems


ALL_CHECKS: list[Callable[[list[dict]], list[str]]] = [
    check_invocations, check_ports_and_probes, check_services, check_gateway_targets, check_shared_settings,
    check_autoscaling, check_monitoring, check_disruption_budgets, check_redis, check_network_policies,
]


def drift_problems(objects: list[dict]) -> list[str]:
    return [problem for check in ALL_CHECKS for problem in check(objects)]
