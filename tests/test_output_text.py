"""Streaming output text: detokenisation, stop strings and the reasoning split, on the tiny tokenizer."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path

import pytest

from services.common.tiny_tokenizer import write_tiny_tokenizer
from services.common.tokenizer import KimiTokenizer
from services.decoder.engine.output_text import (
    THINK_END,
    THINK_START,
    OutputText,
    TextDelta,
    thinking_evidence,
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> KimiTokenizer:
    directory: Path = tmp_path_factory.mktemp("output_text") / "tiny"
    write_tiny_tokenizer(directory)
    return KimiTokenizer.from_pretrained(directory)


def _byte_ids(tok: KimiTokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte: the tiny vocabulary's first 256 ranks are the single bytes."""
    ids = list(text.encode("utf-8"))
    assert all(tok.token_bytes(i) == bytes([i]) for i in ids)
    return ids


def _run(out: OutputText, ids: Sequence[int], chunks: Sequence[int] = (1,)) -> list[TextDelta]:
    """Feed `ids` in chunks of the given sizes (cycled) until a stop matches, then finish."""
    deltas, pos, i = [], 0, 0
    while pos < len(ids) and not out.stopped:
        size = chunks[i % len(chunks)]
        deltas.append(out.feed(ids[pos : pos + size]))
        pos, i = pos + size, i + 1
    deltas.append(out.finish())
    return deltas


def _joined(deltas: Sequence[TextDelta]) -> tuple[str, str]:
    return "".join(d.text for d in deltas), "".join(d.reasoning for d in deltas)


def _assert_whole_characters(deltas: Sequence[TextDelta]) -> None:
    for d in deltas:
        for part in (d.text, d.reasoning):
            assert "\ufffd" not in part
            part.encode("utf-8")  # no lone surrogates either


# -- a non-streaming reference ---------------------------------------------------------------------


def _first_stop(text: str, stop: Sequence[str]) -> tuple[int, int, str] | None:
    """(end, start, stop) of the match that ends first, the longest of those ending together."""
    found = [(i + len(s), i, s) for s in stop if (i := text.find(s)) >= 0]
    return min(found) if found else None


def _split(raw: str) -> tuple[str, str]:
    answer, reasoning, inside, pos = [], [], False, 0
    for m in re.finditer(f"{re.escape(THINK_START)}|{re.escape(THINK_END)}", raw):
        (reasoning if inside else answer).append(raw[pos : m.start()])
        inside, pos = m.group() == THINK_START, m.end()
    (reasoning if inside else answer).append(raw[pos:])
    return "".join(answer), "".join(reasoning)


def _chars_after(tok: KimiTokenizer, ids: Sequence[int]) -> list[str]:
    """Text decodable after each token (a trailing partial character not yet included)."""
    data, texts = b"", []
    for i in ids:
        if not tok.is_special(i):
            data += tok.token_bytes(i)
        texts.append(data.decode("utf-8", errors="ignore"))  # inputs are valid: only the tail drops
    return texts


def _reference(
    tok: KimiTokenizer, ids: Sequence[int], stop: Sequence[str], split: bool
) -> tuple[str, str, str | None, int]:
    raw = tok.decode(ids, skip_special_tokens=True)
    match, num_tokens = _first_stop(raw, stop), len(ids)
    if match is not None:
        raw = raw[: match[1]]
        num_tokens = 1 + next(k for k, t in enumerate(_chars_after(tok, ids)) if len(t) >= match[0])
    text, reasoning = _split(raw) if split else (raw, "")
    return text, reasoning, match[2] if match else None, num_tokens


# -- detokenisation --------------------------------------------------------------------------------

MULTIBYTE = ["你好世界", "😀 emoji 🎉!", f"{THINK_START}思考{THINK_END}答案", "naïve café – ok", "a◁b▷c"]


@pytest.mark.parametrize("text", MULTIBYTE)
def test_multibyte_one_token_at_a_time(tok: KimiTokenizer, text: str) -> None:
    ids = tok.encode(text)
    deltas = _run(OutputText(tok), ids)
    _assert_whole_characters(deltas)
    assert _joined(deltas) == (tok.decode(ids, skip_special_tokens=True), "") == (text, "")


