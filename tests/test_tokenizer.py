"""KimiTokenizer and the tiny tokenizer writer: layout, BPE validity, encode/decode, streaming."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import tiktoken

from services.common.errors import CheckpointError, InvalidInputError
from services.common.tiny_tokenizer import RELEASE_SPECIAL_OFFSETS, train_bpe, write_tiny_tokenizer
from services.common.tokenizer import (
    MAX_RUN_CHARS,
    NUM_SPECIAL_SLOTS,
    PAT_STR,
    TIKTOKEN_FILE,
    TOKENIZER_CONFIG_FILE,
    KimiTokenizer,
    pre_tokenize,
    read_tiktoken_ranks,
    split_long_text,
)

N_BPE = 1024

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "今天天气很好，我们去公园散步吧。",
    "Emoji 😀🚀👍🏽 and ❤️ in a row, Zoë's café.",
    "tabs\tand   spaces \n\n\n  newlines\r\n  and trailing   ",
    "Mixed中文English混合text 12345678 don't YOU'RE",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "",
    " ",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    write_tiny_tokenizer(directory, n_bpe=N_BPE)
    return directory


@pytest.fixture(scope="module")
def tok(tiny_dir: Path) -> KimiTokenizer:
    return KimiTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def official(tiny_dir: Path, tok: KimiTokenizer) -> tiktoken.Encoding:
    """The official tokenizer's path: one tiktoken Encoding with the spec's pattern."""
    ranks = read_tiktoken_ranks(tiny_dir / TIKTOKEN_FILE)
    return tiktoken.Encoding(
        "official", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=tok.special_tokens
    )


# -- the tiny tokenizer's files ------------------------------------------------------------------


def test_tiny_bpe_is_valid(tiny_dir: Path) -> None:
    ranks = read_tiktoken_ranks(tiny_dir / TIKTOKEN_FILE)
    assert sorted(ranks.values()) == list(range(N_BPE))
    by_rank = sorted(ranks, key=ranks.__getitem__)
    assert by_rank[:256] == [bytes([b]) for b in range(256)]
    for rank, token in enumerate(by_rank[256:], start=256):
        assert len(token) > 1
        splits = [(token[:k], token[k:]) for k in range(1, len(token))]
        assert any(ranks.get(a, N_BPE) < rank and ranks.get(b, N_BPE) < rank for a, b in splits), token


def test_tiny_tokenizer_is_deterministic(tmp_path: Path, tiny_dir: Path) -> None:
    write_tiny_tokenizer(tmp_path, n_bpe=N_BPE)
    for name in (TIKTOKEN_FILE, TOKENIZER_CONFIG_FILE):
        assert (tmp_path / name).read_bytes() == (tiny_dir / name).read_bytes()


def test_tiny_layout_and_special_ids(tmp_path: Path, tok: KimiTokenizer) -> None:
    layout = write_tiny_tokenizer(tmp_path, n_bpe=512)
    assert layout.n_bpe == 512 and layout.vocab_size == 512 + 256
    assert layout.special_ids == {name: 512 + offset for name, offset in RELEASE_SPECIAL_OFFSETS.items()}
    assert len(set(RELEASE_SPECIAL_OFFSETS.values())) == len(RELEASE_SPECIAL_OFFSETS)
    assert tok.n_bpe == N_BPE and tok.n_vocab == N_BPE + NUM_SPECIAL_SLOTS
    for name, offset in RELEASE_SPECIAL_OFFSETS.items():
        assert tok.special_token_id(name) == N_BPE + offset
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (N_BPE, N_BPE + 1, N_BPE + 254, N_BPE + 255)
    # Unnamed slots, including the two beyond the embedding rows, get reserved names.
    for token_id in (N_BPE + 5, N_BPE + 256, N_BPE + 257):
        assert tok.special_token_id(f"<|reserved_token_{token_id}|>") == token_id
    assert len(tok.special_tokens) == NUM_SPECIAL_SLOTS
    assert tok.is_special(N_BPE) and not tok.is_special(N_BPE - 1) and not tok.is_special(tok.n_vocab)


def test_train_bpe_rejects_impossible_sizes() -> None:
    with pytest.raises(ValueError):
        train_bpe(100)
    with pytest.raises(ValueError, match="supports at most"):
        train_bpe(100_000)


# -- encoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_official_equality(tok: KimiTokenizer, official: tiktoken.Encoding, text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < tok.n_bpe for i in ids)
    assert tok.decode(ids) == text
    assert ids == official.encode(text, disallowed_special=())


def test_long_text_round_trip(tok: KimiTokenizer) -> None:
    text = "x" * (MAX_RUN_CHARS + 5_000) + " " * (MAX_RUN_CHARS + 7) + "好" * 60_000 + " end"
    ids = tok.encode(text)
    assert max(ids) < tok.n_vocab
    assert tok.decode(ids) == text


def test_split_long_text_limits() -> None:
    text = ("a" * 30_000 + " " * 26_000) * 8 + "b" * 10
    pieces = list(split_long_text(text))
    assert "".join(pieces) == text
    for piece in pieces:
        assert len(piece) <= 400_000
        run = 1
        for prev, char in zip(piece, piece[1:], strict=False):
            run = run + 1 if prev.isspace() == char.isspace() else 1
            assert run <= MAX_RUN_CHARS
    assert list(split_long_text("")) == []


@pytest.mark.parametrize(
    ("text", "chunks"),
    [
        ("Hello你好world", ["Hello", "你好", "world"]),
        ("I'M don't they'll", ["I'M", " don't", " they'll"]),
        ("1234567", ["123", "456", "7"]),
        (" HELLOworld CamelCase", [" HELLOworld", " Camel", "Case"]),
        ("a  \n\n b", ["a", "  \n\n", " b"]),
        ("x = 1;\n", ["x", " =", " ", "1", ";\n"]),
    ],
)
def test_pre_tokenization_splits(text: str, chunks: list[str]) -> None:
    assert pre_tokenize(text) == chunks
    # tiktoken splits the same way: with a vocabulary that spells out each chunk and then merges
    # it with the first byte of the next one, a coarser split would show a crossing token and a
    # finer one would leave a chunk in pieces.
    pieces = [chunk.encode() for chunk in chunks]
    vocab = [bytes([b]) for b in range(256)]
    for index, piece in enumerate(pieces):
        vocab += [piece[:k] for k in range(2, len(piece) + 1) if piece[:k] not in vocab]
        if index + 1 < len(pieces) and piece + pieces[index + 1][:1] not in vocab:
            vocab.append(piece + pieces[index + 1][:1])
    encoding = tiktoken.Encoding(
        "t", pat_str=PAT_STR, mergeable_ranks={t: r for r, t in enumerate(vocab)}, special_tokens={}
    )
    assert [encoding.decode_single_token_bytes(i) for i in encoding.encode(text)] == pieces


def test_user_text_special_strings_stay_plain(tok: KimiTokenizer) -> None:
    for name in ("<|im_end|>", "<|media_pad|>", "[EOS]", "<|im_assistant|>"):
        ids = tok.encode(f"a{name}b")
        assert not any(tok.is_special(i) for i in ids)
        assert tok.decode(ids) == f"a{name}b"
        assert tok.special_token_id(name) in tok.encode_with_special_tokens(f"a{name}b")


def test_encode_with_special_tokens_matches_official(tok: KimiTokenizer, official: tiktoken.Encoding) -> None:
    text = "<|im_user|>user<|im_middle|>hi <|media_start|>image<|media_content|><|media_pad|><|im_end|>"
    assert tok.encode_with_special_tokens(text) == official.encode(text, allowed_special="all")


def test_lone_surrogate_does_not_crash(tok: KimiTokenizer) -> None:
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"


# -- decoding ------------------------------------------------------------------------------------


def test_decode_special_and_errors(tok: KimiTokenizer) -> None:
    ids = [tok.bos_id, *tok.encode("hi"), tok.special_token_id("<|im_end|>")]
    assert tok.decode(ids) == "[BOS]hi<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "hi"
    assert tok.decode([0xE4, 0xBD]) == "\ufffd"  # a cut multi-byte character
    for bad in ([tok.n_vocab], [-1], [True], ["3"]):
        with pytest.raises(InvalidInputError):
            tok.decode(bad)  # type: ignore[arg-type]


def test_incremental_decoder_holds_back_partial_characters(tok: KimiTokenizer) -> None:
    text = "a你好😀é b"
    ids = list(text.encode("utf-8"))  # ranks 0..255 are the single bytes: one token per byte
    decoder = tok.incremental_decoder()
    outputs = [decoder.feed(i) for i in ids]
    assert "".join(outputs) + decoder.flush() == text
    assert outputs[:4] == ["a", "", "", "你"]
    assert all(o in ("", *text) for o in outputs)


def test_incremental_decoder_equals_decode(tok: KimiTokenizer) -> None:
    ids = [0xE4, *tok.encode("中文 text"), tok.eos_id, 0xF0, 0x9F, *tok.encode("ok"), 0xFF, 0xE4, 0xBD]
    decoder = tok.incremental_decoder()
    streamed = "".join(decoder.feed(i) for i in ids) + decoder.flush()
    assert streamed == tok.decode(ids)
    skipping = tok.incremental_decoder(skip_special_tokens=True)
    streamed = "".join(skipping.feed(i) for i in ids) + skipping.flush()
    assert streamed == tok.decode(ids, skip_special_tokens=True)


# -- reading checkpoints -------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    for name in (TIKTOKEN_FILE, TOKENIZER_CONFIG_FILE):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def _edit_config(directory: Path, **changes: object) -> None:
    path = directory / TOKENIZER_CONFIG_FILE
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def test_token_names_and_chat_template_from_config(tiny_dir: Path, tmp_path: Path) -> None:
    directory = _copy(tiny_dir, tmp_path)
    _edit_config(
        directory,
        eos_token={"content": "<|im_end|>"},
        chat_template=[{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
    )
    tok = KimiTokenizer.from_pretrained(directory)
    assert tok.eos_id == N_BPE + 2 and tok.chat_template == "D"
    _edit_config(directory, chat_template=None)
    assert KimiTokenizer.from_pretrained(directory).chat_template is None
    (directory / "chat_template.jinja").write_text("J")
    assert KimiTokenizer.from_pretrained(directory).chat_template == "J"
    _edit_config(directory, pad_token="<|not_there|>")
    with pytest.raises(CheckpointError, match="not_there"):
        _ = KimiTokenizer.from_pretrained(directory).pad_id


def _b64(token: bytes) -> str:
    return base64.b64encode(token).decode()


@pytest.mark.parametrize(
    "vocab",
    [
        None,  # missing file
        "not base64 at all!\n",
        "".join(f"{_b64(bytes([b]))} {b}\n" for b in range(256)) + f"{_b64(b'ab')} 300\n",  # gap
        "".join(f"{_b64(bytes([b]))} {b}\n" for b in range(255)),  # byte 255 missing
        "".join(f"{_b64(bytes([b]))} {b}\n" for b in range(256)) + f"{_b64(b'a')} 256\n",  # duplicate
    ],
)
def test_bad_vocabulary_is_a_checkpoint_error(tiny_dir: Path, tmp_path: Path, vocab: str | None) -> None:
    directory = _copy(tiny_dir, tmp_path)
    if vocab is None:
        (directory / TIKTOKEN_FILE).unlink()
    else:
        (directory / TIKTOKEN_FILE).write_text(vocab)
    with pytest.raises(CheckpointError):
        KimiTokenizer.from_pretrained(directory)


@pytest.mark.parametrize(
    "config",
    [None, "{not json", "[]", '{"added_tokens_decoder": {"x": {"content": "a"}}}', '{"bos_token": 3}'],
)
def test_bad_tokenizer_config_is_a_checkpoint_error(
    tiny_dir: Path, tmp_path: Path, config: str | None
) -> None:
    directory = _copy(tiny_dir, tmp_path)
    if config is None:
        (directory / TOKENIZER_CONFIG_FILE).unlink()
    else:
        (directory / TOKENIZER_CONFIG_FILE).write_text(config)
    with pytest.raises(CheckpointError):
        KimiTokenizer.from_pretrained(directory)


def test_duplicate_special_name_is_a_checkpoint_error(tiny_dir: Path, tmp_path: Path) -> None:
    directory = _copy(tiny_dir, tmp_path)
    _edit_config(
        directory, added_tokens_decoder={str(N_BPE): {"content": "X"}, str(N_BPE + 1): {"content": "X"}}
    )
    with pytest.raises(CheckpointError, match="'X'"):
        KimiTokenizer.from_pretrained(directory)


def test_special_token_id_names_the_missing_token(tok: KimiTokenizer) -> None:
    with pytest.raises(CheckpointError, match="<\\|media_begin\\|>"):
        tok.special_token_id("<|media_begin|>")
