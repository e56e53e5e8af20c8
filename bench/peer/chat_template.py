"""The `internvl2_5` conversation template as a Jinja chat template, for `vllm serve --chat-template`.

Our checkpoints, like the published ones, carry no chat template; `vllm serve` needs one. This one renders what our
gateway renders for an OpenAI request (gateway.openai.protocol, services.llm.prompt, services.contract.template):

- the system and developer messages joined with "\\n" into the system message, or the model's default one;
- each user turn (consecutive user messages merged) as its text parts concatenated, with its images in front: one
  image -> `<image>\\n{text}`, several -> `Image-1: <image>\\nImage-2: <image>\\n{text}`; vLLM then expands each
  `<image>` into `<img>` + 256 x tiles `<IMG_CONTEXT>` + `</img>`, as our LLM service does;
- each assistant message as its text, then the open `<|im_start|>assistant\\n`.

It iterates over the content parts, so vLLM passes them as parts ("openai" content format), images as
`{"type": "image"}`. `tests/bench/test_peer_template.py` renders it against our prompt builder, and the benchmark
checks vLLM's prompt token ids against ours on a text and an image conversation before it measures (`check_prompts`
in `vllm_serve`).
"""

from __future__ import annotations

import json
from pathlib import Path

from services.contract import template

_TEMPLATE = """\
{%- macro text_of(content) -%}
{%- if content is string -%}{{ content }}{%- else -%}
{%- for part in content if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- macro images_of(content) -%}
{%- if content is not string -%}
{%- for part in content if part['type'] in ('image', 'image_url') -%}.{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(system=none, text='', images=0, asking=false, out='') -%}
{%- for message in messages if message['role'] in ('system', 'developer') -%}
{%- set ns.system = text_of(message['content']) if ns.system is none
                    else ns.system ~ '\\n' ~ text_of(message['content']) -%}
{%- endfor -%}
{%- macro question(text, images) -%}
{%- if images == 1 -%}{{ '<image>\\n' }}{%- elif images > 1 -%}
{%- for i in range(images) -%}{{ 'Image-' ~ (i + 1) ~ ': <image>\\n' }}{%- endfor -%}
{%- endif -%}{{ text }}
{%- endmacro -%}
{{- '<|im_start|>system\\n' ~ (DEFAULT_SYSTEM if ns.system is none else ns.system) ~ '<|im_end|>\\n' -}}
{%- for message in messages if message['role'] in ('user', 'assistant') -%}
{%- if message['role'] == 'user' -%}
{%- set ns.text = ns.text ~ text_of(message['content']) -%}
{%- set ns.images = ns.images + images_of(message['content']) | length -%}
{%- set ns.asking = true -%}
{%- else -%}
{{- '<|im_start|>user\\n' ~ question(ns.text, ns.images) ~ '<|im_end|>\\n' -}}
{{- '<|im_start|>assistant\\n' ~ text_of(message['content']) ~ '<|im_end|>\\n' -}}
{%- set ns.text = '' -%}{%- set ns.images = 0 -%}{%- set ns.asking = false -%}
{%- endif -%}
{%- endfor -%}
{%- if ns.asking -%}{{- '<|im_start|>user\\n' ~ question(ns.text, ns.images) ~ '<|im_end|>\\n' -}}{%- endif -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}
"""


def chat_template(default_system_message: str | None) -> str:
    """The Jinja text, with the model's default system message (the original's when the checkpoint names none)."""
    system = template.DEFAULT_SYSTEM_MESSAGE if default_system_message is None else default_system_message
    return "{%- set DEFAULT_SYSTEM = " + json.dumps(system, ensure_ascii=False) + " -%}\n" + _TEMPLATE


def write_chat_template(path: Path, default_system_message: str | None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(chat_template(default_system_message), encoding="utf-8")
    return path