def test_the_stream_really_splits_characters(tok: KimiTokenizer) -> None:
    # 世界 tokenises with one token holding the end of 世 and the start of 界
    ids = tok.encode("你好世界")
    assert any(not _decodes(tok.token_bytes(i)) for i in ids)
    out = OutputText(tok)
    seen = [out.feed([i]).text for i in ids]
    assert "".join(seen) == "你好世界" and "" in seen


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_special_tokens_skipped_or_kept(tok: KimiTokenizer) -> None:
    eos = tok.eos_id
    ni = list("你".encode())
    ids = tok.encode("ok ") + ni[:2] + [eos] + ni[2:] + [eos]  # a special token inside a character
    skipped = _run(OutputText(tok), ids)
    assert _joined(skipped) == ("ok 你", "") == (tok.decode(ids, skip_special_tokens=True), "")
    kept = _run(OutputText(tok, skip_special_tokens=False), ids)
    assert _joined(kept)[0] == tok.decode(ids, skip_special_tokens=False)
    assert _joined(kept)[0].endswith(tok.eos_token)


def test_incomplete_character_at_finish_is_replaced(tok: KimiTokenizer) -> None:
    ids = tok.encode("ab") + list("界".encode())[:2]
    out = OutputText(tok)
    assert out.feed(ids).text == "ab"
    assert out.finish().text == "\ufffd" == tok.decode(ids)[-1]


CHUNKED = f"Hi 你好 {THINK_START}let me 想 😀{THINK_END}\n\nThe answer is 42. STOP here"


@pytest.mark.parametrize(
    ("stop", "split"),
    [((), False), ((), True), (("STOP",), False), (("STOP", "42"), True), (("想 😀",), True)],
)
def test_chunking_does_not_change_the_result(tok: KimiTokenizer, stop: tuple[str, ...], split: bool) -> None:
    ids = tok.encode(CHUNKED)
    results = set()
    for chunks in [(1,), (2,), (3,), (5, 1), (len(ids),)]:
        out = OutputText(tok, stop=stop, split_reasoning=split)
        deltas = _run(out, ids, chunks)
        _assert_whole_characters(deltas)
        assert _joined(deltas) == (out.text, out.reasoning)
        results.add((out.text, out.reasoning, out.matched_stop, out.num_tokens))
    assert results == {_reference(tok, ids, stop, split)}


# -- stop strings ----------------------------------------------------------------------------------


def test_stop_across_token_boundaries(tok: KimiTokenizer) -> None:
    ids = tok.encode("hello world")  # he | llo | ␠wor | ld
    assert [tok.token_bytes(i) for i in ids] == [b"he", b"llo", b" wor", b"ld"]
    out = OutputText(tok, stop=["lo wo"])  # starts inside `llo`, ends inside ` wor`
    deltas = [out.feed([i]) for i in ids[:3]]
    assert [d.text for d in deltas] == ["he", "l", ""]
    assert (out.stopped, out.matched_stop, out.num_tokens, out.text) == (True, "lo wo", 3, "hel")
    assert out.finish() == TextDelta()


def test_stop_within_one_token_and_later_tokens_ignored(tok: KimiTokenizer) -> None:
    ids = tok.encode("hello world")
    out = OutputText(tok, stop=["wo"])
    assert out.feed(ids).text == "hello "
    assert (out.matched_stop, out.num_tokens) == ("wo", 3)


def test_stop_at_the_very_start(tok: KimiTokenizer) -> None:
    out = OutputText(tok, stop=["he"])
    assert out.feed(tok.encode("hello")) == TextDelta()
    assert (out.text, out.num_tokens, out.matched_stop) == ("", 1, "he")


def test_stop_inside_multibyte_characters(tok: KimiTokenizer) -> None:
    ids = tok.encode("你好世界")  # the tokens do not line up with the characters
    out = OutputText(tok, stop=["好世"])
    deltas = _run(out, ids)
    assert _joined(deltas) == ("你", "")
    assert out.num_tokens == 7  # the token holding the end of 世 completes the match


def test_shorter_stop_that_ends_first_wins(tok: KimiTokenizer) -> None:
    for stop in (["abc", "ab"], ["ab", "abc"]):
        out = OutputText(tok, stop=stop)
        _run(out, _byte_ids(tok, "xabcd"), (5,))
        assert (out.text, out.matched_stop, out.num_tokens) == ("x", "ab", 3)


