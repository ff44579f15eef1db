"""EDM's U-Nets, preconditioners and training losses."""

import math

import pytest
import torch
import torch.nn.functional as F

from dg_lightning.nets import edm
from dg_lightning.score_loss import EDMLoss, VELoss, VPLoss
from netutils import randomized

# Network arguments of EDM's released pickles (`_init_kwargs` of the top EDMPrecond).
DDPMPP = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
              channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2],
              dropout=0.13, augment_dim=9, use_fp16=False)
NCSN = dict(embedding_type="fourier", encoder_type="residual", channel_mult_noise=2, resample_filter=[1, 3, 3, 1])
NCSNPP = dict(DDPMPP, **NCSN)
ADM64 = dict(model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4], dropout=0.10, use_fp16=True)

# Tiny networks for 8x8 grey images.
TINY = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
TINY_SONG = dict(TINY, model_type="SongUNet")
TINY_VARIANTS = {
    "ddpm++": TINY_SONG,
    "ncsn++": dict(TINY_SONG, **NCSN),
    "skip-skip": dict(TINY_SONG, encoder_type="skip", decoder_type="skip"),
    "adm": dict(TINY, model_type="DhariwalUNet"),
}


def released(img_resolution, label_dim, kwargs):
    """A released-size EDMPrecond on the meta device (shapes only) and its state-dict shapes."""
    with torch.device("meta"):
        net = edm.EDMPrecond(img_resolution, 3, label_dim=label_dim, **kwargs)
    return net, {name: list(t.shape) for name, t in net.state_dict().items()}




def one_hot(indices, label_dim=10):
    return F.one_hot(torch.tensor(indices), label_dim).float()


# --- released configurations (meta device: no memory, no compute) ---
# 425 and 432 tensors were checked against EDM's own code.

@pytest.mark.parametrize(
    "img_resolution, label_dim, kwargs, num_params, num_tensors",
    [
        (32, 0, DDPMPP, 55_733_891, 425),
        (32, 10, DDPMPP, 55_735_299, 427),
        (32, 0, NCSNPP, 56_397_827, 432),
        (64, 1000, ADM64, 295_899_267, 553),
    ],
    ids=["cifar10-uncond-vp", "cifar10-cond-vp", "cifar10-uncond-ve", "imagenet64-cond-adm"],
)
def test_released_configs_have_reference_parameter_counts(img_resolution, label_dim, kwargs, num_params, num_tensors):
    net, shapes = released(img_resolution, label_dim, kwargs)
    assert sum(p.numel() for p in net.parameters()) == num_params
    assert len(shapes) == num_tensors


def test_ddpmpp_cifar10_keys_and_shapes():
    _, shapes = released(32, 10, DDPMPP)
    expected = {
        "model.map_label.weight": [128, 10], "model.map_label.bias": [128], "model.map_augment.weight": [128, 9],
        "model.map_layer0.weight": [512, 128], "model.map_layer1.weight": [512, 512],
        "model.enc.32x32_conv.weight": [128, 3, 3, 3],
        "model.enc.32x32_block0.norm0.weight": [128], "model.enc.32x32_block0.conv0.weight": [256, 128, 3, 3],
        "model.enc.32x32_block0.affine.weight": [256, 512], "model.enc.32x32_block0.norm1.weight": [256],
        "model.enc.32x32_block0.conv1.weight": [256, 256, 3, 3], "model.enc.32x32_block0.skip.weight": [256, 128, 1, 1],
        "model.enc.16x16_down.conv0.resample_filter": [1, 1, 2, 2],
        "model.enc.16x16_block0.norm2.weight": [256], "model.enc.16x16_block0.qkv.weight": [768, 256, 1, 1],
        "model.enc.16x16_block0.proj.weight": [256, 256, 1, 1],
        "model.dec.8x8_in0.qkv.weight": [768, 256, 1, 1], "model.dec.8x8_block0.conv0.weight": [256, 512, 3, 3],
        "model.dec.16x16_block4.qkv.weight": [768, 256, 1, 1], "model.dec.32x32_block4.conv0.weight": [256, 384, 3, 3],
        "model.dec.32x32_aux_norm.weight": [256], "model.dec.32x32_aux_conv.weight": [3, 256, 3, 3],
    }
    assert {name: shapes.get(name) for name in expected} == expected
    assert "model.map_noise.freqs" not in shapes
    assert "model.map_augment.bias" not in shapes
    assert "model.dec.16x16_block3.qkv.weight" not in shapes  # decoder attention only on a level's last block
    assert "model.enc.32x32_block0.qkv.weight" not in shapes


