"""Media items per request and per conversation: counted from the request's parts and the session's references,
before any media is fetched, read, decoded or encoded.

An item is one image or one video (a video counts one, whatever the frames it is sampled into: `--max-video-
frames` and `--max-request-tiles` bound those). Images under one combined placeholder count one each, as the
caller sent them.
"""

from __future__ import annotations

from gateway.chat_request import ChatRequest, ContentPart
from gateway.sessions import Session
from services.contract.conversation import ImageRef, VideoRef
from services.contract.errors import InvalidArgumentError


def request_media_items(request: ChatRequest) -> int:
    """The images and videos of the request's new turn and of the history it carries."""
    parts: list[ContentPart] = [*request.content, *(part for turn in request.history for part in turn.user)]
    return sum(part.image is not None or part.video is not None for part in parts)


def session_media_items(session: Session) -> int:
    """The images and videos of the session's earlier turns (a combined reference counts the images it combines)."""
    count = 0
    for turn in session.turns:
        for part in turn.user_parts:
            if isinstance(part, ImageRef):
                count += len(part.leaves())
            elif isinstance(part, VideoRef):
                count += 1
    return count


def check_request_media(items: int, limit: int) -> None:
    """Refuses a request with more than `limit` (--max-media-items) images and videos."""
    if items > limit:
        raise InvalidArgumentError(f"the request carries {items} images and videos (its history included); at most "
                                   f"{limit} per request (--max-media-items): send fewer")


def check_conversation_media(items: int, earlier: int, limit: int) -> None:
    """Refuses a round that would bring the conversation above `limit` (--max-conversation-media-items) images and
    videos: `items` this request's, `earlier` the session's."""
    if items + earlier > limit:
        raise InvalidArgumentError(
            f"the conversation would hold {items + earlier} images and videos ({earlier} from earlier rounds of the "
            f"session); at most {limit} per conversation (--max-conversation-media-items): start a new session or "
            "send fewer")