def test_match_that_ends_first_wins_inside_one_token(tok: KimiTokenizer) -> None:
    # both complete inside `llo`; byte by byte `ll` would be seen first, so it must win here too
    for ids in (tok.encode("hello world"), _byte_ids(tok, "hello world")):
        out = OutputText(tok, stop=["hello", "ll"])
        assert out.feed(ids).text == "he"
        assert (out.matched_stop, out.num_tokens) == ("ll", 2 if len(ids) == 4 else 4)


def test_longest_stop_wins_when_matches_end_together(tok: KimiTokenizer) -> None:
    out = OutputText(tok, stop=["bc", "abc"])
    _run(out, _byte_ids(tok, "xabcd"), (5,))
    assert (out.text, out.matched_stop, out.num_tokens) == ("x", "abc", 4)


def test_self_overlapping_stop(tok: KimiTokenizer) -> None:
    out = OutputText(tok, stop=["aab"])
    deltas = [out.feed([i]).text for i in _byte_ids(tok, "aaab")]
    assert deltas == ["", "", "a", ""]  # `aa` could start a match until the third `a`
    assert (out.text, out.matched_stop, out.num_tokens) == ("a", "aab", 4)


def test_hold_back_only_a_possible_prefix(tok: KimiTokenizer) -> None:
    out = OutputText(tok, stop=["yq", "zzzz"])
    assert [out.feed([i]).text for i in _byte_ids(tok, "xyzw")] == ["x", "", "y", "zw"]
    assert [out.feed([i]).text for i in _byte_ids(tok, "zzz")] == ["", "", ""]
    assert out.finish().text == "zzz"  # a prefix still held at the end is released
    assert (out.stopped, out.text, out.num_tokens) == (False, "xyzwzzz", 7)


def test_feed_after_stop_or_finish_raises(tok: KimiTokenizer) -> None:
    out = OutputText(tok, stop=["b"])
    out.feed(_byte_ids(tok, "ab"))
    with pytest.raises(ValueError, match="stop"):
        out.feed(_byte_ids(tok, "c"))
    done = OutputText(tok)
    done.feed(_byte_ids(tok, "a") + list("界".encode())[:1])
    assert done.finish().text == "\ufffd" and done.finish() == TextDelta()
    with pytest.raises(ValueError, match="finish"):
        done.feed(_byte_ids(tok, "c"))


@pytest.mark.parametrize("stop", [[""], "ab", [None]])
def test_bad_stop_strings_rejected(tok: KimiTokenizer, stop) -> None:
    with pytest.raises(ValueError):
        OutputText(tok, stop=stop)


# -- reasoning split -------------------------------------------------------------------------------


def test_reasoning_split_with_markers_across_tokens(tok: KimiTokenizer) -> None:
    ids = tok.encode(f"{THINK_START}Let me think.{THINK_END}\n\nThe answer.")
    assert len(tok.encode(THINK_START)) > 1 and len(tok.encode(THINK_END)) > 1
    out = OutputText(tok, split_reasoning=True)
    deltas = _run(out, ids)
    assert all("◁" not in d.text + d.reasoning and "▷" not in d.text + d.reasoning for d in deltas)
    assert (out.reasoning, out.text) == ("Let me think.", "\n\nThe answer.")  # whitespace kept as generated
    assert _joined(deltas) == (out.text, out.reasoning)


def test_reasoning_without_split_is_plain_text(tok: KimiTokenizer) -> None:
    text = f"{THINK_START}r{THINK_END}a"
    out = OutputText(tok)
    _run(out, tok.encode(text))
    assert (out.text, out.reasoning) == (text, "")


@pytest.mark.parametrize(
    ("generated", "text", "reasoning"),
    [
        (f"{THINK_START}still thinking", "", "still thinking"),
        (f"{THINK_START}almost{THINK_END[:-2]}", "", f"almost{THINK_END[:-2]}"),  # held prefix released
        ("no think block at all ◁ ▷", "no think block at all ◁ ▷", ""),
        (f"Sure. {THINK_START}r{THINK_END} a", "Sure.  a", "r"),
        (f"a{THINK_END}b{THINK_START}c{THINK_START}d{THINK_END}e", "abe", "cd"),  # markers never emitted
        (f"{THINK_START[:3]}x", f"{THINK_START[:3]}x", ""),
    ],
)
def test_reasoning_split_cases(tok: KimiTokenizer, generated: str, text: str, reasoning: str) -> None:
    out = OutputText(tok, split_reasoning=True)
    deltas = _run(out, tok.encode(generated))
    assert (out.text, out.reasoning) == (text, reasoning) == _split(generated)
    assert _joined(deltas) == (text, reasoning)


