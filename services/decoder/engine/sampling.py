"""Next-token selection for a batch of requests, each with its own settings.

Logits in, token ids (and logprobs) out, with vLLM's semantics: penalties, greedy argmax,
temperature, top-k, top-p, min-p, then one draw per row (vLLM V0's order; V1 applies min-p
before top-k/top-p, which can change only which tokens top-p keeps). Every filter is a batched
tensor op over [B, V] (no Python loop over the vocabulary); only the random draw is made row by
row: one uniform number from the row's own CPU generator, turned into a token by inverse-CDF
search over the row's filtered distribution, so a seeded request draws the same tokens whatever
it is batched with (and costs one number, not V, per row). Knows nothing about the model,
the cache or the scheduler.

Shapes: `B` rows (sequences), `V` vocabulary, `S` rows that sample, `R` rows in a sub-batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import torch

from services.common.errors import InternalError
from services.decoder.engine.outputs import TokenLogprobs
from services.decoder.engine.params import SamplingParams

__all__ = ["SampleOutput", "SamplingParams", "TokenLogprobs", "make_generator", "sample"]

_NEG_INF = float("-inf")


@dataclass(frozen=True)
class SampleOutput:
    token_ids: list[int]  # one per row
    logprobs: list[TokenLogprobs | None]  # None for rows that asked for none


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A CPU generator for a sampling request, seeded from `params.seed` (None for greedy)."""
    if params.greedy:
        return None
    gen = torch.Generator()
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
) -> SampleOutput:
    """One next token per row of `logits` [B, V] (float32, any device); `logits` is not modified.

    `generators[i]` is row i's CPU generator (from `make_generator`); `prompt_ids[i]` and
    `output_ids[i]` are the ids the repetition, frequency and presence penalties look at.
    """
    _check_batch(logits, params, generators, prompt_ids, output_ids)
    batch, vocab = logits.shape
    # the draws come first: the CPU makes them while the device may still run the model's forward
    uniforms = _row_uniforms([g for p, g in zip(params, generators, strict=True) if not p.greedy])
    token_ids = torch.empty(batch, dtype=torch.long, device=logits.device)

    # rows that need a private, modified copy of their logits: those that sample or are penalised
    work_rows = [i for i, p in enumerate(params) if not p.greedy or p.needs_penalties]
    if len(work_rows) < batch:
        token_ids.copy_(logits.argmax(dim=-1))  # plain greedy rows; the others are overwritten
    if work_rows:
        _sample_rows(logits, work_rows, params, prompt_ids, output_ids, uniforms, token_ids)
    ids = token_ids.tolist()
    return SampleOutput(ids, _logprobs(logits, params, ids))


def _sample_rows(
    logits: torch.Tensor,
    rows: list[int],
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    uniforms: torch.Tensor,
    token_ids: torch.Tensor,
) -> None:
    """Penalise, filter and draw for batch rows `rows`; writes their tokens into `token_ids` [B].

    `uniforms` [S] (CPU, in [0, 1)) holds one draw for each non-greedy row, in batch order.
    """
    batch, _ = logits.shape
    dev = logits.device
    any_penalty = any(params[i].needs_penalties for i in rows)
    # `work` [R, V] is ours to change in place, unless it is still the caller's `logits`: then the
    # temperature division below makes the one copy
    owned = len(rows) < batch or any_penalty
    if len(rows) < batch:
        work = logits.index_select(0, torch.tensor(rows, device=dev))
    else:
        work = logits.clone(memory_format=torch.contiguous_format) if any_penalty else logits

    if any_penalty:
        _apply_penalties(
            work, [params[i] for i in rows], [prompt_ids[i] for i in rows], [output_ids[i] for i in rows]
        )
        greedy_pos = [j for j, i in enumerate(rows) if params[i].greedy]
        if greedy_pos:  # greedy rows are penalised but neither scaled nor filtered
            pos = torch.tensor(greedy_pos, device=dev)
            token_ids[torch.tensor([rows[j] for j in greedy_pos], device=dev)] = work[pos].argmax(dim=-1)
            sample_pos = [j for j, i in enumerate(rows) if not params[i].greedy]
            if not sample_pos:
                return
            work = work.index_select(0, torch.tensor(sample_pos, device=dev))
            rows = [rows[j] for j in sample_pos]

    rows_params = [params[i] for i in rows]
    temperature = torch.tensor([p.temperature for p in rows_params], device=dev).unsqueeze(1)
    probs = work.div_(temperature) if owned else work.div(temperature)  # [S, V]
    del work
    _top_k_top_p(probs, rows_params)

    # unnormalised probabilities, relative to the row's best token: exp(x - max) in [0, 1]
    probs.sub_(probs.amax(dim=-1, keepdim=True)).exp_()
    if any(p.min_p > 0.0 for p in rows_params):
        min_p = torch.tensor([p.min_p for p in rows_params], device=dev).unsqueeze(1)
        probs.masked_fill_(probs < min_p, 0.0)

    # inverse CDF: the first token whose cumulative mass exceeds u·total, so a token without mass
    # (filtered out) never wins; `last` (the first index reaching the total: the last token with
    # mass) catches u·total rounding up to the total in float32
    cdf = probs.cumsum_(dim=-1)  # [S, V]
    total = cdf[:, -1:]
    target = uniforms.to(dev, cdf.dtype, non_blocking=True).unsqueeze(1) * total
    drawn = torch.searchsorted(cdf, target, right=True).squeeze(1)
    last = (cdf < total).sum(dim=-1)
    token_ids[torch.tensor(rows, device=dev)] = torch.minimum(drawn, last)


