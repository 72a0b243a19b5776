"""The oneDNN-prepacked dense projections (a CPU transform of a loaded decoder) against nn.Linear."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from services.common.checkpoint import write_checkpoint
from services.decoder.engine.llm_engine import EngineConfig, LLMEngine
from services.decoder.engine.params import SamplingParams
from services.decoder.loading import load_text_model
from services.decoder.model.prepack import PrepackedLinear, can_prepack, prepack_linears

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("prepack") / "tiny", dtype=torch.float32)


@pytest.mark.parametrize(("rows", "dtype"), [(1, torch.float32), (3, torch.float32), (37, torch.float32),
                                             (5, torch.bfloat16)])  # fmt: skip
def test_a_packed_projection_equals_linear(rows: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(rows)
    linear = nn.Linear(72, 136, bias=True).to(dtype)  # odd widths
    x = torch.randn(2, rows, 72, generator=gen).to(dtype)
    want = linear(x)
    got = PrepackedLinear(linear)(x)
    assert got.shape == want.shape and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(72,), (1, 72), (1, 1, 72)])
def test_one_row_takes_the_gemv_and_keeps_its_shape(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    linear = nn.Linear(72, 136, bias=True).to(dtype)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    want = linear(x)
    got = PrepackedLinear(linear)(x)
    assert got.shape == want.shape == (*shape[:-1], 136) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_the_transform_keeps_what_other_code_reads_and_the_greedy_ids(ckpt) -> None:
    plain = load_text_model(ckpt, torch.float32)
    packed = load_text_model(ckpt, torch.float32)
    assert can_prepack(packed)
    replaced = prepack_linears(packed)
    kinds = {name.rsplit(".", 1)[-1]: type(m) for name, m in packed.named_modules()}
    assert replaced > 0 and kinds["o_proj"] is PrepackedLinear and kinds["lm_head"] is PrepackedLinear
    assert kinds["kv_b_proj"] is nn.Linear  # the absorbed decode reads its weight
    assert prepack_linears(packed) == 0  # idempotent

    def greedy(model, prepack: bool) -> list[list[int]]:
        engine = LLMEngine(model, EngineConfig(block_size=4, kv_cache_tokens=4096, prepack_weights=prepack))
        params = SamplingParams(max_new_tokens=12, ignore_eos=True)
        return [[o.token_id for o in engine.generate(list(range(3, 3 + n)), params)] for n in (5, 19, 40)]

    assert greedy(packed, prepack=True) == greedy(plain, prepack=False)
