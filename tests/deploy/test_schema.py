"""Every rendered object validates offline: built-in kinds against the Kubernetes OpenAPI schemas (the
`kubernetes-validate` package, strict: unknown fields are errors), for the oldest and the newest Kubernetes version
we claim; the custom resources (Prometheus Operator's ServiceMonitor and PrometheusRule) and the prometheus-adapter
rules, which no bundled schema covers, structurally here.
"""

import copy
import re

import kubernetes_validate
import manifest_checks as mc
import pytest
import yaml

# Native gRPC probes are GA since 1.27; 1.28 is the oldest minor release we claim. The newest is whatever the
# installed kubernetes-validate knows.
VERSIONS = ["1.28.0", kubernetes_validate.utils.latest_version()]

SERVICE_MONITOR_ENDPOINT_FIELDS = {"port", "targetPort", "path", "scheme", "interval", "scrapeTimeout",
                                   "honorLabels", "relabelings", "metricRelabelings"}


def service_monitor_problems(obj: dict) -> list[str]:
    """The fields of monitoring.coreos.com/v1 ServiceMonitor this project uses, checked like its CRD would."""
    problems = []
    if obj.get("apiVersion") != "monitoring.coreos.com/v1":
        problems.append(f"apiVersion {obj.get('apiVersion')!r}")
    if not (obj.get("metadata") or {}).get("name"):
        problems.append("metadata.name missing")
    spec = obj.get("spec") or {}
    if set(spec) - {"selector", "endpoints", "namespaceSelector", "jobLabel"}:
        problems.append(f"unknown spec fields {sorted(set(spec) - {'selector', 'endpoints'})}")
    selector = spec.get("selector")
    if not isinstance(selector, dict) or not (selector.get("matchLabels") or selector.get("matchExpressions")):
        problems.append("spec.selector must be a non-empty LabelSelector")
    for expr in (selector or {}).get("matchExpressions") or []:
        if expr.get("operator") not in ("In", "NotIn", "Exists", "DoesNotExist") or "key" not in expr:
            problems.append(f"bad matchExpression {expr}")
    endpoints = spec.get("endpoints")
    if not isinstance(endpoints, list) or not endpoints:
        problems.append("spec.endpoints must be a non-empty list")
    for endpoint in endpoints or []:
        if set(endpoint) - SERVICE_MONITOR_ENDPOINT_FIELDS:
            problems.append(f"unknown endpoint fields {sorted(set(endpoint) - SERVICE_MONITOR_ENDPOINT_FIELDS)}")
        if not isinstance(endpoint.get("port"), str) and "targetPort" not in endpoint:
            problems.append("an endpoint needs a named port")
        if "interval" in endpoint and not str(endpoint["interval"]).rstrip("smh").isdigit():
            problems.append(f"interval {endpoint['interval']!r} is not a Prometheus duration")
    return problems


DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
RULE_FIELDS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}


def prometheus_rule_problems(obj: dict) -> list[str]:
    """The fields of monitoring.coreos.com/v1 PrometheusRule, checked like its CRD (and Prometheus's rule loader)
    would: groups with unique names, each rule an alert or a recording rule with an expression, durations in
    Prometheus's format, string-valued labels and annotations."""
    problems = []
    if obj.get("apiVersion") != "monitoring.coreos.com/v1":
        problems.append(f"apiVersion {obj.get('apiVersion')!r}")
    if not (obj.get("metadata") or {}).get("name"):
        problems.append("metadata.name missing")
    spec = obj.get("spec") or {}
    if set(spec) - {"groups"}:
        problems.append(f"unknown spec fields {sorted(set(spec) - {'groups'})}")
    groups = spec.get("groups")
    if not isinstance(groups, list) or not groups:
        return [*problems, "spec.groups must be a non-empty list"]
    names = [g.get("name") for g in groups]
    if len(set(names)) != len(names) or not all(names):
        problems.append(f"group names must be present and unique: {names}")
    for group in groups:
        if set(group) - {"name", "interval", "rules", "limit", "partial_response_strategy"}:
            problems.append(f"group {group.get('name')}: unknown fields {sorted(set(group) - {'name', 'rules'})}")
        if "interval" in group and not DURATION.match(str(group["interval"])):
            problems.append(f"group {group.get('name')}: interval {group['interval']!r} is not a duration")
        for rule in group.get("rules") or []:
            where = f"rule {rule.get('alert') or rule.get('record')}"
            if set(rule) - RULE_FIELDS:
                problems.append(f"{where}: unknown fields {sorted(set(rule) - RULE_FIELDS)}")
            if ("alert" in rule) == ("record" in rule):
                problems.append(f"{where}: exactly one of alert and record")
            if not isinstance(rule.get("expr"), str) or not rule["expr"].strip():
                problems.append(f"{where}: expr must be a non-empty string")
            elif rule["expr"].count("(") != rule["expr"].count(")") or rule["expr"].count("{") != \
                    rule["expr"].count("}"):
                problems.append(f"{where}: unbalanced brackets in expr")
            for key in ("for", "keep_firing_for"):
                if key in rule and not DURATION.match(str(rule[key])):
                    problems.append(f"{where}: {key} {rule[key]!r} is not a duration")
            if "record" in rule and ("for" in rule or "annotations" in rule):
                problems.append(f"{where}: a recording rule takes no for or annotations")
            for key in ("labels", "annotations"):
                if not all(isinstance(v, str) for v in (rule.get(key) or {}).values()):
                    problems.append(f"{where}: {key} values must be strings")
    return problems


