"""The Grafana dashboard against the services' metrics, so that a rename cannot leave a panel silently blank.

`dashboard_problems` reads every panel target's PromQL and every template variable's query with a small tokenizer
(enough for the expressions the dashboard uses: selectors, label matchers, `by (...)` lists, function calls, ranges,
Grafana's `$variables`) and checks each metric name against the metric families of fresh `GatewayMetrics`,
`VisionMetrics` and `LLMMetrics` instances: a scraped series name maps to its family the way prometheus_client names
them (`_total` and `_created` of a counter; `_bucket`, `_sum`, `_count` and `_created` of a histogram; a gauge's
own name). It also checks label names and the label values the code fixes, that counters are read through a rate
and gauges are not, that `histogram_quantile` reads `_bucket` series grouped by `le`, and the panels' structure
(a title, targets, the `${datasource}` variable, a unit on rates and latencies). The mutation tests break a copy of
the dashboard and show the checker names what broke; the last tests check that the monitoring component ships the
same JSON as a ConfigMap Grafana's dashboard sidecar picks up.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import dataclass, field

import manifest_checks as mc
import pytest

DASHBOARD = mc.K8S / "components" / "monitoring" / "dashboards" / "internvl-serve.json"
CONFIG_MAP = "internvl-grafana-dashboard"
SIDECAR_LABEL = ("grafana_dashboard", "1")
DATASOURCE_UID = "${datasource}"
# `kubectl apply` keeps the whole object in its last-applied-configuration annotation, which may not exceed this.
APPLY_ANNOTATION_LIMIT = 262144

# The series names prometheus_client exposes for a family of each type (a gauge's is the family's own name).
SERIES_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                   "gauge": ("",), "summary": ("", "_sum", "_count", "_created"), "info": ("_info",),
                   "stateset": ("",), "unknown": ("",)}
RATE_FUNCTIONS = frozenset({"rate", "irate", "increase"})
AGGREGATIONS = frozenset({"sum", "avg", "min", "max", "count", "group", "stddev", "stdvar", "topk", "bottomk",
                          "quantile", "count_values", "limitk", "limit_ratio"})
FUNCTIONS = AGGREGATIONS | RATE_FUNCTIONS | frozenset({
    "abs", "absent", "absent_over_time", "avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "count_over_time", "delta", "deriv", "exp", "floor", "histogram_avg", "histogram_count", "histogram_fraction",
    "histogram_quantile", "histogram_sum", "idelta", "label_join", "label_replace", "last_over_time", "ln", "log2",
    "log10", "max_over_time", "min_over_time", "predict_linear", "present_over_time", "quantile_over_time",
    "resets", "round", "scalar", "sgn", "sort", "sort_desc", "sqrt", "stddev_over_time", "stdvar_over_time",
    "sum_over_time", "time", "timestamp", "vector"})
# Followed by a parenthesised list of label names.
GROUPING_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"})
# Grafana's own variables.
GLOBAL_VARIABLES = frozenset({"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s",
                              "__range_ms", "__from", "__to", "__dashboard", "__name", "__org", "__user"})

TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])
  | (?P<variable>\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*)
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+(?:ms|[smhdwy]))+(?![A-Za-z0-9_])|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){},@])
""", re.VERBOSE)
VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")
LABEL_VALUES = re.compile(r"^\s*label_values\((?:(?P<selector>.*),)?\s*(?P<label>[A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$")


# ------------------------------------------------------------------------------------------- the services


@functools.cache
def families() -> dict[str, str]:
    """{family name: type} of every metric the three services export, from their registries."""
    from gateway.metrics import GatewayMetrics
    from services.llm.metrics import LLMMetrics
    from services.vision.metrics import VisionMetrics

    return {f.name: f.type for cls in (GatewayMetrics, VisionMetrics, LLMMetrics) for f in cls().registry.collect()}


