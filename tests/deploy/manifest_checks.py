"""Cross-checks of the rendered manifests against the services' code.

Each `check_*` function takes rendered objects and returns a list of problems (empty: consistent), so the tests can
run it on the real output and on deliberately broken copies (tests/deploy/test_drift.py). The objects and the facts
from the code come from `manifest_objects`, re-exported here so that tests need one import.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from manifest_objects import (  # noqa: F401 - K8S, OVERLAYS, REPO, the renderers and a few helpers are re-exported
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
    exported_series_labels,
    find,
    gateway_label_values,
    health_service_name,
    invocations,
    matches,
    object_id,
    one,
    parse_cli,
    parsed_invocations,
    pod_labels,
    pod_template,
    render,
    render_directory,
    selected_workloads,
    servers,
    workloads,
)

# The requirement: a startup probe long enough for a 10-minute weight load.
WEIGHT_LOAD_S = 600
# Seconds a pod needs after its drain to free the model and exit (the grace period must cover it too).
EXIT_MARGIN_S = 5
# The TTL of cluster DNS records (CoreDNS's kubernetes plugin default): how stale a resolver's answer may be.
DNS_TTL_S = 5
# `$NAME` / `${NAME...}` in a shell script (`sh -c`): the container's environment read by the shell at run time.
SHELL_REF = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")
# The image deploy/docker/Dockerfile's `vllm` target builds, by the name the overlays give it: the only one with vLLM.
VLLM_IMAGE = "internvl-serve-vllm"


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
        command_line = [str(item) for item in (inv.container.get("command") or []) + (inv.container.get("args") or [])]
        referenced = {m.group(1) for item in command_line for m in VAR_REF.finditer(item)}
        if command_line[:1] in (["sh"], ["bash"]) and "-c" in command_line:
            referenced |= {m.group(1) for item in command_line for m in SHELL_REF.finditer(item)}
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
    """The gateway's --vision-target/--llm-target: dns:/// on a headless Service listing only ready pods, whose pods
    run that service on that port."""
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
            problems.append(f"Service/{m['host']} must be headless (clusterIP: None): the gateway routes each call to "
                            "a replica itself and needs every pod's address")
        if spec.get("publishNotReadyAddresses"):
            problems.append(f"Service/{m['host']} publishes not-ready addresses: pods still loading or draining would "
                            "join every gateway's pool and count as not_ready there")
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
    return problems


def check_routing(objects: list[dict]) -> list[str]:
    """A pod leaving a pool leaves every gateway's view (next DNS lookup of a record up to a TTL old) before its
    preStop sleep ends and it stops accepting calls."""
    problems = []
    srv = servers(objects)
    gateway = srv.get("gateway")
    if gateway is None:
        return ["no gateway container"]
    stale_s = gateway.args.resolve_interval_s + DNS_TTL_S
    for command in ("vision", "llm"):
        inv = srv.get(command)
        if inv is not None and prestop_sleep_s(inv.container) < stale_s:
            problems.append(f"gateway --resolve-interval-s {gateway.args.resolve_interval_s:g} + the {DNS_TTL_S} s DNS "
                            f"TTL exceed the {command} preStop sleep of {prestop_sleep_s(inv.container):g} s: "
                            "gateways could still send new calls to a pod that has stopped accepting them")
    return problems


REDIS_URL = re.compile(r"^redis://(?P<host>[a-z0-9-]+)(?:\.[a-z0-9.-]+)?:(?P<port>\d+)(?:/\d+)?$")
# A StatefulSet pod's DNS name under its governing headless Service: POD.SERVICE[.NAMESPACE.svc...].
POD_HOST = re.compile(r"^(?P<pod>[a-z0-9-]+)\.(?P<service>[a-z0-9-]+)(?:\.[a-z0-9.-]+)?$")


def is_redis_server(workload: dict) -> bool:
    return any((c.get("command") or [""])[0] == "redis-server" for c in containers(workload, init=False))


def redis_servers(objects: list[dict], url: str) -> tuple[list[dict], list[str]]:
    """The Redis StatefulSets a `redis://` or `redis+cluster://` URL reaches, and what is wrong with it.

    `redis://SERVICE:PORT`: a Service whose port leads to a redis-server StatefulSet. `redis+cluster://` (parsed by
    the services' own parser): every node a pod name under the headless Service governing a redis-server
    StatefulSet, on its container port, and every pod of that StatefulSet listed (the cluster is formed from the URL).
    """
    from services.runtime.redis_cluster import is_cluster_url, parse_cluster_url

    if not is_cluster_url(url):
        m = REDIS_URL.match(url)
        if not m:
            return [], [(f"--redis-url {url!r} is neither redis://SERVICE:PORT nor "
                         "redis+cluster://POD.SERVICE:PORT,... (without one the service keeps its cache in-process, "
                         "invisible to the other pool)")]
        services = find(objects, "Service", m["host"])
        backends = service_backends(objects, services[0], int(m["port"])) if services else []
        reached = [w for w, _, n in backends if w["kind"] == "StatefulSet" and is_redis_server(w) and n]
        return reached, [] if reached else [f"--redis-url {url} does not reach a Redis StatefulSet"]
    try:
        nodes = parse_cluster_url(url).nodes
    except ValueError as exc:
        return [], [f"--redis-url: {exc}"]
    reached, problems, listed = [], [], set()
    for host, port in nodes:
        m = POD_HOST.match(host)
        sets = [w for w in find(objects, "StatefulSet") if m and w["spec"].get("serviceName") == m["service"]]
        pods = {f"{w['metadata']['name']}-{i}": w for w in sets for i in range(w["spec"].get("replicas", 1))}
        workload = pods.get(m["pod"]) if m else None
        service = find(objects, "Service", m["service"]) if m else []
        if workload is None or not service or not is_redis_server(workload):
            problems.append(f"--redis-url node {host}:{port} is not a pod of a Redis StatefulSet under its headless "
                            "Service")
            continue
        if service[0]["spec"].get("clusterIP") != "None":
            problems.append(f"Service/{m['service']} must be headless to give the Redis nodes their own DNS names")
        # A pod's DNS name is its own address: the client connects to the container port itself.
        if not any(container_port(c, port) for c in containers(workload, init=False)):
            problems.append(f"--redis-url node {host}:{port}: no container of {m['pod']} declares port {port}")
        for c in containers(workload, init=False):
            if (c.get("command") or [""])[0] == "redis-server" and \
                    conf_value(redis_conf(workload, c, objects), "cluster-enabled") != "yes":
                problems.append(f"--redis-url names {host} as a cluster node, but its redis.conf lacks "
                                "cluster-enabled yes")
        listed.add(m["pod"])
        if workload not in reached:
            reached.append(workload)
    for workload in reached:
        name = workload["metadata"]["name"]
        missing = [f"{name}-{i}" for i in range(workload["spec"].get("replicas", 1)) if f"{name}-{i}" not in listed]
        if missing:
            problems.append(f"--redis-url leaves out {', '.join(missing)} of StatefulSet/{name}: the cluster is formed "
                            "from the URL's nodes, so they would stay outside it")
    return reached, problems


def check_shared_settings(objects: list[dict]) -> list[str]:
    """Redis URL reaches Redis and is the same for every service; cache key namespaces agree; drains outlast the
    longest stream."""
    problems = []
    srv = servers(objects)
    for command, inv in srv.items():
        problems += [f"{inv.where}: {p}" for p in redis_servers(objects, inv.args.redis_url or "")[1]]
    urls = {inv.args.redis_url for inv in srv.values()}
    if len(urls) > 1:
        problems.append(f"the services use different Redis URLs {sorted(map(str, urls))}: the LLM would not find what "
                        "vision wrote, nor one gateway another's sessions")
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


# Labels Prometheus Operator attaches to every series it scrapes through a ServiceMonitor.
TARGET_LABELS = frozenset({"namespace", "service", "pod", "container", "endpoint", "job", "instance"})


def check_monitoring(objects: list[dict]) -> list[str]:
    """The ServiceMonitors reach every service's metrics port, and keep the services' own labels where they share a
    name with a target label."""
    problems = []
    monitors = find(objects, "ServiceMonitor")
    if not monitors:
        return problems
    scraped: dict[str, bool] = {}  # service -> whether its endpoint honours the scraped labels
    mains = servers(objects)
    for monitor in monitors:
        endpoints = {e.get("port"): e for e in monitor["spec"]["endpoints"]}
        for service in find(objects, "Service"):
            if not matches(monitor["spec"]["selector"], service["metadata"].get("labels") or {}):
                continue
            for entry in service["spec"]["ports"]:
                if entry.get("name") in endpoints:
                    for workload, c, number in service_backends(objects, service, entry["port"]):
                        inv = next((i for i in mains.values() if i.container is c), None)
                        if inv is not None and number == inv.args.metrics_port:
                            scraped[inv.subcommand] = bool(endpoints[entry["name"]].get("honorLabels"))
    for command in mains:
        if command not in scraped:
            problems.append(f"no ServiceMonitor endpoint reaches the {command} service's --metrics-port")
        elif not scraped[command]:
            for series, labels in sorted(exported_series_labels(command).items()):
                for label in sorted(labels & TARGET_LABELS):
                    problems.append(f"{series} has a label {label!r}, which Prometheus Operator also sets on every "
                                    f"target: without honorLabels: true it is stored as exported_{label}")
    return problems


PROMQL_SELECTOR = re.compile(r"\b(internvl_[a-zA-Z0-9_:]+)\s*(\{[^}]*\})?")
PROMQL_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
PROMQL_GROUPING = re.compile(r"\bby\s*\(([^)]*)\)")
TEMPLATE_LABEL = re.compile(r"\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)")


def check_alert_rules(objects: list[dict]) -> list[str]:
    """Every PrometheusRule expression reads series the services export, with label names they have and label
    values the code gives them; the labels its annotations name survive the expression's aggregations."""
    problems = []
    series: dict[str, frozenset[str]] = {}
    for command in SERVER_COMMANDS:
        series.update(exported_series_labels(command))
    values = gateway_label_values()
    for rules in find(objects, "PrometheusRule"):
        for group in rules["spec"]["groups"]:
            for rule in group["rules"]:
                where = f"PrometheusRule/{rules['metadata']['name']} {rule.get('alert') or rule.get('record')}"
                expr = str(rule["expr"])
                used = []
                for m in PROMQL_SELECTOR.finditer(expr):
                    metric = m.group(1)
                    if metric not in series:
                        problems.append(f"{where}: reads {metric}, which no service exports")
                        continue
                    used.append(metric)
                    for label, op, value in PROMQL_MATCHER.findall(m.group(2) or ""):
                        if label not in series[metric]:
                            problems.append(f"{where}: {metric} has no label {label!r}")
                        elif op in ("=", "!=") and metric.startswith("internvl_gateway_") and label in values \
                                and value not in values[label]:
                            problems.append(f"{where}: {label}={value!r} never occurs: the code's {label} values "
                                            f"are {sorted(values[label])}")
                groupings = [{lbl.strip() for lbl in m.group(1).split(",") if lbl.strip()}
                             for m in PROMQL_GROUPING.finditer(expr)]
                for label in sorted(set().union(*groupings)):
                    if label not in TARGET_LABELS and not all(label in series[metric] for metric in used):
                        problems.append(f"{where}: groups by {label!r}, a label not every series it reads has")
                kept = set.intersection(*groupings) if groupings else None
                for text in (rule.get("annotations") or {}).values():
                    for label in TEMPLATE_LABEL.findall(str(text)):
                        if kept is not None and label not in kept:
                            problems.append(f"{where}: an annotation names $labels.{label}, which its aggregation "
                                            f"drops (it keeps {sorted(kept)})")
    return problems


def check_disruption_budgets(objects: list[dict]) -> list[str]:
    problems = []
    for pdb in find(objects, "PodDisruptionBudget"):
        if not selected_workloads(objects, pdb["spec"]["selector"]):
            problems.append(f"PDB/{pdb['metadata']['name']}: selects no pods")
    return problems


MEMORY_UNITS = {"": 1, "k": 1000, "M": 1000**2, "G": 1000**3, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}
REDIS_UNITS = {"b": 1, "k": 1000, "kb": 1024, "m": 1000**2, "mb": 1024**2, "g": 1000**3, "gb": 1024**3}


def redis_conf(workload: dict, container: dict, objects: list[dict]) -> str:
    """The redis.conf the container's command names, read from the ConfigMap mounted at its directory ("": none)."""
    path = next((a for a in container.get("command") or [] if a.endswith(".conf")), None)
    if path is None:
        return ""
    directory, _, name = path.rpartition("/")
    mount = next((m for m in container.get("volumeMounts") or [] if m["mountPath"].rstrip("/") == directory), None)
    volumes = {v["name"]: v for v in pod_template(workload)["spec"].get("volumes") or []}
    config_map = (volumes.get(mount["name"]) or {}).get("configMap", {}).get("name") if mount else None
    maps = find(objects, "ConfigMap", config_map) if config_map else []
    return (maps[0].get("data") or {}).get(name, "") if maps else ""


def conf_value(conf: str, key: str) -> str | None:
    m = re.search(rf"^{re.escape(key)}\s+(\S+)\s*$", conf, re.MULTILINE)
    return m.group(1) if m else None


CLUSTER_CREATE = re.compile(r"redis-cli --cluster create .*--cluster-replicas (?P<replicas>\d+)")
MIN_CLUSTER_MASTERS = 3


def check_redis(objects: list[dict]) -> list[str]:
    """maxmemory below the container limit, allkeys-lru, no persistence; a Redis Cluster's nodes keep their identity
    on a volume, get DNS names before they are ready, and are formed into >= 3 masters by a Job reading the
    services' URL."""
    problems = []
    for inv in invocations(objects):
        if inv.argv[:1] != ["redis-server"]:
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
        conf = redis_conf(inv.workload, inv.container, objects)
        if conf_value(conf, "maxmemory-policy") != "allkeys-lru":
            problems.append(f"{inv.where}: its redis.conf lacks maxmemory-policy allkeys-lru")
        if inv.workload["kind"] != "StatefulSet":
            problems.append(f"{inv.where}: Redis should be a StatefulSet")
        elif conf_value(conf, "cluster-enabled") == "yes":
            problems += _cluster_problems(objects, inv, conf)
    return problems


def _cluster_problems(objects: list[dict], inv: Invocation, conf: str) -> list[str]:
    problems, spec = [], inv.workload["spec"]
    name = inv.workload["metadata"]["name"]
    directory = (conf_value(conf, "cluster-config-file") or "nodes.conf").rpartition("/")[0] or \
        conf_value(conf, "dir") or ""
    mount = next((m for m in inv.container.get("volumeMounts") or [] if m["mountPath"].rstrip("/") == directory),
                 None)
    claims = {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates") or []}
    if mount is None or mount["name"] not in claims:
        problems.append(f"{inv.where}: the cluster's nodes.conf (in {directory or 'the working directory'}) is not on "
                        "a volumeClaimTemplate: a rescheduled pod would come back as a new, empty node")
    service = find(objects, "Service", spec.get("serviceName", ""))
    if not service or service[0]["spec"].get("clusterIP") != "None":
        problems.append(f"StatefulSet/{name}: serviceName {spec.get('serviceName')!r} is not a headless Service")
    elif not service[0]["spec"].get("publishNotReadyAddresses"):
        problems.append(f"Service/{spec['serviceName']} must publish not-ready addresses: Redis nodes are ready only "
                        "once the cluster is formed, which is done by their DNS names")
    jobs = [i for i in invocations(objects) if i.workload["kind"] == "Job"
            and CLUSTER_CREATE.search(" ".join(i.argv))]
    if not jobs:
        return [*problems, f"StatefulSet/{name}: no Job runs `redis-cli --cluster create ... --cluster-replicas N`"]
    per_master = 1 + int(CLUSTER_CREATE.search(" ".join(jobs[0].argv))["replicas"])
    replicas = spec.get("replicas", 1)
    if replicas % per_master or replicas // per_master < MIN_CLUSTER_MASTERS:
        problems.append(f"StatefulSet/{name}: {replicas} pods do not make at least {MIN_CLUSTER_MASTERS} masters with "
                        f"{per_master - 1} replica(s) each")
    urls = {i.args.redis_url for i in servers(objects).values()}
    if set(jobs[0].env.values()).isdisjoint(urls):
        problems.append(f"{jobs[0].where}: does not form the cluster from the services' --redis-url")
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
    """Only the gateway reaches vision and llm; only the three services reach Redis (and, for a Redis Cluster, its
    nodes each other's client and bus ports, and the Job that forms it their client port); only the gateway is
    exposed; Prometheus reaches the metrics ports."""
    by_name = {w["metadata"]["name"]: w for w in workloads(objects)}
    if not {"vision", "llm", "gateway"} <= set(by_name):
        return ["missing one of the vision, llm, gateway workloads"]
    gateway = servers(objects).get("gateway")
    redis = redis_servers(objects, gateway.args.redis_url or "")[0] if gateway else []
    if not redis:
        return ["the gateway's --redis-url reaches no Redis workload"]
    namespace = by_name["vision"]["metadata"].get("namespace")
    here = {"kubernetes.io/metadata.name": namespace}
    formers = [i.workload["metadata"]["name"] for i in invocations(objects)
               if i.workload["kind"] == "Job" and CLUSTER_CREATE.search(" ".join(i.argv))]
    sources = {name: Peer(pod_labels(by_name[name]), here)
               for name in ("vision", "llm", "gateway", *(r["metadata"]["name"] for r in redis), *formers)}
    sources["another pod of the namespace"] = Peer({"app.kubernetes.io/name": "debug"}, here)
    sources["a pod of another namespace"] = Peer({"app.kubernetes.io/name": "gateway"},
                                                 {"kubernetes.io/metadata.name": "default"})
    sources["prometheus"] = Peer({"app.kubernetes.io/name": "prometheus"},
                                 {"kubernetes.io/metadata.name": "monitoring"})
    sources["outside the cluster"] = Peer(None, {})
    expected = {("vision", "grpc"): {"gateway"}, ("llm", "grpc"): {"gateway"}, ("gateway", "grpc"): set(sources),
                ("gateway", "http"): set(sources)}
    for workload in redis:
        name = workload["metadata"]["name"]
        clustered = any(container_port(c, "bus") for c in containers(workload, init=False))
        expected[(name, "redis")] = {"vision", "llm", "gateway", *((name, *formers) if clustered else ())}
        if clustered:
            expected[(name, "bus")] = {name}
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


def image_name(image: str) -> str:
    """An image reference's repository name without registry, path, tag or digest (`reg.io/a/b:1` -> `b`)."""
    return image.rsplit("/", 1)[-1].split("@")[0].split(":")[0]


def gpu_count(container: dict) -> int:
    return int(((container.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu", 0))


def check_llm_engine(objects: list[dict]) -> list[str]:
    """The llm pool's engine against its pod: vLLM runs from the image that has it, its tensor parallelism spans
    exactly the GPUs the container gets (one without GPUs: 1), and the GPUs of a sharded model share a memory-backed
    /dev/shm (NCCL's transport between vLLM's workers)."""
    inv = servers(objects).get("llm")
    if inv is None:
        return []
    problems, container = [], inv.container
    if inv.args.engine == "vllm" and image_name(container["image"]) != VLLM_IMAGE:
        problems.append(f"{inv.where}: --engine vllm runs from image {container['image']}; vLLM is only in the "
                        f"Dockerfile's `vllm` target ({VLLM_IMAGE})")
    parallel, gpus = inv.args.tensor_parallel_size, gpu_count(container)
    if parallel != max(gpus, 1):
        problems.append(f"{inv.where}: --tensor-parallel-size {parallel}, but the container gets {gpus} GPUs "
                        "(nvidia.com/gpu): vLLM starts one worker per shard, each on a GPU of its own")
    if parallel > 1:
        spec = pod_template(inv.workload)["spec"]
        memory = {v["name"] for v in spec.get("volumes") or [] if (v.get("emptyDir") or {}).get("medium") == "Memory"}
        if not any(m["mountPath"] == "/dev/shm" and m["name"] in memory for m in container.get("volumeMounts") or []):
            problems.append(f"{inv.where}: --tensor-parallel-size {parallel} without a memory-backed /dev/shm (the "
                            "runtime's 64 MiB is too small for NCCL between the shards)")
    return problems


ALL_CHECKS: list[Callable[[list[dict]], list[str]]] = [
    check_invocations, check_ports_and_probes, check_services, check_gateway_targets, check_routing,
    check_shared_settings, check_autoscaling, check_monitoring, check_alert_rules, check_disruption_budgets,
    check_redis, check_network_policies, check_llm_engine,
]


def drift_problems(objects: list[dict]) -> list[str]:
    return [problem for check in ALL_CHECKS for problem in check(objects)]
