"""Per-request streaming text: generated token ids in, text deltas safe to send to a client out.

Three stages run on every token, in order:

1. detokenise — the tokenizer's incremental decoder turns ids into text, holding back the bytes of
   a multi-byte character split across tokens until it is complete;
2. stop strings — matched on the raw decoded text (think markers included), across token
   boundaries; the trailing characters that could still begin a stop string are held back, and the
   stop string and everything after it are never emitted;
3. reasoning split (Thinking checkpoints) — text inside ◁think▷ … ◁/think▷ goes to `reasoning`,
   the rest to `text`, the markers themselves to neither; a possible marker prefix is held back.

Which stop string wins: the one whose match *ends* first in the text, and of those the longest
(earliest start). That is what checking after every token finds, so the answer does not depend on
how tokens are chunked into `feed` calls nor on how the tokenizer cut the text.

Knows nothing about sampling, stop token ids, the engine or the transport; imports no torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from services.common.tokenizer import KimiTokenizer

THINK_START = "◁think▷"
THINK_END = "◁/think▷"

_MARKER_RE = re.compile(f"{re.escape(THINK_START)}|{re.escape(THINK_END)}")


@dataclass(frozen=True)
class TextDelta:
    """What one `feed` or `finish` call adds: answer text and reasoning text, both possibly empty."""

    text: str = ""
    reasoning: str = ""


def thinking_evidence(chat_template: str | None, model_name: str | None) -> str | None:
    """Why a checkpoint writes ◁think▷ blocks (a Thinking one), from what it ships, or None when
    nothing in it says so: its chat template mentions a think marker, or the model name its
    config.json records (`_name_or_path`, e.g. "moonshotai/Kimi-VL-A3B-Thinking-2506") is a
    Thinking one. The folder's name is not evidence: renaming a folder changes nothing."""
    if chat_template is not None and (THINK_START in chat_template or THINK_END in chat_template):
        return "its chat template mentions a think marker"
    if model_name is not None and "thinking" in model_name.lower():
        return f"config.json names it {model_name!r}"
    return None


def _proper_prefixes(patterns: Iterable[str]) -> frozenset[str]:
    return frozenset(p[:i] for p in patterns for i in range(1, len(p)))


def _held_length(text: str, prefixes: frozenset[str], longest: int) -> int:
    """Length of the longest suffix of `text` (at most `longest` chars) that is in `prefixes`."""
    for k in range(min(len(text), longest), 0, -1):
        if text[-k:] in prefixes:
            return k
    return 0


class _StopMatcher:
    """Stage 2: releases raw text that can no longer be part of a stop string."""

    def __init__(self, stop: Sequence[str]) -> None:
        if isinstance(stop, str):
            raise ValueError("`stop` must be a sequence of strings, not one string")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self._stops = tuple(dict.fromkeys(stop))
        self._prefixes = _proper_prefixes(self._stops)
        self._longest_prefix = max((len(s) for s in self._stops), default=1) - 1
        self._held = ""
        self.matched: str | None = None

    def push(self, new: str) -> str:
        """Add decoded text; return the raw text now safe to pass on. Sets `matched` on a match."""
        if not self._stops:
            return new
        held = self._held + new
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for s in self._stops:
            start = held.find(s)
            if start >= 0 and (best is None or (start + len(s), start) < best[:2]):
                best = (start + len(s), start, s)
        if best is not None:
            self.matched = best[2]
            self._held = ""
            return held[: best[1]]
        keep = _held_length(held, self._prefixes, self._longest_prefix)
        self._held = held[len(held) - keep :]
        return held[: len(held) - keep]

    def flush(self) -> str:
        """End of text: what was held back could never complete a match."""
        held, self._held = self._held, ""
        return held