@functools.cache
def series_labels() -> dict[str, frozenset[str]]:
    """{series name as scraped: its label names}, the helper the alert-rule checks use."""
    found: dict[str, frozenset[str]] = {}
    for command in mc.SERVER_COMMANDS:
        found.update(mc.exported_series_labels(command))
    return found


@functools.cache
def fixed_label_values() -> dict[str, frozenset[str]]:
    """The values the code gives some labels: the gateway's routing labels, and `code` (a gRPC status name)."""
    from services.contract.errors import RpcStatus

    return {**mc.gateway_label_values(), "code": frozenset(s.name for s in RpcStatus)}


def family_of(name: str) -> tuple[str, str] | None:
    """(family, type) of a scraped series name, or None when no service exports a series of that name."""
    for suffix in ("", "_total", "_created", "_bucket", "_sum", "_count", "_info"):
        base = name[: len(name) - len(suffix)] if suffix else name
        if name.endswith(suffix) and base in families() and suffix in SERIES_SUFFIXES[families()[base]]:
            return base, families()[base]
    return None


def near_miss(name: str) -> str:
    """Why a name is not a series, when its family exists: the series a family of that type does have."""
    for base in [name] + [name.removesuffix(s) for s in ("_total", "_created", "_bucket", "_sum", "_count", "_info")
                          if name.endswith(s)]:
        if base in families():
            kind = families()[base]
            return f" ({base} is a {kind}: its series are {', '.join(base + s for s in SERIES_SUFFIXES[kind])})"
    return ""


# ---------------------------------------------------------------------------------------------- PromQL


@dataclass
class Selector:
    name: str | None
    matchers: list[tuple[str, str, str]] = field(default_factory=list)
    # The innermost function or aggregation the selector is an argument of.
    enclosing: str | None = None


@dataclass
class Parsed:
    selectors: list[Selector] = field(default_factory=list)
    groupings: list[set[str]] = field(default_factory=list)
    functions: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def tokens(expr: str) -> list[tuple[str, str]]:
    found, pos = [], 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"cannot read {expr[pos:pos + 20]!r} in {expr!r}")
        if m.lastgroup != "space":
            found.append((m.lastgroup, m.group()))
        pos = m.end()
    return found


def parse(expr: str) -> Parsed:
    """The selectors, groupings and functions of one PromQL expression."""
    out = Parsed()
    try:
        toks = tokens(expr)
    except ValueError as exc:
        out.problems.append(str(exc))
        return out
    stack: list[str | None] = []  # the function each open parenthesis belongs to (None: plain grouping)
    pending: str | None = None  # a function or aggregation whose argument list has not opened yet
    label_list: set[str] | None = None  # the `by (...)` list being read
    expect_list = False
    selector: Selector | None = None  # the selector whose braces are open
    last_metric: Selector | None = None  # a metric name just read, whose braces may follow
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        after = toks[i + 1][1] if i + 1 < len(toks) else None
        if selector is not None:
            if kind == "ident" and i + 2 < len(toks) and toks[i + 1][0] == "op" and toks[i + 2][0] == "string":
                selector.matchers.append((text, toks[i + 1][1], toks[i + 2][1][1:-1]))
                i += 3
                continue
            if text == "}":
                selector = None
            elif text != ",":
                out.problems.append(f"cannot read the matchers of {selector.name} at {text!r}")
            i += 1
            continue
        if label_list is not None:
            if kind == "ident":
                label_list.add(text)
            elif text == ")":
                out.groupings.append(label_list)
                label_list = None
            elif text != ",":
                out.problems.append(f"unexpected {text!r} in a label list")
            i += 1
            continue
        if kind == "ident":
            last_metric = None
            if text in GROUPING_KEYWORDS:
                expect_list = after == "("
            elif after == "(" or (text in AGGREGATIONS and after in ("by", "without")):
                if text not in FUNCTIONS:
                    out.problems.append(f"unknown function {text}")
                out.functions.append(text)
                pending = text
            elif text.lower() in KEYWORDS:
                pass
            else:
                enclosing = next((f for f in reversed(stack) if f is not None), None)
                last_metric = Selector(text, enclosing=enclosing)
                out.selectors.append(last_metric)
        elif text == "(":
            if expect_list:
                label_list, expect_list = set(), False
            else:
                stack.append(pending)
                pending = None
        elif text == ")":
            if not stack:
                out.problems.append("unbalanced parentheses")
            else:
                stack.pop()
        elif text == "{":
            if last_metric is None:
                last_metric = Selector(None, enclosing=next((f for f in reversed(stack) if f is not None), None))
                out.selectors.append(last_metric)
                out.problems.append("a selector without a metric name")
            selector = last_metric
        elif text == "}":
            out.problems.append("unbalanced braces")
        if kind != "ident" and text != "{" and kind != "range":
            last_metric = None
        i += 1
    if stack or selector is not None or label_list is not None:
        out.problems.append("unbalanced brackets")
    return out


