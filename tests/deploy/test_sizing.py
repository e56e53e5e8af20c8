"""The README's sizing table (tests/deploy/sizing.py computes it): the shapes add up to the InternVL 2.5 report's
parameter counts, the README carries exactly the computed table, and the GPU overlays give each pod the GPUs the
table says for their model."""

import manifest_checks as mc
import pytest
import sizing


@pytest.mark.parametrize("size", sizing.SIZES, ids=[s.name for s in sizing.SIZES])
def test_the_shapes_add_up_to_the_reports_parameter_counts(size):
    assert round((size.llm_params() + size.vision_params()) / 1e9, 1) == size.report_params_b


def test_the_readme_carries_the_computed_table():
    assert sizing.table() in (mc.REPO / "README.md").read_text()


@pytest.mark.parametrize("gpu_overlay", ["gpu", "gpu-redis-cluster", "gpu-large"])
def test_each_gpu_overlay_gives_its_pods_the_tables_gpus(gpu_overlay):
    objects = mc.render(gpu_overlay)
    model = mc.one(objects, "ConfigMap", "internvl-config")["data"]["model"].rsplit("/", 1)[1]
    size = next(s for s in sizing.SIZES if model == f"InternVL2_5-{s.name}")
    llm, vision = mc.servers(objects)["llm"], mc.servers(objects)["vision"]
    assert mc.gpu_count(llm.container) == llm.args.tensor_parallel_size == size.llm_gpus()
    assert mc.gpu_count(vision.container) == 1
