"""OpenAI-compatible requests: validation and conversion to the core's types.

For `POST /v1/chat/completions` the ingress calls, in order:

    request = parse_chat_request(body)            # the decoded JSON body
    check_model(request.model, served_names)      # 404 for another name
    messages, media = chat_messages(request, max_images=..., max_videos=...)  # openai_convert
    params = sampling_params(request, generation_defaults)                    # openai_convert
    video = video_options(request)                # None: the service's defaults

and for `POST /v1/completions` `parse_completion_request`, `check_model` and `sampling_params`.
This module validates; `services.frontend.openai_convert` turns a valid request into core types.
Every refusal is a `ProtocolError` (an `InvalidInputError`, HTTP 400 unless a subclass says
otherwise) carrying OpenAI's `param` (`messages[1].content[0].image_url.url`) and `code`; the
parse functions raise nothing else.

Fields follow OpenAI's API plus vLLM's extensions: `top_k`, `min_p`, `repetition_penalty`,
`stop_token_ids`, `ignore_eos`, `return_token_ids`, `include_reasoning`, `video_url` parts and
`media_io_kwargs: {"video": {"num_frames", "fps"}}`, where we also take `frame_token_limit`.
Decisions:
- types are strict, as OpenAI's are: `"max_tokens": "5"` or `"stream": 1` is a 400;
- value ranges are the core's (`SamplingParams`), checked at parse time under the request's name;
- unknown fields are accepted and ignored (SDKs send fields we have no use for: `user`, `store`,
  `metadata`); they stay in `request.model_extra` for logging. Known fields whose silent omission
  would change what the client gets (tools, response_format, logit_bias, guided decoding, echo,
  suffix, best_of, several prompts) are refused instead, and so are unknown `media_io_kwargs`;
- images and videos are allowed in user messages only, as OpenAI does; `image_url.detail` is
  accepted and ignored; `null` means "not set" for every optional field.

Knows nothing about HTTP, tokenization, chat templates or fetching media; imports no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from services.common.errors import InvalidInputError
from services.decoder.engine.params import SamplingParams

DEFAULT_MAX_IMAGES = 16
DEFAULT_MAX_VIDEOS = 1
URL_PREFIXES = ("data:", "http://", "https://")
ROLES = ("system", "user", "assistant")

Message = dict[str, Any]  # what services.common.chat_template.encode_chat takes


class ProtocolError(InvalidInputError):
    """A refused request, as OpenAI reports one: a message, the offending `param`, a `code`."""

    http_status: ClassVar[int] = 400

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message, param=param)
        self.code = code


class ModelNotFoundError(ProtocolError):
    http_status = 404

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist.", param="model", code="model_not_found")


class RequestTooLargeError(ProtocolError):
    http_status = 413

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(
            f"The request body is larger than the limit of {limit_bytes} bytes.", code="request_too_large"
        )


def protocol_error(code: str, param: str | None, detail: str) -> ProtocolError:
    lead = {
        "invalid_type": "Invalid type for",
        "invalid_value": "Invalid value for",
        "unsupported_value": "Unsupported value for",
        "unsupported_parameter": "Unsupported parameter:",
    }[code]
    where = f"'{param}'" if param else "the request body"
    return ProtocolError(f"{lead} {where}: {detail}.", param=param, code=code)


def _short(value: Any) -> str:
    """repr(value), cut: error messages echo client input, which may be large."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _custom(code: str, detail: str) -> PydanticCustomError:
    return PydanticCustomError(code, "{detail}", {"detail": detail})  # braces in `detail` stay literal


# --- request models (types and shapes; the checks below add ranges and rules) -----------------


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class ImageURL(_Model):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class VideoURL(_Model):
    url: str


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoPart(_Model):
    type: Literal["video_url"]
    video_url: VideoURL


# union tags appear in pydantic's error locations; `_param` drops them
_PART_TAGS = {"text": "<text>", "image_url": "<image_url>", "video_url": "<video_url>"}
_CONTENT_TAGS = {str: "<string>", list: "<parts>"}
_TAGS = frozenset([*_PART_TAGS.values(), *_CONTENT_TAGS.values()])


def _part_tag(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, Mapping) else None
    return _PART_TAGS.get(kind) if isinstance(kind, str) else None


ContentPart = Annotated[
    Annotated[TextPart, Tag("<text>")]
    | Annotated[ImagePart, Tag("<image_url>")]
    | Annotated[VideoPart, Tag("<video_url>")],
    Discriminator(_part_tag, custom_error_type="unknown_part", custom_error_message="unknown part"),
]
Content = Annotated[
    Annotated[str, Tag("<string>")] | Annotated[list[ContentPart], Tag("<parts>")],
    Discriminator(
        lambda v: _CONTENT_TAGS.get(type(v)), custom_error_type="content_type", custom_error_message="bad"
    ),
]


