"""The OpenAI-compatible protocol layer: request validation, conversion to the core, response shapes.

Response dicts are checked against the official `openai` package twice: with its pydantic models
(`model_validate`), and end to end through its client over an in-process transport (no network),
so the client parses them unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from services.common.chat_template import encode_chat, expand_media
from services.common.errors import (
    CapacityError,
    DeadlineExceededError,
    InternalError,
    InvalidInputError,
    UpstreamUnavailableError,
)
from services.common.tiny_tokenizer import write_tiny_tokenizer
from services.common.tokenizer import KimiTokenizer
from services.decoder.engine.outputs import CompletionDelta, RequestOutput, TokenLogprobs
from services.decoder.engine.params import SamplingParams
from services.frontend.openai_convert import MediaRef, chat_messages, sampling_params, video_options
from services.frontend.openai_protocol import (
    ChatRequest,
    ModelNotFoundError,
    ProtocolError,
    RequestTooLargeError,
    check_model,
    parse_chat_request,
    parse_completion_request,
)
from services.frontend.openai_responses import (
    SSE_DONE,
    ChatResponseBuilder,
    CompletionResponseBuilder,
    collect_response,
    error_body,
    error_headers,
    models_list,
    open_sse_stream,
    sse_event,
)
from services.preprocess.settings import VideoOptions

try:
    import openai
    from openai.types import Completion, Model
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
except ImportError:  # a dev dependency; the shape tests need it
    openai = None

needs_openai = pytest.mark.skipif(openai is None, reason="needs the `openai` package (the dev extra)")

MODEL = "kimi-vl"
IMAGE = "data:image/png;base64,iVBORw0KGgo="


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> KimiTokenizer:
    directory: Path = tmp_path_factory.mktemp("openai_protocol") / "tiny"
    write_tiny_tokenizer(directory)
    return KimiTokenizer.from_pretrained(directory)


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **fields}


def _user(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"role": "user", "content": list(parts)}


def _image(url: str = IMAGE) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def _video(url: str = "https://example.com/v.mp4") -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": url}}


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


# --- validation -----------------------------------------------------------------------------

CHAT_REFUSALS = {
    # wrong types
    "max_tokens as a string": (_chat(max_tokens="5"), "max_tokens", "invalid_type"),
    "stream as an int": (_chat(stream=1), "stream", "invalid_type"),
    "temperature as a string": (_chat(temperature="hot"), "temperature", "invalid_type"),
    "n as a float": (_chat(n=1.5), "n", "invalid_type"),
    "logprobs as an int": (_chat(logprobs=1), "logprobs", "invalid_type"),
    "model as a number": (_chat(model=3), "model", "invalid_type"),
    "messages as a string": (_chat(messages="Hi"), "messages", "invalid_type"),
    "a message as a string": (_chat(messages=["Hi"]), "messages[0]", "invalid_type"),
    "content as a number": (
        _chat(messages=[{"role": "user", "content": 5}]),
        "messages[0].content",
        "invalid_type",
    ),
    "a part as a string": (_chat(messages=[_user("Hi")]), "messages[0].content[0]", "invalid_type"),
    "image url as a number": (
        _chat(messages=[{"role": "system", "content": "s"}, _user(_image(5))]),  # type: ignore[arg-type]
        "messages[1].content[0].image_url.url",
        "invalid_type",
    ),
    "text as a list": (
        _chat(messages=[_user({"type": "text", "text": ["a"]})]),
        "messages[0].content[0].text",
        "invalid_type",
    ),
    "stop as numbers": (_chat(stop=[1]), "stop", "invalid_type"),
    "stop_token_ids as strings": (_chat(stop_token_ids=["1"]), "stop_token_ids[0]", "invalid_type"),
    # missing fields
    "no model": ({"messages": [{"role": "user", "content": "Hi"}]}, "model", "missing_required_parameter"),
    "no messages": ({"model": MODEL}, "messages", "missing_required_parameter"),
    "no role": (_chat(messages=[{"content": "Hi"}]), "messages[0].role", "missing_required_parameter"),
    "no content": (_chat(messages=[{"role": "user"}]), "messages[0].content", "missing_required_parameter"),
    "no image_url": (
        _chat(messages=[_user({"type": "image_url"})]),
        "messages[0].content[0].image_url",
        "missing_required_parameter",
    ),
    # empty or unknown
    "empty messages": (_chat(messages=[]), "messages", "invalid_value"),
    "unknown role": (_chat(messages=[{"role": "tool", "content": "x"}]), "messages[0].role", "invalid_value"),
    "unknown part type": (
        _chat(messages=[_user({"type": "input_audio"})]),
        "messages[0].content[0]",
        "invalid_value",
    ),
    "a part without type": (
        _chat(messages=[_user({"text": "x"})]),
        "messages[0].content[0]",
        "invalid_value",
    ),
    "empty part list": (_chat(messages=[_user()]), "messages[0].content", "invalid_value"),
    "null user content": (
        _chat(messages=[{"role": "user", "content": None}]),
        "messages[0].content",
        "invalid_value",
    ),
    "image in a system message": (
        _chat(messages=[{"role": "system", "content": [_image()]}, {"role": "user", "content": "x"}]),
        "messages[0].content[0]",
        "invalid_value",
    ),
    "file url": (
        _chat(messages=[_user(_image("file:///etc/passwd"))]),
        "messages[0].content[0].image_url.url",
        "invalid_value",
    ),
    "bad detail": (
        _chat(messages=[_user({"type": "image_url", "image_url": {"url": IMAGE, "detail": "max"}})]),
        "messages[0].content[0].image_url.detail",
        "invalid_value",
    ),
    # ranges (the core's)
    "negative max_tokens": (_chat(max_tokens=-1), "max_tokens", "invalid_value"),
    "zero max_completion_tokens": (_chat(max_completion_tokens=0), "max_completion_tokens", "invalid_value"),
    "negative max_tokens beside max_completion_tokens": (
        _chat(max_tokens=-3, max_completion_tokens=5),
        "max_tokens",
        "invalid_value",
    ),
    "negative temperature": (_chat(temperature=-0.1), "temperature", "invalid_value"),
    "top_p zero": (_chat(top_p=0), "top_p", "invalid_value"),
    "top_p above one": (_chat(top_p=1.5), "top_p", "invalid_value"),
    "n zero": (_chat(n=0), "n", "invalid_value"),
    "n too large": (_chat(n=17), "n", "invalid_value"),
    "presence_penalty": (_chat(presence_penalty=2.5), "presence_penalty", "invalid_value"),
    "frequency_penalty": (_chat(frequency_penalty=-3), "frequency_penalty", "invalid_value"),
    "negative seed": (_chat(seed=-1), "seed", "invalid_value"),
    "top_k": (_chat(top_k=-2), "top_k", "invalid_value"),
    "min_p": (_chat(min_p=1.5), "min_p", "invalid_value"),
    "repetition_penalty": (_chat(repetition_penalty=0), "repetition_penalty", "invalid_value"),
    "NaN temperature": (_chat(temperature=float("nan")), "temperature", "invalid_value"),
    "empty stop string": (_chat(stop=["a", ""]), "stop", "invalid_value"),
    "too many stop strings": (_chat(stop=[str(i) for i in range(17)]), "stop", "invalid_value"),
    "top_logprobs without logprobs": (_chat(top_logprobs=2), "top_logprobs", "invalid_value"),
    "top_logprobs with logprobs false": (
        _chat(logprobs=False, top_logprobs=0),
        "top_logprobs",
        "invalid_value",
    ),
    "top_logprobs too large": (_chat(logprobs=True, top_logprobs=21), "top_logprobs", "invalid_value"),
    "stream_options without stream": (
        _chat(stream_options={"include_usage": True}),
        "stream_options",
        "invalid_value",
    ),
    # video options
    "zero num_frames": (
        _chat(media_io_kwargs={"video": {"num_frames": 0}}),
        "media_io_kwargs.video.num_frames",
        "invalid_value",
    ),
    "negative fps": (
        _chat(media_io_kwargs={"video": {"fps": -1.0}}),
        "media_io_kwargs.video.fps",
        "invalid_value",
    ),
    "zero frame_token_limit": (
        _chat(media_io_kwargs={"video": {"frame_token_limit": 0}}),
        "media_io_kwargs.video.frame_token_limit",
        "invalid_value",
    ),
    "unknown video kwarg": (
        _chat(media_io_kwargs={"video": {"backend": "x"}}),
        "media_io_kwargs.video.backend",
        "unknown_parameter",
    ),
    "image kwargs": (_chat(media_io_kwargs={"image": {}}), "media_io_kwargs.image", "unknown_parameter"),
    # fields we do not silently drop
    "tools": (
        _chat(tools=[{"type": "function", "function": {"name": "f"}}]),
        "tools",
        "unsupported_parameter",
    ),
    "json mode": (_chat(response_format={"type": "json_object"}), "response_format", "unsupported_parameter"),
    "logit_bias": (_chat(logit_bias={"50256": -100}), "logit_bias", "unsupported_parameter"),
    "guided decoding": (_chat(guided_json={"type": "object"}), "guided_json", "unsupported_parameter"),
}


@pytest.mark.parametrize("body, param, code", CHAT_REFUSALS.values(), ids=CHAT_REFUSALS.keys())
def test_chat_refusals_name_the_parameter(body: dict[str, Any], param: str, code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_chat_request(body)
    error = info.value
    assert isinstance(error, InvalidInputError)
    assert (error.param, error.code) == (param, code), str(error)
    assert param in str(error)
    status, body_out = error_body(error)
    assert status == 400
    assert body_out["error"]["param"] == param
    assert body_out["error"]["type"] == "invalid_request_error"


def test_unknown_role_and_part_type_are_named_in_the_message() -> None:
    with pytest.raises(ProtocolError, match="unknown role 'tool'"):
        parse_chat_request(_chat(messages=[{"role": "tool", "content": "x"}]))
    with pytest.raises(ProtocolError, match="'input_audio'"):
        parse_chat_request(_chat(messages=[_user({"type": "input_audio"})]))
    with pytest.raises(ProtocolError, match="max_tokens must be >= 1, got -5"):
        parse_chat_request(_chat(max_tokens=-5))


def test_a_body_that_is_not_an_object_is_refused() -> None:
    for body in ([], "x", None, 3):
        with pytest.raises(ProtocolError, match="request body") as info:
            parse_chat_request(body)
        assert info.value.param is None


COMPLETION_REFUSALS = {
    "no prompt": ({"model": MODEL}, "prompt", "missing_required_parameter"),
    "prompt as a number": ({"model": MODEL, "prompt": 5}, "prompt", "invalid_type"),
    "prompt of mixed ids": ({"model": MODEL, "prompt": [1, "a"]}, "prompt", "invalid_type"),
    "several prompts": ({"model": MODEL, "prompt": ["a", "b"]}, "prompt", "unsupported_value"),
    "several id prompts": ({"model": MODEL, "prompt": [[1], [2]]}, "prompt", "unsupported_value"),
    "empty prompt": ({"model": MODEL, "prompt": ""}, "prompt", "invalid_value"),
    "empty id prompt": ({"model": MODEL, "prompt": []}, "prompt", "invalid_value"),
    "negative id": ({"model": MODEL, "prompt": [3, -1]}, "prompt", "invalid_value"),
    "echo": ({"model": MODEL, "prompt": "a", "echo": True}, "echo", "unsupported_parameter"),
    "suffix": ({"model": MODEL, "prompt": "a", "suffix": "z"}, "suffix", "unsupported_parameter"),
    "best_of": ({"model": MODEL, "prompt": "a", "best_of": 3}, "best_of", "unsupported_parameter"),
    "logprobs as a bool": ({"model": MODEL, "prompt": "a", "logprobs": True}, "logprobs", "invalid_type"),
    "logprobs too large": ({"model": MODEL, "prompt": "a", "logprobs": 21}, "logprobs", "invalid_value"),
    "negative max_tokens": ({"model": MODEL, "prompt": "a", "max_tokens": -1}, "max_tokens", "invalid_value"),
    "stream_options without stream": (
        {"model": MODEL, "prompt": "a", "stream_options": {"include_usage": True}},
        "stream_options",
        "invalid_value",
    ),
}


@pytest.mark.parametrize("body, param, code", COMPLETION_REFUSALS.values(), ids=COMPLETION_REFUSALS.keys())
def test_completion_refusals_name_the_parameter(body: dict[str, Any], param: str, code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_completion_request(body)
    assert (info.value.param, info.value.code) == (param, code), str(info.value)


ODD_VALUES = [None, True, 0, -1, 1.5, float("inf"), 2**70, "x", "", [], {}, [1], [None], [{}], {"a": 1}]
FIELDS = [
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "seed",
    "logprobs", "top_logprobs", "stream", "stream_options", "top_k", "min_p", "repetition_penalty",
    "stop_token_ids", "ignore_eos", "return_token_ids", "include_reasoning", "media_io_kwargs", "prompt",
]  # fmt: skip


@pytest.mark.parametrize("name", FIELDS)
def test_odd_values_raise_only_protocol_errors(name: str) -> None:
    for value in ODD_VALUES:
        for parse, base in (
            (parse_chat_request, _chat()),
            (parse_completion_request, {"model": MODEL, "prompt": "a"}),
        ):
            with contextlib.suppress(ProtocolError):  # anything else fails the test
                parse({**base, name: value})
    odd_messages = [[{"role": "user", "content": [v]}] for v in ODD_VALUES] + [[v] for v in ODD_VALUES]
    for messages in odd_messages:
        with pytest.raises(ProtocolError):
            parse_chat_request(_chat(messages=messages))


def test_extra_fields_are_accepted_and_ignored() -> None:
    body = _chat(user="u-1", store=False, metadata={"k": "v"}, foo=[1, 2], tool_choice="none", tools=[])
    request = parse_chat_request(body)
    assert request.model_extra == {
        "user": "u-1",
        "store": False,
        "metadata": {"k": "v"},
        "foo": [1, 2],
        "tool_choice": "none",
        "tools": [],
    }
    assert sampling_params(request) == SamplingParams()
    nested = _chat(
        messages=[{"role": "user", "name": "ann", "content": [{"type": "text", "text": "x", "cache": 1}]}]
    )
    assert parse_chat_request(nested).messages[0].content[0].text == "x"  # type: ignore[index, union-attr]


def test_nulls_mean_not_set() -> None:
    request = parse_chat_request(
        _chat(temperature=None, stop=None, max_tokens=None, stream=None, logprobs=None)
    )
    assert sampling_params(request, {"temperature": 0.7}) == SamplingParams(temperature=0.7)


# --- conversion to SamplingParams -----------------------------------------------------------


def test_stop_as_string_and_list() -> None:
    assert sampling_params(parse_chat_request(_chat(stop="END"))).stop == ("END",)
    assert sampling_params(parse_chat_request(_chat(stop=["a", "b"]))).stop == ("a", "b")
    assert sampling_params(parse_completion_request({"model": MODEL, "prompt": "p", "stop": "\n"})).stop == (
        "\n",
    )


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert sampling_params(parse_chat_request(_chat(max_tokens=5))).max_new_tokens == 5
    assert sampling_params(parse_chat_request(_chat(max_completion_tokens=9))).max_new_tokens == 9
    both = parse_chat_request(_chat(max_tokens=5, max_completion_tokens=9))
    assert sampling_params(both, {"max_new_tokens": 100}).max_new_tokens == 9


def test_explicit_fields_override_checkpoint_defaults() -> None:
    defaults = {"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 1000}
    params = sampling_params(parse_chat_request(_chat(temperature=0, top_k=5)), defaults)
    assert (params.temperature, params.top_p, params.top_k, params.max_new_tokens) == (0.0, 0.95, 5, 1000)


def test_every_sampling_field_maps() -> None:
    body = _chat(
        max_tokens=7, temperature=0.5, top_p=0.9, n=3, stop=["x"], seed=11, presence_penalty=0.5,
        frequency_penalty=-0.5, top_k=40, min_p=0.05, repetition_penalty=1.1, stop_token_ids=[5, 6],
        ignore_eos=True, logprobs=True, top_logprobs=4,
    )  # fmt: skip
    expected = SamplingParams(
        max_new_tokens=7, temperature=0.5, top_p=0.9, n=3, stop=("x",), seed=11, presence_penalty=0.5,
        frequency_penalty=-0.5, top_k=40, min_p=0.05, repetition_penalty=1.1, stop_token_ids=(5, 6),
        ignore_eos=True, logprobs=4,
    )  # fmt: skip
    assert sampling_params(parse_chat_request(body)) == expected


def test_logprobs_mapping() -> None:
    assert sampling_params(parse_chat_request(_chat(logprobs=True))).logprobs == 0
    assert sampling_params(parse_chat_request(_chat(logprobs=True, top_logprobs=3))).logprobs == 3
    assert sampling_params(parse_chat_request(_chat(logprobs=False))).logprobs is None
    completion = parse_completion_request({"model": MODEL, "prompt": [1, 2], "logprobs": 2})
    assert sampling_params(completion).logprobs == 2
    assert completion.prompt == (1, 2)
    assert parse_completion_request({"model": MODEL, "prompt": ["one"]}).prompt == "one"
    assert parse_completion_request({"model": MODEL, "prompt": [[4, 5]]}).prompt == (4, 5)
    assert ChatRequest.split_reasoning is None and completion.split_reasoning is False


def test_check_model() -> None:
    check_model(MODEL, {MODEL})
    with pytest.raises(ModelNotFoundError) as info:
        check_model("gpt-4o", {MODEL})
    status, body = error_body(info.value)
    assert status == 404
    assert body["error"] == {
        "message": "The model `gpt-4o` does not exist.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


# --- messages and media ---------------------------------------------------------------------


def _conversation() -> dict[str, Any]:
    return _chat(
        messages=[
            {"role": "system", "content": "Be brief."},
            _user(_text("Compare"), _image(), _image("https://example.com/b.jpg"), _text("and")),
            {"role": "assistant", "content": [_text("They differ.")]},
            _user(_video(), _text("Now this?")),
            {"role": "assistant", "content": None},
        ],
        media_io_kwargs={"video": {"num_frames": 8, "fps": 2, "frame_token_limit": 256}},
    )


def test_chat_messages_reference_the_media_in_prompt_order() -> None:
    messages, media = chat_messages(parse_chat_request(_conversation()))
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare"},
                {"type": "image", "media_index": 0},
                {"type": "image", "media_index": 1},
                {"type": "text", "text": "and"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "They differ."}]},
        {
            "role": "user",
            "content": [{"type": "video", "media_index": 2}, {"type": "text", "text": "Now this?"}],
        },
        {"role": "assistant", "content": ""},
    ]
    assert media == [
        MediaRef("image", IMAGE, 0, "messages[1].content[1].image_url.url"),
        MediaRef("image", "https://example.com/b.jpg", 1, "messages[1].content[2].image_url.url"),
        MediaRef("video", "https://example.com/v.mp4", 2, "messages[3].content[0].video_url.url"),
    ]


def test_video_options_map_vllm_names() -> None:
    assert video_options(parse_chat_request(_conversation())) == VideoOptions(
        fps=2.0, max_frames=8, frame_token_limit=256
    )
    assert video_options(parse_chat_request(_chat())) is None


def test_media_limits() -> None:
    body = _chat(messages=[_user(_image(), _text("x")), _user(_image(), _image())])
    request = parse_chat_request(body)
    assert len(chat_messages(request, max_images=3)[1]) == 3
    with pytest.raises(ProtocolError, match="more images than the limit of 2") as info:
        chat_messages(request, max_images=2)
    assert info.value.param == "messages[1].content[1]"
    with pytest.raises(ProtocolError, match="more videos than the limit of 0"):
        chat_messages(parse_chat_request(_chat(messages=[_user(_video())])), max_videos=0)


def test_messages_feed_the_chat_template(tok: KimiTokenizer) -> None:
    messages, media = chat_messages(parse_chat_request(_conversation()))
    # the preprocessor's answer: an image is one image part, a video its frames' stamps and images
    parts = [
        [{"type": "image"}],
        [{"type": "image"}],
        [_text("00:00:00.0"), {"type": "image"}, _text("00:00:00.5"), {"type": "image"}],
    ]
    encoding = encode_chat(tok, expand_media(messages, parts), image_token_counts=[4, 6, 2, 2])
    assert [length for _, length in encoding.image_spans] == [4, 6, 2, 2]
    assert "00:00:00.5" in encoding.text and "Now this?" in encoding.text
    images_only = chat_messages(parse_chat_request(_chat(messages=[_user(_image(), _text("What?"))])))[0]
    assert encode_chat(tok, images_only, image_token_counts=[3]).image_spans[0][1] == 3  # no expansion needed
    with pytest.raises(InternalError):
        expand_media(messages, parts[:2])


# --- responses ------------------------------------------------------------------------------


def _outputs(
    answers: list[str],
    *,
    reasoning: str = "",
    logprobs: int | None = None,
    finish: str = "stop",
    prompt_tokens: int = 9,
    cached: int = 4,
) -> list[RequestOutput]:
    """An engine stream: one byte-level token per step and choice (reasoning first, choice 0)."""
    steps: list[list[CompletionDelta]] = [
        [CompletionDelta(0, reasoning=c, token_ids=(ord(c),))] for c in reasoning
    ]
    for step in range(max(map(len, answers))):
        deltas = []
        for index, answer in enumerate(answers):
            if step < len(answer):
                token = ord(answer[step])
                entry = TokenLogprobs(
                    token,
                    float("-inf") if step == 0 else -0.25,
                    ((token, -0.25), (ord("?"), -2.0))[: logprobs or 0],
                )
                last = step == len(answer) - 1
                lps = (entry,) if logprobs is not None else ()
                deltas.append(
                    CompletionDelta(index, answer[step], "", (token,), lps, finish if last else None)
                )
        steps.append(deltas)
    outputs, done = [], 0
    for number, deltas in enumerate(steps):
        done += len(deltas)
        outputs.append(
            RequestOutput("r", tuple(deltas), number == len(steps) - 1, prompt_tokens, cached, done)
        )
    return outputs


def _chat_builder(tok: KimiTokenizer, request: dict[str, Any], **kwargs: Any) -> ChatResponseBuilder:
    return ChatResponseBuilder(
        parse_chat_request(request),
        response_id="chatcmpl-1",
        model=MODEL,
        tokenizer=tok,
        created=1700000000,
        **kwargs,
    )


def _completion_builder(
    tok: KimiTokenizer, request: dict[str, Any], **kwargs: Any
) -> CompletionResponseBuilder:
    parsed = parse_completion_request(request)
    return CompletionResponseBuilder(
        parsed, response_id="cmpl-1", model=MODEL, tokenizer=tok, created=1700000000, **kwargs
    )


@needs_openai
def test_chat_completion_validates_with_openai_models(tok: KimiTokenizer) -> None:
    body = _chat(n=2, logprobs=True, top_logprobs=2, return_token_ids=True)
    builder = _chat_builder(tok, body, prompt_token_ids=[1, 2, 3])
    for output in _outputs(["Hello", "Hi"], reasoning="hm", logprobs=2):
        builder.add(output)
    response = builder.response()
    parsed = ChatCompletion.model_validate(response)
    assert parsed.object == "chat.completion" and parsed.id == "chatcmpl-1"
    first, second = parsed.choices
    assert (first.message.content, second.message.content) == ("Hello", "Hi")
    assert first.message.model_extra == {"reasoning_content": "hm"}
    assert first.finish_reason == "stop"
    assert first.logprobs is not None and first.logprobs.content is not None
    entry = first.logprobs.content[0]
    assert (entry.token, entry.logprob, entry.bytes) == ("H", -9999.0, [ord("H")])
    assert [(t.token, t.logprob, t.bytes) for t in entry.top_logprobs] == [
        ("H", -0.25, [72]),
        ("?", -2.0, [63]),
    ]
    assert parsed.usage is not None and parsed.usage.prompt_tokens_details is not None
    assert (parsed.usage.prompt_tokens, parsed.usage.completion_tokens, parsed.usage.total_tokens) == (
        9,
        9,
        18,
    )
    assert parsed.usage.prompt_tokens_details.cached_tokens == 4
    assert response["prompt_token_ids"] == [1, 2, 3]
    assert response["choices"][0]["token_ids"] == [ord(c) for c in "hmHello"]
    json.dumps(response, allow_nan=False)


def test_include_reasoning_false_drops_the_reasoning(tok: KimiTokenizer) -> None:
    builder = _chat_builder(tok, _chat(include_reasoning=False, stream=True))
    chunks = [c for o in _outputs(["ok"], reasoning="secret") for c in builder.chunks(o)]
    assert (
        "secret" not in json.dumps(chunks)
        and "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "ok"
    )
    builder = _chat_builder(tok, _chat(include_reasoning=False))
    for output in _outputs(["ok"], reasoning="secret"):
        builder.add(output)
    assert "reasoning_content" not in builder.response()["choices"][0]["message"]


def test_logprob_tokens_of_a_split_character(tok: KimiTokenizer) -> None:
    builder = _chat_builder(tok, _chat(logprobs=True))
    builder.add(
        RequestOutput(
            "r",
            (CompletionDelta(0, "", "", (0xE4,), (TokenLogprobs(0xE4, -1.0, ()),), "length"),),
            True,
            1,
            0,
            1,
        )
    )
    entry = builder.response()["choices"][0]["logprobs"]["content"][0]
    assert entry == {"token": "\ufffd", "logprob": -1.0, "bytes": [0xE4], "top_logprobs": []}
    assert builder.response()["choices"][0]["finish_reason"] == "length"


@needs_openai
def test_chat_stream_chunks_validate_with_openai_models(tok: KimiTokenizer) -> None:
    body = _chat(
        n=2, stream=True, stream_options={"include_usage": True}, logprobs=True, return_token_ids=True
    )
    builder = _chat_builder(tok, body, prompt_token_ids=[7, 8])
    chunks = [c for o in _outputs(["Hey", "Yo"], reasoning="r", logprobs=0) for c in builder.chunks(o)]
    usage = builder.usage_chunk()
    assert usage is not None
    parsed = [ChatCompletionChunk.model_validate(c) for c in [*chunks, usage]]
    assert all(c.object == "chat.completion.chunk" and c.id == "chatcmpl-1" for c in parsed)
    assert chunks[0]["prompt_token_ids"] == [7, 8] and all("prompt_token_ids" not in c for c in chunks[1:])
    assert all(c.usage is None for c in parsed[:-1]) and parsed[-1].choices == []
    assert parsed[-1].usage is not None and parsed[-1].usage.prompt_tokens_details is not None
    assert (
        parsed[-1].usage.prompt_tokens_details.cached_tokens == 4 and parsed[-1].usage.completion_tokens == 6
    )
    for index, answer in ((0, "Hey"), (1, "Yo")):
        mine = [c.choices[0] for c in parsed[:-1] if c.choices[0].index == index]
        assert mine[0].delta.role == "assistant" and mine[0].delta.content == ""
        assert "".join(c.delta.content or "" for c in mine) == answer
        assert [c.finish_reason for c in mine][-1] == "stop" and all(
            c.finish_reason is None for c in mine[:-1]
        )
        token_ids = [t for c in mine for t in (c.model_extra or {}).get("token_ids", [])]
        assert bytes(token_ids).decode().endswith(answer)
    reasoning = [c.choices[0].delta.model_extra for c in parsed[:-1] if c.choices[0].delta.model_extra]
    assert reasoning == [{"reasoning_content": "r"}]


def test_stream_without_usage_has_no_usage_fields(tok: KimiTokenizer) -> None:
    builder = _chat_builder(tok, _chat(stream=True))
    chunks = [c for o in _outputs(["ab"]) for c in builder.chunks(o)]
    assert all("usage" not in c for c in chunks) and builder.usage_chunk() is None
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": ""},
        {"content": "a"},
        {"content": "b"},
    ]


@needs_openai
def test_text_completion_validates_with_openai_models(tok: KimiTokenizer) -> None:
    builder = _completion_builder(
        tok, {"model": MODEL, "prompt": "x", "logprobs": 1, "return_token_ids": True}, prompt_token_ids=[5]
    )
    for output in _outputs(["abc"], logprobs=1, finish="length"):
        builder.add(output)
    response = builder.response()
    parsed = Completion.model_validate(response)
    choice = parsed.choices[0]
    assert (choice.text, choice.finish_reason) == ("abc", "length")
    assert choice.logprobs is not None
    assert choice.logprobs.tokens == ["a", "b", "c"] and choice.logprobs.text_offset == [0, 1, 2]
    assert choice.logprobs.token_logprobs == [-9999.0, -0.25, -0.25]
    assert choice.logprobs.top_logprobs == [{"a": -0.25}, {"b": -0.25}, {"c": -0.25}]
    assert response["choices"][0]["prompt_token_ids"] == [5] and response["choices"][0]["token_ids"] == [
        97,
        98,
        99,
    ]
    assert parsed.usage is not None and parsed.usage.prompt_tokens_details is not None
    assert parsed.usage.prompt_tokens_details.cached_tokens == 4


@needs_openai
def test_text_completion_stream_parses(tok: KimiTokenizer) -> None:
    body = {
        "model": MODEL,
        "prompt": "x",
        "logprobs": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    builder = _completion_builder(tok, body)
    chunks = [c for o in _outputs(["abc"], logprobs=0) for c in builder.chunks(o)]
    usage = builder.usage_chunk()
    # OpenAI's own stream sends `finish_reason: null` until the end, which its (non-optional) field
    # refuses; the client reads chunks with construct_type, as done here, and validates nothing
    from openai._models import construct_type

    parsed = [construct_type(value=c, type_=Completion) for c in chunks]
    assert "".join(p.choices[0].text for p in parsed) == "abc"
    assert [p.choices[0].logprobs.text_offset for p in parsed] == [[0], [1], [2]]
    Completion.model_validate(chunks[-1])
    assert Completion.model_validate(usage).usage.total_tokens == 12  # type: ignore[union-attr]


def test_an_aborted_choice_is_a_retryable_error(tok: KimiTokenizer) -> None:
    builder = _chat_builder(tok, _chat())
    with pytest.raises(UpstreamUnavailableError):
        builder.add(RequestOutput("r", (CompletionDelta(0, "", "", (), (), "abort"),), True, 1, 0, 0))
    assert error_body(UpstreamUnavailableError("x"))[0] == 503


def test_a_response_before_the_end_is_a_bug(tok: KimiTokenizer) -> None:
    builder = _chat_builder(tok, _chat())
    builder.add(_outputs(["ab"])[0])
    with pytest.raises(InternalError):
        builder.response()


# --- SSE and stream driving -----------------------------------------------------------------


def test_sse_framing() -> None:
    assert sse_event({"a": "é", "b": [1]}) == 'data: {"a":"é","b":[1]}\n\n'
    assert SSE_DONE == "data: [DONE]\n\n"
    with pytest.raises(ValueError):
        sse_event({"x": float("nan")})


class _Engine:
    """A stand-in for AsyncEngine.generate: yields `outputs`, then raises `error` if given."""

    def __init__(self, outputs: list[RequestOutput], error: BaseException | None = None) -> None:
        self.outputs, self.error, self.closed = outputs, error, False

    async def generate(self) -> AsyncIterator[RequestOutput]:
        try:
            for output in self.outputs:
                yield output
            if self.error is not None:
                raise self.error
        finally:
            self.closed = True


def _events(text: str) -> list[Any]:
    return [json.loads(e[6:]) if e != "data: [DONE]" else "[DONE]" for e in text.split("\n\n") if e]


def test_stream_errors_before_the_first_output_raise(tok: KimiTokenizer) -> None:
    builder = _chat_builder(tok, _chat(stream=True))
    with pytest.raises(CapacityError):
        asyncio.run(open_sse_stream(builder, _Engine([], CapacityError("full", retry_after_s=2)).generate()))


def test_stream_errors_after_the_first_output_become_an_event(tok: KimiTokenizer) -> None:
    engine = _Engine(_outputs(["abc"])[:2], DeadlineExceededError("request r passed its deadline"))

    async def run() -> str:
        events = await open_sse_stream(_chat_builder(tok, _chat(stream=True)), engine.generate())
        return "".join([e async for e in events])

    events = _events(asyncio.run(run()))
    assert events[-1] == "[DONE]"
    assert events[-2] == {
        "error": {
            "message": "The request did not finish before its deadline.",
            "type": "server_error",
            "param": None,
            "code": "timeout",
        }
    }
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2]) == "ab"


def test_closing_the_stream_closes_the_engine_stream(tok: KimiTokenizer) -> None:
    engine = _Engine(_outputs(["abcdef"]))

    async def run() -> None:
        events = await open_sse_stream(_chat_builder(tok, _chat(stream=True)), engine.generate())
        await anext(events)  # type: ignore[call-overload]
        await events.aclose()  # type: ignore[attr-defined]

    asyncio.run(run())
    assert engine.closed


def test_collect_response(tok: KimiTokenizer) -> None:
    builder = _chat_builder(tok, _chat())
    response = asyncio.run(collect_response(builder, _Engine(_outputs(["ok"])).generate()))
    assert response["choices"][0]["message"]["content"] == "ok"


# --- errors and models ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "error, status, kind, code, message",
    [
        (
            InvalidInputError("the image is not an image"),
            400,
            "invalid_request_error",
            None,
            "the image is not an image",
        ),
        (
            RequestTooLargeError(1024),
            413,
            "invalid_request_error",
            "request_too_large",
            "larger than the limit of 1024 bytes",
        ),
        (
            CapacityError("256 requests are waiting"),
            429,
            "server_error",
            "server_overloaded",
            "256 requests are waiting",
        ),
        (InternalError("bug in /srv/secret.py"), 500, "server_error", None, "The server had an error"),
        (RuntimeError("Traceback: /srv/secret.py"), 500, "server_error", None, "The server had an error"),
        (
            UpstreamUnavailableError("redis://10.0.0.3 refused"),
            503,
            "server_error",
            "service_unavailable",
            "temporarily unavailable",
        ),
        (DeadlineExceededError("deadline"), 504, "server_error", "timeout", "did not finish"),
    ],
)
def test_error_bodies(error: BaseException, status: int, kind: str, code: str | None, message: str) -> None:
    got_status, body = error_body(error)
    assert got_status == status
    assert body["error"]["type"] == kind and body["error"]["code"] == code and body["error"]["param"] is None
    assert message in body["error"]["message"] and "secret" not in body["error"]["message"]
    assert "10.0.0.3" not in body["error"]["message"]


def test_retry_after_headers() -> None:
    assert error_headers(CapacityError("full", retry_after_s=0.25)) == {
        "Retry-After": "1",
        "retry-after-ms": "250",
    }
    assert error_headers(CapacityError("full", retry_after_s=2.5)) == {
        "Retry-After": "3",
        "retry-after-ms": "2500",
    }
    assert error_headers(CapacityError("full")) == {} and error_headers(InvalidInputError("x")) == {}


@needs_openai
def test_models_list_validates() -> None:
    body = models_list([MODEL], created=1700000000)
    assert [Model.model_validate(m).id for m in body["data"]] == [MODEL] and body["object"] == "list"


def test_the_layer_imports_no_heavy_dependencies() -> None:
    code = (
        "import sys; import services.frontend.openai_responses, services.frontend.openai_protocol; "
        "print([m for m in ('torch', 'ray', 'grpc', 'redis') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[1],
    )
    assert out.stdout.strip() == "[]"


# --- the official client end to end, over an in-process transport ---------------------------


def _app(
    tok: KimiTokenizer, script: Callable[[Any], list[RequestOutput] | BaseException]
) -> Callable[[Any], Any]:
    """A stand-in for the ingress: request -> our parse, a scripted engine, our builders."""
    from openai import _base_client

    httpx = getattr(_base_client, "httpx2", None) or _base_client.httpx

    def handle(request: Any) -> Any:
        try:
            if request.url.path.endswith("/models"):
                return httpx.Response(200, json=models_list([MODEL], created=1))
            body = json.loads(request.content)
            chat = request.url.path.endswith("/chat/completions")
            parsed = parse_chat_request(body) if chat else parse_completion_request(body)
            check_model(parsed.model, {MODEL})
            scripted = script(parsed)
            outputs = scripted if isinstance(scripted, list) else []
            error = scripted if isinstance(scripted, BaseException) else None
            kind = ChatResponseBuilder if chat else CompletionResponseBuilder
            builder = kind(parsed, response_id="id-1", model=MODEL, tokenizer=tok, prompt_token_ids=[1])  # type: ignore[arg-type]
            engine = _Engine(outputs, error)
            if not parsed.stream:
                return httpx.Response(200, json=asyncio.run(collect_response(builder, engine.generate())))

            async def stream() -> str:
                events = await open_sse_stream(builder, engine.generate())
                return "".join([e async for e in events])

            text = asyncio.run(stream())
            return httpx.Response(200, content=text.encode(), headers={"content-type": "text/event-stream"})
        except Exception as exc:  # the ingress's edge
            status, body = error_body(exc)
            return httpx.Response(status, json=body, headers=error_headers(exc))

    return lambda: openai.OpenAI(  # type: ignore[union-attr]
        api_key="none",
        base_url="http://ingress.test/v1",
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(handle)),
    )


@needs_openai
def test_the_openai_client_end_to_end(tok: KimiTokenizer) -> None:
    client = _app(
        tok,
        lambda r: _outputs(
            ["Hello"] * (r.n or 1),
            reasoning="hm",
            logprobs=r.top_logprobs if isinstance(r, ChatRequest) else r.logprobs,
        ),
    )()
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[_user(_text("Hi"), _image())],  # type: ignore[list-item]
        max_completion_tokens=8,
        logprobs=True,
        top_logprobs=2,
        n=2,
        extra_body={"top_k": 5, "return_token_ids": True},
    )
    assert [c.message.content for c in chat.choices] == ["Hello", "Hello"]
    assert chat.choices[0].message.reasoning_content == "hm"  # type: ignore[attr-defined]
    assert chat.choices[0].logprobs.content[1].top_logprobs[1].token == "?"  # type: ignore[union-attr, index]
    assert chat.usage.prompt_tokens_details.cached_tokens == 4  # type: ignore[union-attr]
    assert chat.prompt_token_ids == [1]  # type: ignore[attr-defined]

    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    assert chunks[-1].usage.completion_tokens == 7  # type: ignore[union-attr]

    completion = client.completions.create(model=MODEL, prompt="Hi", logprobs=1, max_tokens=4)
    assert completion.choices[0].text == "Hello" and completion.choices[0].logprobs.tokens[0] == "H"  # type: ignore[union-attr]
    text = "".join(
        c.choices[0].text for c in client.completions.create(model=MODEL, prompt=[1, 2], stream=True)
    )
    assert text == "Hello"
    assert [m.id for m in client.models.list()] == [MODEL]


@needs_openai
def test_the_openai_client_raises_its_own_errors(tok: KimiTokenizer) -> None:
    def script(request: Any) -> list[RequestOutput] | BaseException:
        if request.seed == 1:
            return CapacityError("full", retry_after_s=3)
        return _outputs(["ab"])[:1] if request.seed == 2 else _outputs(["ab"])

    client = _app(tok, script)()
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.BadRequestError) as bad:  # type: ignore[union-attr]
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=-1)  # type: ignore[arg-type]
    assert bad.value.param == "max_tokens" and bad.value.code == "invalid_value"
    with pytest.raises(openai.BadRequestError) as bad:  # type: ignore[union-attr]
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": [_image("ftp://x")]}]
        )  # type: ignore[list-item]
    assert bad.value.param == "messages[0].content[0].image_url.url"
    with pytest.raises(openai.NotFoundError):  # type: ignore[union-attr]
        client.chat.completions.create(model="gpt-4o", messages=messages)  # type: ignore[arg-type]
    with pytest.raises(openai.RateLimitError) as limited:  # type: ignore[union-attr]
        client.chat.completions.create(model=MODEL, messages=messages, seed=1)  # type: ignore[arg-type]
    assert limited.value.response.headers["retry-after"] == "3"
    with pytest.raises(openai.APIError, match="server had an error"):  # type: ignore[union-attr]
        list(client.chat.completions.create(model=MODEL, messages=messages, seed=2, stream=True))  # type: ignore[arg-type]