def test_ncsnpp_cifar10_keys_and_shapes():
    _, shapes = released(32, 0, NCSNPP)
    expected = {
        "model.map_noise.freqs": [128], "model.map_layer0.weight": [512, 256],
        "model.enc.16x16_aux_residual.weight": [256, 3, 3, 3], "model.enc.8x8_aux_residual.weight": [256, 256, 3, 3],
        "model.enc.16x16_aux_residual.resample_filter": [1, 1, 4, 4],
        "model.enc.16x16_down.conv0.resample_filter": [1, 1, 4, 4],
        "model.dec.16x16_up.skip.resample_filter": [1, 1, 4, 4],
    }
    assert {name: shapes.get(name) for name in expected} == expected


def test_adm_imagenet64_keys_and_shapes():
    net, shapes = released(64, 1000, ADM64)
    expected = {
        "model.map_layer0.weight": [768, 192], "model.map_label.weight": [768, 1000],
        "model.enc.64x64_block0.affine.weight": [384, 768], "model.enc.32x32_block0.qkv.weight": [1152, 384, 1, 1],
        "model.dec.32x32_block0.conv0.weight": [384, 960, 3, 3],
        "model.enc.32x32_down.skip.resample_filter": [1, 1, 2, 2],
        "model.out_norm.weight": [192], "model.out_conv.weight": [3, 192, 3, 3],
    }
    assert {name: shapes.get(name) for name in expected} == expected
    assert "model.map_label.bias" not in shapes and "model.map_augment.weight" not in shapes
    assert "model.enc.32x32_down.skip.weight" not in shapes  # pure resampling skip
    assert [net.model.enc[f"{r}x{r}_block0"].num_heads for r in (64, 32, 16, 8)] == [0, 6, 9, 12]


# EDM's DhariwalUNet(img_resolution=8, in_channels=1, out_channels=2, num_blocks=1, dropout=0, ...): its number of
# tensors and its attention blocks with their heads, read off EDM's own code. A block of width c has c // 64 heads,
# so a width below 64 has no attention layers at all.
EDM_NARROW_ADM = [
    (dict(model_channels=16, channel_mult=[1, 2], attn_resolutions=[4]), 124, {}),
    (dict(model_channels=32, channel_mult=[1, 2, 4], attn_resolutions=[8, 4, 2]), 226,
     {"enc.4x4_block0": 1, "enc.2x2_block0": 2, "dec.2x2_in0": 2, "dec.2x2_block0": 2, "dec.2x2_block1": 2,
      "dec.4x4_block0": 1, "dec.4x4_block1": 1}),
]


@pytest.mark.parametrize("kwargs, num_tensors, heads", EDM_NARROW_ADM, ids=["16-wide", "32-to-128-wide"])
def test_narrow_adm_has_edms_attention_layout(kwargs, num_tensors, heads):
    with torch.device("meta"):
        net = edm.DhariwalUNet(8, 1, 2, num_blocks=1, dropout=0.0, **kwargs)
    keys = list(net.state_dict())
    assert len(keys) == num_tensors
    assert {name: block.num_heads for name, block in net.named_modules()
            if isinstance(block, edm.UNetBlock) and block.num_heads} == heads
    attention_keys = {k for k in keys if k.split(".")[-2] in ("norm2", "qkv", "proj")}
    assert attention_keys == {f"{block}.{layer}.{p}" for block in heads for layer in ("norm2", "qkv", "proj")
                              for p in ("weight", "bias")}


# --- building blocks ---

def test_attention_uses_edm_head_layout():
    """SDPA attention equals softmax(q^T k / sqrt(c)) v with qkv channels laid out [head][channel][q, k, v]."""
    torch.manual_seed(0)
    block = edm.UNetBlock(16, 16, emb_channels=8, init={}, init_zero={}, num_heads=2)
    h = torch.randn(2, 16, 4, 4)
    q, k, v = block.qkv(h).reshape(2 * 2, 8, 3, 16).unbind(2)
    weights = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(8)).softmax(dim=2)
    expected = torch.einsum("nqk,nck->ncq", weights, v).reshape(2, 16, 4, 4)
    torch.testing.assert_close(block.attention(h), expected, atol=1e-5, rtol=1e-5)


def test_box_filter_resampling_is_the_depthwise_convolution_with_the_filter():
    x = torch.randn(2, 3, 8, 8)
    down = edm.Conv2d(3, 3, kernel=0, down=True)
    up = edm.Conv2d(3, 3, kernel=0, up=True)
    f = torch.full((3, 1, 2, 2), 0.25)  # f f^T / (sum f)^2 for f = [1, 1]
    torch.testing.assert_close(down(x), F.conv2d(x, f, groups=3, stride=2))
    torch.testing.assert_close(up(x), F.conv_transpose2d(x, 4 * f, groups=3, stride=2), rtol=0, atol=0)
    torch.testing.assert_close(down.resample_filter, f[:1])  # the checkpoints' buffer is unchanged
    fir = edm.Conv2d(3, 5, kernel=3, down=True, resample_filter=[1, 3, 3, 1], fused_resample=True)
    assert not fir.box_filter and fir(x).shape == (2, 5, 4, 4)


