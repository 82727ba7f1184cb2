"""The fused bf16 CPU encoder block computes the plain block's function, as accurately as autocast does."""

import os
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vit_pipelines.models import VisionTransformer, ViTConfig, fastpath, fused_cpu

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
    gelu, derivative = ops.bias_gelu_fwd(z, bias)
    keep = F.gelu(exact).abs() > 1e-3  # far-left tail: float32's erf saturates, as in torch's own kernel
    # half a bf16 step from the final rounding, plus the float32 arithmetic before it
    assert bf16_ulps(gelu, F.gelu(exact).detach())[keep].max() <= 0.6
    assert bf16_ulps(derivative, exact.grad)[exact.grad.abs() > 1e-3].max() <= 0.6
    # the backward multiplies the upstream gradient by the saved derivative, rounding once
    upstream = torch.randn(z.shape, generator=torch.Generator().manual_seed(0)).bfloat16()
    # fc1's input, for the weight gradient (tested in test_gradient_kernels_sum_the_weight_gradient)
    x = torch.ones(len(z), 16).bfloat16()
    dh, bias_grad, _ = ops.mul_colsum(upstream, derivative, x, False)
    product = upstream.double() * derivative.double()
    assert bf16_ulps(dh, product)[product.abs() > 1e-30].max() <= 0.5
    # the bias gradient sums the float32 products, before their rounding to bf16
    torch.testing.assert_close(bias_grad.double(), product.sum(0), rtol=1e-5, atol=1e-4)
    with pytest.raises(RuntimeError, match="same shape"):
        ops.mul_colsum(upstream[:-1], derivative, x, False)
    with pytest.raises(RuntimeError, match=f"x: expected {len(z)} rows, got {len(z) - 1}"):
        ops.mul_colsum(upstream, derivative, x[:-1], False)


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
    g_out, dw, db = ops.layer_norm_bwd(dy, x, mean, rstd, w, g, None, False)
    torch.testing.assert_close(g_out.double(), g.double() + exact.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw.double(), wd.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db.double(), bd.grad, rtol=1e-5, atol=1e-5)
    # given the input of the dense layer before (proj's), also that layer's gradients (test_gradient_kernels_...)
    dense_input = torch.randn(4, 9, 32, generator=gen).bfloat16()
    g_out_too, *_ = ops.layer_norm_bwd(dy, x, mean, rstd, w, g, dense_input, False)
    assert torch.equal(g_out_too, g_out)
    # the residual add after a dense layer that ran without its bias; given the next layer norm's parameters, also
    # that layer norm of the sum, from the same pass
    dense, bias = torch.randn(4, 9, 64, generator=gen).bfloat16(), torch.randn(64, generator=gen)
    (summed,) = ops.add_bias_residual(x, dense, bias, None, None, 1e-6)
    assert torch.equal(summed, x + (dense.float() + bias))
    summed_too, *normed = ops.add_bias_residual(x, dense, bias, w, b, 1e-6)
    assert torch.equal(summed_too, summed)
    for got, separately in zip(normed, ops.layer_norm_fwd(summed, w, b, 1e-6), strict=True):
        assert torch.equal(got, separately)
    with pytest.raises(RuntimeError, match="needs both its weight and its bias"):
        ops.add_bias_residual(x, dense, bias, w, None, 1e-6)


