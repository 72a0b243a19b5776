"""A small tokenizer in the official Kimi-VL layout, for tiny test checkpoints.

`write_tiny_tokenizer` writes `tiktoken.model` (256 single bytes in byte order, then merges learned
by the byte-level BPE trainer below on a built-in corpus, pre-tokenised with the official regex)
and `tokenizer_config.json` with the release's special-token names at the release's offsets from
the BPE size B. Deterministic: the same arguments always write the same bytes.

Knows nothing about models or checkpoints beyond the tokenizer files; the vocabulary is learned
from a few KB of text, so it is a valid BPE, not a good one.
"""

from __future__ import annotations

import base64
import functools
import heapq
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from enum import Enum
from itertools import pairwise
from pathlib import Path

from services.common.chat_template import load_shipped_chat_template
from services.common.tokenizer import (
    NUM_RESERVED_SPECIAL_TOKENS,
    TIKTOKEN_FILE,
    TOKENIZER_CONFIG_FILE,
    pre_tokenize,
)

# name → id − B, as in the Kimi-VL release (B = 163584). `[UNK]` sits where Moonlight/Kimi-K2
# configs put it (B+254); the spec lists no id for it.
RELEASE_SPECIAL_OFFSETS: dict[str, int] = {
    "[BOS]": 0,
    "[EOS]": 1,
    "<|im_end|>": 2,
    "<|im_user|>": 3,
    "<|im_assistant|>": 4,
    "<|im_system|>": 10,
    "<|im_middle|>": 17,
    "<|media_start|>": 18,
    "<|media_content|>": 19,
    "<|media_end|>": 20,
    "<|media_pad|>": 21,
    "[UNK]": 254,
    "[PAD]": 255,
}

# Rows of the model's embedding: BPE ranks plus the 256 reserved slots (163584 + 256 = 163840).
EMBEDDING_EXTRA_ROWS = NUM_RESERVED_SPECIAL_TOKENS

_CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog doesn't mind; it's sleeping in the sun.
A vision-language model reads images and text together. It looks at the picture, then it answers
the question that the user asked about it. We'll see what it can do, and you're welcome to try.
Mixture-of-experts layers route every token to a few experts, so the model is large but each
step is cheap. The router picks six experts out of sixty-four for every token in the sequence.
Hello, World! HELLO again... Are you there? Yes, I'm here: ready, willing and able.
In 2025, the team trained the model on 4096 images per batch for 123456 steps at 0.0003 lr.
Prices: $12.50, $7, 99%, 3.14159, 1,000,000 and -42. Call 555-0199 before 10:30 on 2024-06-01.
The image shows a red bus on a wet street; people with umbrellas wait at the stop, and a cyclist
rides past a bakery whose window is full of bread. There are three cars and one white van.
What is the dome building in the picture? Think step by step, then answer in one sentence.
今天天气很好，我们去公园散步吧。这张图片里有一只猫，它正在窗台上晒太阳。
请描述这张图片的内容，并回答下面的问题：图中有几个人？他们在做什么？
模型先看图片，再读文字，然后给出答案。专家混合层把每个词元送到少数几个专家。
北京、上海和深圳都是中国的大城市。我们用中文和英文测试这个分词器。
def encode(text: str) -> list[int]:
    ids = []
    for piece in text.split():
        ids.append(len(piece) * 2 + 1)
    return ids

class Tokenizer:
    def __init__(self, path):
        self.path = path  # where the vocabulary lives

for (i = 0; i < n; i++) { total += values[i] * weights[i]; }
if (x != null && y >= 0) return {"key": [1, 2, 3], "ok": true};
SELECT name, COUNT(*) FROM users WHERE age > 30 GROUP BY name ORDER BY 2 DESC;
<html><body><p class="note">Tokens &amp; text</p></body></html>
    Indented lines, tabs\tand\ttabs, trailing spaces \x20\x20
\n\n\n
Émile and Zoë visited São Paulo, Kraków and Reykjavík; naïve café owners served crème brûlée.
Привет, как дела? Γειά σου κόσμε. こんにちは、世界。안녕하세요 세계.
Streaming servers send the answer a few tokens at a time, so the reader sees words appear while
the model is still thinking. Each request waits in a queue until a batch slot is free; the engine
then runs one step for every request in the batch and hands each new token back to its caller.
The cache keeps the keys and values of earlier tokens in fixed-size blocks, which are freed when
a request finishes. Long prompts are split into chunks; short ones share a step with decoding.
Please summarise the document below in three bullet points, and list any numbers it mentions.
Translate to French: "Where is the train station?" -> "Où est la gare ?" Thanks a lot!
User: Can you read the sign in this photo? Assistant: Yes. It says "No parking, 8am-6pm".
我们的服务把图片先切成小块，再由视觉编码器转换成向量，最后交给语言模型生成回答。
如果输入的文字太长，系统会返回错误，并告诉用户最多可以输入多少个字。
数字一二三四五六七八九十，百千万亿。时间是下午三点半，地点在图书馆二楼。
import torch
from pathlib import Path

