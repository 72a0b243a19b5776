"""The batched sampler against plain-loop references on a small vocabulary (CPU, fast).

Each option is checked against an independent computation written with Python loops and
floats: penalties and greedy exactly, the filters through the set of tokens ever drawn and the
empirical frequencies of many seeded draws.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import pytest
import torch

from services.common.errors import InternalError, InvalidInputError
from services.decoder.engine.params import SamplingParams
from services.decoder.engine.sampling import SampleOutput, make_generator, sample

V = 50
DRAWS = 20000
FREQ_TOL = 0.015  # > 4 standard deviations of an empirical frequency after 20000 draws


# ---- plain-loop references ----------------------------------------------------------------


def ref_penalised(
    row: list[float], p: SamplingParams, prompt: Sequence[int], output: Sequence[int]
) -> list[float]:
    output = list(output)
    out = list(row)
    for tok in range(len(out)):
        if p.repetition_penalty != 1.0 and (tok in prompt or tok in output):
            r = p.repetition_penalty
            out[tok] = out[tok] / r if out[tok] > 0 else out[tok] * r
        count = output.count(tok)
        out[tok] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
    return out


def ref_distribution(
    row: list[float], p: SamplingParams, prompt: Sequence[int] = (), output: Sequence[int] = ()
) -> list[float]:
    """Probability of each token after penalties, temperature, top-k, top-p and min-p."""
    x = [v / p.temperature for v in ref_penalised(row, p, prompt, output)]
    order = sorted(range(len(x)), key=lambda t: -x[t])
    keep = set(order[: p.top_k] if p.top_k > 0 else order)
    probs = _normalise([math.exp(x[t]) if t in keep and x[t] > -math.inf else 0.0 for t in range(len(x))])
    if p.top_p < 1.0:
        mass, kept = 0.0, set()
        for t in order:
            if mass >= p.top_p:
                break
            kept.add(t)
            mass += probs[t]
        probs = _normalise([probs[t] if t in kept else 0.0 for t in range(len(x))])
    top = max(probs)
    return _normalise([q if q >= p.min_p * top else 0.0 for q in probs])


def _normalise(q: list[float]) -> list[float]:
    total = sum(q)
    return [v / total for v in q]


def ref_top_p_margin(row: list[float], p: SamplingParams) -> float:
    """How far the top-p cut is from flipping (cumulative masses vs top_p), to reject fragile data."""
    probs = ref_distribution(row, SamplingParams(temperature=p.temperature, top_k=p.top_k))
    cumulative = 0.0
    margin = math.inf
    for q in sorted(probs, reverse=True):
        cumulative += q
        margin = min(margin, abs(cumulative - p.top_p))
    return margin


# ---- helpers --------------------------------------------------------------------------------


def random_logits(rows: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * scale


def draw_counts(
    row: torch.Tensor,
    p: SamplingParams,
    prompt: Sequence[int] = (),
    output: Sequence[int] = (),
    n: int = DRAWS,
) -> list[int]:
    """Token counts of n draws: one batch of n copies of `row`, all sharing one seeded generator."""
    gen = make_generator(p)
    out = sample(row.expand(n, -1), [p] * n, [gen] * n, [list(prompt)] * n, [list(output)] * n)
    counts = [0] * row.shape[-1]
    for t in out.token_ids:
        counts[t] += 1
    return counts


def assert_matches(counts: list[int], expected: list[float]) -> None:
    n = sum(counts)
    drawn = {t for t, c in enumerate(counts) if c}
    allowed = {t for t, q in enumerate(expected) if q > 0}
    assert drawn <= allowed, f"drew filtered-out tokens {sorted(drawn - allowed)}"
    worst = max(abs(c / n - q) for c, q in zip(counts, expected, strict=True))
    assert worst < FREQ_TOL, f"empirical frequencies off by {worst:.4f}"


def call(
    logits: torch.Tensor,
    params: list[SamplingParams],
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
) -> SampleOutput:
    """`sample` with fresh generators and, unless given, empty prompts and outputs."""
    prompts = prompts if prompts is not None else [[] for _ in params]
    outputs = outputs if outputs is not None else [[] for _ in params]
    return sample(logits, params, [make_generator(p) for p in params], prompts, outputs)


# ---- greedy and penalties -------------------------------------------------------------------


def test_greedy_is_argmax_and_input_untouched() -> None:
    logits = random_logits(8, seed=0)
    before = logits.clone()
    out = call(logits, [SamplingParams()] * 8)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 8
    assert torch.equal(logits, before)


def test_penalised_greedy_matches_reference_on_random_rows() -> None:
    rng = random.Random(1)
    batch = 300
    logits = random_logits(batch, seed=1)
    params, prompts, outputs = [], [], []
    for _ in range(batch):
        params.append(
            SamplingParams(
                repetition_penalty=rng.choice([1.0, 0.7, 1.3, 2.5]),
                frequency_penalty=rng.choice([0.0, 0.4, -0.6, 1.5]),
                presence_penalty=rng.choice([0.0, 0.5, -1.0, 2.0]),
            )
        )
        prompts.append([rng.randrange(V) for _ in range(rng.randrange(0, 30))])
        outputs.append([rng.randrange(12) for _ in range(rng.randrange(0, 15))])  # many repeats
    before = logits.clone()
    out = call(logits, params, prompts, outputs)
    for b in range(batch):
        ref = ref_penalised(logits[b].tolist(), params[b], prompts[b], outputs[b])
        assert ref[out.token_ids[b]] >= max(ref) - 1e-5, b
    assert torch.equal(logits, before)


def test_repetition_penalty_on_prompt_tokens() -> None:
    logits = torch.zeros(2, V)
    logits[:, 3] = 4.0  # best, seen only in the prompt: 4 / 2 = 2 < 3
    logits[:, 7] = 3.0
    logits[1] = -logits[1] - 1.0  # all negative: token 0.. at -1; seen token 0 becomes -1 * 2 = -2
    params = [SamplingParams(repetition_penalty=2.0)] * 2
    out = call(logits, params, prompts=[[3], [0, 1, 2, 4]], outputs=[[], [5, 6]])
    assert out.token_ids[0] == 7
    # row 1: seen tokens 0,1,2,4,5,6 are pushed down to -2; the best unseen stays at -1
    assert out.token_ids[1] == 8


def test_frequency_counts_and_presence_once() -> None:
    logits = torch.zeros(4, V)
    logits[:, 5] = 2.5
    logits[:, 6] = 0.0
    params = [
        SamplingParams(frequency_penalty=1.0),  # 2.5 - 3 = -0.5 < 0: token 5 loses
        SamplingParams(frequency_penalty=1.0),  # 2.5 - 1 = 1.5: token 5 stays
        SamplingParams(presence_penalty=2.0),  # 2.5 - 2 = 0.5 whatever the count
        SamplingParams(frequency_penalty=0.5, presence_penalty=1.0),  # 2.5 - 1.5 - 1 = 0 ties with 0
    ]
    outputs = [[5, 5, 5], [5], [5, 5, 5, 5], [5, 5, 5]]
    out = call(logits, params, outputs=outputs)
    assert out.token_ids[0] != 5
    assert out.token_ids[1] == 5
    assert out.token_ids[2] == 5
    assert out.token_ids[3] == 0  # argmax picks the first of the tied zeros


def test_penalties_apply_to_sampling_rows() -> None:
    row = random_logits(1, seed=2)[0]
    p = SamplingParams(
        temperature=1.0, seed=3, repetition_penalty=1.8, frequency_penalty=0.7, presence_penalty=0.3
    )
    prompt, output = [int(row.argmax()), 1, 2], [4, 4, 9, int(row.argmax())]
    assert_matches(draw_counts(row, p, prompt, output), ref_distribution(row.tolist(), p, prompt, output))


# ---- temperature and filters: distributions --------------------------------------------------


FILTER_CASES = {
    "temperature_1": SamplingParams(temperature=1.0, seed=10),
    "temperature_0.5": SamplingParams(temperature=0.5, seed=11),
    "temperature_2": SamplingParams(temperature=2.0, seed=12),
    "top_k_5": SamplingParams(temperature=1.0, top_k=5, seed=13),
    "top_k_1": SamplingParams(temperature=1.5, top_k=1, seed=14),
    "top_k_off_-1": SamplingParams(temperature=1.0, top_k=-1, seed=15),
    "top_k_over_vocab": SamplingParams(temperature=1.0, top_k=V + 10, seed=16),
    "top_p_0.6": SamplingParams(temperature=1.0, top_p=0.6, seed=17),
    "min_p_0.2": SamplingParams(temperature=1.0, min_p=0.2, seed=18),
    "top_k_and_top_p": SamplingParams(temperature=0.8, top_k=8, top_p=0.7, seed=19),
    "all_filters": SamplingParams(
        temperature=0.7,
        top_k=10,
        top_p=0.8,
        min_p=0.05,
        repetition_penalty=1.2,
        frequency_penalty=0.3,
        seed=20,
    ),
}


@pytest.mark.parametrize("name", list(FILTER_CASES))
def test_filters_match_reference_distribution(name: str) -> None:
    p = FILTER_CASES[name]
    row = random_logits(1, seed=100 + len(name), scale=1.5)[0]
    prompt, output = ([1, 2, 3], [3, 3, 7]) if p.needs_penalties else ((), ())
    if p.top_p < 1.0:
        assert ref_top_p_margin(row.tolist(), p) > 1e-4  # the cut is not a float coin-flip
    expected = ref_distribution(row.tolist(), p, prompt, output)
    assert_matches(draw_counts(row, p, prompt, output), expected)


MIXED_BATCHES = {
    # a top-p row without top-k: every filtered row goes through the full sort
    "sort": [
        SamplingParams(temperature=1.0, top_p=0.5, seed=1),
        SamplingParams(temperature=0.9, top_k=4, seed=2),
        SamplingParams(temperature=1.0, top_k=6, top_p=0.6, seed=3),
        SamplingParams(temperature=1.2, min_p=0.3, seed=4),
        SamplingParams(temperature=1.0, seed=5),
        SamplingParams(repetition_penalty=1.5),
    ],
    # every top-p row has a top-k: topk(12) serves rows with k = 3, 5 and 12
    "topk": [
        SamplingParams(temperature=1.0, top_k=5, top_p=0.7, seed=6),
        SamplingParams(temperature=0.8, top_k=12, seed=7),
        SamplingParams(temperature=1.0, top_k=3, top_p=0.9, min_p=0.2, seed=8),
        SamplingParams(temperature=1.0, seed=9),
        SamplingParams(),
    ],
}


@pytest.mark.parametrize("name", list(MIXED_BATCHES))
def test_mixed_batch_each_row_follows_its_own_settings(name: str) -> None:
    """Rows with different filters share one call; each follows its own settings."""
    configs = MIXED_BATCHES[name]
    base = random_logits(len(configs), seed=5, scale=1.5)
    n = 6000
    logits = base.repeat(n, 1)  # row b * len(configs) + c uses config c
    params = configs * n
    gens = [make_generator(p) for p in configs] * n
    prompts = [[int(base[c].argmax())] for c in range(len(configs))] * n
    out = sample(logits, params, gens, prompts, [[] for _ in params])
    for c, p in enumerate(configs):
        tokens = out.token_ids[c :: len(configs)]
        if p.greedy:
            ref = ref_penalised(base[c].tolist(), p, prompts[c], [])
            assert set(tokens) == {max(range(V), key=ref.__getitem__)}
            continue
        if p.top_p < 1.0:
            assert ref_top_p_margin(base[c].tolist(), p) > 1e-4
        counts = [tokens.count(t) for t in range(V)]
        expected = ref_distribution(base[c].tolist(), p, prompts[c] if p.needs_penalties else [])
        drawn = {t for t in range(V) if counts[t]}
        assert drawn <= {t for t in range(V) if expected[t] > 0}, c
        assert max(abs(counts[t] / n - expected[t]) for t in range(V)) < 0.025, c


# ---- top-p boundary ---------------------------------------------------------------------------

BOUNDARY_IDS = [17, 3, 42, 8, 30, 11]  # probabilities 1/2, 1/4, 1/8, 1/16, 1/32, 1/32, the rest 0


def boundary_row() -> torch.Tensor:
    row = torch.full((V,), float("-inf"))
    for rank, tok in enumerate(BOUNDARY_IDS):
        row[tok] = -min(rank, 4) * math.log(2)
    return row


@pytest.mark.parametrize("top_k", [0, 6])  # full-sort path and top-k path
@pytest.mark.parametrize(
    ("top_p", "kept"),
    [
        (0.5, 1),  # the top token alone reaches 0.5 exactly
        (0.75, 2),  # 1/2 + 1/4 reaches 0.75 exactly: no third token
        (0.7500001, 3),
        (0.875, 3),
        (0.01, 1),  # the top token is always kept
        (0.99, 6),
    ],
)
def test_top_p_boundary_is_exact(top_p: float, kept: int, top_k: int) -> None:
    p = SamplingParams(temperature=1.0, top_p=top_p, top_k=top_k, seed=7)
    counts = draw_counts(boundary_row(), p, n=4000)
    assert {t for t in range(V) if counts[t]} == set(BOUNDARY_IDS[:kept])


# ---- seeds and batch independence -------------------------------------------------------------


TARGET = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=123)
OTHERS = [
    SamplingParams(),
    SamplingParams(frequency_penalty=0.5),
    SamplingParams(temperature=1.0),  # unseeded
    SamplingParams(temperature=0.7, top_p=0.5, seed=9),  # top-p without top-k: the full sort
    SamplingParams(temperature=1.3, min_p=0.1, presence_penalty=1.0, seed=10),
    SamplingParams(temperature=1.0, top_k=3, seed=11, logprobs=5),
]


def run_target(position: int, others: list[SamplingParams], steps: int = 25) -> list[int]:
    """The target's tokens over `steps` calls, at `position` among `others` (fresh logits each step)."""
    params = list(others)
    params.insert(position, TARGET)
    gens = [make_generator(p) for p in params]
    prompts = [[1, 2, 3, 4] for _ in params]
    outputs: list[list[int]] = [[] for _ in params]
    target_logits = torch.Generator().manual_seed(55)
    other_logits = torch.Generator().manual_seed(len(params) * 31 + position)
    tokens = []
    for _ in range(steps):
        logits = torch.randn(len(params), V, generator=other_logits) * 3
        logits[position] = torch.randn(V, generator=target_logits) * 3
        out = sample(logits, params, gens, prompts, outputs)
        for row, tok in zip(outputs, out.token_ids, strict=True):
            row.append(tok)
        tokens.append(out.token_ids[position])
    return tokens


