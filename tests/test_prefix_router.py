"""The decoder's cache-affine routing: the engine's prefix-block keys of a GenerateRequest
(media-aware, torch-free) and the pure choice over synthetic load and prefix tables
(`services.scaling.routing`)."""

from __future__ import annotations

import numpy as np
import pytest

from protos.kimi_vl.v1 import generate_pb2 as pb
from services.common import tensor_codec
from services.decoder.engine.block_pool import MediaKey, block_hashes
from services.decoder.service.prefix_keys import request_block_keys
from services.scaling.routing import PrefixIndex, RouterSettings, choose

PAD, BS = 9, 4


def request(ids: list[int], *segments: pb.EmbeddingSegment) -> pb.GenerateRequest:
    media = [pb.MediaEmbeddings(segments=[s]) for s in segments]
    return pb.GenerateRequest(tokens=pb.PromptTokens(ids=ids), media=media)


def keyed(key: str, n: int) -> pb.EmbeddingSegment:
    return pb.EmbeddingSegment(num_tokens=n, cache_key=key)


# --- keys ----------------------------------------------------------------------------------


def test_keys_are_the_engines_own():
    ids = [1, 2, 3, PAD, PAD, PAD, PAD, PAD, 4, 5, 6, 7]
    got = request_block_keys(request(ids, keyed("img-a", 5)), PAD, BS)
    assert got == block_hashes(ids, BS, [MediaKey(3, 5, "img-a")])
    assert len(got) == 3


def test_two_same_size_pictures_never_look_alike_and_a_resent_one_does():
    ids = [1, 2, PAD, PAD, PAD, PAD, 3, 4]
    a, b = request(ids, keyed("img-a", 4)), request(ids, keyed("img-b", 4))
    keys_a, keys_b = request_block_keys(a, PAD, BS), request_block_keys(b, PAD, BS)
    assert keys_a[0] != keys_b[0] and keys_a[1] != keys_b[1]
    assert request_block_keys(request(ids, keyed("img-a", 4)), PAD, BS) == keys_a
    # the text is not the key: the same picture under another question shares the leading blocks
    other = request([1, 2, PAD, PAD, PAD, PAD, 7, 7], keyed("img-a", 4))
    assert request_block_keys(other, PAD, BS)[0] == keys_a[0]


def test_inline_embeddings_key_on_their_bytes():
    ids = [1, PAD, PAD, PAD, PAD, 2, 3, 4]
    tensors = [np.full((4, 2), v, dtype=np.float32) for v in (1.0, 2.0)]
    inline = [pb.EmbeddingSegment(num_tokens=4, embeddings=tensor_codec.encode(t)) for t in tensors]
    first, second = (request_block_keys(request(ids, s), PAD, BS) for s in inline)
    assert first != second
    assert request_block_keys(request(ids, inline[0]), PAD, BS) == first


def test_a_request_whose_media_do_not_fit_keys_only_its_leading_text():
    ids = [1, 2, 3, 4, 5, PAD, PAD, 6]
    assert request_block_keys(request(ids, keyed("x", 3)), PAD, BS) == block_hashes([1, 2, 3, 4, 5], BS)


# --- the choice ----------------------------------------------------------------------------

S = RouterSettings(min_match_ratio=0.5, balance_abs=4, balance_rel=1.5)
K = [bytes([i]) * 8 for i in range(10)]


def index_with(entries: dict[str, int], now: float = 0.0) -> PrefixIndex[str]:
    """Replica -> how many of K's leading blocks it holds."""
    index: PrefixIndex[str] = PrefixIndex(1000, ttl_s=60)
    for replica, n in entries.items():
        index.record(K[:n], replica, now)
    return index


def test_the_replica_holding_the_prefix_wins_at_equal_load():
    decision = choose(K, {"a": 2, "b": 2, "c": 2}, index_with({"b": 8, "c": 3}), S, now=1)
    assert (decision.replica, decision.by_affinity, decision.matched_blocks) == ("b", True, 8)


def test_a_much_busier_holder_yields_to_the_least_loaded():
    index = index_with({"b": 8})
    assert choose(K, {"a": 1, "b": 5}, index, S, now=1).replica == "b"  # 4 more: within balance_abs
    decision = choose(K, {"a": 1, "b": 6}, index, S, now=1)
    assert (decision.replica, decision.by_affinity) == ("a", False)
    # both thresholds must be passed: 20 against 14 is 6 more but only 1.4 times
    assert choose(K, {"a": 14, "b": 20}, index, S, now=1).replica == "b"