CUSTOM_RESOURCES = {("monitoring.coreos.com/v1", "ServiceMonitor"): service_monitor_problems,
                    ("monitoring.coreos.com/v1", "PrometheusRule"): prometheus_rule_problems}


def adapter_rule_problems(config_text: str) -> list[str]:
    """prometheus-adapter's rule format: seriesQuery, resources, name, metricsQuery with its template fields."""
    problems = []
    config = yaml.safe_load(config_text)
    for i, rule in enumerate(config.get("rules") or []):
        for field in ("seriesQuery", "resources", "name", "metricsQuery"):
            if field not in rule:
                problems.append(f"rule {i}: no {field}")
        overrides = (rule.get("resources") or {}).get("overrides") or {}
        if {v.get("resource") for v in overrides.values()} != {"namespace", "pod"}:
            problems.append(f"rule {i}: resources must map namespace and pod (per-pod metrics for the HPA)")
        for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            if placeholder not in rule.get("metricsQuery", ""):
                problems.append(f"rule {i}: metricsQuery lacks {placeholder}")
    if not config.get("rules"):
        problems.append("no rules")
    return problems


def schema_problems(obj: dict) -> list[str]:
    key = (obj["apiVersion"], obj["kind"])
    if key in CUSTOM_RESOURCES:
        return CUSTOM_RESOURCES[key](obj)
    problems = []
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"no schema for {key} in Kubernetes {version} (a custom resource needs a check here)")
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(f"Kubernetes {version}: {path}: {exc.message}")
    if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] == "prometheus-adapter-rules":
        problems += adapter_rule_problems(obj["data"]["config.yaml"])
    return problems


def test_every_object_validates(objects):
    problems = {f"{o['kind']}/{o['metadata']['name']}": schema_problems(o) for o in objects}
    assert {k: v for k, v in problems.items() if v} == {}


def test_base_validates():
    objects = mc.render_directory(mc.K8S / "base")
    assert {f"{o['kind']}/{o['metadata']['name']}": p for o in objects if (p := schema_problems(o))} == {}


def test_validation_catches_broken_objects():
    objects = mc.render("gpu")
    deployment = copy.deepcopy(mc.one(objects, "Deployment", "vision"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    assert any("readinesProbe" in p for p in schema_problems(deployment))
    hpa = copy.deepcopy(mc.one(objects, "HorizontalPodAutoscaler", "llm"))
    hpa["spec"]["minReplicas"] = "two"
    assert schema_problems(hpa)
    monitor = copy.deepcopy(mc.one(objects, "ServiceMonitor", "internvl"))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    assert any("intervall" in p for p in schema_problems(monitor))
    del monitor["spec"]["selector"]
    assert any("selector" in p for p in schema_problems(monitor))
    rules = copy.deepcopy(mc.one(objects, "ConfigMap", "prometheus-adapter-rules"))
    rules["data"]["config.yaml"] = rules["data"]["config.yaml"].replace("<<.LabelMatchers>>", "")
    assert any("LabelMatchers" in p for p in schema_problems(rules))
    alerts = copy.deepcopy(mc.one(objects, "PrometheusRule", "internvl"))
    alerts["spec"]["groups"][0]["rules"][0]["for"] = "2 minutes"
    assert any("not a duration" in p for p in schema_problems(alerts))
    alerts["spec"]["groups"][0]["rules"][1]["expr"] += ")"
    assert any("unbalanced" in p for p in schema_problems(alerts))
    alerts["spec"]["groups"][0]["rules"][2]["record"] = "x"
    assert any("exactly one of alert and record" in p for p in schema_problems(alerts))
    unknown = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "x"}}
    assert any("no schema" in p for p in schema_problems(unknown))


@pytest.mark.parametrize("kind", ["ServiceMonitor", "PrometheusRule"])
def test_custom_resources_are_only_in_overlays_with_their_operator(kind):
    # cpu-demo runs on a bare kind cluster, which has no Prometheus Operator CRDs: applying it must not need them.
    assert not mc.find(mc.render("cpu-demo"), kind)
    assert mc.find(mc.render("gpu"), kind)
