"""vLLM's xgrammar structured-output backend over our vocabulary (installed by the plugin in vLLM's engine core,
services.llm.engine.vllm.plugin).

The vLLM engine hands every constraint to vLLM as the EBNF text our service compiles (services.llm.grammar
`constraint_ebnf`, as a `StructuredOutputsParams(grammar=...)`), so the grammar is ours: JSON without optional
whitespace and with JSON's characters in length-bounded strings. What vLLM's own backend would still do otherwise:

- its `TokenizerInfo` is xgrammar's `from_huggingface`, which lets InternVL's added tokens (`<img>`,
  `<IMG_CONTEXT>`, ...) into open strings as their literal text; ours (services.llm.grammar `build_tokenizer_info`)
  never allows them;
- its matchers take as stop tokens every stop token of the request, the tokenizer's eos among them (vLLM adds it even
  with `ignore_eos`); the original ends a turn only with `<|im_end|>`, which ours allows only where the grammar
  accepts.

`CheckpointXgrammarBackend` is vLLM's `XgrammarBackend` with those two things ours, for an engine whose tokenizer is
the checkpoint's (our tokenizer mode); any other engine in the process gets vLLM's backend unchanged.
"""

from __future__ import annotations

from vllm.v1.structured_output.backend_xgrammar import XgrammarBackend

from services.contract import template


class CheckpointXgrammarBackend(XgrammarBackend):
    def __post_init__(self):
        from services.llm.engine.vllm.plugin import TOKENIZER_MODE

        self.stop_token_id: int | None = None
        if self.vllm_config.model_config.tokenizer_mode != TOKENIZER_MODE:
            super().__post_init__()
            return
        import vllm.envs
        import xgrammar

        from services.llm.grammar import build_tokenizer_info

        self.stop_token_id = self.tokenizer.convert_tokens_to_ids(template.STOP_TOKEN)
        # What vLLM's __post_init__ sets, with our vocabulary (no speculative decoding in this engine).
        self.disable_any_whitespace = self.vllm_config.structured_outputs_config.disable_any_whitespace
        self.compiler = xgrammar.GrammarCompiler(
            build_tokenizer_info(self.tokenizer, self.vocab_size, self.stop_token_id), max_threads=8,
            cache_enabled=True, cache_limit_bytes=vllm.envs.VLLM_XGRAMMAR_CACHE_MB * 1024 * 1024)
        self.num_speculative_tokens = 0

    def compile_grammar(self, request_type, grammar_spec: str, stop_token_ids: set[int] | None = None):
        if self.stop_token_id is not None:
            stop_token_ids = {self.stop_token_id}
        return super().compile_grammar(request_type, grammar_spec, stop_token_ids=stop_token_ids)
