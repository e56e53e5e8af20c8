"""Before anything is timed: `vllm serve`'s prompt token ids equal ours, for a text and an image conversation.

`vllm serve` renders the chat template and expands each image itself; our LLM service renders with its prompt
builder (services.llm.prompt). The benchmark compares the two token for token (vLLM returns its prompt ids with the
`return_token_ids` extension), so a timing of `vllm serve` is a timing of the very prompts our stack prefills. Our
ids are computed here, with the checkpoint's tokenizer and our tiling rule for the image's tile count.
"""

from __future__ import annotations

from bench.peer.openai_stream import Endpoint, image_url_part, post_json, text_part
from services.contract.conversation import Conversation, ImageRef
from services.contract.tiling import DEFAULT_MAX_NUM, count_tiles
from services.llm.prompt import PromptBuilder
from services.model.checkpoint import open_checkpoint
from services.model.modules import load_tokenizer


class PromptMismatchError(RuntimeError):
    pass


def our_prompt_ids(model: str, conversation: Conversation) -> list[int]:
    checkpoint = open_checkpoint(model)
    builder = PromptBuilder(load_tokenizer(checkpoint), checkpoint.spec.tokens_per_tile,
                            checkpoint.spec.system_message, 1 << 30)
    return list(builder.build(conversation).token_ids)


def vllm_prompt_ids(endpoint: Endpoint, messages: list[dict]) -> list[int]:
    reply = post_json(endpoint, "/v1/chat/completions", {
        "model": endpoint.model, "messages": messages, "max_tokens": 1, "temperature": 0,
        "return_token_ids": True})
    return list(reply["prompt_token_ids"])


def check_prompts(endpoint: Endpoint, model: str, image: bytes, side: int) -> dict[str, int]:
    """Raises PromptMismatchError unless vLLM's ids equal ours for both conversations; their lengths otherwise.
    `image` is a PNG of `side` x `side` pixels."""
    question = "Describe the image in detail."
    tiles = count_tiles(side, side, DEFAULT_MAX_NUM)
    cases = {
        "text": ([{"role": "user", "content": question}], Conversation(user_parts=(question,))),
        "image": ([{"role": "user", "content": [image_url_part(image), text_part(question)]}],
                  Conversation(user_parts=(ImageRef("image", tiles), question))),
    }
    lengths = {}
    for name, (messages, conversation) in cases.items():
        theirs, ours = vllm_prompt_ids(endpoint, messages), our_prompt_ids(model, conversation)
        if theirs != ours:
            first = next((i for i, (a, b) in enumerate(zip(theirs, ours, strict=False)) if a != b),
                         min(len(theirs), len(ours)))
            raise PromptMismatchError(f"vllm serve's prompt for the {name} conversation differs from ours: "
                                      f"{len(theirs)} vs {len(ours)} tokens, first difference at {first} "
                                      f"({theirs[first:first + 8]} vs {ours[first:first + 8]})")
        lengths[name] = len(ours)
    return lengths