def metric_names(expr: str) -> list[str]:
    return [s.name for s in parse(expr).selectors if s.name is not None]


def expr_problems(expr: str, graphed: bool = True) -> list[str]:
    """What is wrong with one expression, measured against the services' registries. `graphed`: the expression is
    a panel's (its counters must go through a rate); a variable's label_values selector only names series."""
    parsed = parse(expr)
    problems = list(parsed.problems)
    labels = series_labels()
    values = fixed_label_values()
    read = []
    for s in parsed.selectors:
        if s.name is None:
            continue
        found = family_of(s.name)
        if found is None:
            problems.append(f"reads {s.name}, which no service exports{near_miss(s.name)}")
            continue
        read.append(s.name)
        kind = found[1]
        for label, op, value in s.matchers:
            if label not in labels.get(s.name, frozenset()) | mc.TARGET_LABELS:
                problems.append(f"{s.name} has no label {label!r}")
            elif op in ("=", "!=") and label in values and not VARIABLE.search(value) and \
                    (label == "code" or s.name.startswith("internvl_gateway_")) and value not in values[label]:
                problems.append(f"{label}={value!r} never occurs: the values the code gives {label} are "
                                f"{sorted(values[label])}")
        cumulative = kind in ("counter", "histogram") and not s.name.endswith("_created")
        if graphed and cumulative and s.enclosing not in RATE_FUNCTIONS:
            problems.append(f"{s.name} is a {kind} series: read it through rate() or increase()")
        if kind == "gauge" and s.enclosing in RATE_FUNCTIONS:
            problems.append(f"{s.enclosing}() of {s.name}, a gauge")
    if "histogram_quantile" in parsed.functions:
        for name in read:
            if not name.endswith("_bucket"):
                problems.append(f"histogram_quantile over {name}, not a _bucket series")
        if not any("le" in g for g in parsed.groupings):
            problems.append("histogram_quantile over buckets whose aggregation drops le")
    for label in sorted(set().union(*parsed.groupings)):
        if label not in mc.TARGET_LABELS and not all(label in labels.get(name, frozenset()) for name in read):
            problems.append(f"groups by {label!r}, a label not every series it reads has")
    return problems


# ------------------------------------------------------------------------------------------- the dashboard


