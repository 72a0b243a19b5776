"""Kimi-VL's tiktoken tokenizer, read from a checkpoint directory.

The checkpoint ships `tiktoken.model` (one `base64(token) rank` pair per line, B ranks) and
`tokenizer_config.json`. Ids 0..B-1 are byte-level BPE tokens; the 258 ids B..B+257 are special
tokens named by `added_tokens_decoder` (an unnamed slot is `<|reserved_token_{id}|>`), exactly as
the official `TikTokenTokenizer` numbers them.

Two encoders, on purpose: `encode` treats special-token strings as plain text and is the only one
user text may reach; `encode_with_special_tokens` parses them and is for template-generated text.

Knows nothing about chat messages, images or models, and never unpickles anything. The files are
parsed here rather than with `tiktoken.load.load_tiktoken_bpe`, which caches local files by path in
a temporary directory and would serve a stale vocabulary when a path is rewritten.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import regex
import tiktoken

from services.common.errors import CheckpointError, InvalidInputError

logger = logging.getLogger(__name__)

TIKTOKEN_FILE = "tiktoken.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

NUM_RESERVED_SPECIAL_TOKENS = 256
NUM_SPECIAL_SLOTS = NUM_RESERVED_SPECIAL_TOKENS + 2  # ids B .. B+257

# tiktoken panics on very long inputs; the official tokenizer slices them like this.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000

# The official pre-tokenisation regex (`pat_str`), alternatives in the official order.
PAT_STR = "|".join(
    [
        r"[\p{Han}]+",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
        r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
        r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

# `regex` needs V1 for the `&&` class intersections tiktoken's engine understands natively.
_PAT = regex.compile(PAT_STR, flags=regex.V1)

DEFAULT_BOS_TOKEN = "[BOS]"
DEFAULT_EOS_TOKEN = "[EOS]"
DEFAULT_UNK_TOKEN = "[UNK]"
DEFAULT_PAD_TOKEN = "[PAD]"


def pre_tokenize(text: str) -> list[str]:
    """Split `text` into the chunks BPE runs on (a Python twin of what tiktoken does internally)."""
    return _PAT.findall(text)


def split_long_text(text: str) -> Iterator[str]:
    """Slices of `text` tiktoken can encode: ≤ 400,000 characters, and no run of more than 25,000
    consecutive whitespace (or non-whitespace) characters. Concatenated they give `text` back."""
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        yield from _split_runs(text[start : start + MAX_ENCODE_CHARS], MAX_RUN_CHARS)


def _split_runs(text: str, limit: int) -> Iterator[str]:
    piece_start = 0
    run_length = 0
    run_is_space = text[:1].isspace()
    for i, char in enumerate(text):
        is_space = char.isspace()
        if is_space != run_is_space:
            run_is_space = is_space
            run_length = 1
            continue
        run_length += 1
        if run_length > limit:
            yield text[piece_start:i]
            piece_start = i
            run_length = 1
    yield text[piece_start:]


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a `tiktoken.model` file; the ranks must be exactly 0..B-1 and cover all 256 bytes."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise CheckpointError(f"cannot read tokenizer vocabulary {path}: {exc}") from exc
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError("expected two fields")
            token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
        except (ValueError, binascii.Error) as exc:
            raise CheckpointError(f"{path}:{number}: not a `base64 rank` pair ({exc})") from exc
        if token in ranks:
            raise CheckpointError(f"{path}:{number}: token {token!r} appears twice")
        ranks[token] = rank
    if not ranks:
        raise CheckpointError(f"{path} holds no tokens")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise CheckpointError(f"{path}: ranks are not exactly 0..{len(ranks) - 1}")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} single bytes have no token (first: {missing[0]})")
    return ranks


def _token_name(value: Any, key: str) -> str | None:
    """A `bos_token`-style entry: a string, an object with `content`, or absent/null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise CheckpointError(f"{TOKENIZER_CONFIG_FILE}: `{key}` is neither a string nor {{'content': ...}}")


def _chat_template_from(config: dict[str, Any], directory: Path) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise CheckpointError(f"{TOKENIZER_CONFIG_FILE}: `chat_template` list has no 'default' entry")
    if template is not None:
        raise CheckpointError(f"{TOKENIZER_CONFIG_FILE}: `chat_template` must be a string or a list")
    path = directory / CHAT_TEMPLATE_FILE
    return path.read_text(encoding="utf-8") if path.is_file() else None


def _special_names(config: dict[str, Any], n_bpe: int) -> dict[str, int]:
    named: dict[int, str] = {}
    decoder = config.get("added_tokens_decoder", {})
    if not isinstance(decoder, dict):
        raise CheckpointError(f"{TOKENIZER_CONFIG_FILE}: `added_tokens_decoder` must be an object")
    for key, entry in decoder.items():
        content = entry.get("content") if isinstance(entry, dict) else None
        if not isinstance(content, str) or not key.isdigit():
            raise CheckpointError(f"{TOKENIZER_CONFIG_FILE}: bad added_tokens_decoder entry {key!r}")
        token_id = int(key)
        if n_bpe <= token_id < n_bpe + NUM_SPECIAL_SLOTS:
            named[token_id] = content
        else:  # the official tokenizer ignores these too
            logger.warning("ignoring added token %r: id %d is outside the special range", content, token_id)
    special: dict[str, int] = {}
    for token_id in range(n_bpe, n_bpe + NUM_SPECIAL_SLOTS):
        name = named.get(token_id, f"<|reserved_token_{token_id}|>")
        if name in special:
            raise CheckpointError(
                f"{TOKENIZER_CONFIG_FILE}: {name!r} names two ids, {special[name]} and {token_id}"
            )
        special[name] = token_id
    return special


