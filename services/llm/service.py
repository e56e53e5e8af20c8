"""The LLM service's transport-free core: conversation in, stream of generation events out.

`LLMService.generate` first refuses what it will not take (services.llm.intake: a model it does not serve, a full
queue), then validates the request against its limits (`LLMConfig.sampling_limits`), builds the prompt (tokenisation
off the event loop), refuses a prompt over --max-prompt-tokens or an asked max_new_tokens that does not fit beside it,
compiles the constraint's grammar within its budget (services.llm.grammar_pool), resolves every referenced image's
embeddings (from the shared Redis cache, or from what the client sent inline), checks them against the prompt,
and hands the request to the engine. The service knows the engine interface (services.llm.engine.api, events) and the
factory that builds the engine `LLMConfig.engine` names (services.llm.engine.factory), never a concrete engine. Errors
are domain errors (services.contract.errors); the gRPC layer maps them to statuses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import PreTrainedTokenizerBase

from services.contract import template
from services.contract.conversation import Conversation, GenerateRequest
from services.contract.errors import ContextTooLongError, EmbeddingsMissingError, InvalidArgumentError
from services.contract.model_info import AdapterInfo, ModelInfo
from services.contract.priority import Priority
from services.contract.sampling import SamplingParams
from services.llm.config import LLMConfig
from services.llm.engine.api import Engine, GenerationStream
from services.llm.engine.events import EngineRequest
from services.llm.engine.factory import build_engine
from services.llm.grammar import Grammars
from services.llm.grammar_pool import GrammarPool
from services.llm.intake import Intake
from services.llm.metrics import LLMMetrics
from services.llm.prompt import Prompt, PromptBuilder
from services.model.adapters import LANGUAGE_PREFIXES, Adapter, read_adapters
from services.model.checkpoint import Checkpoint, open_checkpoint
from services.model.modules import load_tokenizer
from services.runtime import tracing
from services.runtime.embedding_store import EmbeddingCache
from services.runtime.redis_client import connect as connect_redis
from services.runtime.redis_client import redis_errors

log = logging.getLogger(__name__)


class LLMService:
    """The tokenizer, the prompt builder, the embedding cache client, and the engine the factory built."""

    def __init__(self, config: LLMConfig, checkpoint: Checkpoint, tokenizer: PreTrainedTokenizerBase,
                 metrics: LLMMetrics | None = None, adapters: Sequence[Adapter] = (), model: object | None = None):
        """Builds the engine `config.engine` names (blocking: it may load the model). `adapters` are the LoRA adapters
        served beside the base; `model` a language model already loaded for the engine to compute with
        (services.llm.engine.factory.EngineInputs.model), None: the engine loads its own."""
        self.config = config
        self.checkpoint = checkpoint
        self.adapters: tuple[AdapterInfo, ...] = tuple(adapter.info() for adapter in adapters)
        self.tokenizer = tokenizer
        self.metrics = metrics
        spec = checkpoint.spec
        self.hidden_size = spec.llm_hidden_size
        self.tokens_per_tile = spec.tokens_per_tile
        positions = spec.text_hf_config().max_position_embeddings
        self.max_context_tokens = min(config.max_context_tokens or positions, positions)
        self.max_prompt_tokens = min(config.max_prompt_tokens or self.max_context_tokens, self.max_context_tokens)
        self.prompts = PromptBuilder(tokenizer, self.tokens_per_tile, spec.system_message, self.max_context_tokens)
        self.engine: Engine = build_engine(config, checkpoint, tokenizer, self.prompts, self.max_context_tokens,
                                           adapters=adapters, model=model)
        self.engine.observer = metrics
        self.intake = Intake([adapter.name for adapter in self.adapters], config.max_queue,
                             lambda: self.engine.load().waiting)
        if metrics is not None:
            metrics.model_name = checkpoint.name
        self.vocab_size = spec.text_hf_config().vocab_size
        self.grammars = Grammars(tokenizer, self.vocab_size, tokenizer.convert_tokens_to_ids(template.STOP_TOKEN))
        self.grammar_pool = GrammarPool(self.grammars, config.grammar_compile_timeout_s)
        self.embedding_cache = None
        # Tokenisation, off the event loop and out of the model's worker thread.
        self._cpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-prompt")

    @classmethod
    def with_model(cls, config: LLMConfig, checkpoint: Checkpoint, model: object, tokenizer: PreTrainedTokenizerBase,
                   metrics: LLMMetrics | None = None, adapters: Sequence[Adapter] = ()) -> LLMService:
        """The service computing with `model`, a language model already loaded (tests share one), with `adapters`
        installed in it."""
        return cls(config, checkpoint, tokenizer, metrics, adapters, model=model)

    @classmethod
    def load(cls, config: LLMConfig, metrics: LLMMetrics | None = None) -> LLMService:
        """Opens the checkpoint, reads the adapters and the tokenizer, and builds the engine, which loads the
        language model (blocking: call it off the loop)."""
        checkpoint = open_checkpoint(config.model)
        adapters = read_adapters(config.adapters, checkpoint)
        for adapter in adapters:
            log.info("serving LoRA adapter %s (rank %d, %d layers, digest %s) from %s", adapter.name, adapter.rank,
                     len(adapter.part(LANGUAGE_PREFIXES)), adapter.digest, adapter.path)
        return cls(config, checkpoint, load_tokenizer(checkpoint), metrics, adapters)

    async def start(self) -> None:
        if self.config.redis_url:
            self.embedding_cache = EmbeddingCache(connect_redis(self.config.redis_url), self.checkpoint.fingerprint)
        await self.engine.start()

    async def warm_up(self) -> None:
        """One token through the whole path, so the first request does not pay for lazy initialisation."""
        request = GenerateRequest(Conversation(user_parts=("Hello",)), SamplingParams(max_new_tokens=1))
        async for _ in await self.generate(request):
            pass

    async def close(self) -> None:
        await self.engine.close()
        await self.grammar_pool.close()
        self._cpu.shutdown(wait=False, cancel_futures=True)
        if self.embedding_cache is not None:
            await self.embedding_cache.redis.aclose()

    def model_info(self) -> ModelInfo:
        return self.checkpoint.model_info(self.engine.dtype, self.adapters)

    async def generate(self, request: GenerateRequest, inline: dict[str, torch.Tensor] | None = None,
                       timeout: float | None = None) -> GenerationStream:
        """Starts generating; the returned stream yields TokenDelta events and one Finish per answer.

        Raises NotFoundError (a model this server does not serve), InvalidArgumentError (among them a max_new_tokens
        that does not fit, a constraint xgrammar cannot compile or one that takes longer than
        --grammar-compile-timeout-s), ContextTooLongError (also above --max-prompt-tokens), EmbeddingsMissingError (listing every missing key) or
        OverloadedError (the queue is full, or the engine can never fit the request) before anything is generated.
        """
        arrival = time.monotonic()
        self.intake.check_adapter(request.conversation.adapter)
        sampling = request.sampling
        sampling.validate(self.config.sampling_limits)
        outside = [token for token, _ in sampling.logit_bias if token >= self.vocab_size]
        if outside:
            raise InvalidArgumentError(f"logit_bias: token id {outside[0]} is outside the vocabulary of "
                                       f"{self.vocab_size} tokens")
        with self.intake.queued():  # before any work; the request counts as queued until the engine takes it
            loop = asyncio.get_running_loop()
            prompt = await loop.run_in_executor(self._cpu, self.prompts.build, request.conversation)
            max_new = self._max_new_tokens(len(prompt), sampling.max_new_tokens)
            # In a worker process killed past --grammar-compile-timeout-s: never the model's thread, never unbounded.
            grammar = None if sampling.constraint is None else await self.grammar_pool.compile(sampling.constraint)
            rows = await self._image_rows(prompt, inline if request.inline_embeddings else None,
                                          request.inline_embeddings)
            return self.engine.submit(EngineRequest(
                prompt=prompt, sampling=sampling, max_new_tokens=max_new, image_rows=rows,
                deadline=None if timeout is None else arrival + timeout, arrival=arrival,
                request_id=request.request_id, grammar=grammar, adapter=request.conversation.adapter,
                cache_salt=request.conversation.cache_salt, priority=request.priority or Priority.STANDARD))

    def _max_new_tokens(self, prompt_tokens: int, asked: int) -> int:
        """The answer's token budget: `asked` (max_new_tokens; 0: --max-new-tokens-default, cut to the room the
        context leaves). Refuses, before prefill, a prompt over --max-prompt-tokens and an asked budget that does not
        fit beside the prompt (as vLLM and OpenAI do: a cut would hold a slot for an answer nobody asked for)."""
        if prompt_tokens > self.max_prompt_tokens:
            raise ContextTooLongError(f"the prompt has {prompt_tokens} tokens (images included); at most "
                                      f"{self.max_prompt_tokens} (--max-prompt-tokens)")
        room = self.max_context_tokens - prompt_tokens
        if asked > room:
            raise InvalidArgumentError(
                f"max_new_tokens {asked} does not fit: the prompt has {prompt_tokens} tokens and the context "
                f"{self.max_context_tokens} (--max-context-tokens), so at most {room} can be generated")
        return asked or min(self.config.max_new_tokens_default, room)

    async def _image_rows(self, prompt: Prompt, inline: dict[str, torch.Tensor] | None,
                          inline_expected: bool) -> tuple[torch.Tensor, ...]:
        """The embeddings of each of the prompt's images, in order: [tiles * tokens_per_tile, hidden] each.

        Those sent inline are used as sent; the others are read from the shared cache (EmbeddingsMissingError lists
        the ones it does not hold). So a client may send only the images the cache lost after they were encoded."""
        tiles: dict[str, int] = {}
        for image in prompt.images:
            if tiles.setdefault(image.key, image.num_tiles) != image.num_tiles:
                raise InvalidArgumentError(f"image {image.key} is referenced with {tiles[image.key]} and "
                                           f"{image.num_tiles} tiles")
        found = dict(inline or {}) if inline_expected else {}
        extra = [key for key in found if key not in tiles]
        if extra:
            raise InvalidArgumentError(f"inline embeddings sent for images the prompt does not reference: "
                                       f"{', '.join(extra)}")
        if not tiles:
            return ()
        keys = [key for key in tiles if key not in found]
        if keys and self.embedding_cache is None:
            raise InvalidArgumentError(
                "this LLM server has no shared embedding cache (--redis-url); send the embeddings inline "
                f"(inline_embeddings = true){' (not sent: ' + ', '.join(keys) + ')' if inline_expected else ''}")
        if keys:
            found.update(await self._cached_rows(keys))
        for key, num_tiles in tiles.items():
            shape = tuple(found[key].shape)
            expected = (num_tiles * self.tokens_per_tile, self.hidden_size)
            if shape != expected:
                raise InvalidArgumentError(f"embeddings of {key} have shape {list(shape)}, but {num_tiles} tiles of "
                                           f"this model need {list(expected)}")
        # Concatenated (and checked for NaN) by the engine, on the thread that runs its torch kernels.
        return tuple(found[image.key] for image in prompt.images)

    async def _cached_rows(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Each key's rows from the shared cache; EmbeddingsMissingError listing every key it does not hold."""
        with redis_errors("embedding cache"), tracing.tracer().start_as_current_span("embeddings.fetch") as span:
            values = await asyncio.gather(*(self.embedding_cache.get(key) for key in keys))
            tracing.set_attributes({"internvl.images": len(keys), "internvl.bytes": sum(
                v.numel() * v.element_size() for v in values if v is not None)}, span)
        missing = [key for key, value in zip(keys, values, strict=True) if value is None]
        if missing:
            raise EmbeddingsMissingError(missing)
        return dict(zip(keys, values, strict=True))
