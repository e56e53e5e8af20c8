"""Requests to the gateway's ChatService and checks of its answers: content parts, one Chat gathered, and the rule
that no error a caller gets leaks the server's insides."""

from __future__ import annotations

from dataclasses import dataclass, field

from internvl.gateway.v1 import gateway_pb2 as G

from tools.launcher import REPO

# What no error returned to a caller may contain: tracebacks, source paths, internal addresses.
LEAK_MARKERS = ("Traceback", 'File "', "/work/", str(REPO), "127.0.0.1", "0x7f", "site-packages")


def text_part(value: str) -> G.ContentPart:
    return G.ContentPart(text=value)


def image_part(data: bytes | None = None, **source) -> G.ContentPart:
    """An image by its bytes, or by `path=` or `url=`."""
    return G.ContentPart(image=G.ImageInput(data=data) if data is not None else G.ImageInput(**source))


def video_part(data: bytes, **fields) -> G.ContentPart:
    return G.ContentPart(video=G.VideoInput(data=data, **fields))


@dataclass
class Answer:
    """One Chat call gathered: its tokens, text and finish, and the top alternatives at each position when asked."""

    token_ids: list[int]
    text: str
    finish: G.ChatFinish | None
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # [(token id, logprob)] per position


def chat(stub, content, *, timeout: float = 60, metadata=None, max_new_tokens: int = 4, top_logprobs: int = 0,
         **fields) -> Answer:
    """One Chat with `content` (greedy, `max_new_tokens` unless `sampling=` is given), gathered; raises
    grpc.RpcError on failure. `fields` are ChatRequest's (max_num, session_id, model, ...)."""
    request = G.ChatRequest(content=content, **fields)
    if not request.HasField("sampling"):
        request.sampling.max_new_tokens = max_new_tokens
        request.sampling.top_logprobs = top_logprobs
    answer = Answer([], "", None)
    texts = []
    for response in stub.Chat(request, timeout=timeout, metadata=metadata):
        if response.HasField("delta"):
            answer.token_ids += response.delta.token_ids
            texts.append(response.delta.text)
            answer.top += [[(t.token_id, t.logprob) for t in p.top] for p in response.delta.logprobs]
        else:
            answer.finish = response.finish
    answer.text = "".join(texts)
    return answer


def chat_answers(stub, content, *, timeout: float = 60, **fields) -> list[Answer]:
    """One Chat with `content` and `fields` (ChatRequest's, `sampling` included), its answers gathered by index
    (SamplingParams.n > 1 interleaves them); raises grpc.RpcError on failure."""
    answers: dict[int, Answer] = {}
    texts: dict[int, list[str]] = {}
    for response in stub.Chat(G.ChatRequest(content=content, **fields), timeout=timeout):
        if response.HasField("delta"):
            delta = response.delta
            answer = answers.setdefault(delta.index, Answer([], "", None))
            answer.token_ids += delta.token_ids
            texts.setdefault(delta.index, []).append(delta.text)
            answer.top += [[(t.token_id, t.logprob) for t in p.top] for p in delta.logprobs]
        else:
            answers.setdefault(response.finish.index, Answer([], "", None)).finish = response.finish
    for index, answer in answers.items():
        answer.text = "".join(texts.get(index, []))
    return [answers[i] for i in sorted(answers)]


def assert_no_leak(message: str, *extra: str) -> None:
    for marker in (*LEAK_MARKERS, *extra):
        assert marker not in message, f"error message leaks {marker!r}: {message!r}"