def assert_float32_sums(got: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """got = a·b (bf16 operands) up to float32 summation: a few float32 steps of the sum of the terms' sizes."""
    exact, size = a.double() @ b.double(), a.double().abs() @ b.double().abs()
    assert ((got.double() - exact).abs() <= 2**-20 * size + 1e-30).all()


def attention_reference(qkv, bias, heads, do):
    """Multi-head attention of qkv + bias ([B, N, 3·D]) and its gradients for the output gradient do, in float64
    with autocast's bf16 roundings: q, k, v (its biased matmul's output), the probabilities p and the softmax
    gradient ds. Returns o, p and dqkv, unrounded."""
    bf16 = lambda t: t.bfloat16().double()  # noqa: E731
    batch, tokens, width = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    q, k, v = bf16(qkv.float() + bias).view(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
    scale = q.shape[-1] ** -0.5
    p = bf16(torch.softmax(q @ k.transpose(-1, -2) * scale, -1))
    heads_first = do.double().view(batch, tokens, heads, -1).transpose(1, 2)
    dp = heads_first @ v.transpose(-1, -2)
    ds = bf16(scale * p * (dp - (p * dp).sum(-1, keepdim=True)))
    grads = torch.stack([ds @ k, ds.transpose(-1, -2) @ q, p.transpose(-1, -2) @ heads_first])
    o = (p @ v).transpose(1, 2).reshape(batch, tokens, width)
    return o, p, grads.permute(1, 3, 0, 2, 4).reshape(batch, tokens, 3 * width)


# ViT-Ti/4 at 32 px (65 tokens, head width 64), an odd short sequence, a head width that needs padding to the
# tiles' 32 (H/14's 80), and S/16 at 224 px (197 tokens). 9 images: with 2 workers, the weight gradient's products
# carry rows over from one image to the next and end on a partial block of 32.
@pytest.mark.parametrize("tokens, heads, head_width", [(65, 3, 64), (17, 2, 16), (50, 2, 80), (197, 6, 64)])
@pytest.mark.parametrize("amx", [True, False], ids=["amx", "avx512"])
def test_attention_kernels_match_float64_attention(ops, tokens, heads, head_width, amx, batch=9):
    if amx and not ops.amx_ready():
        pytest.skip("no AMX on this CPU: the AVX-512 case covers the kernels")
    gen = torch.Generator().manual_seed(tokens)
    width = heads * head_width
    qkv = (2 * torch.randn(batch, tokens, 3 * width, generator=gen)).bfloat16()
    bias, do = (
        torch.randn(3 * width, generator=gen),
        torch.randn(batch, tokens, width, generator=gen).bfloat16(),
    )
    x = torch.randn(batch, tokens, width, generator=gen).bfloat16()  # the qkv layer's input
    o_ref, p_ref, dqkv_ref = attention_reference(qkv, bias, heads, do)
    scale = head_width**-0.5
    o, p = ops.attention_fwd(qkv, bias, heads, scale, amx)
    dqkv, dw, bias_grad = ops.attention_bwd(do, qkv, bias, p, x, heads, scale, amx)
    # Float32 scores and sums instead of float64: p and ds may round to the neighbouring bf16 value, and the
    # outputs differ by their final rounding (2^-8 relative) plus such neighbours' share: two bf16 steps of the
    # value, or (where terms cancel) of the largest value.
    assert bf16_ulps(p, p_ref).max() <= 1
    assert (p.double() != p_ref).double().mean() < 0.02
    for got, want in ((o, o_ref), (dqkv, dqkv_ref)):
        torch.testing.assert_close(got.double(), want, rtol=2**-6, atol=2**-7 * want.abs().max().item())
    # The weight gradient sums the rounded dqkv's products in float32, over 32-row blocks in each worker's images.
    assert dw.dtype == torch.float32 and dw.shape == (3 * width, width)
    assert_float32_sums(dw, dqkv.view(-1, 3 * width).t(), x.view(-1, width))
    torch.testing.assert_close(bias_grad, dqkv.float().sum((0, 1)), rtol=1e-5, atol=1e-4)


def test_attention_kernels_reject_what_they_do_not_handle(ops):
    with pytest.raises(RuntimeError, match="multiple of 16"):
        ops.attention_fwd(
            torch.zeros(1, 4, 3 * 24).bfloat16(), torch.zeros(72), 3, 1.0, False
        )  # head width 8
    with pytest.raises(RuntimeError, match="BFloat16"):
        ops.attention_fwd(torch.zeros(1, 4, 3 * 32), torch.zeros(96), 2, 1.0, False)
    qkv, bias, p = torch.zeros(2, 4, 96).bfloat16(), torch.zeros(96), torch.zeros(2, 2, 4, 4).bfloat16()
    # the qkv layer's input, or the output gradient, for one image, not two
    with pytest.raises(RuntimeError, match="x: expected 8 rows, got 4"):
        ops.attention_bwd(
            torch.zeros(2, 4, 32).bfloat16(), qkv, bias, p, torch.zeros(1, 4, 32).bfloat16(), 2, 1.0, False
        )
    with pytest.raises(RuntimeError, match="do: expected 8 rows, got 4"):
        ops.attention_bwd(
            torch.zeros(1, 4, 32).bfloat16(), qkv, bias, p, torch.zeros(2, 4, 32).bfloat16(), 2, 1.0, False
        )


# Ti/4's fc2 (192 ← 768) and fc1 (768 ← 192) over a batch's 8320 rows, partial blocks of 32 and 128 rows with
# widths that pad to the tiles' 32 columns, an odd block whose x needs no padding (rows paired straight from x
# but the last), one row (one worker) and none (no worker: zero gradients).
@pytest.mark.parametrize(
    "rows, out, inputs",
    [(8320, 192, 768), (8320, 768, 192), (1, 16, 16), (0, 16, 32), (77, 48, 80), (77, 32, 64)],
)
@pytest.mark.parametrize("amx", [True, False], ids=["amx", "avx512"])
def test_gradient_kernels_sum_the_weight_gradient(ops, rows, out, inputs, amx):
    """cast_colsum, mul_colsum and layer_norm_bwd: a dense layer's output gradient g in bf16 with its bias gradient
    (column sums) and weight gradient gᵀ·x, summed in float32 from the rounded g over each worker's blocks of rows."""
    if amx and not ops.amx_ready():
        pytest.skip("no AMX on this CPU: the AVX-512 case covers the kernels")
    gen = torch.Generator().manual_seed(rows + out)
    g, x = torch.randn(rows, out, generator=gen), torch.randn(rows, inputs, generator=gen).bfloat16()
    g_bf16, bias_grad, weight_grad = ops.cast_colsum(g, x, amx)
    assert torch.equal(g_bf16, g.bfloat16())
    torch.testing.assert_close(bias_grad.double(), g.double().sum(0), rtol=1e-5, atol=rows * 1e-7)
    da, d = torch.randn(2, rows, out, generator=gen).bfloat16()
    dh, _, weight_grad_mul = ops.mul_colsum(da, d, x, amx)
    # the residual branch's gradient after a layer norm: g + the layer norm's input gradient
    ln_input = torch.randn(rows, out, generator=gen)
    _, mean, rstd = ops.layer_norm_fwd(ln_input, torch.ones(out), torch.zeros(out), 1e-6)
    g_out, _, _, g_out_bf16, sums, weight_grad_ln = ops.layer_norm_bwd(da, ln_input, mean, rstd, torch.ones(out), g, x, amx)  # fmt: skip
    assert torch.equal(g_out_bf16, g_out.bfloat16())
    torch.testing.assert_close(sums.double(), g_out.double().sum(0), rtol=1e-5, atol=rows * 1e-6)
    for got, grad in ((weight_grad, g_bf16), (weight_grad_mul, dh), (weight_grad_ln, g_out_bf16)):
        assert got.dtype == torch.float32 and got.shape == (out, inputs)
        assert_float32_sums(got, grad.view(-1, out).t(), x.view(-1, inputs))


def run_alone(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`block(x)` as the encoder runs it (fused where that applies), with no neighbour to hand over to."""
    return fastpath.encoder(nn.ModuleList([block]), x)


def gradients(model: VisionTransformer, images, labels, autocast: bool) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = F.cross_entropy(model(images).float(), labels)
    loss.backward()
    return loss.detach(), {n: p.grad.double() for n, p in model.named_parameters()}


def test_fused_training_step_is_as_accurate_as_autocast(ops, monkeypatch):
    """Against a float64 run of the same model: every gradient of the fused block is as close as the plain
    modules' under bf16 autocast (same maths, bf16 rounding), and the loss is within one bf16 step. (The loss is one
    number: over seeds, both paths' loss errors scatter between 0.03% and 0.3%, with no order between them.)"""
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
    # every block but the last, which computes the [class] token alone (`fastpath.first_token_block`)
    assert len(calls) == config.depth - 1
    monkeypatch.setattr(fused_cpu, "_kernels", None)
    plain_loss, plain = gradients(model, images, labels, autocast=True)
    assert len(calls) == config.depth - 1
    assert abs(fused_loss - exact_loss) <= 2**-8 * exact_loss
    assert abs(plain_loss - exact_loss) <= 2**-8 * exact_loss
    for name, want in exact.items():
        error = (fused[name] - want).norm() / want.norm()
        assert error <= 1.3 * (plain[name] - want).norm() / want.norm() + 1e-3, name
        assert error < 0.03, name


def test_neighbouring_blocks_share_passes_over_the_rows(ops, monkeypatch):
    """In the encoder, forward, each fused block's last residual add also runs the next block's first layer norm
    (one `layer_norm_fwd` per pass instead of one per block); backward, each block's first layer-norm pass also
    computes the previous block's fc2 gradients (one `cast_colsum` instead of one per block). The same bits as the
    blocks run one by one. Where a hook replaces a block's output or changes it in place, the next block normalizes
    its input itself; where the output is used twice (its gradient is a sum), the block computes its fc2 gradients."""
    config = ViTConfig.from_variant("Ti/4", image_size=32, num_classes=10, depth=3)
    model = VisionTransformer.from_seed(config, 0)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    calls = Counter()

    def counted(name: str):
        kernel = getattr(ops, name)

        def call(*args):
            calls[name] += 1
            return kernel(*args)

        return call

    for name in ("layer_norm_fwd", "cast_colsum"):
        monkeypatch.setattr(ops, name, counted(name))

    def one_by_one(x: torch.Tensor, blocks=model.blocks) -> torch.Tensor:
        for block in blocks:
            x = run_alone(block, x)
        return x

    def training_pass(forward) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, int]]:
        """forward() → (output, extra loss term): the output, the blocks' gradients, the kernel calls."""
        model.zero_grad()
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, extra = forward()
            (out.float().square().sum() + extra).backward()
        return out.detach(), [p.grad.clone() for p in model.blocks.parameters()], dict(calls)

    inputs, outputs = [], []  # the first block's input (float32: after the position embedding) and output
    with model.blocks[0].register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach())):
        handed = training_pass(lambda: (model.encode(model.patch_embed(images))["tokens"], 0))
    alone = training_pass(lambda: (model.norm(one_by_one(inputs[0])), 0))
    assert handed[2] == {"layer_norm_fwd": 1, "cast_colsum": 1}
    assert alone[2] == {"layer_norm_fwd": 3, "cast_colsum": 3}
    assert torch.equal(handed[0], alone[0])
    for handed_grad, grad in zip(handed[1], alone[1], strict=True):
        assert torch.equal(handed_grad, grad)

    # block 0's output used twice: block 1's gradient for it is not the one block 0 receives
    with model.blocks[0].register_forward_hook(lambda module, args, out: outputs.append(out[0])):
        twice = training_pass(lambda: (model.encode(model.patch_embed(images))["tokens"], outputs[-1].sum()))

    def used_twice_one_by_one() -> tuple[torch.Tensor, torch.Tensor]:
        first = run_alone(model.blocks[0], inputs[0])
        return model.norm(one_by_one(first, model.blocks[1:])), first.sum()

    alone = training_pass(used_twice_one_by_one)
    assert twice[2] == {"layer_norm_fwd": 1, "cast_colsum": 2}
    for twice_grad, grad in zip(twice[1], alone[1], strict=True):
        assert torch.equal(twice_grad, grad)

    # pooling the [class] token (`forward`), the last block computes that token alone; its first layer norm, on
    # the kernels, also takes the last fused block's handover both ways
    def pooled_one_by_one() -> tuple[torch.Tensor, int]:
        x, _ = fastpath.first_token_block(model.blocks[-1], one_by_one(inputs[0], model.blocks[:-1]))
        return model.norm(x[:, 0]), 0

    pooled = training_pass(lambda: (model.encode(model.patch_embed(images), tokens=False)["pre_logits"], 0))
    alone = training_pass(pooled_one_by_one)
    assert pooled[2] == {"layer_norm_fwd": 1}
    assert alone[2] == {"layer_norm_fwd": 3, "cast_colsum": 2}
    assert torch.equal(pooled[0], alone[0])
    for pooled_grad, grad in zip(pooled[1], alone[1], strict=True):
        assert torch.equal(pooled_grad, grad)

    def replace(module, args, out):
        return 2 * out[0], None

    def change_in_place(module, args, out):
        out[0].mul_(2)

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = run_alone(model.blocks[0], inputs[0])
        want = model.norm(one_by_one(2 * want, model.blocks[1:]))
        for hook in (replace, change_in_place):
            calls.clear()
            with model.blocks[0].register_forward_hook(hook):
                got = model.encode(model.patch_embed(images))["tokens"]
            assert calls["layer_norm_fwd"] == 2, hook.__name__
            assert torch.equal(got, want), hook.__name__

    # under inference_mode, whose tensors carry no version counter to check, each block normalizes its own input
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(images)
    calls.clear()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(images), want)
    assert calls["layer_norm_fwd"] == config.depth