def test_seeded_row_ignores_its_batch() -> None:
    alone = run_target(0, [])
    assert len(set(alone)) > 3  # it really samples
    assert run_target(0, OTHERS) == alone
    assert run_target(3, OTHERS) == alone
    assert run_target(len(OTHERS), OTHERS) == alone
    assert run_target(1, OTHERS[3:5]) == alone
    assert run_target(2, OTHERS[::-1]) == alone


def test_seed_reproduces_and_differs() -> None:
    row = random_logits(1, seed=8)[0].expand(64, -1)
    draw = lambda seed: call(row, [SamplingParams(temperature=1.0, seed=seed)] * 64).token_ids
    assert draw(5) == draw(5)
    assert draw(5) != draw(6)


def test_make_generator() -> None:
    assert make_generator(SamplingParams()) is None
    a = make_generator(SamplingParams(temperature=1.0, seed=4))
    b = make_generator(SamplingParams(temperature=1.0, seed=4))
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))
    assert isinstance(make_generator(SamplingParams(temperature=1.0)), torch.Generator)


# ---- logprobs ---------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax() -> None:
    params = [
        SamplingParams(logprobs=None),
        SamplingParams(logprobs=0),
        SamplingParams(temperature=0.5, top_k=3, repetition_penalty=2.0, logprobs=3, seed=1),
        SamplingParams(temperature=2.0, top_p=0.5, frequency_penalty=1.0, logprobs=20, seed=2),
        SamplingParams(presence_penalty=2.0, logprobs=1),
    ]
    logits = random_logits(len(params), seed=9)
    prompts = [[int(row.argmax())] for row in logits]
    outputs = [[int(row.argmax()), 4, 4] for row in logits]
    out = call(logits, params, prompts, outputs)
    raw = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[0] is None
    for b, p in enumerate(params[1:], start=1):
        lp = out.logprobs[b]
        assert lp is not None and lp.token_id == out.token_ids[b]
        assert lp.logprob == pytest.approx(raw[b, lp.token_id].item(), abs=1e-6)
        assert len(lp.top) == p.logprobs
        ids = [t for t, _ in lp.top]
        values = [v for _, v in lp.top]
        assert ids == raw[b].topk(p.logprobs).indices.tolist()
        assert values == sorted(values, reverse=True)
        for t, v in lp.top:
            assert v == pytest.approx(raw[b, t].item(), abs=1e-6)
    assert out.logprobs[1].top == ()


