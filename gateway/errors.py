"""The gateway's own refinement of a shared error: embeddings of an earlier round that it cannot re-encode.

The gateway's other errors (an unknown or busy session, a path outside the media root, a body over the limit, a
passed deadline) have codes of their own in the shared table, `services.contract.errors`, so a peer's status decodes
back into them.
"""

from __future__ import annotations

from services.contract.errors import EmbeddingsMissingError, InternVLError


class SessionMediaEvictedError(EmbeddingsMissingError):
    """Embeddings of an image from an earlier round were evicted; the gateway holds no pixels to re-encode them."""

    def __init__(self, missing_keys: list[str]):
        InternVLError.__init__(
            self,
            f"{len(missing_keys)} image(s) of this conversation's earlier rounds are no longer cached and cannot be "
            "re-encoded (sessions keep no pixels); start a new session or send those images again",
        )
        self.missing_keys = list(missing_keys)
