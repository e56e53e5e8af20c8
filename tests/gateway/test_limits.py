"""Media items per request and per conversation (gateway.limits), counted from the parts before any media is read."""

from __future__ import annotations

import pytest

from gateway.chat_request import CallerTurn, ChatRequest, ContentPart, ImageInput, VideoInput
from gateway.limits import (
    check_conversation_media,
    check_request_media,
    request_media_items,
    session_media_items,
)
from gateway.sessions import Session
from services.contract.conversation import ImageRef, Turn, VideoRef
from services.contract.errors import InvalidArgumentError

IMAGE = ContentPart(image=ImageInput(path="a.png"))
VIDEO = ContentPart(video=VideoInput(path="v.mp4"))
TEXT = ContentPart(text="hi")


def test_a_request_counts_its_images_and_videos_history_included():
    request = ChatRequest(content=(IMAGE, TEXT, VIDEO), history=(CallerTurn((IMAGE, IMAGE, TEXT), "ok"),))
    assert request_media_items(request) == 4  # a video counts one, text none
    check_request_media(4, 4)
    with pytest.raises(InvalidArgumentError, match=r"^the request carries 5 images and videos \(its history "
                                                   r"included\); at most 4 per request \(--max-media-items\)"):
        check_request_media(5, 4)


def test_a_session_counts_each_combined_image_and_each_video_once():
    frames = (ImageRef("f1", 1), ImageRef("f2", 1), ImageRef("f3", 1))
    combined = ImageRef("c", 2, combined=(ImageRef("a", 1), ImageRef("b", 1)))
    session = Session("s", turns=(Turn((ImageRef("x", 5), "look"), "seen"), Turn((VideoRef(frames), combined), "ok")))
    assert session_media_items(session) == 4
    check_conversation_media(2, 4, 6)
    with pytest.raises(InvalidArgumentError, match=r"^the conversation would hold 7 images and videos \(4 from "
                                                   r"earlier rounds of the session\); at most 6 per conversation "
                                                   r"\(--max-conversation-media-items\)"):
        check_conversation_media(3, 4, 6)