# ---- edges and errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "p",
    [
        SamplingParams(logprobs=3),
        SamplingParams(temperature=1.0, seed=1, logprobs=3),
        SamplingParams(temperature=0.3, top_k=5, top_p=0.2, min_p=0.5, seed=2, logprobs=3),
        SamplingParams(temperature=2.0, top_p=0.9, seed=3, logprobs=3),
        SamplingParams(
            temperature=1.0, repetition_penalty=3.0, frequency_penalty=2.0, presence_penalty=-2.0, seed=4
        ),
    ],
)
def test_single_finite_logit(p: SamplingParams) -> None:
    row = torch.full((V,), float("-inf"))
    row[21] = -3.0
    out = draw_counts(row, p, prompt=[21, 5], output=[21, 21], n=200)
    assert out[21] == 200
    if p.logprobs is not None:
        lp = call(row[None], [p], [[21]], [[21]]).logprobs[0]
        assert lp.token_id == 21 and lp.logprob == 0.0
        assert lp.top[0] == (21, 0.0) and all(v == float("-inf") for _, v in lp.top[1:])


def test_empty_batch() -> None:
    out = sample(torch.empty(0, V), [], [], [], [])
    assert out.token_ids == [] and out.logprobs == []


def test_caller_mistakes_are_internal_errors() -> None:
    logits = random_logits(2, seed=0)
    sampling = SamplingParams(temperature=1.0)
    with pytest.raises(InternalError, match="generator"):
        sample(logits, [sampling, sampling], [None, None], [[], []], [[], []])
    with pytest.raises(InternalError, match="2 logit rows"):
        sample(logits, [sampling], [make_generator(sampling)], [[]], [[]])
    with pytest.raises(InternalError, match="token ids"):
        call(logits, [SamplingParams(repetition_penalty=1.1)] * 2, prompts=[[V], [0]])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": 0},
        {"temperature": -0.1},
        {"temperature": 101.0},
        {"temperature": float("nan")},
        {"top_p": 0.0},
        {"top_p": 1.01},
        {"top_k": -2},
        {"top_k": 2.0},
        {"min_p": -0.1},
        {"min_p": 1.5},
        {"seed": -1},
        {"seed": 2**63},
        {"seed": True},
        {"repetition_penalty": 0.0},
        {"repetition_penalty": float("inf")},
        {"presence_penalty": 2.5},
        {"frequency_penalty": -2.5},
        {"stop_token_ids": (-1,)},
        {"stop": ("",)},
        {"logprobs": -1},
        {"logprobs": 21},
        {"n": 0},
        {"n": 17},
    ],
)
def test_invalid_params_raise(kwargs: dict) -> None:
    with pytest.raises(InvalidInputError):
        SamplingParams(**kwargs)
