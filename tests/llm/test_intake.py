"""The LLM service's refusals before any work: a model it does not serve, a full queue (requests in preparation
included)."""

from __future__ import annotations

import pytest

from services.contract.errors import NotFoundError, OverloadedError
from services.llm.intake import Intake


def test_an_adapter_not_served_is_not_found_naming_those_served():
    intake = Intake(("q-plain", "q-rslora"), max_queue=4, waiting=lambda: 0)
    intake.check_adapter("")
    intake.check_adapter("q-rslora")
    with pytest.raises(NotFoundError, match=r"^model 'nope' is not served by this LLM server \(adapters: q-plain, "
                                            r"q-rslora\)$"):
        intake.check_adapter("nope")
    with pytest.raises(NotFoundError, match=r"\(adapters: none\)"):
        Intake((), max_queue=4, waiting=lambda: 0).check_adapter("q-plain")


def test_requests_in_preparation_and_in_the_engine_share_the_queue():
    engine = {"waiting": 1}
    intake = Intake((), max_queue=3, waiting=lambda: engine["waiting"])
    with intake.queued(), intake.queued():
        assert intake.preparing == 2
        refused = pytest.raises(OverloadedError, match=r"^the LLM server's queue is full \(3 waiting requests\)$")
        with refused, intake.queued():
            pytest.fail("a fourth request was taken")
    engine["waiting"] = 3  # both handed to the engine, which has not admitted them yet
    with pytest.raises(OverloadedError), intake.queued():
        pass
    engine["waiting"] = 2
    with intake.queued():
        assert intake.preparing == 1


def test_a_request_whose_preparation_fails_gives_its_place_back():
    intake = Intake((), max_queue=1, waiting=lambda: 0)
    with pytest.raises(ValueError), intake.queued():
        raise ValueError("its prompt is too long")
    assert intake.preparing == 0
    with intake.queued():
        pass
