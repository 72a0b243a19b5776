"""The MoE layer's one switch: KIMI_VL_MOE_BACKEND=triton (the interpreter on CPU) equals torch.

Covers the switch's rules and errors, each MoE layer of the tiny checkpoint on both paths, the
greedy continuation of the whole decoder on both paths, and importing without Triton.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from services.common.checkpoint import write_checkpoint
from services.decoder.engine.llm_engine import EngineConfig, LLMEngine
from services.decoder.engine.params import SamplingParams
from services.decoder.loading import load_text_model
from services.decoder.model.moe import MoE
from triton_kernels import BACKEND_ENV, fused_experts, grouped_topk, use_kernels
from triton_kernels._backend import check_launch


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    ckpt = write_checkpoint(tmp_path_factory.mktemp("moe_backends") / "tiny", dtype=torch.float32)
    return load_text_model(ckpt, torch.float32)


def _moe_layers(model) -> list[MoE]:
    return [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, MoE)]


def test_switch_rules(monkeypatch) -> None:
    cpu = torch.zeros(1)
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert not use_kernels(cpu)  # auto: references on CPU
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert not use_kernels(cpu)
    monkeypatch.setenv(BACKEND_ENV, "TRITON")
    assert use_kernels(cpu)
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match=BACKEND_ENV):
        use_kernels(cpu)


def test_compiled_kernel_on_cpu_tensors_is_a_clear_error() -> None:
    compiled = object()  # anything that is not an InterpretedFunction stands for a compiled kernel
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        check_launch(compiled, torch.zeros(1))


@pytest.mark.parametrize("t", [1, 7, 33])
def test_moe_layers_match(model, monkeypatch, t: int) -> None:
    gen = torch.Generator().manual_seed(t)
    for moe in _moe_layers(model):
        x = torch.randn(t, moe.cfg.hidden_size, generator=gen)
        monkeypatch.setenv(BACKEND_ENV, "torch")
        want = moe(x)
        monkeypatch.setenv(BACKEND_ENV, "triton")
        torch.testing.assert_close(moe(x), want, rtol=1e-5, atol=1e-5)


def test_both_dispatch_points_follow_the_switch(model, monkeypatch) -> None:
    calls: list[str] = []
    for name, fn in (("grouped_topk", grouped_topk), ("fused_experts", fused_experts)):

        def spy(*args, _name=name, _fn=fn, **kwargs):
            calls.append(_name)
            return _fn(*args, **kwargs)

        monkeypatch.setattr(f"services.decoder.model.moe.{name}", spy)
    moe = _moe_layers(model)[0]
    monkeypatch.setenv(BACKEND_ENV, "triton")
    moe(torch.randn(3, model.cfg.hidden_size))
    assert calls == ["grouped_topk", "fused_experts"]
    monkeypatch.setenv(BACKEND_ENV, "torch")
    moe(torch.randn(3, model.cfg.hidden_size))
    assert len(calls) == 2


def test_greedy_continuation_matches(model, monkeypatch) -> None:
    prompt = torch.randint(0, 1000, (11,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    runs = []
    for backend in ("torch", "triton"):
        monkeypatch.setenv(BACKEND_ENV, backend)
        engine = LLMEngine(model, EngineConfig(block_size=4, kv_cache_tokens=64))
        runs.append([out.token_id for out in engine.generate(prompt, params)])
    assert runs[0] == runs[1] and len(runs[0]) == 4


def test_imports_and_runs_without_triton() -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # what a platform without Triton looks like
        import torch
        import pytest
        from triton_kernels import HAVE_TRITON, grouped_topk, fused_experts_ref
        from services.decoder.model.moe import FusedExperts
        assert not HAVE_TRITON
        experts = FusedExperts(4, 8, 4)
        torch.nn.init.normal_(experts.w13); torch.nn.init.normal_(experts.w2)
        ids = torch.tensor([[0, 3], [1, 0]], dtype=torch.int32)
        out = experts(torch.randn(2, 8), torch.rand(2, 2), ids)
        assert out.shape == (2, 8)
        with pytest.raises(RuntimeError, match="not installed"):
            grouped_topk(torch.zeros(1, 4), None, top_k=1, n_group=1, topk_group=1, scoring_func="sigmoid",
                         topk_method="greedy", norm_topk_prob=True, routed_scaling_factor=1.0)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