class ChatMessage(_Model):
    role: str
    content: Content | None  # None only for assistant turns

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role not in ROLES:
            raise _custom(
                "invalid_value", f"unknown role {_short(role)} (expected system, user or assistant)"
            )
        return role


class StreamOptions(_Model):
    include_usage: bool | None = None


class VideoIOKwargs(_Model):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    num_frames: Annotated[int, Field(ge=1)] | None = None  # vLLM's name for VideoOptions.max_frames
    fps: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    frame_token_limit: Annotated[int, Field(ge=1)] | None = None  # ours: patches per frame


class MediaIOKwargs(_Model):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    video: VideoIOKwargs | None = None


def _stop_strings(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return None if value is None else (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise _custom("invalid_type", "expected a string or an array of strings")


# request field -> SamplingParams field, where both names are the same
_SHARED_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "n", "ignore_eos", "stop",
)  # fmt: skip


class _GenerationRequest(BaseModel):
    """The fields chat and completion requests share (unknown fields land in `model_extra`)."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)

    model: str
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: tuple[str, ...] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    return_token_ids: bool | None = None

    _stop = field_validator("stop", mode="before")(_stop_strings)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def core_values(self) -> list[tuple[str, str, Any]]:
        """(SamplingParams field, request param, value) for every field the request sets; a later
        entry for the same field wins."""
        values = [(name, name, getattr(self, name)) for name in _SHARED_FIELDS]
        values.append(("stop_token_ids", "stop_token_ids", _tuple(self.stop_token_ids)))
        values.append(("max_new_tokens", "max_tokens", self.max_tokens))
        return [v for v in values if v[2] is not None]


def _tuple(values: list[int] | None) -> tuple[int, ...] | None:
    return None if values is None else tuple(values)


class ChatRequest(_GenerationRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # wins over max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None  # needs logprobs: true
    include_reasoning: bool | None = None  # vLLM's: false drops reasoning_content from the answer
    media_io_kwargs: MediaIOKwargs | None = None

    # the engine splits reasoning as the checkpoint says; include_reasoning only hides it
    split_reasoning: ClassVar[bool | None] = None

    def core_values(self) -> list[tuple[str, str, Any]]:
        values = super().core_values()
        if self.max_completion_tokens is not None:
            values.append(("max_new_tokens", "max_completion_tokens", self.max_completion_tokens))
        if self.logprobs:
            top = self.top_logprobs
            values.append(("logprobs", "logprobs", 0) if top is None else ("logprobs", "top_logprobs", top))
        return values


def _one_prompt(value: Any) -> Any:
    if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        if len(value) > 1:
            raise _custom("unsupported_value", f"a list of {len(value)} prompts; send one prompt per request")
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return tuple(value)
    raise _custom("invalid_type", "expected a string or an array of token ids")


class CompletionRequest(_GenerationRequest):
    prompt: str | tuple[int, ...]
    logprobs: int | None = None  # the legacy API's: how many alternatives per token

    split_reasoning: ClassVar[bool | None] = False  # raw text: a completion has no reasoning field

    _prompt = field_validator("prompt", mode="before")(_one_prompt)

    def core_values(self) -> list[tuple[str, str, Any]]:
        values = super().core_values()
        if self.logprobs is not None:
            values.append(("logprobs", "logprobs", self.logprobs))
        return values


# --- parsing --------------------------------------------------------------------------------


def parse_chat_request(body: Any) -> ChatRequest:
    """The request of a decoded `/v1/chat/completions` body; raises only ProtocolError."""
    request = _validate(ChatRequest, body)
    _check_refused(request, _REFUSED_CHAT)
    _check_messages(request.messages)
    if request.top_logprobs is not None and not request.logprobs:
        raise protocol_error(
            "invalid_value", "top_logprobs", "logprobs must be true when top_logprobs is set"
        )
    _check_common(request)
    return request


def parse_completion_request(body: Any) -> CompletionRequest:
    """The request of a decoded `/v1/completions` body; raises only ProtocolError."""
    request = _validate(CompletionRequest, body)
    _check_refused(request, _REFUSED_COMPLETION)
    if not request.prompt:
        raise protocol_error("invalid_value", "prompt", "the prompt is empty")
    if isinstance(request.prompt, tuple) and min(request.prompt) < 0:
        raise protocol_error("invalid_value", "prompt", "token ids must be non-negative")
    _check_common(request)
    return request


def check_model(model: str, served: Collection[str]) -> None:
    """404 unless `model` is one of the names this deployment serves."""
    if model not in served:
        raise ModelNotFoundError(model)


_Request = TypeVar("_Request", bound=_GenerationRequest)


def _validate(cls: type[_Request], body: Any) -> _Request:
    try:
        return cls.model_validate(body)
    except ValidationError as exc:
        raise _from_pydantic(exc) from None


_TYPE_NAMES = {
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean",
    "list_type": "an array",
    "tuple_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}


def _from_pydantic(exc: ValidationError) -> ProtocolError:
    """The first error pydantic found, in OpenAI's terms."""
    err = exc.errors(include_url=False)[0]
    kind, value = err["type"], err.get("input")
    param = _param(err["loc"])
    if kind == "missing":
        return ProtocolError(
            f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    if kind == "extra_forbidden":
        return ProtocolError(f"Unknown parameter: '{param}'.", param=param, code="unknown_parameter")
    if kind in _TYPE_NAMES:
        return protocol_error("invalid_type", param, f"expected {_TYPE_NAMES[kind]}, got {_json_type(value)}")
    if kind == "content_type":
        return protocol_error(
            "invalid_type", param, f"expected a string or an array of parts, got {_json_type(value)}"
        )
    if kind == "unknown_part":
        if not isinstance(value, Mapping):
            return protocol_error("invalid_type", param, f"expected an object, got {_json_type(value)}")
        part_type = value.get("type")
        detail = (
            f"unknown content part type {_short(part_type)}" if "type" in value else "a part needs a type"
        )
        return protocol_error("invalid_value", param, f"{detail} (expected text, image_url or video_url)")
    if kind in ("invalid_type", "invalid_value", "unsupported_value"):
        return protocol_error(kind, param, err["msg"])
    return protocol_error(
        "invalid_value", param, f"{err['msg'][:1].lower()}{err['msg'][1:]}, got {_short(value)}"
    )


def _param(loc: Sequence[int | str]) -> str | None:
    """pydantic's ('messages', 1, 'content', '<parts>', 0) -> 'messages[1].content[0]'."""
    out = ""
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        elif item not in _TAGS:
            out += f".{item}" if out else item
    return out or None


def _json_type(value: Any) -> str:
    for kind, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else "array" if isinstance(value, list) else "object"


def _is_set(value: Any) -> bool:
    return value is not None


def _not_text(value: Any) -> bool:
    return value is not None and value != {"type": "text"}


def _calls_tools(value: Any) -> bool:
    return value not in (None, "none", "auto")


_GUIDED = ("structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
_REFUSED_CHAT: dict[str, Callable[[Any], bool]] = {
    **dict.fromkeys(("tools", "functions", "logit_bias", "continue_final_message"), bool),
    **dict.fromkeys(("audio", *_GUIDED), _is_set),
    **dict.fromkeys(("tool_choice", "function_call"), _calls_tools),
    "response_format": _not_text,
}
_REFUSED_COMPLETION: dict[str, Callable[[Any], bool]] = {
    **dict.fromkeys(("echo", "suffix", "logit_bias"), bool),
    **dict.fromkeys(("prompt_embeds", *_GUIDED), _is_set),
    "best_of": lambda v: v not in (None, 1),
    "response_format": _not_text,
}


def _check_refused(request: _GenerationRequest, refused: Mapping[str, Callable[[Any], bool]]) -> None:
    for name, value in (request.model_extra or {}).items():
        if name in refused and refused[name](value):
            raise protocol_error("unsupported_parameter", name, "this server does not support it")


def _check_common(request: _GenerationRequest) -> None:
    if request.stream_options is not None and not request.stream:
        raise protocol_error("invalid_value", "stream_options", "only allowed when stream is true")
    for field, param, value in request.core_values():
        try:
            SamplingParams(**{field: value})  # the core's own range check, one field at a time
        except InvalidInputError as exc:
            raise protocol_error("invalid_value", param, str(exc).replace(field, param, 1)) from None


def _check_messages(messages: list[ChatMessage]) -> None:
    if not messages:
        raise protocol_error("invalid_value", "messages", "at least one message is required")
    for i, message in enumerate(messages):
        content = message.content
        if content is None and message.role != "assistant":
            raise protocol_error(
                "invalid_value", f"messages[{i}].content", f"a {message.role} message needs content"
            )
        if isinstance(content, str) or content is None:
            continue
        if not content:
            raise protocol_error("invalid_value", f"messages[{i}].content", "an empty array of parts")
        for j, part in enumerate(content):
            if isinstance(part, TextPart):
                continue
            if message.role != "user":
                raise protocol_error(
                    "invalid_value", f"messages[{i}].content[{j}]", f"{part.type} is for user messages only"
                )
            if not media_url(part).lower().startswith(URL_PREFIXES):
                param = f"messages[{i}].content[{j}].{part.type}.url"
                raise protocol_error("invalid_value", param, "expected a data: URL or an http(s) URL")


def media_url(part: ImagePart | VideoPart) -> str:
    return part.image_url.url if isinstance(part, ImagePart) else part.video_url.url
