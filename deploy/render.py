"""Render a kustomization in Python: exactly the subset of kustomize that `deploy/k8s` uses, and nothing else.

Why it exists: `make test` renders and validates every overlay on machines without `kubectl` (Debian bookworm has
no package for it). `tests/deploy/test_render.py` compares this renderer's output with `kubectl kustomize` object
for object wherever kubectl is installed, so the two cannot quietly disagree; anything outside the subset below is
refused with `UnsupportedError` rather than approximated.

Supported (kustomize v5 semantics):
- `resources`: YAML files, and directories holding a `Kustomization` (built on their own first).
- `components`: directories holding a `Component`; its resources join the accumulated objects and its patches and
  transformers then apply to all of them.
- `patches` with `path` or `patch`: strategic-merge patches whose target is the patch's own kind and name.
  Maps merge, `null` deletes a key, lists of containers/initContainers/env/volumes/imagePullSecrets merge by
  `name` and volumeMounts by `mountPath` (the patch's items first, then the original's others, as kustomize's kyaml
  merge orders them); any other list replaces the original. `$patch` directives, patches of custom resources and
  of the keyed lists this module does not model (ports, ...) are refused.
- `namespace`, `labels` (metadata labels only: no selectors, no templates), `images` (newName/newTag/digest).
Transformers run in kustomize's order: patches, namespace, labels, images.

Usage: `python deploy/render.py deploy/k8s/overlays/gpu` prints the rendered YAML stream.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "components", "namespace", "labels", "patches", "images"}
# Strategic-merge keys of the lists this renderer merges (from the Kubernetes API's patchMergeKey tags).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "imagePullSecrets": "name",
    "volumeMounts": "mountPath",
}
# Lists the API merges by a key this renderer does not model: patching them is refused, not guessed.
UNMODELLED_KEYED_LISTS = {"ports", "volumeDevices", "hostAliases", "topologySpreadConstraints", "resourceClaims",
                          "ephemeralContainers", "conditions", "subjects", "finalizers"}
# Kinds that take no namespace (the ones kustomize's namespace transformer skips) among those one might write here.
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume",
                  "StorageClass", "PriorityClass", "IngressClass", "RuntimeClass", "ValidatingWebhookConfiguration",
                  "MutatingWebhookConfiguration", "APIService"}
# Kinds whose cross-namespace references kustomize rewrites; not modelled, so refused.
NAMESPACE_REFERENCING = {"RoleBinding", "ClusterRoleBinding", "ValidatingWebhookConfiguration",
                         "MutatingWebhookConfiguration", "APIService"}


class UnsupportedError(ValueError):
    """The kustomization uses something outside this renderer's subset."""