def load(path=DASHBOARD) -> dict:
    return json.loads(path.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    """Every panel, those inside collapsed rows included."""
    found = []
    for panel in dashboard.get("panels") or []:
        found.append(panel)
        found += panel.get("panels") or []
    return found


def variable_query(variable: dict) -> str:
    query = variable.get("query")
    return query.get("query", "") if isinstance(query, dict) else str(query or "")


def targets(dashboard: dict) -> list[tuple[str, str, bool]]:
    """(where, PromQL, whether it is graphed) of every panel target and every label_values selector of a template
    variable."""
    found = []
    for panel in all_panels(dashboard):
        for target in panel.get("targets") or []:
            found.append((f"panel {panel.get('title')!r} target {target.get('refId')}", target.get("expr") or "",
                          True))
    for variable in (dashboard.get("templating") or {}).get("list") or []:
        if variable.get("type") == "query":
            m = LABEL_VALUES.match(variable_query(variable))
            if m and m.group("selector"):
                found.append((f"variable {variable['name']}", m.group("selector"), False))
    return found


def unknown_metrics(dashboard: dict) -> set[str]:
    return {name for _, expr, _ in targets(dashboard) for name in metric_names(expr)
            if family_of(name) is None}


def shows_rate_or_latency(panel: dict) -> bool:
    return any(f in RATE_FUNCTIONS or f == "histogram_quantile"
               for t in panel.get("targets") or [] for f in parse(t.get("expr") or "").functions)


def panel_problems(dashboard: dict) -> list[str]:
    problems = []
    ids = [p.get("id") for p in all_panels(dashboard)]
    if len(ids) != len(set(ids)):
        problems.append(f"panel ids repeat: {ids}")
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard.get("panels") or []:
        pos = panel.get("gridPos") or {}
        if not all(isinstance(pos.get(k), int) for k in ("h", "w", "x", "y")) or pos["x"] + pos["w"] > 24:
            problems.append(f"panel {panel.get('title')!r}: gridPos {pos} is not inside the 24-column grid")
            continue
        covered = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        clash = next((cells[c] for c in sorted(covered) if c in cells), None)
        if clash is not None:
            problems.append(f"panel {panel.get('title')!r} overlaps panel {clash!r}")
        cells.update(dict.fromkeys(covered, panel.get("title")))
    for panel in all_panels(dashboard):
        title = panel.get("title")
        where = f"panel {title!r}"
        if not title:
            problems.append(f"panel {panel.get('id')}: no title")
        if panel.get("type") == "row":
            continue
        if not panel.get("targets"):
            problems.append(f"{where}: no targets")
        for item in [panel, *(panel.get("targets") or [])]:
            if (item.get("datasource") or {}).get("uid") != DATASOURCE_UID:
                problems.append(f"{where}: datasource {item.get('datasource')} is not the {DATASOURCE_UID} variable")
        unit = ((panel.get("fieldConfig") or {}).get("defaults") or {}).get("unit")
        if shows_rate_or_latency(panel) and not unit:
            problems.append(f"{where}: shows a rate or a latency but sets no unit")
        latency = any(name.endswith("_seconds_bucket") for t in panel.get("targets") or []
                      for name in metric_names(t.get("expr") or ""))
        if latency and unit != "s":
            problems.append(f"{where}: shows a latency in unit {unit!r}, not 's'")
    return problems


def variable_problems(dashboard: dict) -> list[str]:
    problems = []
    variables = (dashboard.get("templating") or {}).get("list") or []
    defined = {v.get("name") for v in variables}
    source = next((v for v in variables if v.get("name") == "datasource"), None)
    if source is None or source.get("type") != "datasource" or source.get("query") != "prometheus":
        problems.append("no `datasource` variable of Prometheus data sources")
    for variable in variables:
        if variable.get("type") != "query":
            continue
        if (variable.get("datasource") or {}).get("uid") != DATASOURCE_UID:
            problems.append(f"variable {variable.get('name')}: datasource is not the {DATASOURCE_UID} variable")
        m = LABEL_VALUES.match(variable_query(variable))
        if m is None:
            problems.append(f"variable {variable.get('name')}: not a label_values(...) query")
        elif m.group("selector"):
            label = m.group("label")
            for name in metric_names(m.group("selector")):
                if family_of(name) and label not in series_labels().get(name, frozenset()) | mc.TARGET_LABELS:
                    problems.append(f"variable {variable['name']}: {name} has no label {label!r}")
    texts = [(where, expr) for where, expr, _ in targets(dashboard)] + \
        [(f"variable {v.get('name')}", variable_query(v)) for v in variables]
    for where, text in texts:
        for name in VARIABLE.findall(text):
            if name not in defined and name not in GLOBAL_VARIABLES:
                problems.append(f"{where}: ${name} is not a variable of the dashboard")
    return problems


def dashboard_problems(dashboard: dict) -> list[str]:
    problems = [f"{where}: {problem}" for where, expr, graphed in targets(dashboard)
                for problem in expr_problems(expr, graphed)]
    if not isinstance(dashboard.get("schemaVersion"), int) or dashboard["schemaVersion"] < 36:
        problems.append(f"schemaVersion {dashboard.get('schemaVersion')!r}: Grafana 9 or later expected")
    if not dashboard.get("uid") or not dashboard.get("title"):
        problems.append("the dashboard needs a uid and a title")
    return problems + panel_problems(dashboard) + variable_problems(dashboard)


# --------------------------------------------------------------------------------------------------- tests


def test_dashboard_reads_only_what_the_services_export():
    dashboard = load()
    assert dashboard_problems(dashboard) == []
    assert unknown_metrics(dashboard) == set()


def test_the_checker_sees_every_target():
    # Guards against a vacuous pass: every panel but the rows has targets, and each target's expression was read.
    dashboard = load()
    graphs = [p for p in all_panels(dashboard) if p["type"] != "row"]
    rows = [p["title"] for p in all_panels(dashboard) if p["type"] == "row"]
    assert rows == ["Gateway", "Vision", "LLM"]
    assert len(graphs) >= 30
    for panel in graphs:
        for target in panel["targets"]:
            assert metric_names(target["expr"]), (panel["title"], target["expr"])
    read = {family_of(name)[0] for _, expr, _ in targets(dashboard) for name in metric_names(expr)}
    # The families the dashboard exists to show.
    assert {"internvl_gateway_requests", "internvl_gateway_request_seconds",
            "internvl_gateway_time_to_first_token_seconds", "internvl_llm_inter_token_latency_seconds",
            "internvl_gateway_generated_tokens", "internvl_gateway_routing_decisions", "internvl_gateway_tiles_reused",
            "internvl_gateway_tiles_encoded", "internvl_gateway_upstream_retries", "internvl_vision_batch_tiles",
            "internvl_vision_queue_tiles", "internvl_vision_encode_seconds", "internvl_llm_running_sequences",
            "internvl_llm_waiting_sequences", "internvl_llm_kv_cache_usage_bytes", "internvl_llm_kv_reserved_bytes",
            "internvl_llm_kv_budget_bytes", "internvl_llm_prefix_cache_lookups", "internvl_llm_prefix_cache_hits",
            "internvl_llm_prefill_tokens", "internvl_llm_finished_requests"} <= read


def test_tokenizer():
    parsed = parse('histogram_quantile(0.99, sum by (le, pod) (rate(internvl_vision_encode_seconds_bucket'
                   '{namespace="$namespace", pod=~"vision-.*"}[$__rate_interval]))) / on (pod) group_left '
                   'max without (instance) (internvl_vision_queue_tiles offset 5m) > bool 1e-3')
    assert [(s.name, s.enclosing) for s in parsed.selectors] == [
        ("internvl_vision_encode_seconds_bucket", "rate"), ("internvl_vision_queue_tiles", "max")]
    assert parsed.selectors[0].matchers == [("namespace", "=", "$namespace"), ("pod", "=~", "vision-.*")]
    assert parsed.groupings == [{"le", "pod"}, {"pod"}, {"instance"}]
    assert parsed.functions == ["histogram_quantile", "sum", "rate", "max"]
    assert parsed.problems == []
    assert family_of("internvl_gateway_requests_total") == ("internvl_gateway_requests", "counter")
    assert family_of("internvl_vision_encode_seconds_bucket") == ("internvl_vision_encode_seconds", "histogram")
    assert family_of("internvl_llm_running_sequences") == ("internvl_llm_running_sequences", "gauge")
    for wrong in ("internvl_gateway_requests", "internvl_llm_running_sequences_total",
                  "internvl_vision_encode_seconds", "internvl_gateway_requests_bucket"):
        assert family_of(wrong) is None, wrong
    assert parse('{__name__=~"internvl_.*"}').problems == ["a selector without a metric name"]
    assert parse("sum(rate(x[5m])").problems == ["unbalanced brackets"]


def rename(dashboard: dict, old: str, new: str) -> dict:
    """A copy of the dashboard with the metric `old` renamed to `new` wherever it is read."""
    text = json.dumps(dashboard)
    pattern = re.compile(rf"(?<![A-Za-z0-9_:]){re.escape(old)}(?![A-Za-z0-9_:])")
    assert pattern.search(text), old
    return json.loads(pattern.sub(new, text))


def test_a_renamed_metric_is_reported_by_name():
    dashboard = load()
    broken = rename(dashboard, "internvl_llm_running_sequences", "internvl_llm_running_sequence")
    assert unknown_metrics(broken) == {"internvl_llm_running_sequence"}
    problems = dashboard_problems(broken)
    assert problems and all("internvl_llm_running_sequence, which no service exports" in p for p in problems)


def read_series() -> list[str]:
    return sorted({name for _, expr, _ in targets(load()) for name in metric_names(expr)})


@pytest.mark.parametrize("series", read_series())
def test_renaming_any_metric_it_reads_is_caught(series):
    # The family renamed in the code (its last letter dropped), the series suffix kept: what a rename in one of the
    # metrics modules without the dashboard would leave behind.
    family = family_of(series)[0]
    renamed = family[:-1] + series[len(family):]
    assert family_of(renamed) is None
    assert unknown_metrics(rename(load(), series, renamed)) == {renamed}


def panel(dashboard: dict, title: str) -> dict:
    return next(p for p in all_panels(dashboard) if p.get("title") == title)


def edit_expr(dashboard: dict, title: str, old: str, new: str) -> None:
    target = next(t for t in panel(dashboard, title)["targets"] if old in t["expr"])
    target["expr"] = target["expr"].replace(old, new)


def set_query(dashboard: dict, name: str, old: str, new: str) -> None:
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == name)
    assert old in variable["query"]["query"]
    variable["query"]["query"] = variable["query"]["query"].replace(old, new)


