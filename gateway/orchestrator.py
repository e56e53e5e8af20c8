"""The gateway's core, free of any transport: a chat request in, a stream of deltas and one finish out.

For each request:
0. Validate it, then take an admission slot by its priority (gateway.admission): under saturation a sheddable
   request is refused at once and the others wait in priority order, up to their deadline.
1. Plan (gateway.planning, in a thread pool): read and probe every image, decode and sample every video, compute
   each image's cache key and tile count the way the vision service does, check `<image>` placeholders.
2. `Lookup` every key of the prompt (the session's earlier images included) in one call; send only the misses to
   `Encode`, grouped by the vision replica each key prefers and split into calls of `encode_items_per_call` sent
   concurrently (so duplicates meet in one replica's single-flight, and misses still spread over the pool).
3. Stream `Generate` from the LLM service with the images by reference, on the replica the conversation's prefix
   identity prefers (gateway.clients, gateway.routing). If it answers FAILED_PRECONDITION with
   missing keys (evicted between Lookup and Generate), get those images' rows from the vision service (FetchEmbeddings
   with the image: encoded again if need be, returned whatever the cache does meanwhile) and retry with them inline,
   the rest still by reference; each retry hands over at least one more key, so a request whose images were encoded
   is answered however fast the cache evicts.
4. Store the round in the session (texts and keys, never pixels), so any replica can continue it.

The caller's deadline bounds every call to both services, and cancelling the request (the transport cancels this
generator's task) cancels them too. Each request runs as its tenant (`gateway.tenants`, named by the transport): its
session is that tenant's, and the tenant's salts scope its prefix KV cache, its routing key and its embedding keys
unless the shared-cache flags say otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from gateway import tenants
from gateway.admission import Admission
from gateway.backends import (
    Embeddings,
    GenerateFinish,
    LLMBackend,
    VisionBackend,
)
from gateway.chat_request import ChatRequest
from gateway.chat_response import ChatResult, Delta, Finish
from gateway.config import GatewayConfig
from gateway.errors import SessionMediaEvictedError
from gateway.limits import (
    check_conversation_media,
    check_request_media,
    request_media_items,
    session_media_items,
)
from gateway.media import MediaResolver
from gateway.metrics import GatewayMetrics
from gateway.planning import (
    Keyer,
    PendingCombined,
    PendingImage,
    PendingVideo,
    Plan,
    PlannedTurn,
    arrange_turn,
    check_max_num,
    flatten,
    turn_jobs,
)
from gateway.remote_media import RemoteMedia
from gateway.sessions import Session, SessionStore, new_session_id
from services.contract import template
from services.contract.cache_keys import combined_key
from services.contract.conversation import Conversation, ImageRef, Part, Turn, VideoRef, part_images
from services.contract.encoding import EncodedItem
from services.contract.errors import (
    ContextTooLongError,
    DeadlineExceededError,
    EmbeddingsMissingError,
    InternVLError,
    InvalidArgumentError,
    InvalidMediaError,
    ModelMismatchError,
    NotFoundError,
    NotReadyError,
)
from services.contract.finish import Usage
from services.contract.model_info import AdapterInfo, ModelInfo
from services.contract.priority import Priority, effective_priority
from services.contract.tiling import MAX_NUM_LIMIT
from services.runtime import tracing
from services.runtime.logs import request_scope

log = logging.getLogger(__name__)
_ITEM_PREFIX = re.compile(r"^items\[\d+\]:\s*")
T = TypeVar("T")
MAX_BATCH_REQUESTS = 64


class Deadline:
    def __init__(self, seconds: float):
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise DeadlineExceededError("the request's deadline passed")
        return left


class Orchestrator:
    def __init__(self, config: GatewayConfig, vision: VisionBackend, llm: LLMBackend, sessions: SessionStore,
                 metrics: GatewayMetrics | None = None):
        self.config = config
        self.vision = vision
        self.llm = llm
        self.sessions = sessions
        self.metrics = metrics if metrics is not None else GatewayMetrics()
        self.media = MediaResolver(config.media_root, config.max_media_bytes, config.max_pixels,
                                   config.max_video_frames)
        self.remote_media = RemoteMedia.from_config(config)
        self._pool = ThreadPoolExecutor(config.media_threads, thread_name_prefix="gateway-media")
        self.model: ModelInfo | None = None
        # Per served adapter ("" the base): its image keys.
        self._keyers: dict[str, Keyer] = {}
        self._warned_key_mismatch = False
        self.admission = Admission(config.max_in_flight, config.max_queued, config.queue_wait_s,
                                   config.critical_reserve, self.metrics.admission)

    async def connect(self, timeout: float | None = None, retry_interval_s: float = 2.0) -> ModelInfo:
        """Waits for both services, checks they serve the same model, and learns what keys depend on.

        A peer that is still loading its weights answers UNAVAILABLE; that is waited out (up to `timeout`, forever
        when None), so a gateway started beside its pools becomes ready with them instead of crash-looping.
        """
        loop = asyncio.get_running_loop()
        give_up = None if timeout is None else loop.time() + timeout
        while True:
            try:
                vision, llm = await asyncio.gather(self.vision.model_info(retry_interval_s * 5, wait_for_ready=True),
                                                   self.llm.model_info(retry_interval_s * 5, wait_for_ready=True))
                break
            except (NotReadyError, DeadlineExceededError) as exc:
                if give_up is not None and loop.time() + retry_interval_s > give_up:
                    raise
                log.info("peers not ready yet (%s); retrying in %.0fs", exc, retry_interval_s)
                await asyncio.sleep(retry_interval_s)
        check_same_model(vision, llm)
        self.model = vision
        self._keyers = {name: Keyer(vision, self.config.namespace, name)
                        for name in ("", *(a.name for a in vision.adapters))}
        log.info("serving %s (fingerprint %s, %s embeddings)%s", vision.model_name, vision.fingerprint, vision.dtype,
                 "".join(f"; adapter {a.name} ({a.digest})" for a in vision.adapters))
        return vision

    def served_models(self) -> list[tuple[str, AdapterInfo | None]]:
        """The model ids requests may name: the base's, then each adapter's (with its AdapterInfo)."""
        if self.model is None:
            raise NotReadyError("the gateway is still connecting to the vision and LLM services")
        return [(self.model.model_name, None), *((a.name, a) for a in self.model.adapters)]

    def _salts(self, tenant: str) -> tuple[str, str]:
        """(prefix KV cache salt, embedding key salt) of `tenant`'s requests: the tenant's salt, or "" (one scope for
        every tenant) where `--shared-prefix-cache` / `--shared-embedding-cache` says so."""
        salt = tenants.salt(tenant)
        return "" if self.config.shared_prefix_cache else salt, "" if self.config.shared_embedding_cache else salt

    def _adapter(self, model: str) -> str:
        """The adapter a request's model id names ("" the base); NotFoundError for an id that is not served."""
        if not model or model == self.model.model_name:
            return ""
        if self.model.adapter(model) is None:
            raise NotFoundError(f"model {model!r} is not served; GET /v1/models (or ListModels) lists them")
        return model

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        await self.remote_media.close()

    async def _run(self, fn: Callable[[], T]) -> T:
        # In the request's context, so that the media threads' log lines carry its id.
        return await asyncio.get_running_loop().run_in_executor(self._pool, contextvars.copy_context().run, fn)

    # ------------------------------------------------------------------------------------------------ chat

    async def chat(self, request: ChatRequest, timeout: float | None = None) -> AsyncIterator[Delta | Finish]:
        """Streams the answer's deltas, then one Finish; raises domain errors before or during the stream."""
        if not self._keyers or self.model is None:
            raise NotReadyError("the gateway is still connecting to the vision and LLM services")
        deadline = Deadline(timeout if timeout is not None else self.config.default_timeout_s)
        if not request.content:
            raise InvalidArgumentError("content is empty: the new user turn needs text, an image or a video")
        request.sampling.validate(self.config.sampling_limits)
        media_items = request_media_items(request)
        check_request_media(media_items, self.config.max_media_items)
        adapter = self._adapter(request.model)
        check_max_num(request.max_num, "max_num", MAX_NUM_LIMIT)
        for where, video in _videos(request):
            check_max_num(video.max_num, f"{where} (video)", MAX_NUM_LIMIT)
        tracing.set_attributes({"gen_ai.operation.name": "chat",
                                "gen_ai.request.model": request.model or self.model.model_name,
                                "gen_ai.request.max_tokens": request.sampling.max_new_tokens or None,
                                "gen_ai.request.temperature": request.sampling.temperature,
                                "gen_ai.request.top_p": request.sampling.top_p or None,
                                "gen_ai.request.choice.count": request.sampling.answers,
                                "user.id": request.user or None})
        priority = effective_priority(request.priority, tenants.current().priority,
                                      Priority.parse(self.config.default_priority))
        tracing.set_attributes({"internvl.priority": priority.label})
        request = dataclasses.replace(request, priority=priority)
        async with (self.admission.slot(priority, deadline.at),
                    contextlib.aclosing(self._answer(request, adapter, deadline, media_items)) as events):
            async for event in events:
                yield event

    async def _answer(self, request: ChatRequest, adapter: str, deadline: Deadline,
                      media_items: int) -> AsyncIterator[Delta | Finish]:
        """`chat` of a validated request (with `media_items` images and videos) that holds an admission slot."""
        tenant = tenants.current().name
        cache_salt, key_salt = self._salts(tenant)
        # Remote URLs become their bytes (fetched by the allowlist) before planning: the cache keys cover the bytes.
        request = await self.remote_media.resolve_urls(request)
        continuing = request.session_id is not None
        session_id = request.session_id if continuing else new_session_id()
        # A new session's id is known to nobody else yet: only a continued one needs the one-round-at-a-time lock.
        lock = (self.sessions.lock(session_id, deadline.remaining() + 5, tenant) if continuing
                else contextlib.nullcontext())
        async with lock:
            if continuing:
                session = await self.sessions.load(session_id, tenant)
                if request.system_message is not None and request.system_message != session.system_message:
                    raise InvalidArgumentError("system_message differs from the one this session started with; "
                                               "leave it unset when continuing a session")
                if request.model and adapter != session.adapter:
                    raise InvalidArgumentError(
                        f"this session answers with model {session.adapter or self.model.model_name!r}; a session "
                        "keeps the model it started with (leave model unset or name that one)")
                adapter = self._adapter(session.adapter)  # still served?
            else:
                session = Session(session_id, request.system_message, adapter=adapter, tenant=tenant)
            check_conversation_media(media_items, session_media_items(session),
                                     self.config.max_conversation_media_items)
            with tracing.tracer().start_as_current_span("media.plan") as span:
                plan = await self._plan(request, adapter, key_salt)
                tracing.set_attributes({"internvl.images": len(plan.images),
                                        "internvl.tiles": sum(image.num_tiles for image in plan.images)}, span)
            self._check_tiles(plan, session)
            refs = await self._ensure_cached(plan, session, deadline, adapter, key_salt)
            history = (*session.turns, *(Turn(refs[n], t.assistant_text or "")
                                         for n, t in enumerate(plan.turns[:-1])))
            conversation = Conversation(refs[-1], history, session.system_message, adapter, cache_salt)
            first_answer: list[str] = []  # what the session records: answer 0 (of n)
            tiles: Usage | None = None
            finished: list[GenerateFinish] = []
            async with contextlib.aclosing(self._generate(conversation, plan, request, deadline, key_salt)) as events:
                async for event in events:
                    if isinstance(event, Delta):
                        if event.index == 0:
                            first_answer.append(event.text)
                        yield event
                        continue
                    if tiles is None:  # the first finish: every answer's deltas came before it (LLMClient)
                        turn = Turn(refs[-1], template.clean_response("".join(first_answer)))
                        await self.sessions.save(Session(session_id, session.system_message, (*history, turn),
                                                         adapter, tenant))
                        self.metrics.sessions.labels("continued" if continuing else "started").inc()
                        tiles = self._tile_usage(conversation, plan)
                    usage = dataclasses.replace(tiles, prompt_tokens=event.usage.prompt_tokens,
                                                completion_tokens=event.usage.completion_tokens,
                                                cached_prompt_tokens=event.usage.cached_prompt_tokens)
                    finished.append(event)
                    if len(finished) == request.sampling.answers:
                        tracing.set_attributes({
                            "gen_ai.usage.input_tokens": event.usage.prompt_tokens,
                            "gen_ai.usage.output_tokens": sum(f.usage.completion_tokens for f in finished),
                            "gen_ai.response.finish_reasons": [f.reason.value for f in finished],
                            "internvl.cached_prompt_tokens": event.usage.cached_prompt_tokens,
                            "internvl.encoded_tiles": tiles.encoded_tiles, "internvl.reused_tiles": tiles.reused_tiles,
                            "internvl.session_id": session_id})
                    yield Finish(event.reason, usage, session_id, event.index, request.request_id)

    async def batch_chat(self, requests: list[ChatRequest], timeout: float | None = None) -> list[ChatResult]:
        """Answers independent requests concurrently (the LLM service batches them); any failure fails all."""
        if not requests:
            raise InvalidArgumentError("requests is empty")
        if len(requests) > MAX_BATCH_REQUESTS:
            raise InvalidArgumentError(f"{len(requests)} requests; at most {MAX_BATCH_REQUESTS} per batch")
        for index, request in enumerate(requests):
            if request.sampling.answers > 1:
                raise InvalidArgumentError(f"requests[{index}]: BatchChat gives one answer per request (n = "
                                           f"{request.sampling.n}); use Chat for n > 1")

        async def one(index: int, request: ChatRequest) -> ChatResult:
            deltas, finish = [], None
            try:
                # Each question's log lines carry its own id (this task's context is its own).
                with request_scope(request.request_id):
                    async with contextlib.aclosing(self.chat(request, timeout)) as events:
                        async for event in events:
                            if isinstance(event, Delta):
                                deltas.append(event)
                            else:
                                finish = event
            except InternVLError as exc:
                exc.args = (f"requests[{index}]: {exc}",)
                exc.item_index = index
                raise
            assert finish is not None
            return ChatResult.gather(deltas, finish)

        tasks = [asyncio.ensure_future(one(i, r)) for i, r in enumerate(requests)]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------------------------------------ plan

    async def _plan(self, request: ChatRequest, adapter: str, key_salt: str) -> Plan:
        jobs = turn_jobs(request.history, request.content, request.max_num, self.media,
                         self._keyers[adapter].salted(key_salt))
        resolved = await asyncio.gather(*(asyncio.gather(*(self._run(job) for job in parts))
                                          for _, _, parts in jobs))
        turns = [PlannedTurn(where, arrange_turn(where, list(parts), request.multi_image_mode), answer)
                 for (where, answer, _), parts in zip(jobs, resolved, strict=True)]
        return Plan(turns, [image for turn in turns for image in flatten(turn.parts)])

    def _check_tiles(self, plan: Plan, session: Session) -> None:
        """Refuses, before encoding anything, a prompt with more tiles than any context this gateway serves holds."""
        earlier = sum(leaf.num_tiles for turn in session.turns for ref in part_images(turn.user_parts)
                      for leaf in ref.leaves())
        tiles = earlier + sum(image.num_tiles for image in plan.images)
        limit = self.config.max_request_tiles
        if tiles > limit:
            raise ContextTooLongError(
                f"the prompt's images and video frames take {tiles} tiles ({tiles * self.model.tokens_per_tile} "
                f"tokens){' including ' + str(earlier) + ' from earlier rounds' if earlier else ''}; at most "
                f"{limit} fit: send fewer or smaller images, a lower max_num, or fewer video segments")

    # ------------------------------------------------------------------------------------------ embeddings

    async def _ensure_cached(self, plan: Plan, session: Session, deadline: Deadline, adapter: str,
                             key_salt: str) -> list[tuple[Part, ...]]:
        """Looks up every key, encodes the misses, and returns each planned turn's parts as references."""
        stored = [leaf.key for turn in session.turns for ref in part_images(turn.user_parts) for leaf in ref.leaves()]
        keys = list(dict.fromkeys([*stored, *(image.key for image in plan.images)]))
        exists = dict(zip(keys, await self.vision.lookup(keys, deadline.remaining()), strict=True))
        evicted = [key for key in dict.fromkeys(stored) if not exists[key]]
        if evicted:
            raise SessionMediaEvictedError(evicted)
        await self._encode([image for image in plan.images if not exists[image.key]], deadline, adapter, key_salt)
        return [tuple(self._ref(part) for part in turn.parts) for turn in plan.turns]

    async def _encode(self, images: list[PendingImage], deadline: Deadline, adapter: str, key_salt: str) -> None:
        """Encodes each distinct image once with `adapter` under `key_salt`, in concurrent calls of at most `encode_items_per_call`
        items.

        Each image goes to the vision replica its key prefers, so the misses of a request spread over the pool and
        two gateways encoding the same new image reach the same replica (whose single-flight encodes it once).
        """
        unique: dict[str, list[PendingImage]] = {}
        for image in images:
            unique.setdefault(image.key, []).append(image)
        by_call: dict[tuple[int, str | None], list[list[PendingImage]]] = {}
        for same in unique.values():
            by_call.setdefault((same[0].max_num, self.vision.preferred(same[0].key)), []).append(same)
        size = self.config.encode_items_per_call
        calls = [(max_num, groups[i:i + size]) for (max_num, _), groups in by_call.items()
                 for i in range(0, len(groups), size)]
        await asyncio.gather(*(self._encode_call(max_num, groups, deadline, adapter, key_salt)
                               for max_num, groups in calls))

    async def _encode_call(self, max_num: int, groups: list[list[PendingImage]], deadline: Deadline,
                           adapter: str, key_salt: str) -> None:
        items = [group[0].item for group in groups]
        self.metrics.encode_calls.inc()
        for item in items:
            self.metrics.media_bytes_sent.labels(item.kind).inc(len(item.data))
        try:
            results = await self.vision.encode(items, max_num, True, deadline.remaining(), route_key=groups[0][0].key,
                                               adapter=adapter, key_salt=key_salt)
        except (InvalidMediaError, InvalidArgumentError) as exc:
            if exc.item_index is not None and 0 <= exc.item_index < len(groups):
                raise type(exc)(f"{groups[exc.item_index][0].where}: {strip_item_prefix(str(exc))}") from None
            raise
        for group, result in zip(groups, results, strict=True):
            self._confirm(group, result)

    def _confirm(self, group: list[PendingImage], result: EncodedItem) -> None:
        first = group[0]
        if result.key != first.key and not self._warned_key_mismatch:
            self._warned_key_mismatch = True
            log.warning("the vision service keys images differently from the gateway (%s vs %s): every Lookup will "
                        "miss; check that both use the same --namespace", result.key, first.key)
        if result.num_tiles != first.num_tiles:
            log.warning("%s: the vision service cut %d tiles, the gateway expected %d", first.where,
                        result.num_tiles, first.num_tiles)
        for image in group:
            image.key, image.num_tiles = result.key, result.num_tiles
        first.encoded = not result.cache_hit

    def _ref(self, part) -> Part:
        if isinstance(part, str):
            return part
        if isinstance(part, PendingImage):
            return ImageRef(part.key, part.num_tiles)
        if isinstance(part, PendingVideo):
            return VideoRef(tuple(ImageRef(f.key, f.num_tiles) for f in part.frames))
        assert isinstance(part, PendingCombined)
        leaves = tuple(ImageRef(i.key, i.num_tiles) for i in part.images)
        return ImageRef(combined_key([leaf.key for leaf in leaves], self.config.namespace),
                        sum(r.num_tiles for r in leaves), leaves)

    async def _inline(self, conversation: Conversation, deadline: Deadline, pending: dict[str, PendingImage],
                      key_salt: str) -> dict[str, Embeddings]:
        """Every referenced image's embeddings, fetched from the vision service (combined mode); this request's own
        images (`pending`, by key) are encoded again should the cache have lost them."""
        refs = {ref.key: ref for ref in conversation.images()}
        leaves = list(dict.fromkeys(leaf.key for ref in refs.values() for leaf in ref.leaves()))
        fetched = dict(zip(leaves, await asyncio.gather(*(self._fetch(k, pending.get(k), conversation.adapter,
                                                                      deadline, key_salt) for k in leaves)), strict=True))
        out = {}
        for key, ref in refs.items():
            parts = [fetched[leaf.key] for leaf in ref.leaves()]
            rows = sum(p.shape[0] for p in parts)
            out[key] = Embeddings(parts[0].dtype, (rows, *parts[0].shape[1:]), b"".join(p.data for p in parts))
        return out

    async def _fetch(self, key: str, image: PendingImage | None, adapter: str, deadline: Deadline,
                     key_salt: str) -> Embeddings:
        """`key`'s rows from the vision service: with `image` (keyed under `key_salt`), encoded again if the cache
        lost them (so no eviction can make this miss); without, EmbeddingsMissingError on a miss."""
        if image is None:
            return await self.vision.fetch(key, deadline.remaining())
        self.metrics.media_bytes_sent.labels(image.item.kind).inc(len(image.item.data))
        return await self.vision.fetch(key, deadline.remaining(), image.item, image.max_num, adapter, key_salt)

    # -------------------------------------------------------------------------------------------- generate

    async def _generate(self, conversation: Conversation, plan: Plan, request: ChatRequest, deadline: Deadline,
                        key_salt: str) -> AsyncIterator[Delta | GenerateFinish]:
        """Generate with the images by reference; the images of this request that the LLM finds evicted are handed
        over inline in the next try (the LLM reads inline keys first, the rest from the cache). Each try hands over
        at least one more key, so this ends after at most one try per image of the request."""
        pending = {image.key: image for image in plan.images}
        handed: dict[str, Embeddings] = {}
        while True:
            started = False
            try:
                inline = (await self._inline(conversation, deadline, pending, key_salt) if conversation.inline
                          else handed or None)
                self._count_embedding_bytes(conversation, inline)
                stream = self.llm.generate(conversation, request.sampling, request.request_id, inline,
                                           deadline.remaining(), priority=request.priority)
                async with contextlib.aclosing(stream):
                    async for event in stream:
                        started = True
                        yield event
                return
            except EmbeddingsMissingError as exc:
                if started or isinstance(exc, SessionMediaEvictedError):
                    raise
                lost = [key for key in exc.missing_keys if key not in pending]
                if lost:
                    raise SessionMediaEvictedError(lost) from None
                if any(key in handed for key in exc.missing_keys):
                    # Only an LLM service that ignores inline rows does this; the caller can only retry.
                    raise NotReadyError("the embedding cache evicted this request's images again before they could "
                                        "be read (it is full); retry later") from None
                log.info("handing %d evicted image(s) over inline and retrying Generate", len(exc.missing_keys))
                self.metrics.missing_retries.inc()
                rows = await asyncio.gather(*(self._fetch(key, pending[key], conversation.adapter, deadline, key_salt)
                                              for key in exc.missing_keys))
                handed.update(zip(exc.missing_keys, rows, strict=True))

    def _count_embedding_bytes(self, conversation: Conversation, inline: dict[str, Embeddings] | None) -> None:
        inline = inline or {}
        self.metrics.embedding_bytes.labels("inline").inc(sum(len(e.data) for e in inline.values()))
        tiles = {ref.key: ref.num_tiles for ref in conversation.images() if ref.key not in inline}
        self.metrics.embedding_bytes.labels("reference").inc(sum(tiles.values()) * self.model.bytes_per_tile)

    def _tile_usage(self, conversation: Conversation, plan: Plan) -> Usage:
        """The request's image tiles (and their metrics, counted once per request); token counts left zero."""
        leaves = [leaf for ref in conversation.images() for leaf in ref.leaves()]
        fresh = {image.key for image in plan.images if image.encoded}
        encoded = 0
        for leaf in leaves:
            if leaf.key in fresh:
                encoded += leaf.num_tiles
                fresh.discard(leaf.key)  # a second occurrence in the prompt reuses the first
        total = sum(leaf.num_tiles for leaf in leaves)
        self.metrics.tiles_encoded.inc(encoded)
        self.metrics.tiles_reused.inc(total - encoded)
        return Usage(image_tiles=tuple(leaf.num_tiles for leaf in leaves), encoded_tiles=encoded,
                     reused_tiles=total - encoded)