def test_a_lone_marker_character_is_released_once_it_cannot_start_a_marker(tok: KimiTokenizer) -> None:
    out = OutputText(tok, split_reasoning=True)
    assert out.feed(tok.encode("a◁")).text == "a"
    assert out.feed(tok.encode("b")).text == "◁b"


@pytest.mark.parametrize(
    ("stop", "text", "reasoning"),
    [
        ([THINK_END], "", "plan STOP"),  # stop strings see the raw text, markers included
        (["STOP"], "", "plan "),
        (["ans"], "\n", "plan STOP"),
        (["think"], "◁", ""),  # the raw text before the match is a lone ◁, not a marker
    ],
)
def test_stop_and_reasoning_combined(tok: KimiTokenizer, stop: list[str], text: str, reasoning: str) -> None:
    out = OutputText(tok, stop=stop, split_reasoning=True)
    deltas = _run(out, tok.encode(f"{THINK_START}plan STOP{THINK_END}\nanswer"))
    assert (out.text, out.reasoning, out.matched_stop) == (text, reasoning, stop[0])
    assert _joined(deltas) == (text, reasoning)


# -- the property test -----------------------------------------------------------------------------

PIECES = ["a", "b", "ab", "c", " ", "\n", "你", "好", "世界", "😀", "é", "◁", "▷", "think", "ST", "OP"]
PIECES += [THINK_START, THINK_END]
STOPS = ["ab", "abc", "aab", "STOP", "好世", "😀a", THINK_END, "b ", "▷", "\n\n", "ink▷"]


def _stop_prefix_length(text: str, stop: Sequence[str]) -> int:
    suffixes = (k for k in range(1, len(text) + 1) if any(s.startswith(text[len(text) - k :]) for s in stop))
    return max(suffixes, default=0)


def test_random_streams_match_the_reference(tok: KimiTokenizer) -> None:
    rng = random.Random(1234)
    for _ in range(300):
        generated = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 40)))
        ids = tok.encode(generated)
        for _ in range(rng.randint(0, 3)):  # special tokens are skipped wherever they fall
            ids.insert(rng.randint(0, len(ids)), tok.eos_id)
        stop = rng.sample(STOPS, rng.randint(0, 3))
        split = rng.random() < 0.5
        out = OutputText(tok, stop=stop, split_reasoning=split)
        deltas, pos, avail = [], 0, _chars_after(tok, ids)
        while pos < len(ids) and not out.stopped:
            size = rng.randint(1, 6)
            deltas.append(out.feed(ids[pos : pos + size]))
            pos += size
            if not split and not out.stopped:  # exactly the longest possible stop prefix is held back
                seen = avail[min(pos, len(ids)) - 1]
                assert out.text == seen[: len(seen) - _stop_prefix_length(seen, stop)]
        deltas.append(out.finish())
        _assert_whole_characters(deltas)
        assert _joined(deltas) == (out.text, out.reasoning)
        expected = _reference(tok, ids, stop, split)
        assert (out.text, out.reasoning, out.matched_stop, out.num_tokens) == expected, (generated, stop)


# -- thinking checkpoints --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "model_name", "expected"),
    [
        (None, "moonshotai/Kimi-VL-A3B-Thinking-2506", True),
        ("", "kimi-vl-a3b-THINKING", True),
        (None, "moonshotai/Kimi-VL-A3B-Instruct", False),
        ("{{ messages }}", "moonshotai/Kimi-VL-A3B-Instruct", False),
        ("{{ messages }}", None, False),  # a folder named *-Thinking with nothing inside saying so
        (f"{{% if '{THINK_END}' in content %}}...{{% endif %}}", None, True),
        (f"{THINK_START}", "tiny", True),
    ],
)
def test_thinking_evidence(template: str | None, model_name: str | None, expected: bool) -> None:
    reason = thinking_evidence(template, model_name)
    assert (reason is not None) is expected