def render(directory: str | Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize DIRECTORY` would print, in the order of their resources."""
    return _build(Path(directory), [], expect_kind="Kustomization")


def object_id(obj: dict) -> tuple[str, str, str, str]:
    meta = obj.get("metadata") or {}
    return obj.get("apiVersion", ""), obj.get("kind", ""), meta.get("namespace") or "", meta.get("name", "")


# ----------------------------------------------------------------------------------------------- building


def _load_kustomization(directory: Path, expect_kind: str) -> dict:
    for name in KUSTOMIZATION_FILES:
        path = directory / name
        if path.is_file():
            k = yaml.safe_load(path.read_text()) or {}
            break
    else:
        raise FileNotFoundError(f"no kustomization file in {directory}")
    kind = k.get("kind", "Kustomization")
    if kind != expect_kind:
        raise UnsupportedError(f"{directory}: expected a {expect_kind}, found {kind}")
    unknown = set(k) - SUPPORTED_FIELDS
    if unknown:
        raise UnsupportedError(f"{directory}: unsupported kustomization fields {sorted(unknown)}")
    return k


def _load_documents(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            raise UnsupportedError(f"{path}: every document must be an object with apiVersion and kind")
        if doc["kind"].endswith("List"):
            raise UnsupportedError(f"{path}: List objects are not supported")
    return docs


def _build(directory: Path, accumulated: list[dict], expect_kind: str) -> list[dict]:
    k = _load_kustomization(directory, expect_kind)
    objects = list(accumulated)
    for entry in k.get("resources") or []:
        path = (directory / entry).resolve()
        if path.is_dir():
            objects += _build(path, [], expect_kind="Kustomization")
        elif path.is_file():
            _check_inside(directory, path)
            objects += _load_documents(path)
        else:
            raise FileNotFoundError(f"{directory}: resource {entry} not found")
    _check_unique(objects, directory)
    for entry in k.get("components") or []:
        objects = _build((directory / entry).resolve(), objects, expect_kind="Component")
    for patch in k.get("patches") or []:
        _apply_patch(objects, _patch_document(directory, patch))
    if "namespace" in k:
        _set_namespace(objects, k["namespace"])
    for spec in k.get("labels") or []:
        _add_labels(objects, spec, directory)
    for image in k.get("images") or []:
        _set_image(objects, image)
    return objects


def _check_inside(directory: Path, path: Path) -> None:
    """kustomize's default load restriction: files (not kustomization directories) must lie under the root."""
    if not path.resolve().is_relative_to(directory.resolve()):
        raise UnsupportedError(f"{directory}: {path} is outside the kustomization's directory")


def _check_unique(objects: list[dict], directory: Path) -> None:
    seen: set[tuple] = set()
    for obj in objects:
        api_version, kind, namespace, name = object_id(obj)
        key = (api_version.split("/")[0] if "/" in api_version else "", kind, namespace, name)
        if key in seen:
            raise UnsupportedError(f"{directory}: {kind}/{name} is defined twice")
        seen.add(key)


# ------------------------------------------------------------------------------------------------ patches


def _patch_document(directory: Path, entry: dict) -> dict:
    if set(entry) - {"path", "patch"} or len(entry) != 1:
        raise UnsupportedError(f"{directory}: patches need exactly one of path/patch (no target, no options)")
    if "path" in entry:
        _check_inside(directory, directory / entry["path"])
    text = (directory / entry["path"]).read_text() if "path" in entry else entry["patch"]
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    if len(docs) != 1:
        raise UnsupportedError(f"{directory}: a patch must hold exactly one document")
    patch = docs[0]
    if "metadata" not in patch or "name" not in patch["metadata"] or "kind" not in patch:
        raise UnsupportedError(f"{directory}: a strategic-merge patch needs kind and metadata.name")
    return patch


def _apply_patch(objects: list[dict], patch: dict) -> None:
    name, namespace = patch["metadata"]["name"], patch["metadata"].get("namespace")
    targets = [o for o in objects if o["kind"] == patch["kind"] and o["metadata"]["name"] == name
               and (namespace is None or o["metadata"].get("namespace") == namespace)]
    if len(targets) != 1:
        raise UnsupportedError(f"patch for {patch['kind']}/{name} matches {len(targets)} objects, not 1")
    group = targets[0]["apiVersion"].rpartition("/")[0]
    if "." in group and not group.endswith(".k8s.io"):
        # Custom resources merge by schemas this module does not have.
        raise UnsupportedError(f"patch for {patch['kind']}/{name}: patching custom resources is not supported")
    body = {key: value for key, value in patch.items() if key not in ("apiVersion", "kind")}
    body["metadata"] = {key: value for key, value in body["metadata"].items() if key not in ("name", "namespace")}
    merged = _merge(targets[0], body, path=f"{patch['kind']}/{name}")
    targets[0].clear()
    targets[0].update(merged)


def _merge(original: Any, patch: Any, path: str) -> Any:
    if not isinstance(patch, dict) or not isinstance(original, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(original)
    for key, value in patch.items():
        if key.startswith("$"):
            raise UnsupportedError(f"{path}: strategic-merge directive {key} is not supported")
        here = f"{path}.{key}"
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list):
            if key in UNMODELLED_KEYED_LISTS:
                raise UnsupportedError(f"{here}: patching this keyed list is not supported")
            if key in MERGE_KEYS and isinstance(result.get(key), list):
                result[key] = _merge_keyed_list(result[key], value, MERGE_KEYS[key], here)
            else:
                result[key] = copy.deepcopy(value)
        elif key in result:
            result[key] = _merge(result[key], value, here)
        else:
            result[key] = _strip_nulls(copy.deepcopy(value))
    return result


def _merge_keyed_list(original: list, patch: list, merge_key: str, path: str) -> list:
    """The patch's items (merged into their originals, in patch order), then the original's other items in their
    order: kustomize's kyaml merge prepends what a patch lists."""
    by_key = {item.get(merge_key): item for item in original}
    result = []
    for item in patch:
        if not isinstance(item, dict) or merge_key not in item or any(k.startswith("$") for k in item):
            raise UnsupportedError(f"{path}: every patch item needs {merge_key} and no $ directives")
        key = item[merge_key]
        if key in by_key:
            result.append(_merge(by_key[key], item, f"{path}[{key}]"))
        else:
            result.append(_strip_nulls(copy.deepcopy(item)))
    patch_keys = {item[merge_key] for item in patch}
    return result + [copy.deepcopy(item) for item in original if item.get(merge_key) not in patch_keys]


def _strip_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nulls(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------- transformers


def _set_namespace(objects: list[dict], namespace: str) -> None:
    for obj in objects:
        if obj["kind"] in NAMESPACE_REFERENCING:
            raise UnsupportedError(f"{obj['kind']}: namespace rewriting of its references is not supported")
        if obj["kind"] not in CLUSTER_SCOPED:
            obj["metadata"]["namespace"] = namespace


def _add_labels(objects: list[dict], spec: dict, directory: Path) -> None:
    if set(spec) - {"pairs", "includeSelectors", "includeTemplates"} or spec.get("includeSelectors") or \
            spec.get("includeTemplates"):
        raise UnsupportedError(f"{directory}: labels support only `pairs` (no selectors, no templates)")
    for obj in objects:
        labels = obj["metadata"].get("labels") or {}
        labels.update(spec.get("pairs") or {})
        obj["metadata"]["labels"] = labels


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """`registry:5000/name:tag@sha256:...` -> (`registry:5000/name`, tag, digest)."""
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = None
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    return name, tag, digest or None


def _set_image(objects: list[dict], image: dict) -> None:
    if set(image) - {"name", "newName", "newTag", "digest"}:
        raise UnsupportedError(f"images: unsupported fields in {image}")
    for container in _containers(objects):
        name, tag, digest = split_image(container.get("image", ""))
        if name != image["name"]:
            continue
        name = image.get("newName", name)
        if "digest" in image:
            tag, digest = None, image["digest"]
        elif "newTag" in image:
            tag, digest = str(image["newTag"]), None
        container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def _containers(value: Any):
    """Every container and init container anywhere in the objects (pod templates of any workload)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("containers", "initContainers") and isinstance(item, list):
                yield from (c for c in item if isinstance(c, dict))
            else:
                yield from _containers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _containers(item)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: render.py KUSTOMIZATION_DIR", file=sys.stderr)
        return 2
    yaml.safe_dump_all(render(argv[0]), sys.stdout, sort_keys=False, default_flow_style=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
