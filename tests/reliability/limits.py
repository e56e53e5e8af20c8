"""The limits of the stack most reliability tests share (tests/reliability/conftest.py starts it): small on purpose, so
the bad-input tests reach them cheaply."""

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # gRPC messages, every server
MAX_MEDIA_BYTES = 3_000_000  # per image or video part (gateway)
MAX_CONTEXT_TOKENS = 4096  # prompt + answer (LLM)
KV_CACHE_BUDGET_MB = 32  # the LLM's prefix KV cache