class _ReasoningSplitter:
    """Stage 3: routes raw text to answer or reasoning and drops the think markers.

    Every marker is dropped: ◁think▷ opens a think block (a no-op inside one), ◁/think▷ closes it
    (a no-op outside one). Whitespace right after ◁/think▷ stays in the answer as generated.
    """

    _prefixes = _proper_prefixes((THINK_START, THINK_END))
    _longest_prefix = len(THINK_END) - 1

    def __init__(self) -> None:
        self._held = ""
        self._in_think = False

    def push(self, raw: str, *, final: bool = False) -> tuple[str, str]:
        """Return (answer text, reasoning text) now safe to emit; `final` releases a held prefix."""
        buf = self._held + raw
        answer: list[str] = []
        reasoning: list[str] = []
        pos = 0
        for marker in _MARKER_RE.finditer(buf):
            (reasoning if self._in_think else answer).append(buf[pos : marker.start()])
            self._in_think = marker.group() == THINK_START
            pos = marker.end()
        rest = buf[pos:]
        keep = 0 if final else _held_length(rest, self._prefixes, self._longest_prefix)
        (reasoning if self._in_think else answer).append(rest[: len(rest) - keep])
        self._held = rest[len(rest) - keep :]
        return "".join(answer), "".join(reasoning)


class OutputText:
    """Streaming text of one request: `feed` the generated ids in order, then `finish`.

    The deltas never hold part of a character. Without stop strings and without the split, their
    concatenation equals `tokenizer.decode(ids, skip_special_tokens)`; with stop strings it is that
    text cut before the winning match (see the module docstring); with `split_reasoning` the think
    markers are removed and the think-block text goes to `reasoning` (a block still open at
    `finish` stays reasoning). With `split_reasoning=False` the markers are plain text.
    """

    def __init__(
        self,
        tokenizer: KimiTokenizer,
        *,
        stop: Sequence[str] = (),
        split_reasoning: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self._decoder = tokenizer.incremental_decoder(skip_special_tokens=skip_special_tokens)
        self._stop = _StopMatcher(stop)
        self._splitter = _ReasoningSplitter() if split_reasoning else None
        self._num_tokens = 0
        self._finished = False
        self._text: list[str] = []
        self._reasoning: list[str] = []

    @property
    def stopped(self) -> bool:
        return self._stop.matched is not None

    @property
    def matched_stop(self) -> str | None:
        return self._stop.matched

    @property
    def num_tokens(self) -> int:
        """Tokens consumed; after a stop match, up to and including the one that completed it."""
        return self._num_tokens

    @property
    def text(self) -> str:
        return "".join(self._text)

    @property
    def reasoning(self) -> str:
        return "".join(self._reasoning)

    def feed(self, token_ids: Sequence[int]) -> TextDelta:
        """Consume the next generated ids; tokens after the one completing a stop match are ignored."""
        if self.stopped:
            raise ValueError("feed() after a stop string matched")
        if self._finished:
            raise ValueError("feed() after finish()")
        raw: list[str] = []
        for token_id in token_ids:
            piece = self._decoder.feed(token_id)
            self._num_tokens += 1
            if piece:
                raw.append(self._stop.push(piece))
                if self.stopped:
                    self._finished = True  # nothing can follow a stop match: release what is held
                    return self._emit("".join(raw), final=True)
        return self._emit("".join(raw), final=False)

    def finish(self) -> TextDelta:
        """End of generation (length, stop token, abort): emit everything still held back.

        Bytes of an unfinished character come out as U+FFFD, as `decode` would give them.
        Calling it again, or after a stop match, returns an empty delta.
        """
        if self._finished:
            return TextDelta()
        self._finished = True
        raw = self._stop.push(tail) if (tail := self._decoder.flush()) else ""
        if not self.stopped:
            raw += self._stop.flush()
        return self._emit(raw, final=True)

    def _emit(self, raw: str, *, final: bool) -> TextDelta:
        if self._splitter is None:
            answer, reasoning = raw, ""
        else:
            answer, reasoning = self._splitter.push(raw, final=final)
        if answer:
            self._text.append(answer)
        if reasoning:
            self._reasoning.append(reasoning)
        return TextDelta(answer, reasoning)
