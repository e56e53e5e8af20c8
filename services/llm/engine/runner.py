"""The transformers engine's model runner: the KV batch, prefill, forks, sampling, LoRA rows, the prefix cache.

`ModelRunner.step` runs one `StepPlan` (services.llm.engine.step) in the engine's worker thread; every torch kernel
of the engine runs on that one thread (see services.runtime.own_thread):

1. the plan's leaving rows drop out of the batch (their KV offered to the prefix cache when a stop string ended them);
2. one decode forward for every row of the batch (`KVBatch`, which writes the new position in place);
3. one prefill forward for the plan's chunks of several prompts together (`prefill_forward`); a prompt's first chunk
   first turns its inputs into tensors and checks them (`_prepare`);
4. one vectorised sampling call for every row that needs a token (one host sync): the decode rows, then each completed
   prompt's answers (the prompt's last logits repeated per answer: the fork). Rows that sampled the stop token or
   reached their length leave the batch (their KV offered to the prefix cache); the completed prompts' other answers
   join it, the prompt's KV copied into a row each.

Requests for LoRA adapters (`EngineRequest.adapter`, installed in the model as `services.model.lora.AdapterSlots`)
share every forward with each other and with the base: each forward is told the adapter slot of each of its rows.
The prefix cache keeps each entry under its adapter.

Faults are confined: an error in a prefill forward of several prompts is retried prompt by prompt, and only the one
that fails alone fails (out of memory: OverloadedError; otherwise INTERNAL); an error sampling one row fails that row;
an error in the decode forward (the shared batch state) fails every row with `BatchFaultError`, drops the batch and
runs on.

`admit`, `release` and `reset` run on the event loop's thread between steps, never during one, and launch no torch
kernel (the prefix cache's lookup slices views).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import PreTrainedModel

from services.contract.errors import InternVLError, OverloadedError
from services.contract.finish import FinishReason
from services.llm.engine.api import StepReport
from services.llm.engine.batch import KVBatch, KVShape, PrefillRow, prefill_forward
from services.llm.engine.events import EngineRequest, check_image_rows
from services.llm.engine.prefix_cache import LayerKV, PrefixCache, prompt_identity
from services.llm.engine.sampling import Sampler, sample_batch
from services.llm.engine.step import NewPrompt, Sampled, StepPlan, StepResult, batch_fault
from services.model.lora import AdapterSlots

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Row:
    """One answer on the runner's side: what its row of the forwards and its sampling need."""

    id: int
    request: EngineRequest  # without image rows; `sampling` is this answer's
    slot: int  # its adapter's slot in the AdapterSlots (0: the base)
    identity: np.ndarray  # the prompt's position identities [prompt], the prefix cache's key
    sampler: Sampler | None = None  # made before the prompt's first chunk, on the worker thread
    generated: list[int] = field(default_factory=list)

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt)


@dataclass(eq=False)
class _Prompt:
    """A prompt being prefilled, and its answers, which fork from it when its prefill completes."""

    answers: list[_Row]
    # Each image's embeddings ([tiles * tokens_per_tile, hidden], in prompt.images order) until the first chunk; then
    # all of them in slot order [slots, hidden], dropped when the prefill completes.
    image_parts: tuple[torch.Tensor, ...] = ()
    image_rows: torch.Tensor | None = None
    ids: torch.Tensor | None = None  # the prompt's token ids [prompt], from the first chunk on
    past: list[LayerKV] | None = None  # KV of its first `prefilled` positions, per layer [kv_heads, prefilled, dim]
    prefilled: int = 0
    slots_filled: int = 0  # image slots among the first `prefilled` positions

    @property
    def head(self) -> _Row:
        """Answer 0, whose id names the prompt."""
        return self.answers[0]

    @property
    def length(self) -> int:
        return self.head.prompt_len


