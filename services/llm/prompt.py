"""From a conversation with image references to the exact token ids the original `chat()` feeds the model.

Placement of images in a user turn (both the new turn and every turn of history, rendered the same way):

* Text parts are concatenated in order. If that text contains `<image>` placeholders, the turn's images (ImageRef
  parts and each frame of a VideoRef, all in part order) fill them in order; the counts must be equal.
* If the text has no placeholder, the images go in front of the text, as the original's conventions write them:
  one lone image -> `<image>\\n{text}` (what `chat()` prepends); several images -> `Image-1: <image>\\nImage-2:
  <image>\\n{text}` (the original multi-image example); a video -> `Frame1: <image>\\nFrame2: <image>\\n{text}`
  (the original video example). Images and videos mixed in one turn are numbered `Image-k` and `Frame-j`
  in part order.

Then the `internvl2_5` template renders system message, history and question (services.contract.template), and each
image becomes `<img>` + 256*tiles `<IMG_CONTEXT>` + `</img>`. The run of `<IMG_CONTEXT>` ids is inserted after
tokenisation: the prompt is tokenised with each image written `<img></img>` (both are special tokens that split the
text, so the ids are exactly those of the expanded string) and a 13-tile image costs no 3,328-token string.

Text is taken literally, as the original takes it, with two exceptions: `<image>` is a placeholder, and
`<IMG_CONTEXT>` is refused (it would open an embedding slot that no image fills). A literal `<img>` (a question about
HTML, say) tokenises to the same special token the original gives it and is told apart from the image markers by
its position in the string.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from services.contract import template
from services.contract.conversation import Conversation, ImageRef, Part, VideoRef, part_images
from services.contract.errors import ContextTooLongError, InvalidArgumentError


@dataclass(frozen=True)
class Prompt:
    """The token ids to prefill and the images whose embeddings fill their `<IMG_CONTEXT>` runs, in order."""

    # The rendered prompt with every image still written `<img></img>` (see `expanded_text`).
    text: str
    token_ids: tuple[int, ...] = field(repr=False)
    images: tuple[ImageRef, ...]
    tokens_per_tile: int
    # Offset in `text` of each image's `<img></img>`, in image order.
    image_offsets: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def image_keys(self) -> list[str]:
        return [image.key for image in self.images]

    @property
    def expanded_text(self) -> str:
        """Exactly the string the original tokenises (each image as `<img>` + IMG_CONTEXT run + `</img>`)."""
        out, previous = [], 0
        for image, offset in zip(self.images, self.image_offsets, strict=True):
            out += [self.text[previous:offset], template.image_tokens(image.num_tiles, self.tokens_per_tile)]
            previous = offset + len(_MARKER)
        return "".join(out) + self.text[previous:]


_MARKER = template.IMG_START + template.IMG_END


def render_question(parts: Sequence[Part], where: str = "user_parts") -> str:
    """One user turn as the question text, images still as `<image>` placeholders (rules in the module doc)."""
    text = ""
    for index, part in enumerate(parts):
        if isinstance(part, str):
            template.check_text(part, f"{where}[{index}].text")
            text += part
        elif isinstance(part, ImageRef):
            if not part.key:
                raise InvalidArgumentError(f"{where}[{index}].image has an empty key")
            if part.num_tiles < 1:
                raise InvalidArgumentError(f"{where}[{index}].image.num_tiles must be >= 1, got {part.num_tiles}")
        elif isinstance(part, VideoRef):
            if not part.frames:
                raise InvalidArgumentError(f"{where}[{index}].video has no frames")
            for frame_index, frame in enumerate(part.frames):
                if not frame.key or frame.num_tiles < 1:
                    raise InvalidArgumentError(f"{where}[{index}].video.frames[{frame_index}] needs a key and "
                                               "num_tiles >= 1")
        else:  # pragma: no cover - the wire layer builds only the three kinds
            raise InvalidArgumentError(f"{where}[{index}] is empty")
    images = part_images(parts)
    placeholders = template.count_placeholders(text)
    if placeholders:
        if placeholders != len(images):
            raise InvalidArgumentError(f"{where} has {placeholders} <image> placeholders but {len(images)} images "
                                       "(video frames count one each)")
        return text
    if not images:
        return text
    media = [p for p in parts if not isinstance(p, str)]
    if len(media) == 1 and isinstance(media[0], ImageRef):
        return template.IMAGE_PLACEHOLDER + "\n" + text
    if all(isinstance(p, ImageRef) for p in media):
        return template.multi_image_prefix(len(media)) + text
    if len(media) == 1:
        return template.video_prefix(len(media[0].frames)) + text
    prefix, image_no, frame_no = "", 0, 0
    for part in media:
        if isinstance(part, ImageRef):
            image_no += 1
            prefix += f"Image-{image_no}: {template.IMAGE_PLACEHOLDER}\n"
        else:
            for _ in part.frames:
                frame_no += 1
                prefix += f"Frame{frame_no}: {template.IMAGE_PLACEHOLDER}\n"
    return prefix + text


class PromptBuilder:
    """Renders conversations with one checkpoint's tokenizer, default system message and tile size."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, tokens_per_tile: int,
                 default_system_message: str | None, max_context_tokens: int):
        self.tokenizer = tokenizer
        self.tokens_per_tile = tokens_per_tile
        self.default_system_message = default_system_message
        self.max_context_tokens = max_context_tokens
        ids = tokenizer.convert_tokens_to_ids([template.IMG_START, template.IMG_END, template.IMG_CONTEXT])
        self.img_start_id, self.img_end_id, self.img_context_id = ids

    def render(self, conversation: Conversation) -> tuple[str, list[ImageRef], list[int]]:
        """The prompt text with each image written `<img></img>`, the images, and their markers' offsets."""
        if not conversation.user_parts:
            raise InvalidArgumentError("user_parts is empty: the new user turn needs text or an image")
        history = []
        for number, turn in enumerate(conversation.history):
            question = render_question(turn.user_parts, f"history[{number}].user_parts")
            template.check_text(turn.assistant_text, f"history[{number}].assistant_text")
            history.append((question.replace(template.IMAGE_PLACEHOLDER, template.IMAGE_SENTINEL), turn.assistant_text))
        question = render_question(conversation.user_parts).replace(template.IMAGE_PLACEHOLDER, template.IMAGE_SENTINEL)
        system = conversation.system_message
        if system is None:
            system = self.default_system_message
        else:
            template.check_text(system, "system_message")
        pieces = template.render(question, history, system).split(template.IMAGE_SENTINEL)
        offsets, length = [], len(pieces[0])
        for piece in pieces[1:]:
            offsets.append(length)
            length += len(_MARKER) + len(piece)
        return _MARKER.join(pieces), conversation.images(), offsets

    def build(self, conversation: Conversation) -> Prompt:
        """Renders and tokenises; raises InvalidArgumentError or ContextTooLongError (before any embedding fetch)."""
        text, images, offsets = self.render(conversation)
        tiles = sum(image.num_tiles for image in images)
        # Cheap bound first: the image slots alone can exceed the context without tokenising anything.
        if tiles * self.tokens_per_tile >= self.max_context_tokens:
            raise self._too_long(tiles * self.tokens_per_tile)
        ids = self.tokenizer(text, add_special_tokens=True).input_ids
        # The k-th `<img>` of the text is the k-th `<img>` id; the markers are those at the images' offsets.
        occurrences = [m.start() for m in re.finditer(re.escape(template.IMG_START), text)]
        starts = [i for i, token in enumerate(ids) if token == self.img_start_id]
        is_marker = set(offsets)
        marker_starts = [i for i, offset in zip(starts, occurrences, strict=False) if offset in is_marker]
        if (len(starts) != len(occurrences) or len(marker_starts) != len(images)
                or any(i + 1 >= len(ids) or ids[i + 1] != self.img_end_id for i in marker_starts)):
            raise InvalidArgumentError("the prompt's image markers did not tokenise as expected")
        expanded: list[int] = []
        previous = 0
        for start, image in zip(marker_starts, images, strict=True):
            expanded += ids[previous:start + 1]
            expanded += [self.img_context_id] * (image.num_tiles * self.tokens_per_tile)
            previous = start + 1
        expanded += ids[previous:]
        if len(expanded) >= self.max_context_tokens:
            raise self._too_long(len(expanded))
        return Prompt(text=text, token_ids=tuple(expanded), images=tuple(images),
                      tokens_per_tile=self.tokens_per_tile, image_offsets=tuple(offsets))

    def _too_long(self, tokens: int) -> ContextTooLongError:
        return ContextTooLongError(f"the prompt has at least {tokens} tokens; this model's context holds "
                                   f"{self.max_context_tokens} (prompt and answer together)")
