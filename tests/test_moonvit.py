"""MoonViT and the projector on a tiny random model, against references written here from spec section 2."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from services.common.config import VisionConfig
from services.common.errors import InvalidInputError
from services.vision_encoder.attention import PackedSeqs, packed_attention, packed_attention_ref
from services.vision_encoder.moonvit import MoonViT, MultiModalProjector, patch_merger
from services.vision_encoder.rope2d import apply_rope, rope_cis

CFG = VisionConfig(
    patch_size=14,
    init_pos_emb_height=8,
    init_pos_emb_width=8,
    num_attention_heads=4,
    num_hidden_layers=2,
    hidden_size=64,
    intermediate_size=96,
    merge_kernel_size=(2, 2),
)
HEAD_DIM = CFG.head_dim  # 16
TEXT_HIDDEN = 32
GRIDS = [(4, 6), (8, 8), (2, 2), (6, 4), (10, 12)]  # (8, 8) is the table's own size


def perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Default init plus noise, so LayerNorm affines and biases are not trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return module.eval()


@pytest.fixture(scope="module")
def model() -> MoonViT:
    torch.manual_seed(0)
    return perturb(MoonViT(CFG), seed=1)


def pixels(grids, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(sum(h * w for h, w in grids), 3, 14, 14, generator=gen)


def grid_tensor(grids) -> torch.Tensor:
    return torch.tensor(grids, dtype=torch.int64).reshape(-1, 2)


# --------------------------------------------------------------------------------------------
# Reference forward, one image at a time, in plain tensor ops
# --------------------------------------------------------------------------------------------


def reference_rotations(h: int, w: int) -> torch.Tensor:
    """[h·w, D/2] complex128: number 2i turns by column·θ^(-4i/D), number 2i+1 by row·θ^(-4i/D)."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    freq = 10000.0 ** (-4.0 * torch.arange(HEAD_DIM // 4, dtype=torch.float64) / HEAD_DIM)
    angle = torch.empty(h * w, HEAD_DIM // 2, dtype=torch.float64)
    angle[:, 0::2] = cols.reshape(-1, 1) * freq
    angle[:, 1::2] = rows.reshape(-1, 1) * freq
    return torch.polar(torch.ones_like(angle), angle)


def reference_rope(t: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    z = torch.complex(t[..., 0::2].double(), t[..., 1::2].double()) * rot[:, None, :]
    return torch.stack((z.real, z.imag), dim=-1).reshape(t.shape).float()


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def reference_block(blk, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    n, heads = x.shape[0], CFG.num_attention_heads
    y = F.layer_norm(x, (CFG.hidden_size,), blk.norm0.weight, blk.norm0.bias, 1e-5)
    qkv = (y @ blk.wqkv.weight.T + blk.wqkv.bias).reshape(n, 3, heads, HEAD_DIM)
    q, k, v = reference_rope(qkv[:, 0], rot), reference_rope(qkv[:, 1], rot), qkv[:, 2]
    weights = (torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(HEAD_DIM)).softmax(-1)
    attn = torch.einsum("hqk,khd->qhd", weights, v).reshape(n, -1)
    x = x + attn @ blk.wo.weight.T + blk.wo.bias
    y = F.layer_norm(x, (CFG.hidden_size,), blk.norm1.weight, blk.norm1.bias, 1e-5)
    hidden = gelu_tanh(y @ blk.mlp.fc0.weight.T + blk.mlp.fc0.bias)
    return x + hidden @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias


def reference_image(model: MoonViT, pv: torch.Tensor, h: int, w: int) -> torch.Tensor:
    embed = model.patch_embed
    x = F.conv2d(pv, embed.proj.weight, embed.proj.bias, stride=14).reshape(h * w, -1)
    table = embed.pos_emb.weight.permute(2, 0, 1).unsqueeze(0)
    if (h, w) != (8, 8):
        table = F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False)
    x = x + table[0].permute(1, 2, 0).reshape(h * w, -1)
    rot = reference_rotations(h, w)
    for blk in model.encoder.blocks:
        x = reference_block(blk, x, rot)
    norm = model.encoder.final_layernorm
    x = F.layer_norm(x, (CFG.hidden_size,), norm.weight, norm.bias, 1e-5).reshape(h, w, -1)
    windows = [
        torch.stack((x[r, c], x[r, c + 1], x[r + 1, c], x[r + 1, c + 1]))
        for r in range(0, h, 2)
        for c in range(0, w, 2)
    ]
    return torch.stack(windows)  # [h·w/4, 4, H]


# --------------------------------------------------------------------------------------------
# The tower
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def test_matches_reference_per_image(model):
    pv = pixels(GRIDS)
    out = model(pv, grid_tensor(GRIDS))
    expected, start = [], 0
    for h, w in GRIDS:
        expected.append(reference_image(model, pv[start : start + h * w], h, w))
        start += h * w
    torch.testing.assert_close(out, torch.cat(expected), atol=3e-5, rtol=1e-5)


@torch.no_grad()
def test_packed_batch_equals_images_alone(model):
    pv = pixels(GRIDS)
    out = model(pv, grid_tensor(GRIDS))
    assert out.shape == (sum(h * w // 4 for h, w in GRIDS), 4, CFG.hidden_size)
    alone, start = [], 0
    for grid in GRIDS:
        n = grid[0] * grid[1]
        alone.append(model(pv[start : start + n], grid_tensor([grid])))
        start += n
    torch.testing.assert_close(out, torch.cat(alone), atol=1e-5, rtol=0)


@torch.no_grad()
def test_attention_does_not_leak_between_images(model):
    grids = [(4, 6), (4, 6), (2, 4)]  # equal neighbours share one batched SDPA call
    pv = pixels(grids)
    out = model(pv, grid_tensor(grids))
    pv2 = pv.clone()
    pv2[24:48] += torch.randn(24, 3, 14, 14)  # image 2 only
    out2 = model(pv2, grid_tensor(grids))
    torch.testing.assert_close(out2[:6], out[:6], atol=1e-6, rtol=0)
    torch.testing.assert_close(out2[12:], out[12:], atol=1e-6, rtol=0)
    assert not torch.allclose(out2[6:12], out[6:12])


def test_packed_attention_matches_block_diagonal_mask():
    gen = torch.Generator().manual_seed(3)
    lengths = [6, 6, 4, 9, 9, 9, 1]
    q, k, v = (torch.randn(sum(lengths), 4, 16, generator=gen) for _ in range(3))
    seqs = PackedSeqs.from_lengths(lengths, torch.device("cpu"))
    assert seqs.cu_seqlens.tolist() == [0, 6, 12, 16, 25, 34, 43, 44] and seqs.max_len == 9
    out = packed_attention(q, k, v, seqs, scale=0.25)
    torch.testing.assert_close(out, packed_attention_ref(q, k, v, seqs, scale=0.25), atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_position_embedding_identity_at_table_size_and_bicubic_elsewhere(model):
    pos = model.patch_embed.pos_emb
    table = pos.weight.permute(2, 0, 1).unsqueeze(0)  # [1, H, 8, 8]
    assert torch.equal(pos.for_grid((8, 8)), pos.weight.reshape(64, -1))
    same = F.interpolate(table, size=(8, 8), mode="bicubic", align_corners=False)
    assert torch.equal(same, table)  # the remote code's same-size interpolation changes nothing
    for grid in [(6, 10), (12, 4), (2, 2)]:
        resized = F.interpolate(table, size=grid, mode="bicubic", align_corners=False)
        assert torch.equal(pos.for_grid(grid), resized[0].permute(1, 2, 0).reshape(grid[0] * grid[1], -1))


@torch.no_grad()
def test_patch_embedding_equals_the_convolution(model):
    grids = [(8, 8), (4, 6)]
    pv = pixels(grids)
    conv = model.patch_embed.proj(pv).flatten(1)  # [P, H]
    pos = torch.cat([model.patch_embed.pos_emb.for_grid(g) for g in grids])
    torch.testing.assert_close(model.patch_embed(pv, grids), conv + pos, atol=1e-5, rtol=1e-5)


def test_patch_merger_ordering():
    grids = [(4, 6), (2, 2)]
    x = torch.arange(28, dtype=torch.float32).unsqueeze(-1)  # [P, 1]: patch index, row-major
    out = patch_merger(x, grids, (2, 2)).squeeze(-1)  # [T, 4]
    assert out.tolist() == [
        [0, 1, 6, 7],
        [2, 3, 8, 9],
        [4, 5, 10, 11],
        [12, 13, 18, 19],
        [14, 15, 20, 21],
        [16, 17, 22, 23],
        [24, 25, 26, 27],
    ]


def test_rope_against_direct_complex_rotation():
    h, w = 3, 5
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(h * w, 2, HEAD_DIM, generator=gen)
    got = apply_rope(x, rope_cis([(h, w)], HEAD_DIM, torch.device("cpu")))
    torch.testing.assert_close(got, reference_rope(x, reference_rotations(h, w)), atol=1e-5, rtol=1e-5)
    # Several grids: each image's positions restart at (0, 0).
    both = rope_cis([(2, 2), (h, w)], HEAD_DIM, torch.device("cpu"))
    assert torch.equal(both[4:], rope_cis([(h, w)], HEAD_DIM, torch.device("cpu")))
    # bf16 in, bf16 out; the rotation itself ran in fp32.
    assert apply_rope(x.bfloat16(), rope_cis([(h, w)], HEAD_DIM, torch.device("cpu"))).dtype == torch.bfloat16


@torch.no_grad()
def test_mlp_is_tanh_gelu(model):
    mlp = model.encoder.blocks[0].mlp
    x = torch.randn(10, CFG.hidden_size)
    hidden = mlp.fc0(x)
    assert torch.equal(mlp(x), mlp.fc1(F.gelu(hidden, approximate="tanh")))
    assert not torch.allclose(mlp(x), mlp.fc1(F.gelu(hidden)), atol=1e-7, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(model, dtype):
    low = MoonViT(CFG).to(dtype)
    low.load_state_dict(model.state_dict())
    pv = pixels(GRIDS)
    out = low(pv, grid_tensor(GRIDS))  # fp32 pixels are cast to the weights' dtype
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), model(pv, grid_tensor(GRIDS)), atol=0.1, rtol=0.05)


@torch.no_grad()
def test_meta_construction_then_load(model):
    with torch.device("meta"):
        fresh = MoonViT(CFG)
    fresh.to_empty(device="cpu")
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert list(dict(fresh.named_buffers())) == []
    pv = pixels(GRIDS)
    assert torch.equal(fresh(pv, grid_tensor(GRIDS)), model(pv, grid_tensor(GRIDS)))


def test_parameter_names_are_checkpoint_keys(model):
    keys = set(model.state_dict())
    expected = {"patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.pos_emb.weight"}
    for n in range(CFG.num_hidden_layers):
        for name in ("norm0", "norm1", "wqkv", "wo", "mlp.fc0", "mlp.fc1"):
            expected |= {f"encoder.blocks.{n}.{name}.weight", f"encoder.blocks.{n}.{name}.bias"}
    expected |= {"encoder.final_layernorm.weight", "encoder.final_layernorm.bias"}
    assert keys == expected
    assert model.state_dict()["patch_embed.pos_emb.weight"].shape == (8, 8, CFG.hidden_size)
    assert model.state_dict()["encoder.blocks.0.wqkv.weight"].shape == (3 * CFG.hidden_size, CFG.hidden_size)


@pytest.mark.parametrize(
    ("grids", "n_patches", "match"),
    [
        ([(4, 6)], 23, "cover 24 patches"),
        ([(3, 4)], 12, "divisible"),
        ([(2, 514)], 1028, r"\[1, 512\]"),
    ],
)
def test_rejects_inconsistent_inputs(model, grids, n_patches, match):
    with pytest.raises(InvalidInputError, match=match):
        model(torch.zeros(n_patches, 3, 14, 14), grid_tensor(grids))


def test_no_images():
    out = MoonViT(CFG)(torch.zeros(0, 3, 14, 14), grid_tensor([]))
    assert out.shape == (0, 4, CFG.hidden_size)


# --------------------------------------------------------------------------------------------
# The projector
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def test_projector_shapes_norm_and_exact_gelu():
    torch.manual_seed(5)
    proj = perturb(MultiModalProjector(CFG, TEXT_HIDDEN), seed=6)
    assert set(proj.state_dict()) == {
        f"{name}.{kind}" for name in ("pre_norm", "linear_1", "linear_2") for kind in ("weight", "bias")
    }
    assert proj.linear_1.weight.shape == (4 * CFG.hidden_size, 4 * CFG.hidden_size)
    assert proj.linear_2.weight.shape == (TEXT_HIDDEN, 4 * CFG.hidden_size)
    tokens = torch.randn(7, 4, CFG.hidden_size)
    out = proj(tokens)
    assert out.shape == (7, TEXT_HIDDEN)
    normed = torch.stack(
        [
            F.layer_norm(tokens[:, i], (CFG.hidden_size,), proj.pre_norm.weight, proj.pre_norm.bias, 1e-5)
            for i in range(4)
        ],
        dim=1,
    ).reshape(7, -1)
    hidden = normed @ proj.linear_1.weight.T + proj.linear_1.bias
    erf_gelu = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    torch.testing.assert_close(
        out, erf_gelu @ proj.linear_2.weight.T + proj.linear_2.bias, atol=1e-5, rtol=1e-5
    )
    tanh_out = gelu_tanh(hidden) @ proj.linear_2.weight.T + proj.linear_2.bias
    assert not torch.allclose(out, tanh_out, atol=1e-6, rtol=0)