class ModelRunner:
    """One transformers causal LM (Qwen2 or Llama layout) and the KV state of the sequences it computes."""

    def __init__(self, model: PreTrainedModel, *, stop_token_id: int, img_context_id: int, max_context_tokens: int,
                 prefix_cache_budget_bytes: int = 0, adapters: AdapterSlots | None = None):
        self.model = model
        self.adapters = adapters
        self.stop_token_id = stop_token_id
        self.img_context_id = img_context_id
        self.max_context_tokens = max_context_tokens
        self.prefix_cache = PrefixCache(prefix_cache_budget_bytes)
        self.device = model.device
        self.dtype = model.dtype
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.kv_bytes_per_token = KVShape.of(model).bytes_per_token
        self.steps = 0
        self.max_batch_size_seen = 0
        self._batch = KVBatch(model)
        self._rows: list[_Row] = []  # in batch-row order
        self._prompts: dict[int, _Prompt] = {}  # admitted, not yet forked, by NewPrompt.id

    # -- the event loop's thread, between steps -------------------------------------------------------------------

    def admit(self, new: NewPrompt) -> int:
        """Takes an admitted request; returns the prompt positions the prefix cache already holds (where its first
        chunk starts). Raises the error its caller gets when its inputs are unusable."""
        try:
            request = new.request
            prompt = request.prompt
            identity = prompt_identity(prompt.token_ids, prompt.image_keys, self.img_context_id)
            slot = self._slot(request.adapter)
            match = self.prefix_cache.lookup(identity, max_length=len(prompt) - 1, adapter=request.adapter,
                                             salt=request.cache_salt)
        except Exception as exc:  # noqa: BLE001 - this request's inputs only
            raise _request_error(exc, len(new.request.prompt), new.request.request_id or new.id) from None
        answers = [_Row(answer, dataclasses.replace(request, image_rows=(), sampling=request.sampling.for_answer(i)),
                        slot, identity) for i, answer in enumerate(new.answers)]
        entry = _Prompt(answers, image_parts=request.image_rows)
        if match is not None:
            entry.past, entry.prefilled = match.layers, match.length
            entry.slots_filled = int(np.count_nonzero(np.asarray(prompt.token_ids[:match.length])
                                                      == self.img_context_id))
        self._prompts[new.id] = entry
        return entry.prefilled

    def release(self, prompt: int) -> None:
        """Forgets an admitted prompt that has not forked (its caller is gone): its past KV and image rows go."""
        self._prompts.pop(prompt, None)

    def reset(self) -> None:
        """Drops the batch and every admitted prompt: after a step that raised, nothing in them can be trusted."""
        self._rows, self._prompts = [], {}
        self._batch = KVBatch(self.model)

    def _slot(self, adapter: str) -> int:
        # The service refuses a model it does not serve before any work (services.llm.intake): a name unknown
        # here is a caller's bug, answered INTERNAL.
        if not adapter:
            return 0
        if self.adapters is None or adapter not in self.adapters.slot:
            raise KeyError(f"adapter {adapter!r} is not installed in this engine's model")
        return self.adapters.slot[adapter]

    # -- the worker thread ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> StepResult:
        result = StepResult()
        for leave in plan.leaving:
            self._leave(self._position(leave.id), remember=leave.remember)
        if {row.id for row in self._rows} != plan.decode:
            raise RuntimeError(f"the plan decodes {sorted(plan.decode)}, the batch holds "
                               f"{sorted(row.id for row in self._rows)}")
        decoding, decode_logits = self._decode(result)
        prefill_logits, completed, fed = self._prefill(plan, result)
        rows = decoding + [row for row, _ in completed]
        logits = [t for t in (decode_logits, prefill_logits) if t is not None]
        if rows:
            self._sample(rows, torch.cat(logits) if len(logits) > 1 else logits[0], result)
        self._settle(completed, result)
        self.steps += 1
        result.report = StepReport(len(decoding), len(plan.prefill), fed)
        result.kv_bytes = self._batch.nbytes
        return result

    def _decode(self, result: StepResult) -> tuple[list[_Row], torch.Tensor | None]:
        """The decode forward of every row; its next-token logits [rows, vocab]. A failure drops the batch."""
        decoding = list(self._rows)
        if not decoding:
            return [], None
        try:
            tokens = torch.tensor([row.generated[-1] for row in decoding], device=self.device)
            with self._adapter_rows(decoding):
                logits = self._batch.forward(tokens)
        except Exception as exc:  # noqa: BLE001 - the batch state is suspect: drop it, serve on
            error = batch_fault(exc, len(self._rows))
            result.failed += [(row.id, error) for row in self._rows]
            self._rows, self._batch = [], KVBatch(self.model)
            decoding, logits = [], None
        self.max_batch_size_seen = max(self.max_batch_size_seen, len(decoding))
        return decoding, logits

    def _settle(self, completed: list[tuple[_Row, list[LayerKV]]], result: StepResult) -> None:
        """Rows that ended leave the batch, their KV offered to the prefix cache; the answers of completed prompts
        join it, but those that ended (their KV offered too) or failed."""
        for row_id in [s.id for s in result.sampled if s.ended is not None]:
            position = self._position(row_id, missing_ok=True)
            if position is not None:
                self._leave(position, remember=True)
        failed = {row_id for row_id, _ in result.failed}
        ended = {s.id for s in result.sampled if s.ended is not None}
        joining = []
        for row, kv in completed:
            if row.id in ended:  # finished on its first token: its prompt's KV never joins the batch
                self._remember(row, lambda kv=kv: [(k.clone(), v.clone()) for k, v in kv])
            elif row.id not in failed:
                joining.append((row, kv))
        self._batch.add([kv for _, kv in joining])
        self._rows += [row for row, _ in joining]

    def _position(self, row_id: int, missing_ok: bool = False) -> int | None:
        for position, row in enumerate(self._rows):
            if row.id == row_id:
                return position
        if missing_ok:
            return None
        raise RuntimeError(f"sequence {row_id} has no row in the batch")

    def _leave(self, position: int, remember: bool) -> None:
        """Removes the row at `position` (offering its KV to the prefix cache first when `remember`); the last row
        takes its place."""
        if remember:
            self._remember(self._rows[position], lambda: self._batch.row(position))
        self._batch.remove(position)
        self._rows[position] = self._rows[-1]
        self._rows.pop()

    def _prefill(self, plan: StepPlan, result: StepResult
                 ) -> tuple[torch.Tensor | None, list[tuple[_Row, list[LayerKV]]], int]:
        """Runs the plan's chunks in one forward (one at a time when that fails, to find the request at fault).

        Returns the next-token logits of the answers of the prompts it completed [answers, vocab], those answers with
        their prompt's KV (per layer [kv_heads, prompt, head_dim], shared by a prompt's answers), and the number of
        prompt tokens fed.
        """
        chunks = []
        for chunk in plan.prefill:
            prompt = self._prompts[chunk.prompt]
            try:
                self._prepare(prompt)
            except Exception as exc:  # noqa: BLE001 - this request's inputs only
                self._fail_prompt(prompt, exc, result)
            else:
                chunks.append((prompt, chunk.end))
        if not chunks:
            return None, [], 0
        try:
            hidden, done, fed = self._prefill_together(chunks)
        except Exception as exc:  # noqa: BLE001 - find which request it was
            if len(chunks) == 1:
                self._fail_prompt(chunks[0][0], exc, result)
                return None, [], 0
            log.warning("a prefill of %d prompts failed (%s); retrying them one by one", len(chunks), exc)
            parts, done, fed = [], [], 0
            for chunk in chunks:
                try:
                    part, part_done, part_fed = self._prefill_together([chunk])
                except Exception as one_exc:  # noqa: BLE001 - this request's fault only
                    self._fail_prompt(chunk[0], one_exc, result)
                    continue
                parts.append(part)
                done += part_done
                fed += part_fed
            hidden = torch.cat(parts) if parts else None
        if not done:
            return None, [], fed
        for prompt, _ in done:
            del self._prompts[prompt.head.id]
        with self._adapter_rows([prompt.head for prompt, _ in done]):
            logits = self.model.get_output_embeddings()(hidden)
        result.completed += [prompt.head.id for prompt, _ in done]
        return self._fork(logits, done) + (fed,)

    def _fail_prompt(self, prompt: _Prompt, exc: BaseException, result: StepResult) -> None:
        self._prompts.pop(prompt.head.id, None)
        result.failed.append((prompt.head.id, _request_error(exc, prompt.length,
                                                             prompt.head.request.request_id or prompt.head.id)))

    @staticmethod
    def _fork(logits: torch.Tensor, done: list[tuple[_Prompt, list[LayerKV]]]
              ) -> tuple[torch.Tensor, list[tuple[_Row, list[LayerKV]]]]:
        """Completed prompts' logits [completed, vocab] and KV, as each prompt's answers sharing both (the batch
        copies the KV into a row per answer): [answers, vocab]."""
        answers = [(row, kv) for prompt, kv in done for row in prompt.answers]
        if len(answers) == len(done):
            return logits, answers
        counts = torch.tensor([len(prompt.answers) for prompt, _ in done], device=logits.device)
        return logits.repeat_interleave(counts, dim=0), answers

    def _prepare(self, prompt: _Prompt) -> None:
        """Before a prompt's first chunk, on the model's thread: token ids, samplers, the image rows in slot order,
        checked."""
        if prompt.ids is not None:
            return
        # Caught here, the request fails alone and clearly.
        check_image_rows(prompt.head.request.prompt.images, prompt.image_parts)
        if prompt.image_parts:
            prompt.image_rows = torch.cat(prompt.image_parts).to(device=self.device, dtype=self.dtype)
            prompt.image_parts = ()
        for row in prompt.answers:
            row.sampler = Sampler(row.request.sampling, self.vocab_size, self.device, grammar=row.request.grammar)
        prompt.ids = torch.tensor(prompt.head.request.prompt.token_ids, device=self.device)

    def _prefill_together(self, chunks: list[tuple[_Prompt, int]]
                          ) -> tuple[torch.Tensor | None, list[tuple[_Prompt, list[LayerKV]]], int]:
        """One prefill forward of `chunks` (prompt, end); the last hidden state of the prompts it completed
        [completed, hidden], those prompts with their KV, and the prompt tokens fed."""
        rows = [PrefillRow(prompt.past, prompt.prefilled, self._chunk_embeds(prompt, end)) for prompt, end in chunks]
        with self._adapter_rows([prompt.head for prompt, _ in chunks]):
            hidden, kv = prefill_forward(self.model, rows)
        done, keep = [], []
        for i, ((prompt, end), layers) in enumerate(zip(chunks, kv, strict=True)):
            prompt.slots_filled += int(np.count_nonzero(
                np.asarray(prompt.head.request.prompt.token_ids[prompt.prefilled:end]) == self.img_context_id))
            prompt.prefilled = end
            if end < prompt.length:
                prompt.past = [(k.clone(), v.clone()) for k, v in layers]  # owns its memory; the forward's buffer goes
            else:
                prompt.past = prompt.image_rows = None
                done.append((prompt, layers))
                keep.append(i)
        fed = sum(end - row.past_length for (_, end), row in zip(chunks, rows, strict=True))
        return (hidden[keep] if keep else None), done, fed

    def _chunk_embeds(self, prompt: _Prompt, end: int) -> torch.Tensor:
        """Input embeddings of prompt positions [prefilled, end), image rows in their slots: [end - prefilled, hidden]."""
        chunk = prompt.ids[prompt.prefilled:end]
        embeds = self.model.get_input_embeddings()(chunk)
        if prompt.image_rows is not None:
            slots = chunk == self.img_context_id
            count = int(slots.sum())
            if count:
                embeds[slots] = prompt.image_rows[prompt.slots_filled:prompt.slots_filled + count]
        return embeds

    def _sample(self, rows: list[_Row], logits: torch.Tensor, result: StepResult) -> None:
        """One token for each row of `logits` [rows, vocab]; a row whose sampling fails fails alone."""
        try:
            picked = list(zip(rows, *sample_batch(logits, [row.sampler for row in rows]), strict=True))
        except Exception as exc:  # noqa: BLE001 - find the row at fault
            log.warning("sampling %d rows failed (%s); sampling them one by one", len(rows), exc)
            picked = []
            for i, row in enumerate(rows):
                try:
                    [token], [report] = sample_batch(logits[i:i + 1], [row.sampler])
                except Exception as one_exc:  # noqa: BLE001 - this request's fault only
                    result.failed.append((row.id, _request_error(one_exc, row.prompt_len,
                                                                 row.request.request_id or row.id)))
                    if row in self._rows:  # a completed prompt's answer is kept from joining by `_settle`
                        self._leave(self._rows.index(row), remember=False)
                    continue
                picked.append((row, token, report))
        for row, token, report in picked:
            row.generated.append(token)
            ended = None
            if token == self.stop_token_id:
                ended = FinishReason.STOP
            elif (len(row.generated) >= row.request.max_new_tokens
                  or row.prompt_len + len(row.generated) >= self.max_context_tokens):
                ended = FinishReason.LENGTH
            result.sampled.append(Sampled(row.id, token, report, ended))

    def _adapter_rows(self, rows: list[_Row]):
        """The adapter slot of each row of the forward inside (row i is `rows[i]`'s)."""
        if self.adapters is None:
            return contextlib.nullcontext()
        return self.adapters.rows([row.slot for row in rows], self.device)

    def _remember(self, row: _Row, layers: Callable[[], list[LayerKV]]) -> None:
        """Offers a finished row's KV (`layers()` extracts it) to the prefix cache: the prompt and every generated
        token but the last, which was never fed back."""
        length = row.prompt_len + len(row.generated) - 1
        if not self.prefix_cache.enabled or length * self.kv_bytes_per_token > self.prefix_cache.budget_bytes:
            return
        fed = np.asarray(row.generated[:-1], dtype=np.int64)
        self.prefix_cache.insert(np.concatenate([row.identity, fed]), layers(), adapter=row.request.adapter,
                                 salt=row.request.cache_salt)


def _request_error(exc: BaseException, prompt_tokens: int, name: object) -> BaseException:
    """What a caller is told when computing its request (`name`: its request id, or else its sequence id) failed."""
    if isinstance(exc, InternVLError):
        return exc
    if isinstance(exc, torch.OutOfMemoryError):
        return OverloadedError(f"the LLM server ran out of memory computing this request ({prompt_tokens} prompt "
                               "tokens); retry later or with a shorter conversation")
    log.error("request %s failed: %s: %s", name, type(exc).__name__, exc)
    return InternVLError(f"the LLM server failed computing this request ({type(exc).__name__}); other requests "
                         "are unaffected")
