"""The OpenAI-compatible HTTP API, served by aiohttp on the gateway's event loop (beside gRPC).

`POST /v1/chat/completions` (JSON or SSE streaming), `GET /v1/models` and `GET /health`, translated into the same
domain request the gRPC `Chat` takes. In layers: the request as pydantic models and the one place their validation
errors become the API's 400 (`protocol`, with `messages` and `fields`), responses and stream chunks as OpenAI's JSON
(`render`), server-sent events (`sse`), the handlers (`handlers`) and the aiohttp application (`app`).
"""