def _apply_penalties(
    work: torch.Tensor,
    row_params: list[SamplingParams],
    prompts: list[Sequence[int]],
    outputs: list[Sequence[int]],
) -> None:
    """vLLM's repetition, frequency and presence penalties, in place on `work` [R, V].

    Touches only the (row, token) pairs that were seen, as flat indices row * V + token, so the
    cost follows the number of ids, not R * V.
    """
    _, vocab = work.shape
    dev = work.device
    flat = work.view(-1)

    rep = [j for j, p in enumerate(row_params) if p.repetition_penalty != 1.0]
    if rep:  # a seen token (prompt or output) once: logit > 0 is divided by r, else multiplied
        keys = _flat_keys([(j, prompts[j]) for j in rep] + [(j, outputs[j]) for j in rep], vocab)
        keys = torch.unique(keys.to(dev))
        by_row = torch.tensor([p.repetition_penalty for p in row_params], dtype=work.dtype, device=dev)
        r = by_row[keys // vocab]
        seen = flat[keys]
        flat[keys] = torch.where(seen > 0, seen / r, seen * r)

    freq = [j for j, p in enumerate(row_params) if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0]
    if freq:  # subtract f * count(token in output) + p * [token in output]
        keys = _flat_keys([(j, outputs[j]) for j in freq], vocab)
        keys, counts = torch.unique(keys.to(dev), return_counts=True)
        row = keys // vocab
        f = torch.tensor([p.frequency_penalty for p in row_params], dtype=work.dtype, device=dev)[row]
        p = torch.tensor([p.presence_penalty for p in row_params], dtype=work.dtype, device=dev)[row]
        flat.index_add_(0, keys, (f * counts + p).neg_().to(work.dtype))


def _flat_keys(row_ids: list[tuple[int, Sequence[int]]], vocab: int) -> torch.Tensor:
    """CPU int64 tensor of row * vocab + id for every id of every (row, ids) pair."""
    ids = torch.tensor(list(chain.from_iterable(ids for _, ids in row_ids)), dtype=torch.long)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise InternalError(f"token ids must be in [0, {vocab}), got {int(ids.min())}..{int(ids.max())}")
    lengths = torch.tensor([len(ids_j) for _, ids_j in row_ids], dtype=torch.long)
    offsets = torch.tensor([j * vocab for j, _ in row_ids], dtype=torch.long)
    return ids + torch.repeat_interleave(offsets, lengths)


def _top_k_top_p(x: torch.Tensor, rows_params: list[SamplingParams]) -> None:
    """Top-k, then top-p on the top-k renormalised distribution, in place on `x` [S, V] (-inf out).

    Both keep a prefix of the row sorted by logit, so each row reduces to one threshold: the
    smallest kept logit (tokens tied with it stay too, as in vLLM's top-k). Only the rows that
    filter are sorted; when every top-p row also has a top-k, `topk(max k)` replaces the sort.
    """
    _, vocab = x.shape
    dev = x.device
    use_k = [0 < p.top_k < vocab for p in rows_params]
    use_p = [p.top_p < 1.0 for p in rows_params]
    filtered = [j for j in range(len(rows_params)) if use_k[j] or use_p[j]]
    if not filtered:
        return
    fparams = [rows_params[j] for j in filtered]
    fuse_k = [use_k[j] for j in filtered]
    fuse_p = [use_p[j] for j in filtered]
    width = vocab
    if all(k or not q for k, q in zip(fuse_k, fuse_p, strict=True)):  # every top-p row has a top-k
        width = max(p.top_k for p, k in zip(fparams, fuse_k, strict=True) if k)

    index = torch.tensor(filtered, device=dev)
    sub = x if len(filtered) == len(rows_params) else x.index_select(0, index)  # [R, V]
    # [R, W] best first; for the usual small k, topk's partial selection beats sorting all V
    ranked = sub.topk(width, dim=-1).values if width < vocab else sub.sort(dim=-1, descending=True).values
    del sub
    k = torch.tensor([p.top_k if u else width for p, u in zip(fparams, fuse_k, strict=True)], device=dev)
    n_keep = k  # [R]: how many of the ranked logits survive
    if any(fuse_p):
        if any(fuse_k):  # top-p sees the top-k renormalised distribution
            probs = ranked.masked_fill(torch.arange(width, device=dev) >= k.unsqueeze(1), _NEG_INF)
            probs = probs.softmax(dim=-1)
        else:
            probs = ranked.softmax(dim=-1)
        mass = probs.cumsum_(dim=-1)
        # token i stays while the mass before it is < top_p: the top token always, and the set
        # stops as soon as its mass reaches top_p; rows without top-p compare against 2
        top_p = torch.tensor(
            [p.top_p if u else 2.0 for p, u in zip(fparams, fuse_p, strict=True)], device=dev
        )
        n_keep = (mass[:, :-1] < top_p.unsqueeze(1)).sum(dim=-1).add_(1).clamp_(max=k)
        del probs, mass
    threshold = ranked.gather(1, (n_keep - 1).unsqueeze(1))  # [R, 1]
    del ranked
    if len(filtered) < len(rows_params):
        full = torch.full((x.shape[0], 1), _NEG_INF, device=dev, dtype=x.dtype)
        threshold = full.index_copy_(0, index, threshold)
    x.masked_fill_(x < threshold, _NEG_INF)


def _row_uniforms(generators: list[torch.Generator | None]) -> torch.Tensor:
    """One U[0, 1) draw per sampling row [S] (CPU, float64), row j from generators[j] alone."""
    return torch.tensor(
        [float(torch.rand(1, generator=g, dtype=torch.float64)) for g in generators], dtype=torch.float64
    )


def _logprobs(
    logits: torch.Tensor, params: Sequence[SamplingParams], token_ids: list[int]
) -> list[TokenLogprobs | None]:
    """Logprobs from the raw logits (before penalties and temperature), for rows that ask."""
    out: list[TokenLogprobs | None] = [None] * len(params)
    wanted = [(i, p.logprobs) for i, p in enumerate(params) if p.logprobs is not None]  # (row, k)
    if not wanted:
        return out
    rows = [i for i, _ in wanted]
    dev = logits.device
    src = logits if len(rows) == len(params) else logits.index_select(0, torch.tensor(rows, device=dev))
    logp = torch.log_softmax(src, dim=-1)  # [R, V]
    del src
    chosen = torch.tensor([token_ids[i] for i in rows], device=dev)
    chosen_lp = logp.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
    n = max(k for _, k in wanted)  # one batched top-n for every row
    top_lp: list[list[float]] = [[] for _ in rows]
    top_ids: list[list[int]] = [[] for _ in rows]
    if n > 0:
        values, indices = logp.topk(n, dim=-1)
        top_lp, top_ids = values.tolist(), indices.tolist()
    for j, (i, k) in enumerate(wanted):
        out[i] = TokenLogprobs(
            token_ids[i], chosen_lp[j], tuple(zip(top_ids[j][:k], top_lp[j][:k], strict=True))
        )
    return out


def _check_batch(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
) -> None:
    if logits.dim() != 2:
        raise InternalError(f"logits must be [batch, vocab], got shape {list(logits.shape)}")
    batch = logits.shape[0]
    sizes = {len(params), len(generators), len(prompt_ids), len(output_ids)}
    if sizes != {batch}:
        raise InternalError(
            f"{batch} logit rows but {len(params)} params, {len(generators)} generators, "
            f"{len(prompt_ids)} prompts and {len(output_ids)} outputs"
        )
    if missing := [
        i for i, (p, g) in enumerate(zip(params, generators, strict=True)) if g is None and not p.greedy
    ]:
        raise InternalError(f"rows {missing[:5]} sample but have no generator (use make_generator)")
