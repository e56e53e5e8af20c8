"""An `EngineRequest` in vLLM's terms: the prompt with one `<image>` per image, the image rows as embeddings keyed by
our content keys, and vLLM's sampling parameters for one answer; what vLLM cannot do as the original does; and
vLLM's log-probabilities in our terms.

**The prompt.** Ours (services.llm.prompt) is the original's token ids, each image already expanded to `<img>` +
`<IMG_CONTEXT>` x rows + `</img>`. vLLM's InternVL processor expands images itself and refuses a prompt whose image
tokens are already there, so each expanded image is folded back into the ids of the string `<image>` (what vLLM
searches for); vLLM's expansion must then give back exactly our ids, which the engine checks before anything runs.

**The images.** Each image's rows [tiles * 256, hidden] (a video frame is an image; combined mode is one image of
all the tiles) go in as image embeddings: one image as [1, rows, hidden] (a 2-D tensor would be read as `rows`
images), several as a list of 2-D tensors. Each image's content key is its `multi_modal_uuids` entry: vLLM trusts it
as the image's identity for its prefix cache and its multimodal caches, which is what our keys are (sha256 over the
model's identity, the preprocessing and the media bytes).

**Sampling.** Temperature (0: greedy), top-p and top-k (0: off, as ours), the seed (answer i of n gets seed + i and
is a request of its own), raw log-softmax log-probabilities (`logprobs_mode=raw_logprobs`), presence and frequency
penalties (vLLM counts the generated tokens only, as OpenAI and we do), logit bias (added before vLLM's penalties:
addition commutes with theirs), the end of turn `<|im_end|>` as the only stop token (the tokenizer's eos does not end
an answer, as in the original). Stop strings and the answer's text are ours (services.llm.engine.detokenize), so
vLLM neither detokenises nor stops on strings.

**Constraints**: the grammar (our EBNF text, services.llm.grammar `constraint_ebnf`) as vLLM's structured output
`grammar`, which its xgrammar backend (ours, installed by the plugin) compiles over our vocabulary.

**Refused** (InvalidArgumentError naming the option): the repetition penalty (vLLM's counts the prompt's tokens too,
the original's only the generated ones: its answers would differ); top_logprobs with a constraint (vLLM masks the
logits before it takes their log-probabilities, where the original reports the model's own).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from services.contract.errors import InvalidArgumentError
from services.llm.engine.events import EngineRequest, TopLogprobs
from services.llm.prompt import Prompt

# What vLLM's InternVL processor replaces with an image's tokens.
IMAGE_PLACEHOLDER = "<image>"


def refusal(request: EngineRequest) -> InvalidArgumentError | None:
    """Why this engine cannot answer `request` as the original would, or None."""
    sampling = request.sampling
    if sampling.penalty is not None:
        return InvalidArgumentError(
            "repetition_penalty is not supported by this LLM server's engine (vLLM): it would penalise the prompt's "
            "tokens too, where the original penalises only the generated ones; leave it unset (0 or 1)")
    if sampling.constraint is not None and sampling.top_logprobs:
        return InvalidArgumentError(
            "top_logprobs with a constraint is not supported by this LLM server's engine (vLLM): it would report the "
            "log-probabilities after the constraint's mask, where the original reports the model's own; ask for one "
            "of the two")
    return None


class PromptFolder:
    """Folds each image's `<img>` + IMG_CONTEXT run + `</img>` in a prompt's ids back into `placeholder` (the ids
    vLLM's tokenizer gives `<image>`)."""

    def __init__(self, placeholder: Sequence[int], img_start_id: int, img_context_id: int, img_end_id: int):
        self.placeholder = list(placeholder)
        self.img_start_id, self.img_context_id, self.img_end_id = img_start_id, img_context_id, img_end_id

    def fold(self, prompt: Prompt) -> list[int]:
        """vLLM's prompt ids for `prompt`. An image is an `<img>` followed by IMG_CONTEXT (the text cannot hold
        IMG_CONTEXT, services.contract.template); its run must be exactly its rows long, in image order."""
        ids, out, image, i = prompt.token_ids, [], 0, 0
        while i < len(ids):
            if ids[i] == self.img_start_id and i + 1 < len(ids) and ids[i + 1] == self.img_context_id:
                if image >= len(prompt.images):
                    raise ValueError("the prompt has more image runs than images")
                rows = prompt.images[image].num_tiles * prompt.tokens_per_tile
                end = i + 1 + rows
                if (end >= len(ids) or ids[end] != self.img_end_id
                        or any(token != self.img_context_id for token in ids[i + 1:end])):
                    raise ValueError(f"image {image}'s run in the prompt is not {rows} IMG_CONTEXT tokens")
                out += self.placeholder
                image, i = image + 1, end + 1
                continue
            out.append(ids[i])
            i += 1
        if image != len(prompt.images):
            raise ValueError(f"the prompt has {image} image runs for {len(prompt.images)} images")
        return out


def engine_prompt(request: EngineRequest, folder: PromptFolder, dtype: torch.dtype) -> dict[str, Any]:
    """vLLM's token prompt for `request`: folded ids, the images' rows as embeddings in `dtype`, their keys, and
    the request's cache salt (vLLM folds it into the hash of the prompt's first KV block, so no block of one salt is
    a prefix-cache hit for another)."""
    prompt: dict[str, Any] = {"prompt_token_ids": folder.fold(request.prompt)}
    if request.cache_salt:
        prompt["cache_salt"] = request.cache_salt
    rows = [r.to(dtype) for r in request.image_rows]
    if rows:
        prompt["multi_modal_data"] = {"image": rows[0][None] if len(rows) == 1 else rows}
        prompt["multi_modal_uuids"] = {"image": request.prompt.image_keys}
    return prompt


def sampling_params(request: EngineRequest, index: int, stop_token_id: int, grammar: str | None = None):
    """vLLM's SamplingParams of answer `index` (its own seed: services.contract.sampling.for_answer), constrained
    to `grammar` (EBNF text) if given."""
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    sampling = request.sampling.for_answer(index)
    return VLLMSamplingParams(
        n=1,
        max_tokens=request.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p if 0 < sampling.top_p < 1 else 1.0,
        top_k=sampling.top_k,
        seed=sampling.seed,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        logit_bias=dict(sampling.logit_bias) or None,
        logprobs=sampling.top_logprobs or None,
        stop_token_ids=[stop_token_id],
        ignore_eos=True,
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
        structured_outputs=None if grammar is None else StructuredOutputsParams(grammar=grammar),
    )


def top_logprobs(entry: dict, token: int, k: int) -> TopLogprobs:
    """Our report from vLLM's log-probabilities of one position, {token id: Logprob(logprob, rank)}: the sampled
    token's and the top k's (ranks 1..k), most likely first. The sampled token keeps its own rank when it is not
    among the top k, which can equal the k-th's on a tie: then it is not one of them."""
    top = sorted(((item.rank, token_id, item.logprob) for token_id, item in entry.items() if item.rank <= k),
                 key=lambda t: t[0])
    if len(top) > k:
        top = [t for t in top if t[1] != token]
    return TopLogprobs(entry[token].logprob, tuple(t[1] for t in top), tuple(t[2] for t in top))