MUTATIONS = [
    # (what breaks, mutation, a phrase the problem report must contain)
    ("a gauge read as a counter",
     lambda d: edit_expr(d, "KV reserved vs budget", "kv_budget_bytes{", "kv_budget_bytes_total{"),
     "internvl_llm_kv_budget_bytes is a gauge"),
    ("a counter without its _total",
     lambda d: edit_expr(d, "Routing decisions", "routing_decisions_total{", "routing_decisions{"),
     "internvl_gateway_routing_decisions is a counter: its series are internvl_gateway_routing_decisions_total"),
    ("a quantile over counts instead of buckets",
     lambda d: edit_expr(d, "Encode latency", "encode_seconds_bucket{", "encode_seconds_count{"),
     "histogram_quantile over internvl_vision_encode_seconds_count"),
    ("a quantile whose aggregation drops le",
     lambda d: edit_expr(d, "Time to first token", "sum by (le)", "sum"), "aggregation drops le"),
    ("a label the metric does not have",
     lambda d: edit_expr(d, "Finished requests by reason", "by (finish_reason)", "by (reason)"),
     "groups by 'reason'"),
    ("a matcher on a label the metric does not have",
     lambda d: edit_expr(d, "Routing decisions", 'namespace="$namespace"', 'namespace="$namespace", method="Chat"'),
     "internvl_gateway_routing_decisions_total has no label 'method'"),
    ("a status the code never reports",
     lambda d: edit_expr(d, "Error ratio", 'code!="OK"', 'code!="ok"'), "code='ok' never occurs"),
    ("a routing reason the code never reports",
     lambda d: edit_expr(d, "Routing decisions", 'namespace="$namespace"', 'namespace="$namespace", reason="sticky"'),
     "reason='sticky' never occurs"),
    ("a counter read without a rate",
     lambda d: edit_expr(d, "Prefill and generated tokens",
                         'rate(internvl_llm_prefill_tokens_total{namespace="$namespace"}[$__rate_interval])',
                         'internvl_llm_prefill_tokens_total{namespace="$namespace"}'),
     "internvl_llm_prefill_tokens_total is a counter series: read it through rate()"),
    ("a rate of a gauge",
     lambda d: edit_expr(d, "Queue depth", 'internvl_vision_queue_tiles{namespace="$namespace"}',
                         'rate(internvl_vision_queue_tiles{namespace="$namespace"}[5m])'),
     "rate() of internvl_vision_queue_tiles, a gauge"),
    ("a misspelt function",
     lambda d: edit_expr(d, "Request latency", "histogram_quantile(0.99", "histogram_quantil(0.99"),
     "unknown function histogram_quantil"),
    ("a misspelt variable",
     lambda d: edit_expr(d, "Queue depth", "$namespace", "$namepsace"), "$namepsace is not a variable"),
    ("a variable query on a renamed metric",
     lambda d: set_query(d, "namespace", "internvl_llm_running_sequences", "internvl_llm_running_seqs"),
     "variable namespace: reads internvl_llm_running_seqs"),
    ("a latency panel without a unit",
     lambda d: panel(d, "Encode latency")["fieldConfig"]["defaults"].pop("unit"), "sets no unit"),
    ("a latency panel in milliseconds",
     lambda d: panel(d, "Request latency")["fieldConfig"]["defaults"].update(unit="ms"), "not 's'"),
    ("a panel without targets",
     lambda d: panel(d, "Queue depth").update(targets=[]), "panel 'Queue depth': no targets"),
    ("a panel without a title",
     lambda d: panel(d, "Queue depth").update(title=""), "no title"),
    ("a hard-wired data source",
     lambda d: panel(d, "Queue depth").update(datasource={"type": "prometheus", "uid": "prom-1"}),
     "is not the ${datasource} variable"),
    ("two panels on the same cells",
     lambda d: panel(d, "Error ratio")["gridPos"].update(x=0), "overlaps panel 'Requests by status'"),
    ("unbalanced brackets",
     lambda d: edit_expr(d, "Queue depth", "}", "}("), "unbalanced brackets"),
]


