"""A message of the chat completions request and its content parts, as pydantic models, and their translation into
the domain's parts (`gateway.chat_request`).

Roles `system` and `developer` (joined into the system message), `user`, `assistant`; content a string or a list of
parts: `text`, `image_url` (`url`: a `data:` URL, an http(s) URL, or a path under the media root; `detail`: `low`,
`high` or `auto`), and the `video` extension part:

    {"type": "video", "video": {"url": "data:video/mp4;base64,..." | "https://..." | "path": "clips/a.mp4",
                                "num_segments": 8, "bound": [start_s, end_s], "max_num": 1}}

URLs are decoded or fetched later, off the event loop, with the rest of the media (`gateway.media`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.chat_request import (
    DEFAULT_FRAME_MAX_NUM,
    DEFAULT_NUM_SEGMENTS,
    ContentPart,
    ImageDetail,
    ImageInput,
    VideoInput,
)
from gateway.openai.fields import Integer, Model, problem, to_float

# The error type of a part whose `type` this API does not take (pydantic raises it: `protocol.invalid_argument`).
UNSUPPORTED_PART = "internvl_unsupported_part"
PART_TYPES = ("text", "image_url", "video")
ROLES = ("system", "developer", "user", "assistant")
# A message's fields beside role and content, refused (unless null) with the reason.
REFUSED_MESSAGE_FIELDS = {
    "name": "participant names are not part of the internvl2_5 template",
    "tool_calls": "tool calling is not supported",
    "tool_call_id": "tool calling is not supported",
    "function_call": "function calling is not supported",
    "audio": "audio is not supported",
    "refusal": "assistant refusals cannot be replayed",
}


def _is_url(text: str) -> bool:
    """A URL the gateway decodes or fetches (anything else names a file under the media root)."""
    return text.lower().startswith(("data:", "http://", "https://"))


class TextPart(Model):
    type: Literal["text"]
    text: str

    def content_part(self) -> ContentPart:
        return ContentPart(text=self.text)


def _non_empty_string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise problem(" must be a non-empty string")
    return value


def _detail(value: Any) -> ImageDetail:
    try:
        return ImageDetail(value or "auto")
    except ValueError:
        raise problem(f" must be 'low', 'high' or 'auto', got {value!r}") from None


class ImageURL(Model):
    # A field defaulting to None but validated anyway (validate_default) is refused when missing, so the document
    # lists it as required; pydantic would not.
    model_config = ConfigDict(json_schema_extra={"required": ["url"]})

    url: Annotated[str, PlainValidator(_non_empty_string, json_schema_input_type=Annotated[str, Field(min_length=1)])] = (
        Field(None, validate_default=True, json_schema_extra={"description": "A data: URL, an http(s) URL, or a path "
                                                                             "under the gateway's media root."}))
    detail: Annotated[ImageDetail, PlainValidator(_detail, json_schema_input_type=Literal["low", "high", "auto"] | None)
                      ] = Field(None, validate_default=True)


def _url_object(value: Any) -> dict:
    """OpenAI's `{"url": ..., "detail": ...}`; anything else is taken as the URL itself."""
    return value if isinstance(value, dict) else {"url": value}


class ImagePart(Model):
    model_config = ConfigDict(json_schema_extra={"required": ["type", "image_url"]})

    type: Literal["image_url"]
    image_url: Annotated[ImageURL, BeforeValidator(_url_object, json_schema_input_type=ImageURL | str)] = Field(
        None, validate_default=True)

    def content_part(self) -> ContentPart:
        url, detail = self.image_url.url, self.image_url.detail
        return ContentPart(image=ImageInput(url=url, detail=detail) if _is_url(url)
                           else ImageInput(path=url, detail=detail))


def _bound(value: Any) -> tuple[float, float]:
    if not (isinstance(value, list) and len(value) == 2):
        raise problem(" must be [start_seconds, end_seconds]")
    return to_float(value[0]), to_float(value[1])


class VideoSpec(Model):
    """The video part's object: exactly one source (a data: or http(s) `url`, or a `path`), and the sampling."""

    url: str | None = None
    path: str | None = None
    num_segments: Integer | None = None
    max_num: Integer | None = None
    bound: Annotated[tuple[float, float], PlainValidator(_bound, json_schema_input_type=tuple[float, float])] | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_source(cls, spec: Any) -> dict:
        if not isinstance(spec, dict):
            raise problem(" must be an object")
        url, path = spec.get("url"), spec.get("path")
        if isinstance(url, str) and _is_url(url):
            return {**spec, "url": url, "path": None}
        if isinstance(path or url, str):  # a `url` that is not one names a file too
            return {**spec, "url": None, "path": path or url}
        raise problem(" needs a url (a data: or http(s) URL) or a path")


class VideoPart(Model):
    model_config = ConfigDict(json_schema_extra={"required": ["type", "video"]})

    type: Literal["video"]
    video: VideoSpec = Field(None, validate_default=True)

    def content_part(self) -> ContentPart:
        v = self.video
        return ContentPart(video=VideoInput(
            url=v.url, path=v.path, bound=v.bound,
            num_segments=DEFAULT_NUM_SEGMENTS if v.num_segments is None else v.num_segments,
            max_num=DEFAULT_FRAME_MAX_NUM if v.max_num is None else v.max_num))


def _part_type(part: Any) -> str | None:
    """The part's `type` if this API takes it (a text part must have text), else None: refused, naming the type."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and not isinstance(part.get("text"), str):
        return None
    return kind if kind in PART_TYPES else None


Part = Annotated[Annotated[TextPart, Tag("text")] | Annotated[ImagePart, Tag("image_url")]
                 | Annotated[VideoPart, Tag("video")],
                 Discriminator(_part_type, custom_error_type=UNSUPPORTED_PART,
                               custom_error_message="unsupported part type")]


class Message(Model):
    model_config = ConfigDict(json_schema_extra={"required": ["role", "content"]})

    role: Literal["system", "developer", "user", "assistant"]
    content: list[Part] = Field(None, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _taken(cls, message: Any) -> Any:
        """A message's refused fields, then its role (which decides how its content is read)."""
        if isinstance(message, dict):
            for name, reason in REFUSED_MESSAGE_FIELDS.items():
                if message.get(name) is not None:
                    raise problem(f".{name} is not supported: {reason}")
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise problem(f": unsupported role {role!r} (system, user, assistant)")
        return message

    @field_validator("content", mode="before", json_schema_input_type=str | Annotated[list[Part], Field(min_length=1)])
    @classmethod
    def _as_parts(cls, content: Any, info: ValidationInfo) -> Any:
        """A string is one text part; an assistant's missing (or empty) content is empty text."""
        if info.data.get("role") == "assistant" and not content:
            return []
        if isinstance(content, str):
            return [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise problem(" must be a string or a list of parts")
        if not content:
            raise problem(" is an empty list")
        return content

    @model_validator(mode="after")
    def _text_only(self) -> Message:
        if self.role != "user" and not all(isinstance(p, TextPart) for p in self.content):
            raise problem(": only text is allowed here")
        return self

    def parts(self) -> tuple[ContentPart, ...]:
        return tuple(p.content_part() for p in self.content)

    def text(self) -> str:
        """A system or assistant message's text (its parts are all text)."""
        return "".join(p.text for p in self.content)
