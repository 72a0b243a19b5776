"""Chat messages → Kimi-VL prompt text and ids, without letting user text become special tokens.

Messages are OpenAI-like dicts `{"role": "system" | "user" | "assistant", "content": str | [part]}`;
a part is `{"type": "text", "text": str}` or an image (`type` `image` / `image_url`, or a key
`image` / `image_url`). The prompt is rendered by the checkpoint's Jinja chat template (sandboxed,
configured as `transformers` configures it) or, without one, by a built-in renderer that writes the
same text as `kimi_vl_chat_template.jinja`.

`encode_chat` renders the template with every user-supplied text replaced by a sentinel (private-use
characters absent from all inputs), turns the special-token strings of that render into special
ids, and encodes everything else — template text and the user's text put back — as plain text. The
result equals the official `encode(rendered, allowed_special="all")` whenever the user text holds no
special-token string; when it does, those characters stay plain text. Each `<|media_pad|>` the
template writes becomes a run of the image's token count.

Knows nothing about images themselves (only how many tokens each one takes), models or serving.
A template that branches on or rewrites message text (e.g. `| trim`) cannot be split this way and
is rejected with a CheckpointError. Only `role` and `content` of a message reach the template.
"""

from __future__ import annotations

import functools
import itertools
import json
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.common.config import TextConfig, load_stop_token_ids
from services.common.errors import CheckpointError, InternalError, InvalidInputError
from services.common.tokenizer import KimiTokenizer

SHIPPED_TEMPLATE_PATH = Path(__file__).with_name("kimi_vl_chat_template.jinja")

ROLE_OPENERS = {"system": "<|im_system|>", "user": "<|im_user|>", "assistant": "<|im_assistant|>"}
IM_MIDDLE = "<|im_middle|>"
IM_END = "<|im_end|>"
MEDIA_PAD = "<|media_pad|>"
IMAGE_PLACEHOLDER = "<|media_start|>image<|media_content|>" + MEDIA_PAD + "<|media_end|>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant"  # the Moonlight template's (spec: UNCERTAIN)
GENERATION_PROMPT = "<|im_assistant|>assistant" + IM_MIDDLE

IMAGE_PART_TYPES = ("image", "image_url")
IMAGE_PART_KEYS = ("image", "image_url")

Message = dict[str, Any]


class _TemplateDefault(Enum):
    FROM_TOKENIZER = "from_tokenizer"


FROM_TOKENIZER = _TemplateDefault.FROM_TOKENIZER
"""`encode_chat(template=FROM_TOKENIZER)`: use the tokenizer's chat template (None → built-in)."""


@dataclass(frozen=True)
class ChatEncoding:
    """A rendered, tokenised prompt. `image_spans[i]` = (start, length) of image i's pad run."""

    input_ids: list[int]
    text: str
    image_spans: list[tuple[int, int]]


@functools.lru_cache(maxsize=1)
def load_shipped_chat_template() -> str:
    """The Jinja chat template this project writes into generated checkpoints."""
    return SHIPPED_TEMPLATE_PATH.read_text(encoding="utf-8")


# -- validation ----------------------------------------------------------------------------------


def _normalize_part(part: Any, where: str) -> dict[str, Any]:
    if not isinstance(part, Mapping):
        raise InvalidInputError(f"{where}: a content part must be an object, got {type(part).__name__}")
    part_type = part.get("type")
    image_keys = [key for key in IMAGE_PART_KEYS if key in part]
    if part_type == "text":
        if image_keys:
            raise InvalidInputError(f"{where}: a text part must not carry {image_keys[0]!r}")
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidInputError(f"{where}: `text` must be a string, got {type(text).__name__}")
        return {"type": "text", "text": text}
    if part_type in IMAGE_PART_TYPES or (part_type is None and image_keys):
        # The image data never reaches the template: it needs to know only that the part is one.
        normalized: dict[str, Any] = {"type": part_type or image_keys[0]}
        normalized.update((key, True) for key in image_keys)
        return normalized
    if part_type is None:
        raise InvalidInputError(f"{where}: a content part needs a `type` (text, image or image_url)")
    raise InvalidInputError(f"{where}: unknown content part type {part_type!r}")


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[Message]:
    """Checked copies holding only `role` and `content` (image parts reduced to their kind)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidInputError("messages must be a list of objects")
    if not messages:
        raise InvalidInputError("messages is empty")
    normalized: list[Message] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise InvalidInputError(f"{where} must be an object, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLE_OPENERS:
            raise InvalidInputError(f"{where}: unknown role {role!r} (expected system, user or assistant)")
        content = message.get("content")
        if isinstance(content, str):
            normalized.append({"role": role, "content": content})
        elif isinstance(content, Sequence) and not isinstance(content, (str, bytes)):
            parts = [_normalize_part(p, f"{where}.content[{i}]") for i, p in enumerate(content)]
            normalized.append({"role": role, "content": parts})
        else:
            raise InvalidInputError(
                f"{where}: content must be a string or a list of parts, got {type(content).__name__}"
            )
    return normalized


def _is_image(part: Mapping[str, Any]) -> bool:
    return part["type"] != "text"


def _count_images(messages: list[Message]) -> int:
    return sum(
        _is_image(part) for m in messages if not isinstance(m["content"], str) for part in m["content"]
    )


def _collect_texts(messages: list[Message]) -> list[str]:
    """Every user-supplied text, in the order `_map_texts` visits them."""
    texts: list[str] = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            texts.append(content)
        else:
            texts.extend(part["text"] for part in content if not _is_image(part))
    return texts


def _map_texts(messages: list[Message], fn: Callable[[int, str], str]) -> list[Message]:
    """Copies with every user-supplied text t (in message order) replaced by fn(index, t)."""
    counter = itertools.count()
    mapped: list[Message] = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            mapped.append({"role": message["role"], "content": fn(next(counter), content)})
            continue
        parts = [
            part if _is_image(part) else {"type": "text", "text": fn(next(counter), part["text"])}
            for part in content
        ]
        mapped.append({"role": message["role"], "content": parts})
    return mapped


# -- rendering -----------------------------------------------------------------------------------


class _TemplateRaised(jinja2.TemplateError):
    """The template called `raise_exception`: it rejects the messages."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise CheckpointError(f"the chat template does not parse: {exc}") from exc


