"""LSGM's CIFAR-10 NVAE: the released layout, its blocks against closed forms, and encode / decode."""

import hashlib
import math

import pytest
import torch
import torch.nn.functional as F

from dg_lightning.nets import nvae

# A tiny network for 16x16 RGB images: 8 -> 16 channels, 3 groups of 2 latent channels at 8x8.
TINY = dict(img_resolution=16, channels=8, num_groups=3, latent_per_group=2)


def tiny(seed=0, **overrides):
    """A tiny float64 cifar10 NVAE in eval mode, every parameter and BN statistic random."""
    net = nvae.cifar10(**{**TINY, **overrides}).double().eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype))
            elif tensor.is_floating_point():
                tensor.copy_(0.3 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype))
    return net


def randn(*shape, seed=1):
    """float64 N(0, 1) noise of the given shape."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- the released network (meta device: shapes only) ---
# Measured on upstream's NVAE (LSGM nvae.py with the CIFAR-10 args, run locally): 1,938 state-dict entries, 1,434
# parameter tensors holding 100,867,740 parameters, 504 BatchNorm buffers. The fingerprint is the sha256 of the
# lines "name<TAB>shape<TAB>dtype" of its state dict, in order, joined by newlines. Its state dict (random weights and
# BN statistics) loads here with strict=True; at full size in float64, with the same noise, encode matches upstream's
# forward to 1e-13 relative and decode its sample() to 6e-12 (float32: 4e-5 relative and 1e-3).
UPSTREAM_FINGERPRINT = "616ddb98753e7a6b739e4fe2ed3f734db3b854a18e61ea15233e915841b8c491"

FIRST_KEYS = [
    ("prior_ftr0", (256, 16, 16)), ("stem.weight", (128, 3, 3, 3)), ("stem.bias", (128,)),
    ("stem.log_weight_norm", (128, 1, 1, 1)),
    *[(f"pre_process.0._ops.{i}.{name}", shape) for i in range(2) for name, shape in [
        ("bn_act.weight", (128,)), ("bn_act.bias", (128,)), ("bn_act.running_mean", (128,)),
        ("bn_act.running_var", (128,)), ("bn_act.num_batches_tracked", ()), ("conv_0.weight", (128, 128, 3, 3)),
        ("conv_0.bias", (128,)), ("conv_0.log_weight_norm", (128, 1, 1, 1))]],
    ("pre_process.0.se.se.0.weight", (8, 128)), ("pre_process.0.se.se.0.bias", (8,)),
    ("pre_process.0.se.se.2.weight", (128, 8)), ("pre_process.0.se.se.2.bias", (128,)),
    *[(f"pre_process.1.skip.conv_{i}.{name}", shape) for i in range(1, 5) for name, shape in [
        ("weight", (64, 128, 1, 1)), ("bias", (64,)), ("log_weight_norm", (64, 1, 1, 1))]],
    ("pre_process.1._ops.0.bn_act.weight", (128,)), ("pre_process.1._ops.0.bn_act.bias", (128,)),
    ("pre_process.1._ops.0.bn_act.running_mean", (128,)), ("pre_process.1._ops.0.bn_act.running_var", (128,)),
]


@pytest.fixture(scope="module")
def released():
    """The released CIFAR-10 NVAE on the meta device."""
    with torch.device("meta"):
        return nvae.cifar10()


def test_released_cifar10_has_upstreams_layout(released):
    state = released.state_dict()
    assert len(state) == 1938 and len(list(released.parameters())) == 1434
    assert sum(p.numel() for p in released.parameters()) == 100_867_740
    assert len(list(released.buffers())) == 504 == 3 * 168
    assert [(k, tuple(v.shape)) for k, v in list(state.items())[:40]] == FIRST_KEYS
    shapes = {
        "pre_process.1._ops.0.conv_0.weight": (256, 128, 3, 3),  # the stride-2 conv of the down cell
        "pre_process.1.se.se.0.weight": (16, 256),
        "enc_tower.56.conv.weight": (256, 256, 1, 1),  # the combiner group 1 uses
        "enc_sampler.19.1.weight": (18, 256, 3, 3),
        "eps_conv.19.weight": (9, 9, 3, 3),
        "dec_tower.57.conv.weight": (256, 265, 1, 1),  # cat[d, z]: 256 + 9
        "post_process.0.skip.1.weight": (128, 256, 1, 1),
        "post_process.0._ops.0.conv_0.weight": (128, 256, 3, 3),
        "image_conditional.1.weight": (100, 128, 3, 3),
    }
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert "post_process.0.skip.1.bias" not in state and "enc_tower.59.conv.weight" not in state
    lines = "\n".join(f"{k}\t{tuple(v.shape)}\t{v.dtype}" for k, v in state.items())
    assert hashlib.sha256(lines.encode()).hexdigest() == UPSTREAM_FINGERPRINT
    combiners = [i for i, m in enumerate(released.enc_tower) if isinstance(m, nvae.EncCombinerCell)]
    assert len(released.enc_tower) == 59 and combiners == [3 * j + 2 for j in range(19)]
    assert len(released.dec_tower) == 60 and len(released.enc_sampler) == len(released.eps_conv) == 20
    assert (released.latent_channels, released.latent_resolution) == (180, 16)
    assert (released.img_channels, released.img_resolution) == (3, 32)


# --- blocks against closed forms ---

def test_weight_norm_with_log_norm_of_w_is_the_plain_conv_up_to_eps():
    conv = nvae.WNConv2d(3, 5, 3).double()
    norm = conv.weight.detach().square().sum((1, 2, 3), keepdim=True).sqrt()
    with torch.no_grad():
        conv.log_weight_norm.copy_(norm.log())
    x = randn(2, 3, 6, 6)
    expected = F.conv2d(x, conv.weight * norm / (norm + 1e-5), conv.bias, padding=1)
    assert torch.allclose(conv(x), expected, rtol=1e-13, atol=1e-13)
    unbiased = F.conv2d(x, conv.weight, padding=1)  # the plain conv is off by eps / (||w|| + eps) of it, per channel
    shortfall = (1e-5 / (norm + 1e-5)).view(1, -1, 1, 1) * unbiased
    assert torch.allclose(conv(x), unbiased + conv.bias[:, None, None] - shortfall, rtol=1e-13, atol=1e-13)
    assert 0 < shortfall.abs().max() < 1e-4
    with torch.no_grad():
        conv.log_weight_norm.copy_(randn(5, 1, 1, 1))  # any gain g: the kernel's norm is exp(g) ||w|| / (||w|| + eps)
    effective = conv.normalized_weight().square().sum((1, 2, 3), keepdim=True).sqrt()
    assert torch.allclose(effective, conv.log_weight_norm.exp() * norm / (norm + 1e-5), rtol=1e-13)


def test_bn_swish_in_eval_uses_running_statistics():
    bn = tiny().pre_process[0]._ops[0].bn_act
    x = randn(2, 8, 4, 4)
    y = (x - bn.running_mean[:, None, None]) / (bn.running_var[:, None, None] + 1e-5).sqrt()
    y = y * bn.weight[:, None, None] + bn.bias[:, None, None]
    assert torch.allclose(bn(x), y * torch.sigmoid(y), rtol=1e-13, atol=1e-14)


def test_squeeze_excite_gates_each_channel_by_its_mean():
    se = tiny().pre_process[0].se
    x = randn(2, 8, 4, 4)
    first, last = se.se[0], se.se[2]
    gate = torch.sigmoid(last.weight @ torch.relu(first.weight @ x.mean((2, 3)).T + first.bias[:, None])
                         + last.bias[:, None]).T
    assert se.se[0].out_features == 4  # max(8 // 16, 4)
    assert torch.allclose(se(x), x * gate[:, :, None, None], rtol=1e-13)


def test_normal_cell_is_skip_plus_a_tenth_of_the_branch():
    cell = tiny().pre_process[0]
    x = randn(2, 8, 4, 4)
    branch = cell.se(cell._ops[1](cell._ops[0](x)))
    assert torch.allclose(cell(x), x + 0.1 * branch, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("out_channels", [8, 6])
def test_factorized_reduce_convolves_the_four_stride_two_phases(out_channels):
    reduce = nvae.FactorizedReduce(4, out_channels).double()
    x = randn(2, 4, 8, 8)
    phases = [(0, 0), (1, 1), (0, 1), (1, 0)]  # x, x[1:, 1:], x[:, 1:], x[1:, :]
    parts = []
    for conv, (row, col) in zip([reduce.conv_1, reduce.conv_2, reduce.conv_3, reduce.conv_4], phases):
        w = conv.normalized_weight()[:, :, 0, 0]
        parts.append(torch.einsum("oc,bchw->bohw", w, F.silu(x)[:, :, row::2, col::2]) + conv.bias[:, None, None])
    assert [p.shape[1] for p in parts] == [out_channels // 4] * 3 + [out_channels - 3 * (out_channels // 4)]
    assert torch.allclose(reduce(x), torch.cat(parts, dim=1), rtol=1e-13, atol=1e-14)


def test_up_skip_is_bilinear_with_aligned_corners():
    skip = nvae.up_skip(1, 1).double()
    with torch.no_grad():  # the 1x1 convolution made the identity: w = 1, exp(g) = 1 + eps
        skip[1].weight.fill_(1.0)
        skip[1].log_weight_norm.fill_(math.log(1 + 1e-5))
    n = 4
    i = torch.arange(n, dtype=torch.float64)
    ramp = (i[:, None] + 2 * i[None, :])[None, None]  # rows + 2 columns: bilinear interpolation is exact on it
    p = torch.arange(2 * n, dtype=torch.float64) * (n - 1) / (2 * n - 1)  # align_corners: the end pixels coincide
    assert torch.allclose(skip(ramp), (p[:, None] + 2 * p[None, :])[None, None], rtol=1e-13, atol=1e-13)


def test_up_cell_upsamples_its_branch_by_nearest_copy():
    net = tiny()
    cell = net.post_process[0]
    x = randn(2, 16, 8, 8)
    op = cell._ops[0]
    assert op.upsample and op.conv_0.stride == (1, 1)
    expected = op.conv_0(op.bn_act(x).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    assert torch.allclose(op(x), expected, rtol=1e-13, atol=1e-14)
    assert cell(x).shape == (2, 8, 16, 16)


def logits_with_one_component(k, means, coeff_logits, batch=2, size=3, seed=3):
    """DML logits (B, 100, H, W) whose mixture weight is all on component k, with given per-colour means (3, B, H, W)
    and coefficient pre-activations (3, B, H, W) for it; every other entry random."""
    logits = 3 * randn(batch, 100, size, size, seed=seed)
    logits[:, :10] = -1e4
    logits[:, k] = 0.0
    for c in range(3):
        logits[:, 10 + 30 * c + k] = means[c]
        logits[:, 10 + 30 * c + 20 + k] = coeff_logits[c]
    return logits


def test_dml_mean_of_a_single_component_applies_its_autoregressive_coefficients():
    means, coeff_logits = 1.5 * randn(3, 2, 3, 3, seed=4), randn(3, 2, 3, 3, seed=5)
    a = torch.tanh(coeff_logits)
    x0 = means[0].clamp(-1, 1)
    x1 = (means[1] + a[0] * x0).clamp(-1, 1)
    x2 = (means[2] + a[1] * x0 + a[2] * x1).clamp(-1, 1)
    out = nvae.dml_mean(logits_with_one_component(7, means, coeff_logits))
    assert (means.abs() > 1).any()  # some clamps act
    assert torch.allclose(out, torch.stack([x0, x1, x2], dim=1), rtol=1e-13, atol=1e-14)
    with pytest.raises(ValueError, match="100 logit channels"):
        nvae.dml_mean(randn(1, 99, 2, 2))


def test_dml_mean_averages_means_and_coefficients_over_the_mixture():
    logits = 0.2 * randn(1, 100, 2, 2)  # small values: no clamp acts
    pi = torch.softmax(logits[:, :10], dim=1)
    m = [(pi * logits[:, 10 + 30 * c:20 + 30 * c]).sum(1) for c in range(3)]
    a = [(pi * torch.tanh(logits[:, 30 + 30 * c:40 + 30 * c])).sum(1) for c in range(3)]
    x0, x1 = m[0], m[1] + a[0] * m[0]
    expected = torch.stack([x0, x1, m[2] + a[1] * x0 + a[2] * x1], dim=1)
    assert torch.allclose(nvae.dml_mean(logits), expected, rtol=1e-13, atol=1e-14)


def test_posterior_sample_soft_clamps_mu_and_log_sigma():
    mu, log_sigma, rho = 8 * randn(2, 3, 4, 4, seed=1), 8 * randn(2, 3, 4, 4, seed=2), randn(2, 3, 4, 4, seed=3)
    z = nvae.posterior_sample(torch.cat([mu, log_sigma], dim=1), rho)
    assert torch.allclose(z, 5 * torch.tanh(mu / 5) + torch.exp(5 * torch.tanh(log_sigma / 5)) * rho, rtol=1e-13)
    assert torch.equal(nvae.posterior_sample(torch.cat([mu, torch.zeros_like(mu)], dim=1), rho),
                       rho + 5 * torch.tanh(mu / 5))


# --- encode and decode ---

def test_encode_with_zero_log_sigma_and_constant_mu_returns_the_noise_shifted():
    net = tiny()
    with torch.no_grad():  # enc_sampler outputs its bias: mu = b, log sigma = 0
        for g, sampler in enumerate(net.enc_sampler):
            sampler[1].weight.zero_()
            sampler[1].bias.copy_(torch.tensor([3.0 * g - 4, 1.0, 0.0, 0.0], dtype=torch.float64))
    rho = randn(2, 6, 8, 8)
    shift = torch.tensor([-4.0, 1.0, -1.0, 1.0, 2.0, 1.0], dtype=torch.float64)
    expected = rho + 5 * torch.tanh(shift / 5)[None, :, None, None]
    assert torch.allclose(net.encode(randn(2, 3, 16, 16, seed=2), rho), expected, rtol=1e-14, atol=1e-14)


def test_encode_uses_the_combiners_in_reverse_on_the_decoder_state():
    net = tiny(num_groups=4)
    calls, outputs = [], {}
    for i, module in enumerate(net.enc_tower):
        if isinstance(module, nvae.EncCombinerCell):
            module.register_forward_hook(lambda m, args, out, i=i: calls.append((i, *args)))
        else:
            module.register_forward_hook(lambda m, args, out, i=i: outputs.__setitem__(i, out))
    states = []
    net.dec_tower[8].register_forward_hook(lambda m, args, out: states.append(out))  # group 2's last cell
    net.encode(randn(1, 3, 16, 16), randn(1, 8, 8, 8, seed=2))
    assert [i for i, *_ in calls] == [8, 5, 2]  # groups 1, 2, 3: index 3 (G - 1 - g) + 2
    for i, state, d in calls:
        assert state is outputs[i - 1]  # the encoder state recorded when the tower reached the combiner
    assert calls[2][2] is states[0]  # group 3's combiner takes the decoder state after group 2


def test_encode_and_decode_shapes_determinism_and_range():
    net = tiny()
    x, rho = randn(3, 3, 16, 16).clamp(-1, 1), randn(3, 6, 8, 8, seed=2)
    z = net.encode(x, rho)
    assert z.shape == (3, 6, 8, 8) and torch.equal(z, net.encode(x, rho))
    assert not torch.equal(z, net.encode(x, rho + 1))
    images = net.decode(z)
    assert images.shape == (3, 3, 16, 16) and torch.equal(images, net.decode(z))
    assert images.min() >= -1 and images.max() <= 1
    assert torch.allclose(net.decode(z[:1]), images[:1], rtol=1e-12, atol=1e-12)  # eval: each image on its own
    torch.manual_seed(0)
    drawn = net.encode(x)
    torch.manual_seed(0)
    assert torch.equal(drawn, net.encode(x)) and not torch.equal(drawn, z)


def test_bad_inputs_are_refused_before_compute():
    net = tiny()
    with pytest.raises(ValueError, match=r"images must be \(B, 3, 16, 16\)"):
        net.encode(randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"noise must be \(B, 6, 8, 8\)"):
        net.encode(randn(1, 3, 16, 16), randn(1, 5, 8, 8))
    with pytest.raises(ValueError, match="noise has batch 2"):
        net.encode(randn(1, 3, 16, 16), randn(2, 6, 8, 8))
    with pytest.raises(ValueError, match=r"latents must be \(B, 6, 8, 8\)"):
        net.decode(randn(1, 6, 4, 4))
    with pytest.raises(ValueError, match="divisible"):
        nvae.cifar10(img_resolution=31)
