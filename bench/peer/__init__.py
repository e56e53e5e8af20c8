"""The peer benchmark: `vllm serve` on the benchmark's checkpoint beside our stack (with the vLLM engine and with the
transformers engine), on the same machine, in one run; scenarios 10-14 of `internvl-serve bench` (see `phases`)."""