def _render_builtin(messages: list[Message], add_generation_prompt: bool) -> str:
    out: list[str] = []
    for index, message in enumerate(messages):
        role = message["role"]
        if index == 0 and role != "system":
            out.append(ROLE_OPENERS["system"] + "system" + IM_MIDDLE + DEFAULT_SYSTEM_PROMPT + IM_END)
        out.append(ROLE_OPENERS[role] + role + IM_MIDDLE)
        content = message["content"]
        if isinstance(content, str):
            out.append(content)
        else:
            out.extend(IMAGE_PLACEHOLDER if _is_image(part) else part["text"] for part in content)
        out.append(IM_END)
    if add_generation_prompt:
        out.append(GENERATION_PROMPT)
    return "".join(out)


def _render(
    messages: list[Message], template: str | None, add_generation_prompt: bool, variables: dict[str, str]
) -> str:
    if template is None:
        return _render_builtin(messages, add_generation_prompt)
    compiled = _compile(template)
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except _TemplateRaised as exc:
        raise InvalidInputError(f"the chat template rejected the messages: {exc}") from exc
    except (jinja2.TemplateError, TypeError) as exc:
        raise CheckpointError(f"the chat template failed to render: {exc}") from exc


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    *,
    template: str | None,
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
) -> str:
    """The prompt text for `messages`: `template` rendered as `transformers` does, or, when it is
    None, the built-in renderer (identical to `kimi_vl_chat_template.jinja`)."""
    variables = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None}
    return _render(normalize_messages(messages), template, add_generation_prompt, variables)


# -- encoding ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sentinels:
    """Stand-ins `open + index + close` for user texts; both characters occur in no input."""

    open: str
    close: str

    @staticmethod
    def choose(inputs: Sequence[str]) -> _Sentinels:
        used: set[str] = set()
        for text in inputs:
            used.update(text)
        candidates = (chr(c) for r in ((0xE000, 0xF900), (0xF0000, 0xFFFFE)) for c in range(*r))
        free = list(itertools.islice((c for c in candidates if c not in used), 2))
        if len(free) < 2:
            raise InvalidInputError("the messages use every private-use character")
        return _Sentinels(free[0], free[1])

    def mask(self, index: int, _text: str) -> str:
        return f"{self.open}{index}{self.close}"

    def restore(self, rendered: str, texts: Sequence[str]) -> str:
        pattern = re.escape(self.open) + r"(\d+)" + re.escape(self.close)
        return re.sub(pattern, lambda m: texts[int(m.group(1))], rendered)