def _videos(request: ChatRequest):
    for n, turn in enumerate(request.history):
        for i, part in enumerate(turn.user):
            if part.video is not None:
                yield f"history[{n}].user_content[{i}]", part.video
    for i, part in enumerate(request.content):
        if part.video is not None:
            yield f"content[{i}]", part.video


def check_same_model(vision: ModelInfo, llm: ModelInfo) -> None:
    """The gateway serves only when both pools loaded the same model (fingerprints equal): keys and prompts derive
    from it."""
    if vision.fingerprint != llm.fingerprint:
        raise ModelMismatchError(f"the vision service serves model {vision.fingerprint} ({vision.model_name}) "
                                 f"but the LLM service serves {llm.fingerprint} ({llm.model_name})")
    if set(vision.adapters) != set(llm.adapters):  # each pool lists them in its own --lora order
        def names(info: ModelInfo) -> str:
            return ", ".join(f"{a.name} ({a.digest})" for a in info.adapters) or "none"

        raise ModelMismatchError(f"the vision service serves LoRA adapters {names(vision)} but the LLM service "
                                 f"serves {names(llm)}: give both pools the same --lora flags")
    if vision.dtype and llm.dtype and vision.dtype != llm.dtype:
        log.warning("vision embeddings are %s but the LLM computes in %s", vision.dtype, llm.dtype)


def strip_item_prefix(message: str) -> str:
    """The vision service's message without its `items[i]: ` prefix (the gateway names the part instead)."""
    return _ITEM_PREFIX.sub("", message)