def test_a_short_match_is_not_affinity():
    """A shared system prompt (2 of 10 blocks) says nothing about where the conversation lives, and
    a short prompt's one shared template block saves too little prefill to outweigh any load."""
    decision = choose(K, {"a": 0, "b": 3}, index_with({"b": 2}), S, now=1)
    assert (decision.replica, decision.by_affinity) == ("a", False)
    short = choose(K[:2], {"a": 1, "b": 0}, index_with({"a": 2}), S, now=1)
    assert (short.replica, short.by_affinity) == ("b", False)  # 2 of 2 blocks, but under 4


def test_ties_in_load_do_not_herd_new_conversations():
    """Every replica idle, one holding the template's opening block: new conversations spread."""
    index = index_with({"a": 1})
    fresh = [K[0], *[bytes([200 + i]) * 8 for i in range(5)]]
    picked = {choose(fresh, {"a": 0, "b": 0, "c": 0}, index, S, now=1).replica for _ in range(60)}
    assert picked == {"a", "b", "c"}


def test_new_conversations_go_by_load_so_a_new_replica_takes_them():
    index = index_with({"a": 10, "b": 10})
    fresh = [bytes([100 + i]) * 8 for i in range(6)]
    assert choose(fresh, {"a": 3, "b": 2, "new": 0}, index, S, now=1).replica == "new"
    assert choose([], {"a": 3, "new": 0}, index, S, now=1).replica == "new"  # no full block at all


def test_evictions_reported_by_a_replica_remove_its_entries_once():
    index = index_with({"b": 8})
    index.evicted("b", total=2, latest=[b"other-00", K[5]])  # block 5 went
    assert index.matched(K, ["b"], now=1) == {"b": 5}
    index.record(K[:8], "b", now=2)  # the prefix is sent there again and cached again
    index.evicted("b", total=2, latest=[b"other-00", K[5]])  # the same report: applied already
    assert index.matched(K, ["b"], now=2) == {"b": 8}
    # more went than the report carries: which ones is unknown, so none of b's entries stay
    index.evicted("b", total=10, latest=[K[0]])
    assert index.matched(K, ["b"], now=3) == {"b": 0}


def test_what_other_routers_sent_a_replica_is_learned_from_its_reports():
    """Each ingress replica runs its own router: what went to b through another one reaches this
    one as b's report of the blocks its cache took."""
    index: PrefixIndex[str] = PrefixIndex(1000, ttl_s=60)
    index.cached("b", total=3, latest=K[:3], now=0)
    index.cached("b", total=8, latest=[b"x" * 8, *K[:8]], now=1)  # 5 new: K[3:8]
    assert index.matched(K, ["a", "b"], now=2) == {"a": 0, "b": 8}
    assert choose(K, {"a": 0, "b": 1}, index, S, now=2).replica == "b"
    index.cached("b", total=8, latest=K[:8], now=3)  # the same report again: nothing new


def test_entries_age_out_and_the_index_stays_bounded():
    index = index_with({"a": 10}, now=0.0)
    assert index.matched(K, ["a"], now=59) == {"a": 10}
    assert index.matched(K, ["a"], now=61) == {"a": 0} and len(index) == 0
    small: PrefixIndex[str] = PrefixIndex(4, ttl_s=60)
    small.record(K, "a", now=0)
    assert len(small) == 4 and small.matched(K, ["a"], now=1) == {"a": 0}  # the oldest went first


def test_a_replica_that_leaves_takes_its_entries():
    index = index_with({"a": 10, "b": 10})
    index.remove_replica("a")
    assert index.matched(K, ["a", "b"], now=1) == {"a": 0, "b": 10}
    assert choose(K, {"b": 1, "c": 0}, index, S, now=1).replica == "b"  # only live replicas count


def test_a_recorded_trace_of_conversations_stays_affine_and_balanced():
    """Thirty conversations of three turns over three replicas: every later turn goes where its
    first turn went, and the first turns spread by load."""
    index: PrefixIndex[str] = PrefixIndex(10_000, ttl_s=600)
    loads = {"a": 0, "b": 0, "c": 0}
    home: dict[int, str] = {}
    for turn in range(3):
        for conv in range(30):
            keys = [bytes([conv, block]) * 4 for block in range(4 * (turn + 1))]
            decision = choose(keys, loads, index, S, now=float(turn))
            if turn == 0:
                home[conv] = decision.replica
                loads[decision.replica] += 1  # each conversation stays open
            else:
                assert decision.replica == home[conv] and decision.by_affinity
            index.record(keys, decision.replica, now=float(turn))
    assert sorted(loads.values()) == [10, 10, 10]


@pytest.mark.parametrize(
    "bad", [{"policy": "random"}, {"min_match_ratio": 2}, {"balance_rel": 0.5}, {"min_match_blocks": 0}]
)
def test_settings_refuse_nonsense(bad):
    with pytest.raises(ValueError):
        RouterSettings(**bad)
