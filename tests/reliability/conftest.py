"""The stack most reliability tests share: a restartable Redis, two vision replicas, the LLM service and the gateway
(gRPC and HTTP) on the tiny checkpoint, started once for the package.

Its limits are small on purpose, so the bad-input tests reach them cheaply: a 4 MiB gRPC message limit, 3 MB of media
per part, a 4096-token context and a 32 MiB prefix KV cache.
"""

from __future__ import annotations

import pytest
from stack import running_stack

from reliability.limits import KV_CACHE_BUDGET_MB, MAX_CONTEXT_TOKENS, MAX_MEDIA_BYTES, MAX_MESSAGE_BYTES

NAMESPACE = "relstack"


@pytest.fixture(scope="package")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint()


@pytest.fixture(scope="package")
def stack(checkpoint):
    with running_stack(
        checkpoint,
        vision_args=[(), ()],
        llm_args=["--max-context-tokens", str(MAX_CONTEXT_TOKENS), "--kv-cache-budget-mb", str(KV_CACHE_BUDGET_MB),
                  "--max-batch-size", "16", "--max-message-bytes", str(MAX_MESSAGE_BYTES)],
        gateway_args=["--max-message-bytes", str(MAX_MESSAGE_BYTES), "--max-media-bytes", str(MAX_MEDIA_BYTES),
                      "--default-timeout-s", "120"],
        namespace=NAMESPACE,
    ) as running:
        yield running
