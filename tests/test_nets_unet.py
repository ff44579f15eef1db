"""ADM's UNet (guided-diffusion `UNetModel`) with upstream parameter names (ADM-G++)."""

import math

import pytest
import torch
from netutils import randomized, randomized_zeros

from dg_lightning import ddpm
from dg_lightning.nets import adm, unet

TINY = {"image_size": 16, "in_channels": 3, "model_channels": 32, "out_channels": 6, "num_res_blocks": 1,
        "attention_resolutions": (2,), "channel_mult": (1, 2), "num_head_channels": 16, "num_classes": 10}


def tiny_inputs(batch=2):
    """x [B, 3, 16, 16], fractional DDPM timesteps and labels in 0..9."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 3, 16, 16, generator=generator)
    return x, torch.linspace(0.5, 999.0, batch), torch.arange(batch) % 10


# --- released configuration (meta device: no memory, no compute) ---

@pytest.mark.parametrize(
    "num_classes, num_keys, num_params",
    [(1000, 567, 553_838_086), (None, 566, 552_814_086)],
    ids=["256x256_diffusion", "256x256_diffusion_uncond"],
)
def test_adm256_has_upstream_key_and_parameter_counts(num_classes, num_keys, num_params):
    with torch.device("meta"):
        net = unet.adm256_cond(num_classes=num_classes)
    assert len(net.state_dict()) == num_keys
    assert sum(p.numel() for p in net.parameters()) == num_params


def test_adm256_state_dict_matches_upstream_layout():
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in unet.adm256_cond().state_dict().items()}
    expected = {  # guided-diffusion create_model(256, 256, 2, learn_sigma, class_cond, "32,16,8", 64 head channels)
        "time_embed.0.weight": (1024, 256),
        "time_embed.2.weight": (1024, 1024),
        "label_emb.weight": (1000, 1024),
        "input_blocks.0.0.weight": (256, 3, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (512, 1024),
        "input_blocks.3.0.in_layers.2.weight": (256, 256, 3, 3),
        "input_blocks.7.0.skip_connection.weight": (512, 256, 1, 1),
        "input_blocks.10.1.qkv.weight": (1536, 512, 1),
        "input_blocks.17.1.proj_out.weight": (1024, 1024, 1),
        "middle_block.0.emb_layers.1.weight": (2048, 1024),
        "middle_block.1.qkv.weight": (3072, 1024, 1),
        "middle_block.2.out_layers.3.weight": (1024, 1024, 3, 3),
        "output_blocks.0.0.skip_connection.weight": (1024, 2048, 1, 1),
        "output_blocks.2.1.qkv.weight": (3072, 1024, 1),
        "output_blocks.2.2.in_layers.2.weight": (1024, 1024, 3, 3),
        "output_blocks.5.0.skip_connection.weight": (1024, 1536, 1, 1),
        "output_blocks.6.0.skip_connection.weight": (512, 1536, 1, 1),
        "output_blocks.8.2.emb_layers.1.weight": (1024, 1024),
        "output_blocks.9.0.skip_connection.weight": (512, 1024, 1, 1),
        "output_blocks.11.0.skip_connection.weight": (512, 768, 1, 1),
        "output_blocks.11.1.in_layers.2.weight": (512, 512, 3, 3),
        "output_blocks.12.0.skip_connection.weight": (256, 768, 1, 1),
        "output_blocks.14.1.out_layers.3.weight": (256, 256, 3, 3),
        "output_blocks.17.0.skip_connection.weight": (256, 512, 1, 1),
        "out.0.weight": (256,),
        "out.2.weight": (6, 256, 3, 3),
        "out.2.bias": (6,),
    }
    assert {k: shapes.get(k) for k in expected} == expected
    assert {k.split(".")[0] for k in shapes} == {"time_embed", "label_emb", "input_blocks", "middle_block",
                                                 "output_blocks", "out"}
    for part in ("input_blocks", "output_blocks"):
        assert max(int(k.split(".")[1]) for k in shapes if k.startswith(part)) == 17
    # Attention at factors 8, 16, 32 only: input blocks 10-17 minus the down-samplers 12, 15; output blocks 0-8.
    attention = {k.split(".")[0] + "." + k.split(".")[1] for k in shapes if k.endswith(".qkv.weight")}
    assert attention == {f"input_blocks.{i}" for i in (10, 11, 13, 14, 16, 17)} | {"middle_block.1"} | {
        f"output_blocks.{i}" for i in range(9)}
    # Up-sampling ResBlocks close every level but the last, after the attention where there is one.
    upsamplers = {k.rsplit(".in_layers", 1)[0] for k in shapes
                  if k.startswith("output_blocks") and ".in_layers." in k and k.split(".")[2] != "0"}
    assert upsamplers == {"output_blocks.2.2", "output_blocks.5.2", "output_blocks.8.2", "output_blocks.11.1",
                          "output_blocks.14.1"}


def test_adm256_outputs_eps_and_v_at_full_resolution():
    with torch.device("meta"):
        out = unet.adm256_cond()(torch.empty(2, 3, 256, 256), torch.empty(2), torch.zeros(2, dtype=torch.long))
    assert tuple(out.shape) == (2, 6, 256, 256)


# --- building blocks and initialisation ---

def test_up_resblock_and_upsample_are_nearest_neighbour_doublings():
    x = torch.randn(2, 32, 4, 4)
    nearest = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    block = adm.ResBlock(32, 64, 32, use_scale_shift_norm=True, up=True)  # zero-initialised branch: skip path only
    assert torch.equal(block(x, torch.randn(2, 64)), nearest)
    upsample = randomized(unet.Upsample(32))
    torch.testing.assert_close(upsample(x), upsample.conv(nearest), rtol=0, atol=0)


def test_fresh_unet_outputs_zero_and_every_branch_starts_at_zero():
    net = unet.UNet(**TINY)
    state = net.state_dict()
    zero_init = [k for k in state if ".out_layers.3." in k or ".proj_out." in k]
    # ResBlocks: input 1, 3, down 2, middle 2, output 4 + 1 up-sampler; attention: input 3, middle, output 0 and 1.
    assert len(zero_init) == 2 * (10 + 4)
    assert all(not state[k].any() for k in [*zero_init, "out.2.weight", "out.2.bias"])
    x, t, y = tiny_inputs()
    assert torch.equal(net(x, t, y), torch.zeros(2, 6, 16, 16))
    randomized_zeros(net)
    out = net(x, t, y)
    assert out.abs().min() > 0
    assert (out - net(x, t, (y + 1) % 10)).abs().max() > 1e-4  # the label conditions the output


def test_strict_state_dict_round_trip_gives_the_same_function():
    source, target = randomized(unet.UNet(**TINY), seed=1, scale=0.1), unet.UNet(**TINY)
    target.load_state_dict(source.state_dict(), strict=True)
    x, t, y = tiny_inputs()
    assert torch.equal(source(x, t, y), target(x, t, y))


def test_resblock_updown_false_uses_upstream_conv_resamplers():
    net = randomized_zeros(unet.UNet(**TINY, resblock_updown=False))
    keys = net.state_dict().keys()
    assert "input_blocks.2.0.op.weight" in keys and "output_blocks.1.2.conv.weight" in keys
    assert "output_blocks.1.2.in_layers.2.weight" not in keys
    assert net(*tiny_inputs()).shape == (2, 6, 16, 16)


# --- the DDPM sampler ---

def test_ddpm_sampler_with_a_fresh_unet_follows_the_eps_zero_recursion():
    schedule = ddpm.DDPMSchedule(1000, "4")
    x, _, y = tiny_inputs()
    sample = ddpm.ddpm_sampler(unet.UNet(**TINY), x, y, schedule, randn_like=torch.zeros_like)
    # eps = 0 and no noise: x_{k_{i-1}} = (coef1_i / sqrt(abar_i) + coef2_i) x_{k_i}.
    factor = math.prod(float(schedule.posterior_mean_coef1[i] / schedule.alphas_cumprod[i].sqrt()
                             + schedule.posterior_mean_coef2[i]) for i in range(4))
    torch.testing.assert_close(sample, factor * x, rtol=1e-5, atol=1e-6)


def test_ddpm_sampler_accepts_a_random_unet():
    x, _, y = tiny_inputs()
    sample = ddpm.ddpm_sampler(randomized_zeros(unet.UNet(**TINY)), x, y, ddpm.DDPMSchedule(1000, "3"))
    assert sample.shape == x.shape and torch.isfinite(sample).all()
    assert not torch.allclose(sample, x)


# --- error messages ---

@pytest.mark.parametrize(
    "num_classes, x, y, match",
    [
        (10, torch.randn(2, 3, 8, 8), torch.tensor([0, 1]), r"x must have shape \[B, 3, 16, 16\]"),
        (10, torch.randn(2, 3, 16, 16), None, r"y \(class labels\) must be integer .*num_classes=10\), got None"),
        (10, torch.randn(2, 3, 16, 16), torch.tensor([0.0, 1.0]), r"y \(class labels\) must be integer class indices"),
        (None, torch.randn(2, 3, 16, 16), torch.tensor([0, 1]), r"y \(class labels\) were given .* unconditional"),
    ],
    ids=["wrong-x", "missing-y", "float-y", "y-for-unconditional"],
)
def test_unet_rejects_bad_inputs(num_classes, x, y, match):
    with pytest.raises(ValueError, match=match):
        unet.UNet(**{**TINY, "num_classes": num_classes})(x, torch.rand(2), y)


def test_unet_rejects_a_head_width_that_does_not_divide_the_attention_widths():
    with pytest.raises(ValueError, match="num_head_channels must divide"):
        unet.UNet(**{**TINY, "num_head_channels": 24})