def _special_pattern(names: Sequence[str]) -> re.Pattern[str]:
    # Longest first, so a name that extends another one wins.
    return re.compile("|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)))


def _check_counts(image_token_counts: Sequence[int], n_images: int) -> list[int]:
    counts = list(image_token_counts)
    if len(counts) != n_images:
        raise InvalidInputError(
            f"the messages hold {n_images} images but {len(counts)} token counts were given"
        )
    for count in counts:
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1:
            raise InvalidInputError(f"an image token count must be a positive integer, got {count!r}")
    return [int(count) for count in counts]


def encode_chat(
    tokenizer: KimiTokenizer,
    messages: Sequence[Mapping[str, Any]],
    *,
    image_token_counts: Sequence[int],
    add_generation_prompt: bool = True,
    template: str | None | _TemplateDefault = FROM_TOKENIZER,
) -> ChatEncoding:
    """Render and tokenise `messages`; only the template's own text may yield special ids.

    `image_token_counts[i]` is the number of `<|media_pad|>` ids image i (in message order) takes.
    """
    chat_template = tokenizer.chat_template if isinstance(template, _TemplateDefault) else template
    normalized = normalize_messages(messages)
    counts = _check_counts(image_token_counts, _count_images(normalized))
    specials = tokenizer.special_tokens
    if counts and MEDIA_PAD not in specials:
        raise CheckpointError(f"the tokenizer has no {MEDIA_PAD} token, so it cannot take images")

    texts = _collect_texts(normalized)
    sentinels = _Sentinels.choose([*texts, chat_template or "", *specials])
    variables = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}
    masked = _render(_map_texts(normalized, sentinels.mask), chat_template, add_generation_prompt, variables)
    text = sentinels.restore(masked, texts)
    # A template that looks at the text renders differently around sentinels than around the text.
    if chat_template is not None and text != _render(
        normalized, chat_template, add_generation_prompt, variables
    ):
        raise CheckpointError(
            "the chat template inspects or rewrites message text, so user text cannot be kept apart "
            "from its special tokens"
        )
    input_ids, image_spans = _tokenize_masked(tokenizer, masked, sentinels, texts, counts)
    return ChatEncoding(input_ids=input_ids, text=text, image_spans=image_spans)


def _tokenize_masked(
    tokenizer: KimiTokenizer, masked: str, sentinels: _Sentinels, texts: list[str], counts: list[int]
) -> tuple[list[int], list[tuple[int, int]]]:
    """Special-token strings of the masked render → ids; the plain runs between them → `encode`."""
    specials = tokenizer.special_tokens
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    position = 0
    for match in _special_pattern(list(specials)).finditer(masked):
        ids.extend(tokenizer.encode(sentinels.restore(masked[position : match.start()], texts)))
        position = match.end()
        name = match.group()
        if name != MEDIA_PAD:
            ids.append(specials[name])
            continue
        if len(spans) == len(counts):
            raise InvalidInputError(
                f"the chat template wrote more image placeholders than the {len(counts)} images"
            )
        count = counts[len(spans)]
        spans.append((len(ids), count))
        ids.extend([specials[MEDIA_PAD]] * count)
    ids.extend(tokenizer.encode(sentinels.restore(masked[position:], texts)))
    if len(spans) != len(counts):
        raise InvalidInputError(
            f"the chat template wrote {len(spans)} image placeholders for {len(counts)} images"
        )
    return ids, spans


def end_of_turn_ids(
    checkpoint_dir: str | Path, text: TextConfig, tokenizer: KimiTokenizer
) -> tuple[int, ...]:
    """The ids that end an answer: the checkpoint's eos ids, the tokenizer's eos and `<|im_end|>`
    (the turn end the template writes), sorted."""
    stops = {*load_stop_token_ids(checkpoint_dir, text), tokenizer.eos_id}
    if tokenizer.has_special_token(IM_END):
        stops.add(tokenizer.special_token_id(IM_END))
    return tuple(sorted(stops))


# ---------------------------------------------------------------------------------------------
# Media in messages: where each item's image blocks go
# ---------------------------------------------------------------------------------------------


def video_content_parts(timestamps: Sequence[str]) -> list[dict[str, Any]]:
    """Chat content parts of a video: per frame, its timestamp as text, then one image block."""
    parts: list[dict[str, Any]] = []
    for stamp in timestamps:
        parts.append({"type": "text", "text": stamp})
        parts.append({"type": "image"})
    return parts


def expand_media(
    messages: Sequence[Message], media_parts: Sequence[Sequence[Mapping[str, Any]]]
) -> list[Message]:
    """`messages` with media part k replaced by the parts `media_parts[k]` (an image: one image
    part; a video: per frame its timestamp text and an image part, as the preprocessor gives)."""
    out: list[Message] = []
    used = 0
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            out.append(dict(message))
            continue
        parts: list[dict[str, Any]] = []
        for part in content:
            if "media_index" not in part:
                parts.append(dict(part))
                continue
            if part["media_index"] >= len(media_parts):
                raise InternalError(f"no parts for media {part['media_index']} of {len(media_parts)}")
            parts.extend(dict(p) for p in media_parts[part["media_index"]])
            used += 1
        out.append({**message, "content": parts})
    if used != len(media_parts):
        raise InternalError(f"{len(media_parts)} media parts for {used} media in the messages")
    return out