@pytest.mark.parametrize("what, mutate, phrase", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_a_broken_copy_fails(what, mutate, phrase):
    dashboard = load()
    assert dashboard_problems(dashboard) == []
    broken = copy.deepcopy(dashboard)
    mutate(broken)
    problems = dashboard_problems(broken)
    assert any(phrase in p for p in problems), f"{what}: expected a problem mentioning {phrase!r}, got {problems}"


# ------------------------------------------------------------------------------------------- the ConfigMap


def test_overlays_ship_the_dashboard_to_grafana(objects):
    dashboards = [cm for cm in mc.find(objects, "ConfigMap")
                  if (cm["metadata"].get("labels") or {}).get(SIDECAR_LABEL[0]) == SIDECAR_LABEL[1]]
    if not mc.find(objects, "ServiceMonitor"):
        # An overlay without the monitoring component (cpu-demo) has no Prometheus for the dashboard to read.
        assert dashboards == []
        return
    assert [cm["metadata"]["name"] for cm in dashboards] == [CONFIG_MAP]
    data = dashboards[0]["data"]
    # The very file, not a copy of it that could drift.
    assert data == {DASHBOARD.name: DASHBOARD.read_text()}
    assert json.loads(data[DASHBOARD.name]) == load()
    assert len(json.dumps(dashboards[0])) < APPLY_ANNOTATION_LIMIT
