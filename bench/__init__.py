"""Benchmarks of the decoupled stack against transformers' own InternVL path on the same weights (issue 7).

`internvl-serve bench` (`make bench`) runs every scenario once per repeat and writes `bench/results/<date>.json`,
`<date>.md` and PNG plots. Modules, one job each: `settings` (what to run), `machine` (the processor, its measured
limits, resident memory), `workload` (synthetic images, videos, questions), `baseline` (transformers'
`InternVLForConditionalGeneration` built from the project's loader output), `stack` (`internvl-serve up` as a child
and its gRPC clients), `phases` (the timed runs), `scenarios` (raw timings to comparisons with targets), `results`
(statistics), `report` (JSON, markdown, plots) and `main` (the CLI).
"""
