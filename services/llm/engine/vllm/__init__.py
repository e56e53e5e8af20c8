"""The vLLM engine (`engine.VLLMEngine`, built by `build.build_vllm_engine`) and vLLM's plugin (`plugin.register`).

Nothing is imported here: vLLM imports `plugin` in every process it starts, and those need none of the engine.
"""
