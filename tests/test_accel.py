"""The fast path changes how networks run, never what they compute: float32 outputs, the same weights and
state-dict names, and samples within bf16 rounding of the plain float32 path."""

import pytest
import torch
from netutils import randomized_zeros

from dg_lightning.accel import Accel, Accelerated, accelerate, prepare, set_backends
from dg_lightning.shards import to_uint8
from dg_lightning.guidance import DiscriminatorGuidance
from dg_lightning.module import DiscriminatorModule
from dg_lightning.nets.adm import Discriminator, EncoderUNet, dg_head
from dg_lightning.nets.edm import EDMPrecond
from dg_lightning.samplers import edm_sampler


def tiny_denoiser():
    """A 8x8 DDPM++-style EDM denoiser with every residual branch active."""
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=1, model_type="SongUNet", model_channels=16, channel_mult=(1, 2),
                     num_blocks=1, attn_resolutions=(4,), dropout=0.0)
    return randomized_zeros(net, scale=0.05).eval().requires_grad_(False)


def tiny_discriminator():
    """A frozen 8x8 EncoderUNet feature extractor + DG head, random weights."""
    torch.manual_seed(1)
    extractor = EncoderUNet(image_size=8, in_channels=1, model_channels=32, out_channels=10, num_res_blocks=1,
                            attention_resolutions=(), channel_mult=(1,), num_head_channels=32)
    head = dg_head(32, model_channels=32, num_head_channels=32)
    return randomized_zeros(Discriminator(extractor, head), scale=0.05).eval().requires_grad_(False)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="accel.autocast"):
        Accel(autocast="fp8")
    with pytest.raises(ValueError, match="accel.compile"):
        Accel(compile="fastest")
    with pytest.raises(ValueError, match="accel.attention"):
        Accel(attention="flash3")


def test_plain_path_is_the_network_itself():
    net = tiny_denoiser()
    assert accelerate(net, Accel()) is net
    assert accelerate(net, Accel(tf32=True)) is net
    assert isinstance(accelerate(net, Accel(autocast="bf16")), Accelerated)


def test_channels_last_gives_the_same_float32_output():
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 1.0, 10.0])
    plain = tiny_denoiser()(x, sigma)
    fast_net = accelerate(tiny_denoiser(), Accel(channels_last=True))
    fast = fast_net(x, sigma)
    assert fast.dtype == torch.float32
    assert fast_net.net.model.enc["8x8_conv"].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_rounds_the_networks_but_returns_float32():
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 1.0, 10.0])
    plain = tiny_denoiser()(x, sigma)
    fast = accelerate(tiny_denoiser(), Accel(autocast="bf16"))(x, sigma)
    assert fast.dtype == torch.float32
    error = (fast - plain).abs().max() / plain.abs().max()
    assert 0 < error < 3e-2  # bf16 has an 8-bit mantissa: relative rounding 2^-8 per op, not float32's 2^-24


def test_prepare_keeps_the_state_dict_names_and_values():
    net = tiny_discriminator()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    module = DiscriminatorModule(net, accel=Accel(channels_last=True, compile="default"))
    after = module.discriminator.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert prepare(tiny_discriminator(), Accel()) is not None


def test_discriminator_module_runs_the_accelerated_forward_in_float32():
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    plain = DiscriminatorModule(tiny_discriminator())(x, t)
    fast = DiscriminatorModule(tiny_discriminator(), accel=Accel(autocast="bf16"))(x, t)
    assert fast.dtype == torch.float32
    assert 0 < (fast - plain).abs().max() < 3e-2 * plain.abs().max()


def test_bf16_samples_stay_within_a_few_uint8_levels_of_float32():
    """The accuracy guard at test scale: the same latents through the plain and the bf16 path, with DG."""
    latents = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(num_steps=8, dg_weight=2.0)
    samples = {}
    for name, accel in {"fp32": Accel(), "bf16": Accel(autocast="bf16")}.items():
        guidance = DiscriminatorGuidance(accelerate(tiny_discriminator(), accel))
        samples[name] = to_uint8(edm_sampler(accelerate(tiny_denoiser(), accel), latents, dg=guidance, **kwargs))
    diff = (samples["bf16"].int() - samples["fp32"].int()).abs()
    assert diff.float().mean() < 1.0
    assert diff.max() <= 8


def backend_flags():
    """(matmul TF32, cuDNN TF32, cuDNN autotuning) as PyTorch has them now."""
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark


def test_backend_switches_follow_accel():
    """set_backends applies TF32 and cuDNN autotuning as the Accel says, in both directions."""
    saved = backend_flags()
    try:
        set_backends(Accel.gpu())
        assert backend_flags() == (True, True, True)
        set_backends(Accel())
        assert backend_flags() == (False, False, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


def test_attention_backend_reaches_scaled_dot_product_attention():
    """accel.attention restricts SDPA: the math and flash kernels give the plain output, cuDNN has no CPU kernel."""
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 1.0, 10.0])
    plain = tiny_denoiser()(x, sigma)
    for backend in ("math", "flash"):
        torch.testing.assert_close(accelerate(tiny_denoiser(), Accel(attention=backend))(x, sigma), plain,
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="No viable backend"):
        accelerate(tiny_denoiser(), Accel(attention="cudnn"))(x, sigma)
