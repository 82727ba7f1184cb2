"""The fused bf16 CPU encoder block computes the plain block's function, as accurately as autocast does."""

import os

import pytest
import torch
import torch.nn.functional as F

from vit_pipelines.models import VisionTransformer, ViTConfig, fused_cpu

pytestmark = pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"), reason="the kernels need AVX-512"
)


@pytest.fixture(scope="module")
def ops():
    kernels = fused_cpu.kernels()
    assert kernels is not None, "AVX-512 CPU, but the fused kernels did not build (see the log)"
    return kernels


@pytest.fixture
def plain_modules(monkeypatch):
    """Run the model through its plain modules (autocast), as with VIT_FUSED_CPU=0."""
    monkeypatch.setattr(fused_cpu, "_kernels", None)


def bf16_ulps(got: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|got - exact| in units of exact's bfloat16 spacing."""
    spacing = torch.ldexp(torch.ones_like(exact), torch.frexp(exact.abs()).exponent - 8)
    return (got.double() - exact).abs() / spacing


def test_gelu_kernels_round_the_exact_gelu_and_its_derivative(ops):
    z = torch.linspace(-6, 6, 16 * 4001).bfloat16().view(-1, 16)
    bias = torch.linspace(-0.5, 0.5, 16)
    exact = (z.double() + bias.double()).requires_grad_(True)
    F.gelu(exact).backward(torch.ones_like(exact))
    upstream = torch.full_like(z, 0.5)
    dh, dh_t, a_t, bias_grad = ops.bias_gelu_bwd(upstream, z, bias)
    assert torch.equal(dh_t, dh.t())
    assert torch.equal(a_t, ops.bias_gelu_fwd(z, bias).t())  # recomputed, not approximately
    keep = F.gelu(exact).abs() > 1e-3  # far-left tail: float32's erf saturates, as in torch's own kernel
    # half a bf16 step from the final rounding, plus the float32 arithmetic before it
    assert bf16_ulps(ops.bias_gelu_fwd(z, bias), F.gelu(exact).detach())[keep].max() <= 0.6
    assert bf16_ulps(dh, 0.5 * exact.grad)[exact.grad.abs() > 1e-3].max() <= 0.6
    # the bias gradient sums the float32 values, before their rounding to bf16
    torch.testing.assert_close(bias_grad.double(), 0.5 * exact.grad.sum(0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n", [3, 16, 17, 65, 197])
def test_scaled_softmax_kernels_any_row_length(ops, n):
    gen = torch.Generator().manual_seed(n)
    s = (4 * torch.randn(6, n, n, generator=gen)).bfloat16()
    exact = (0.125 * s.double()).requires_grad_(True)
    p = ops.scaled_softmax_fwd(s, 0.125)
    assert bf16_ulps(p, exact.softmax(-1).detach()).max() <= 0.6
    dp = torch.randn(6, n, n, generator=gen).bfloat16()
    exact.softmax(-1).backward(dp.double())
    p64 = p.double()  # the backward works from the rounded probabilities, as autocast's does
    want = 0.125 * p64 * (dp.double() - (p64 * dp.double()).sum(-1, keepdim=True))
    torch.testing.assert_close(ops.scaled_softmax_bwd(dp, p, 0.125).double(), want, rtol=2**-7, atol=1e-4)


def test_layer_norm_kernels_and_the_residual_they_carry(ops):
    gen = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(4, 9, 64, generator=gen) + 1
    w, b = torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    y, mean, rstd = ops.layer_norm_fwd(x, w, b, 1e-6)
    exact = x.double().requires_grad_(True)
    ln = F.layer_norm(exact, (64,), w.double(), b.double(), 1e-6)
    assert bf16_ulps(y, ln.detach()).max() <= 0.6
    dy, g = torch.randn(4, 9, 64, generator=gen).bfloat16(), torch.randn(4, 9, 64, generator=gen)
    wd, bd = w.double().requires_grad_(True), b.double().requires_grad_(True)
    F.layer_norm(exact, (64,), wd, bd, 1e-6).backward(dy.double())
    g_out, dw, db, g_bf16, g_bf16_t, g_sums = ops.layer_norm_bwd(dy, x, mean, rstd, w, g, True)
    torch.testing.assert_close(g_out.double(), g.double() + exact.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw.double(), wd.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db.double(), bd.grad, rtol=1e-5, atol=1e-5)
    assert torch.equal(g_bf16, g_out.bfloat16())
    assert torch.equal(g_bf16_t, g_bf16.view(-1, 64).t())
    torch.testing.assert_close(g_sums, g_out.sum((0, 1)), rtol=1e-5, atol=1e-5)


def test_head_split_and_merge_are_inverse_layouts(ops):
    qkv = torch.randn(2, 5, 3 * 64).bfloat16()
    bias = torch.zeros(3 * 64)
    q, k, v = ops.split_heads(qkv, bias, 2)
    want = qkv.view(2, 5, 3, 2, 32).permute(2, 0, 3, 1, 4)
    assert all(torch.equal(t, want[i]) for i, t in enumerate((q, k, v)))
    merged, merged_t, sums = ops.merge_heads(q, k, v)
    assert torch.equal(merged, qkv)
    assert torch.equal(merged_t, qkv.view(10, -1).t())
    torch.testing.assert_close(sums, qkv.float().sum((0, 1)))


@pytest.mark.parametrize("rows", [1, 16, 77, 8320])
def test_gradient_kernels_store_the_transpose_the_weight_gradient_reads(ops, rows):
    """Whole and partial tiles of rows: the transposed copy equals the gradient's transpose exactly."""
    gen = torch.Generator().manual_seed(rows)
    z, upstream = torch.randn(2, rows, 48, generator=gen).bfloat16()
    dh, dh_t, a_t, _ = ops.bias_gelu_bwd(upstream, z, torch.zeros(48))
    assert torch.equal(dh_t, dh.t())
    assert torch.equal(a_t, ops.bias_gelu_fwd(z, torch.zeros(48)).t())
    g = torch.randn(rows, 48, generator=gen)
    g_bf16, sums = ops.cast_colsum(g)
    assert torch.equal(g_bf16, g.bfloat16())
    torch.testing.assert_close(sums.double(), g.double().sum(0), rtol=1e-5, atol=rows * 1e-7)


def gradients(model: VisionTransformer, images, labels, autocast: bool) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = F.cross_entropy(model(images).float(), labels)
    loss.backward()
    return loss.detach(), {n: p.grad.double() for n, p in model.named_parameters()}


def test_fused_training_step_is_as_accurate_as_autocast(ops, monkeypatch):
    """Against a float64 run of the same model: the fused block's loss and every gradient are as close as the
    plain modules' under bf16 autocast (same maths, bf16 rounding)."""
    config = ViTConfig.from_variant("Ti/4", image_size=32, num_classes=10, depth=3)
    model = VisionTransformer.from_seed(config, 0)
    torch.nn.init.normal_(model.head.weight, std=0.1, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    images, labels = torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    exact_loss, exact = gradients(model.double(), images.double(), labels, autocast=False)
    model.float()
    calls = []
    monkeypatch.setattr(fused_cpu._FusedBlock, "apply", lambda *a, _f=fused_cpu._FusedBlock.apply: calls.append(1) or _f(*a))  # fmt: skip
    fused_loss, fused = gradients(model, images, labels, autocast=True)
    assert len(calls) == config.depth
    monkeypatch.setattr(fused_cpu, "_kernels", None)
    plain_loss, plain = gradients(model, images, labels, autocast=True)
    assert len(calls) == config.depth
    assert abs(fused_loss - exact_loss) <= max(2 * abs(plain_loss - exact_loss), 1e-3)
    for name, want in exact.items():
        error = (fused[name] - want).norm() / want.norm()
        assert error <= 1.3 * (plain[name] - want).norm() / want.norm() + 1e-3, name
        assert error < 0.03, name


def test_fused_path_applies_only_where_it_computes_the_same_function(ops, monkeypatch):
    config = ViTConfig.from_variant("Ti/16", image_size=32, num_classes=4, depth=1, dropout=0.1)
    block = VisionTransformer.from_seed(config, 0).blocks[0]
    x = torch.randn(2, 5, 192)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_cpu.applies(block.train(), x)  # dropout active
        assert fused_cpu.applies(block.eval(), x)
        assert not fused_cpu.applies(block, x.double())
        _, weights = block(x, return_attention=True)  # attention maps come from the plain modules
        assert weights.shape == (2, 3, 5, 5)
        fused, _ = block(x)
        monkeypatch.setattr(fused_cpu, "_kernels", None)
        plain, _ = block(x)
    assert not fused_cpu.applies(block, x)  # float32: no autocast
    torch.testing.assert_close(fused, plain, rtol=0.02, atol=0.02)


def test_switch_off_with_environment_variable(monkeypatch):
    monkeypatch.setattr(fused_cpu, "_tried", False)
    monkeypatch.setattr(fused_cpu, "_kernels", None)
    monkeypatch.setitem(os.environ, "VIT_FUSED_CPU", "0")
    assert fused_cpu.kernels() is None