@pytest.mark.parametrize("variant", ["ddpm++", "adm"])
def test_bf16_autocast_keeps_activations_bf16(variant):
    """A float32 bias added to a bf16 convolution output would promote every later activation to float32 (twice
    the memory traffic of the normalisation and elementwise kernels on the GPU fast path)."""
    net = edm.EDMPrecond(8, 1, **TINY_VARIANTS[variant])
    dtypes = []
    for block in net.modules():
        if isinstance(block, edm.UNetBlock):
            block.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(torch.randn(2, 1, 8, 8), torch.ones(2))
    assert dtypes and set(dtypes) == {torch.bfloat16}


def test_positional_embedding_frequencies():
    emb = edm.PositionalEmbedding(8, endpoint=True)(torch.tensor([1.0]))
    freqs = torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3), 1e-4])  # endpoint: the last one is 1/max_positions
    torch.testing.assert_close(emb, torch.cat([freqs.cos(), freqs.sin()])[None])


# --- tiny networks: shapes, conditioning, loading ---

@pytest.mark.parametrize("variant", TINY_VARIANTS, ids=list(TINY_VARIANTS))
def test_output_shape_equals_input_shape_and_gradients_reach_all_parameters(variant):
    torch.manual_seed(0)
    net = edm.EDMPrecond(8, 1, **TINY_VARIANTS[variant])
    x = torch.randn(3, 1, 8, 8)
    denoised = net(x, torch.tensor([0.01, 1.0, 50.0]))
    assert denoised.shape == x.shape and torch.isfinite(denoised).all()
    EDMLoss()(net, x).mean().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("variant", ["ddpm++", "adm"])
def test_class_conditional_output_depends_on_labels(variant):
    torch.manual_seed(0)
    net = randomized(edm.EDMPrecond(8, 1, label_dim=10, **TINY_VARIANTS[variant])).eval()
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 2.0])
    with torch.no_grad():
        d_a, d_b = net(x, sigma, one_hot([1, 2])), net(x, sigma, one_hot([7, 2]))
        assert not torch.allclose(d_a[0], d_b[0]) and torch.allclose(d_a[1], d_b[1])
        torch.testing.assert_close(net(x, sigma), net(x, sigma, torch.zeros(2, 10)))  # None: the zero label


def test_state_dict_loads_strictly_into_a_fresh_network():
    """NCSN++'s random Fourier frequencies are a buffer: after loading, two networks agree exactly."""
    torch.manual_seed(0)
    a = randomized(edm.VEPrecond(8, 1, **TINY_VARIANTS["ncsn++"])).eval()
    b = edm.VEPrecond(8, 1, **TINY_VARIANTS["ncsn++"]).eval()
    b.load_state_dict(a.state_dict(), strict=True)
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.1, 10.0])
    with torch.no_grad():
        assert torch.equal(a(x, sigma), b(x, sigma))


# --- preconditioning closed forms ---

class Probe(torch.nn.Module):
    """A stand-in U-Net F: returns the constant `value` and records its inputs."""

    def __init__(self, out_channels):
        super().__init__()
        self.out_channels = out_channels
        self.value = 0.0

    def forward(self, x, noise_labels, class_labels):
        self.seen_x, self.seen_noise = x, noise_labels
        return torch.full((x.shape[0], self.out_channels, *x.shape[2:]), self.value)


def measured_scalings(net, sigma):
    """Per-sample (c_skip, c_out, c_in, c_noise), read off D = c_skip x + c_out F(c_in x, c_noise) with F constant."""
    net.model = probe = Probe(2 if isinstance(net, edm.iDDPMPrecond) else 1)  # iDDPM: learned-variance channels
    x = 1 + torch.rand(len(sigma), 1, 8, 8)
    d0 = net(x, sigma)
    c_in, c_noise = probe.seen_x / x, probe.seen_noise
    probe.value = 1.0
    d1 = net(x, sigma)
    return [t.flatten(1).mean(1) for t in (d0 / x, d1 - d0, c_in)] + [c_noise]


SIGMAS = torch.tensor([0.002, 0.1, 0.5, 3.0, 80.0])


def test_edm_preconditioning():
    s, sd = SIGMAS.double(), 0.5
    c_skip, c_out, c_in, c_noise = measured_scalings(edm.EDMPrecond(8, 1, **TINY_SONG), SIGMAS)
    torch.testing.assert_close(c_skip.double(), sd**2 / (s**2 + sd**2))
    torch.testing.assert_close(c_out.double(), s * sd / (s**2 + sd**2).sqrt())
    torch.testing.assert_close(c_in.double(), 1 / (s**2 + sd**2).sqrt())
    torch.testing.assert_close(c_noise.double(), s.log() / 4)


