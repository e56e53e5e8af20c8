"""Helpers the tests share: requests and their answers, media made on the fly, the LLM engine and its wire in
process. Test modules import them from here (or from the other helper modules beside tests/), never from another test
module or a conftest; `tests/test_layering.py` holds that rule."""