def test_each_layer_norm_keeps_its_own_eps(ops, monkeypatch):
    """The fused path reads each layer norm's own eps: the block's first and second, and the next block's first
    that the block's last residual add computes. Large, different values make a mix-up show."""
    config = ViTConfig.from_variant("Ti/4", image_size=32, num_classes=10, depth=2)
    model = VisionTransformer.from_seed(config, 0).eval()
    model.blocks[0].norm2.eps, model.blocks[1].norm1.eps, model.blocks[1].norm2.eps = 0.25, 0.5, 0.125
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = model.forward_features(images)["tokens"]
        monkeypatch.setattr(fused_cpu, "_kernels", None)
        plain = model.forward_features(images)["tokens"]
    # bf16 roundings differ between the paths: ~0.3% of the tokens' norm; any one eps mixed up: 9-13%
    assert (fused - plain).norm() / plain.norm() < 0.01


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
        fused = run_alone(block, x)
        monkeypatch.setattr(fused_cpu, "_kernels", None)
        plain = run_alone(block, x)
    assert not fused_cpu.applies(block, x)  # float32: no autocast
    torch.testing.assert_close(fused, plain, rtol=0.02, atol=0.02)


def test_switch_off_with_environment_variable(monkeypatch):
    monkeypatch.setattr(fused_cpu, "_tried", False)
    monkeypatch.setattr(fused_cpu, "_kernels", None)
    monkeypatch.setitem(os.environ, "VIT_FUSED_CPU", "0")
    assert fused_cpu.kernels() is None