def test_vp_preconditioning_and_noise_range():
    net = edm.VPPrecond(8, 1, **TINY_SONG)
    assert net.sigma_min == pytest.approx(1e-3, rel=1e-3) and net.sigma_max == pytest.approx(152.17, rel=1e-4)
    c_skip, c_out, c_in, c_noise = measured_scalings(net, SIGMAS)
    torch.testing.assert_close(c_skip, torch.ones(5))
    torch.testing.assert_close(c_out, -SIGMAS)
    torch.testing.assert_close(c_in, 1 / (SIGMAS**2 + 1).sqrt())
    torch.testing.assert_close(edm.vp_sigma(c_noise / 999), SIGMAS)  # c_noise = (M - 1) t(sigma)


def test_ve_preconditioning():
    c_skip, c_out, c_in, c_noise = measured_scalings(edm.VEPrecond(8, 1, **TINY_SONG), SIGMAS)
    torch.testing.assert_close(c_skip, torch.ones(5))
    torch.testing.assert_close(c_out, SIGMAS)
    torch.testing.assert_close(c_in, torch.ones(5))
    torch.testing.assert_close(c_noise, (SIGMAS / 2).log())


def test_iddpm_preconditioning_snaps_to_its_grid():
    net = edm.iDDPMPrecond(8, 1, **TINY_VARIANTS["adm"])
    assert net.sigma_min == pytest.approx(0.0064, rel=1e-2) and net.sigma_max == pytest.approx(20291, rel=1e-3)
    rounded = net.round_sigma(SIGMAS)
    assert torch.isin(rounded, net.u).all() and torch.equal(net.round_sigma(rounded), rounded)
    c_skip, c_out, c_in, c_noise = measured_scalings(net, SIGMAS)
    torch.testing.assert_close(c_out, -SIGMAS)
    torch.testing.assert_close(c_in, 1 / (SIGMAS**2 + 1).sqrt())
    torch.testing.assert_close(net.u[(999 - c_noise).long()], rounded)


# --- losses ---

class ZeroDenoiser:
    """D = 0; records the noise levels it is called with."""

    def __call__(self, x, sigma, labels):
        self.sigma = sigma
        return torch.zeros_like(x)


@pytest.mark.parametrize("loss", [EDMLoss(), VPLoss(), VELoss()], ids=["edm", "vp", "ve"])
def test_loss_is_weighted_squared_error(loss):
    images, net = torch.randn(6, 1, 8, 8), ZeroDenoiser()
    torch.testing.assert_close(loss(net, images), loss.weight(net.sigma) * images**2)


def test_edm_loss_weight_and_sigma_distribution():
    loss, sigma = EDMLoss(), torch.tensor([0.002, 0.5, 80.0])
    torch.testing.assert_close(loss.weight(torch.tensor(0.5)), torch.tensor(8.0))  # (0.25 + 0.25) / 0.25^2
    _, c_out, _, _ = edm.EDMPrecond(8, 1, **TINY_SONG).scalings(sigma)
    torch.testing.assert_close(loss.weight(sigma) * c_out**2, torch.ones(3))  # unit effective weight
    torch.manual_seed(0)
    log_sigma = loss.sample_sigma(100_000, "cpu").log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.02)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.02)


def test_vp_and_ve_loss_sigma_ranges():
    torch.manual_seed(0)
    vp, ve = VPLoss().sample_sigma(10_000, "cpu"), VELoss().sample_sigma(10_000, "cpu")
    net = edm.VPPrecond(8, 1, **TINY_SONG)
    assert net.sigma_min * 0.999 <= vp.min() and vp.max() <= net.sigma_max * 1.001
    assert 0.02 <= ve.min() and ve.max() <= 100
    assert ve.log().mean().item() == pytest.approx((math.log(0.02) + math.log(100)) / 2, abs=0.1)


# --- argument errors ---

@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: edm.SongUNet(8, 1, 1, embedding_type="sinusoidal"), "embedding_type"),
        (lambda: edm.SongUNet(8, 1, 1, encoder_type="fused"), "encoder_type"),
        (lambda: edm.SongUNet(8, 1, 1, decoder_type="residual"), "decoder_type"),
        (lambda: edm.SongUNet(10, 1, 1, channel_mult=[1, 2, 2]), "img_resolution"),
        (lambda: edm.EDMPrecond(8, 1, model_type="UNet"), "model_type"),
        (lambda: edm.Conv2d(1, 1, kernel=3, up=True, down=True), "up and down"),
    ],
)
def test_invalid_arguments_raise(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_labels_for_unconditional_net_raise():
    net = edm.EDMPrecond(8, 1, **TINY_SONG)
    with pytest.raises(ValueError, match="class_labels"):
        net(torch.randn(1, 1, 8, 8), torch.tensor([1.0]), one_hot([3]))