class KimiTokenizer:
    """Byte-level BPE (ids 0..B-1) plus 258 special tokens (ids B..B+257)."""

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        special_tokens: dict[str, int],
        *,
        bos_token: str = DEFAULT_BOS_TOKEN,
        eos_token: str = DEFAULT_EOS_TOKEN,
        unk_token: str = DEFAULT_UNK_TOKEN,
        pad_token: str = DEFAULT_PAD_TOKEN,
        chat_template: str | None = None,
        name: str = "kimi_vl",
    ) -> None:
        self._encoding = tiktoken.Encoding(
            name, pat_str=PAT_STR, mergeable_ranks=mergeable_ranks, special_tokens=special_tokens
        )
        self._n_bpe = len(mergeable_ranks)
        self._special_tokens = dict(special_tokens)
        self._names_by_role = {"bos": bos_token, "eos": eos_token, "unk": unk_token, "pad": pad_token}
        self.chat_template = chat_template

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path) -> KimiTokenizer:
        directory = Path(checkpoint_dir)
        ranks = read_tiktoken_ranks(directory / TIKTOKEN_FILE)
        config_path = directory / TOKENIZER_CONFIG_FILE
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {config_path}: {exc}") from exc
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_path} is not a JSON object")
        names = {
            role: _token_name(config.get(f"{role}_token"), f"{role}_token") or default
            for role, default in (
                ("bos", DEFAULT_BOS_TOKEN),
                ("eos", DEFAULT_EOS_TOKEN),
                ("unk", DEFAULT_UNK_TOKEN),
                ("pad", DEFAULT_PAD_TOKEN),
            )
        }
        return cls(
            ranks,
            _special_names(config, len(ranks)),
            bos_token=names["bos"],
            eos_token=names["eos"],
            unk_token=names["unk"],
            pad_token=names["pad"],
            chat_template=_chat_template_from(config, directory),
            name=directory.name or "kimi_vl",
        )

    # -- vocabulary ------------------------------------------------------------------------------

    @property
    def n_bpe(self) -> int:
        return self._n_bpe

    @property
    def n_vocab(self) -> int:
        return self._n_bpe + NUM_SPECIAL_SLOTS

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_tokens)

    def special_token_id(self, name: str) -> int:
        token_id = self._special_tokens.get(name)
        if token_id is None:
            raise CheckpointError(f"the tokenizer has no special token {name!r}")
        return token_id

    def has_special_token(self, name: str) -> bool:
        return name in self._special_tokens

    def is_special(self, token_id: int) -> bool:
        return self._n_bpe <= token_id < self.n_vocab

    @property
    def bos_token(self) -> str:
        return self._names_by_role["bos"]

    @property
    def eos_token(self) -> str:
        return self._names_by_role["eos"]

    @property
    def bos_id(self) -> int:
        return self.special_token_id(self._names_by_role["bos"])

    @property
    def eos_id(self) -> int:
        return self.special_token_id(self._names_by_role["eos"])

    @property
    def unk_id(self) -> int:
        return self.special_token_id(self._names_by_role["unk"])

    @property
    def pad_id(self) -> int:
        return self.special_token_id(self._names_by_role["pad"])

    # -- encoding --------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Ids of `text` with special-token strings as plain text: the only path for user text."""
        ids: list[int] = []
        for piece in split_long_text(text):
            ids.extend(self._encoding.encode_ordinary(piece))
        return ids

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """Ids of template-generated `text`, special-token strings parsed (the official path)."""
        ids: list[int] = []
        for piece in split_long_text(text):
            ids.extend(self._encoding.encode(piece, allowed_special="all"))
        return ids

    # -- decoding --------------------------------------------------------------------------------

    def _check_ids(self, ids: Sequence[int]) -> None:
        for token_id in ids:
            if isinstance(token_id, bool) or not isinstance(token_id, int):
                raise InvalidInputError(f"token ids must be integers, got {token_id!r}")
            if not 0 <= token_id < self.n_vocab:
                raise InvalidInputError(f"token id {token_id} is outside [0, {self.n_vocab})")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (a special token's bytes are its name)."""
        self._check_ids([token_id])
        return self._encoding.decode_single_token_bytes(token_id)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; broken UTF-8 becomes U+FFFD."""
        ids = list(ids)
        self._check_ids(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i < self._n_bpe]
        return self._encoding.decode(ids, errors="replace")

    def incremental_decoder(self, *, skip_special_tokens: bool = False) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)


class IncrementalDecoder:
    """Streams text from ids fed one at a time, holding back incomplete UTF-8 sequences.

    The concatenation of every `feed` result and the final `flush` equals `decode` of all ids.
    """

    def __init__(self, tokenizer: KimiTokenizer, *, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        """The new complete text that `token_id` adds (possibly empty)."""
        data = self._tokenizer.token_bytes(token_id)
        if self._skip_special_tokens and self._tokenizer.is_special(token_id):
            return ""
        return self._utf8.decode(data)

    def flush(self) -> str:
        """End of stream: bytes still held back come out as U+FFFD."""
        return self._utf8.decode(b"", final=True)
