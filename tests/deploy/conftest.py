"""tests/deploy: the Kubernetes manifests, rendered without a cluster and checked against the services' code.

`manifest_objects` (rendering, facts from the code) and `manifest_checks` (the checks) beside this file are
imported by name like the suite's other helpers, so this directory goes on sys.path.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import manifest_checks


def pytest_generate_tests(metafunc):
    if "overlay" in metafunc.fixturenames:
        metafunc.parametrize("overlay", manifest_checks.OVERLAYS)


@pytest.fixture
def objects(overlay):
    """The overlay rendered by `kubectl kustomize` (once per session; a fresh copy per test)."""
    return manifest_checks.render(overlay)