def load(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    '''Load every tensor in `path` onto `device`.'''
    state = torch.load(path, map_location=device, weights_only=True)
    return {name: tensor.float() for name, tensor in state.items() if not name.startswith("_")}

x = [i ** 2 for i in range(10) if i % 2 == 0]  # squares of even numbers
print(f"{len(x)} items, total={sum(x)}, max={max(x)}")
while (line := stream.readline()) != "":
    parts = line.strip().split(",")
{"model_type": "kimi_vl", "vocab_size": 163840, "hidden_size": 2048, "layers": 27}
$ pip install --upgrade tiktoken && python -m pytest -q tests/ --maxfail=1
Emoji: 😀 🚀 👍🏽 ❤️ — dashes – and “quotes” ‘too’ … ellipsis.
"""


def _corpus_words() -> Counter[bytes]:
    # Repetition weights the common words, so the first merges are the usual English ones.
    return Counter(chunk.encode("utf-8") for chunk in pre_tokenize(_CORPUS * 3 + _CORPUS.lower()))


def _merge_word(word: list[int], a: int, b: int, merged: int) -> list[int]:
    out: list[int] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


@functools.lru_cache(maxsize=8)
def train_bpe(n_bpe: int) -> tuple[bytes, ...]:
    """Tokens by rank: the 256 bytes, then merges (most frequent pair first; ties → lowest ids).

    Each new token is the concatenation of two lower-ranked ones. A merge whose bytes already form
    a token reuses it, so the ranks stay unique and contiguous.
    """
    if n_bpe < 256:
        raise ValueError(f"n_bpe must be at least 256 (the single bytes), got {n_bpe}")
    vocab = [bytes([b]) for b in range(256)]
    rank_of = {token: rank for rank, token in enumerate(vocab)}
    counted = _corpus_words()
    words = [list(word) for word in counted]
    freqs = list(counted.values())
    pair_counts: Counter[tuple[int, int]] = Counter()
    holders: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for index, word in enumerate(words):
        for pair in pairwise(word):
            pair_counts[pair] += freqs[index]
            holders[pair].add(index)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    while len(vocab) < n_bpe:
        if not heap:
            raise ValueError(f"the built-in corpus supports at most {len(vocab)} BPE tokens, not {n_bpe}")
        negative, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -negative:
            continue  # stale heap entry
        merged_bytes = vocab[pair[0]] + vocab[pair[1]]
        merged = rank_of.get(merged_bytes)
        if merged is None:
            merged = rank_of[merged_bytes] = len(vocab)
            vocab.append(merged_bytes)
        changed: set[tuple[int, int]] = set()
        for index in sorted(holders.pop(pair)):
            old, freq = words[index], freqs[index]
            new = _merge_word(old, pair[0], pair[1], merged)
            for p in pairwise(old):
                pair_counts[p] -= freq
                changed.add(p)
            for p in pairwise(new):
                pair_counts[p] += freq
                holders[p].add(index)
                changed.add(p)
            words[index] = new
        for p in changed:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            else:
                del pair_counts[p]
    return tuple(vocab)


@dataclass(frozen=True)
class TokenizerLayout:
    """What a checkpoint writer needs: `vocab_size` (embedding rows) and the special ids."""

    n_bpe: int
    vocab_size: int
    special_ids: dict[str, int]


class _Shipped(Enum):
    TEMPLATE = "shipped"


SHIPPED_TEMPLATE = _Shipped.TEMPLATE
"""`write_tiny_tokenizer(chat_template=SHIPPED_TEMPLATE)`: write `kimi_vl_chat_template.jinja`."""


def _added_token(name: str) -> dict[str, object]:
    return {
        "content": name,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def write_tiny_tokenizer(
    out_dir: Path,
    *,
    n_bpe: int = 1024,
    chat_template: str | None | _Shipped = SHIPPED_TEMPLATE,
    model_max_length: int = 131072,
) -> TokenizerLayout:
    """Write `tiktoken.model` and `tokenizer_config.json` into `out_dir` (created if missing).

    `chat_template=None` writes no template (consumers then use the built-in renderer).
    """
    vocab = train_bpe(n_bpe)
    special_ids = {name: n_bpe + offset for name, offset in RELEASE_SPECIAL_OFFSETS.items()}
    names_by_id = {token_id: name for name, token_id in special_ids.items()}
    # As the release does, list every slot that has an embedding row, named or reserved.
    added = {
        str(token_id): _added_token(names_by_id.get(token_id, f"<|reserved_token_{token_id}|>"))
        for token_id in range(n_bpe, n_bpe + EMBEDDING_EXTRA_ROWS)
    }
    config: dict[str, object] = {
        "added_tokens_decoder": added,
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "tokenizer_class": "TikTokenTokenizer",
    }
    if isinstance(chat_template, _Shipped):
        chat_template = load_shipped_chat_template()
    if chat_template is not None:
        config["chat_template"] = chat_template
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = (f"{base64.b64encode(token).decode('ascii')} {rank}\n" for rank, token in enumerate(vocab))
    (out_dir / TIKTOKEN_FILE).write_text("".join(lines), encoding="ascii")
    (out_dir / TOKENIZER_CONFIG_FILE).write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return TokenizerLayout(n_bpe=n_bpe, vocab_size=n_bpe + EMBEDDING_EXTRA_ROWS, special_ids=special_ids)
