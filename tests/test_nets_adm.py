"""ADM EncoderUNet, DG's head and the Discriminator wrapper."""

import math

import pytest
import torch
import torch.nn.functional as F

from dg_lightning.nets import adm
from dg_lightning.nets.attention import image_tokens, packed_attention
from dg_lightning.sde import cosine_time_from_tau
from netutils import randomized_zeros


def tiny_extractor():
    """A 3x8x8 -> 64x4x4 encoder with attention at the second level, 16-channel heads."""
    return adm.EncoderUNet(
        image_size=8, in_channels=3, model_channels=32, out_channels=5, num_res_blocks=1,
        attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=16,
    )


def tiny_head(num_classes=None):
    """A head for tiny_extractor's 64x4x4 features with one logit."""
    return adm.EncoderUNet(
        image_size=4, in_channels=64, model_channels=32, out_channels=1, num_res_blocks=1,
        attention_resolutions=(1,), channel_mult=(1,), num_head_channels=16, num_classes=num_classes,
    )




def tiny_discriminator(num_classes=None, time_map=None):
    """tiny_extractor (frozen) + tiny_head, both with every branch active."""
    return adm.Discriminator(randomized_zeros(tiny_extractor()), randomized_zeros(tiny_head(num_classes), seed=1), time_map)


# --- released configurations (built on the meta device: no memory, no compute) ---

@pytest.mark.parametrize(
    "build, num_keys, num_params",
    [
        (adm.cifar10_classifier, 255, 47_771_112),
        (adm.latent_classifier, 159, 20_832_488),
        (adm.adm64_classifier, 307, 65_438_568),
        (lambda: adm.dg_head(512), 71, 2_883_841),
        (lambda: adm.dg_head(512, num_classes=1000), 72, 3_395_841),
        (lambda: adm.dg_head(384), 71, 2_736_385),
        (lambda: adm.dg_head(384, num_classes=1000), 72, 3_248_385),
    ],
    ids=["cifar10", "latent", "adm64", "head512", "head512-cond", "head384", "head384-cond"],
)
def test_released_configs_have_reference_key_and_parameter_counts(build, num_keys, num_params):
    with torch.device("meta"):
        net = build()
    assert len(net.state_dict()) == num_keys
    assert sum(p.numel() for p in net.parameters()) == num_params


def test_head_state_dict_matches_released_discriminator_layout():
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in adm.dg_head(512, num_classes=1000).state_dict().items()}
    expected = {
        "time_embed.0.weight": (512, 128),
        "time_embed.2.weight": (512, 512),
        "label_emb.weight": (1000, 512),
        "input_blocks.0.0.weight": (128, 512, 3, 3),
        "input_blocks.1.0.in_layers.0.weight": (128,),
        "input_blocks.1.0.in_layers.2.weight": (128, 128, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (256, 512),
        "input_blocks.1.0.out_layers.0.bias": (128,),
        "input_blocks.2.0.out_layers.3.weight": (128, 128, 3, 3),
        "input_blocks.2.1.norm.weight": (128,),
        "input_blocks.2.1.qkv.weight": (384, 128, 1),
        "input_blocks.2.1.proj_out.weight": (128, 128, 1),
        "middle_block.0.emb_layers.1.bias": (256,),
        "middle_block.1.qkv.weight": (384, 128, 1),
        "middle_block.2.out_layers.3.bias": (128,),
        "out.0.weight": (128,),
        "out.2.positional_embedding": (128, 65),
        "out.2.qkv_proj.weight": (384, 128, 1),
        "out.2.c_proj.weight": (1, 128, 1),
        "out.2.c_proj.bias": (1,),
    }
    assert {k: shapes.get(k) for k in expected} == expected
    assert {k.split(".")[0] for k in shapes} == {"time_embed", "label_emb", "input_blocks", "middle_block", "out"}
    assert not any("skip_connection" in k for k in shapes)  # every ResBlock maps 128 -> 128
    assert max(int(k.split(".")[1]) for k in shapes if k.startswith("input_blocks")) == 2


def test_cifar10_classifier_block_layout():
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in adm.cifar10_classifier().state_dict().items()}
    # 0 conv | 1-4 Res128+Attn | 5 down | 6-9 Res256+Attn | 10 down | 11-14 Res512+Attn
    assert max(int(k.split(".")[1]) for k in shapes if k.startswith("input_blocks")) == 14
    assert shapes["input_blocks.6.0.skip_connection.weight"] == (256, 128, 1, 1)
    assert shapes["input_blocks.11.0.skip_connection.weight"] == (512, 256, 1, 1)
    assert "input_blocks.5.0.in_layers.2.weight" in shapes and "input_blocks.5.1.qkv.weight" not in shapes
    assert shapes["input_blocks.4.1.qkv.weight"] == (384, 128, 1)
    assert shapes["input_blocks.14.1.qkv.weight"] == (1536, 512, 1)
    assert shapes["out.2.positional_embedding"] == (512, 65)
    assert shapes["out.2.c_proj.weight"] == (1000, 512, 1)


@pytest.mark.parametrize(
    "build, in_channels, image_size, feature_shape",
    [
        (adm.cifar10_classifier, 3, 32, (512, 8, 8)),
        (adm.latent_classifier, 4, 32, (384, 8, 8)),
        (adm.adm64_classifier, 3, 64, (512, 8, 8)),
    ],
    ids=["cifar10", "latent", "adm64"],
)
def test_released_feature_map_shapes(build, in_channels, image_size, feature_shape):
    with torch.device("meta"):
        net = build()
        x = torch.empty(2, in_channels, image_size, image_size)
        features = net(x, torch.empty(2), features=True)
        logits = net(x, torch.empty(2))
    assert tuple(features.shape) == (2, *feature_shape)
    assert (net.feature_channels, net.feature_size, net.feature_size) == feature_shape
    assert tuple(logits.shape) == (2, 1000)


# Each builder and the EncoderUNet arguments it sets apart from adm_classifier's (create_classifier's) own.
PRESETS = {
    "cifar10": (adm.cifar10_classifier, {}),
    "latent": (adm.latent_classifier, dict(in_channels=4)),
    "adm64": (adm.adm64_classifier, {}),
    "adm256": (adm.adm256_classifier, {}),
    "dg_head": (lambda **overrides: adm.dg_head(64, num_classes=10, **overrides),
                dict(in_channels=64, out_channels=1, num_classes=10)),
}


@pytest.mark.parametrize("name", PRESETS)
def test_every_builder_setting_can_be_overridden_by_keyword(name):
    """image_size, channel_mult and num_res_blocks too (the loaders pass overrides as keywords); attention follows the
    overridden image_size (factors image_size // 32, // 16, // 8: here at the second level only)."""
    build, own = PRESETS[name]
    small = dict(image_size=64, channel_mult=(1, 2), num_res_blocks=1, model_channels=32, num_head_channels=32)
    with torch.device("meta"):
        net = build(**small)
        expected = adm.EncoderUNet(**{"in_channels": 3, "out_channels": 1000, **own, **small,
                                      "attention_resolutions": (2, 4, 8)})
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in expected.state_dict().items()}
    assert (net.feature_channels, net.feature_size) == (64, 32)


# --- building blocks ---

def naive_attention(qkv, num_heads, heads_first):
    """Per head and per token, softmax(q . k / sqrt(c)) v, reading the channel layout literally."""
    batch, width, length = qkv.shape
    c = width // (3 * num_heads)
    out = torch.empty(batch, num_heads * c, length, dtype=qkv.dtype)
    for h in range(num_heads):
        if heads_first:  # [head][q|k|v][c]
            q, k, v = (qkv[:, (3 * h + i) * c:(3 * h + i + 1) * c] for i in range(3))
        else:  # [q|k|v][head][c]
            q, k, v = (qkv[:, (i * num_heads + h) * c:(i * num_heads + h + 1) * c] for i in range(3))
        weights = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(c), dim=-1)
        out[:, h * c:(h + 1) * c] = torch.einsum("bts,bcs->bct", weights, v)
    return out


@pytest.mark.parametrize("heads_first", [True, False])
def test_packed_attention_matches_naive_softmax_attention(heads_first):
    qkv = torch.randn(2, 3 * 4 * 8, 10, generator=torch.Generator().manual_seed(0))
    out = packed_attention(qkv.transpose(1, 2), num_heads=4, heads_first=heads_first).transpose(1, 2)
    torch.testing.assert_close(out, naive_attention(qkv, 4, heads_first), rtol=1e-5, atol=1e-5)
    other = naive_attention(qkv, 4, not heads_first)
    assert (out - other).abs().max() > 1e-2  # the two layouts are not interchangeable


def test_attention_block_uses_legacy_layout_and_pool_uses_split_first_layout():
    block = randomized_zeros(adm.AttentionBlock(64, num_head_channels=16))
    x = torch.randn(2, 64, 4, 4)
    tokens = x.flatten(2)
    expected = tokens + block.proj_out(naive_attention(block.qkv(block.norm(tokens)), 4, heads_first=True))
    torch.testing.assert_close(block(x), expected.reshape(2, 64, 4, 4), rtol=1e-5, atol=1e-5)

    pool = adm.AttentionPool2d(4, 64, num_head_channels=16, out_channels=3)
    tokens = torch.cat([tokens.mean(-1, keepdim=True), tokens], dim=-1) + pool.positional_embedding
    expected = pool.c_proj(naive_attention(pool.qkv_proj(tokens), 4, heads_first=False))[:, :, 0]
    torch.testing.assert_close(pool(x), expected, rtol=1e-5, atol=1e-5)


def test_attention_layers_give_the_same_output_on_channels_last_inputs_and_keep_their_layout():
    """The token view of a channels_last image is free (no copy), and the blocks' results do not depend on the layout."""
    x = torch.randn(2, 64, 4, 4)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert image_tokens(x_cl).data_ptr() == x_cl.data_ptr() and image_tokens(x_cl).is_contiguous()
    block = randomized_zeros(adm.AttentionBlock(64, num_head_channels=16))
    out, out_cl = block(x), block(x_cl)
    torch.testing.assert_close(out_cl, out, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous() and out_cl.is_contiguous(memory_format=torch.channels_last)
    pool = randomized_zeros(adm.AttentionPool2d(4, 64, num_head_channels=16, out_channels=3))
    torch.testing.assert_close(pool(x_cl), pool(x), rtol=1e-5, atol=1e-5)


def test_group_norm_runs_in_float32_and_returns_input_dtype():
    x = torch.randn(2, 64, 4, 4).bfloat16()
    out = adm.GroupNorm32(64)(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.group_norm(x.float(), 32).bfloat16(), rtol=0, atol=0)


def test_fresh_network_starts_residual_branches_at_zero():
    state = tiny_extractor().state_dict()
    zero_init = [k for k in state if ".out_layers.3." in k or ".proj_out." in k]
    assert len(zero_init) == 2 * (5 + 2)  # weight and bias of 5 ResBlocks and 2 attention blocks
    assert all(not state[k].any() for k in zero_init)
    assert state["input_blocks.1.0.in_layers.2.weight"].any()
    assert state["out.2.c_proj.weight"].any()  # the pool's output projection is not zero-initialised


@pytest.mark.parametrize(
    "option, present, absent",
    [
        ({"resblock_updown": False}, "input_blocks.2.0.op.weight", "input_blocks.2.0.in_layers.2.weight"),
        ({"pool": "adaptive"}, "out.3.weight", "out.2.positional_embedding"),
    ],
)
def test_structural_options_follow_adm_key_names(option, present, absent):
    kw = dict(image_size=8, in_channels=3, model_channels=32, out_channels=5, num_res_blocks=1,
              attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=16)
    net = adm.EncoderUNet(**{**kw, **option})
    keys = net.state_dict().keys()
    assert present in keys and absent not in keys
    assert net(torch.randn(2, 3, 8, 8), torch.rand(2) * 999).shape == (2, 5)


def test_without_scale_shift_norm_the_embedding_gives_one_vector_per_channel():
    kw = dict(image_size=8, in_channels=3, model_channels=32, out_channels=5, num_res_blocks=1,
              attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=16)
    assert adm.EncoderUNet(**kw, use_scale_shift_norm=False).state_dict()["input_blocks.1.0.emb_layers.1.weight"].shape == (32, 128)
    assert adm.EncoderUNet(**kw).state_dict()["input_blocks.1.0.emb_layers.1.weight"].shape == (64, 128)


# --- forward behaviour ---

def test_head_gives_one_logit_and_depends_on_fractional_time():
    head = randomized_zeros(tiny_head())
    features = torch.randn(3, 64, 4, 4)
    t = torch.tensor([10.0, 500.0, 990.0])
    logits = head(features, t)
    assert logits.shape == (3, 1)
    assert (logits - head(features, t + 0.5)).abs().max() > 1e-6


def test_class_conditioning_changes_the_logit():
    discriminator = tiny_discriminator(num_classes=10)
    x = torch.randn(1, 3, 8, 8).expand(2, -1, -1, -1)
    tau = torch.full((2,), 0.3)
    logits = discriminator(x, tau, torch.tensor([0, 1]))
    assert logits.shape == (2,)
    assert (logits[0] - logits[1]).abs() > 1e-4
    torch.testing.assert_close(discriminator(x, tau, torch.tensor([1, 1])), logits[[1, 1]])


def test_discriminator_feeds_999_tau_to_both_networks():
    discriminator = tiny_discriminator()
    x, tau = torch.randn(2, 3, 8, 8), torch.tensor([0.2, 0.7])
    features = discriminator.feature_extractor(x, 999 * tau, features=True)
    expected = discriminator.head(features, 999 * tau)[:, 0]
    torch.testing.assert_close(discriminator(x, tau), expected)


def test_discriminator_applies_time_map_before_999():
    discriminator = tiny_discriminator(time_map=cosine_time_from_tau)
    x, tau = torch.randn(2, 3, 8, 8), torch.tensor([0.2, 0.7])
    t = 999 * cosine_time_from_tau(tau)
    expected = discriminator.head(discriminator.feature_extractor(x, t, features=True), t)[:, 0]
    torch.testing.assert_close(discriminator(x, tau), expected)
    assert (discriminator(x, tau) - tiny_discriminator()(x, tau)).abs().max() > 1e-6


def test_gradients_reach_the_input_and_head_but_not_the_frozen_extractor():
    discriminator = tiny_discriminator()
    x_vp = torch.randn(2, 3, 8, 8, requires_grad=True)
    discriminator(x_vp, torch.tensor([0.1, 0.9])).sum().backward()
    assert x_vp.grad is not None and x_vp.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in discriminator.feature_extractor.parameters())
    assert all(p.grad is not None and p.grad.any() for p in discriminator.head.parameters())


def test_feature_extractor_stays_in_eval_mode():
    discriminator = tiny_discriminator().train()
    assert discriminator.head.training
    assert not any(m.training for m in discriminator.feature_extractor.modules())
    assert [n for n, p in discriminator.named_parameters() if p.requires_grad] == [
        n for n, _ in discriminator.named_parameters() if n.startswith("head.")
    ]


# --- error messages ---

@pytest.mark.parametrize(
    "x, t, labels, match",
    [
        (torch.randn(2, 3, 4, 4), torch.rand(2), None, r"x must have shape \[B, 3, 8, 8\]"),
        (torch.randn(2, 3, 8, 8), torch.rand(3), None, r"timesteps must have shape \(2,\)"),
        (torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 1]), "unconditional"),
    ],
)
def test_encoder_rejects_bad_inputs(x, t, labels, match):
    with pytest.raises(ValueError, match=match):
        tiny_extractor()(x, t, labels)


@pytest.mark.parametrize("labels", [None, torch.tensor([0.0, 1.0]), torch.tensor([0, 1, 2])])
def test_conditional_head_requires_integer_labels_per_sample(labels):
    with pytest.raises(ValueError, match="class_labels must be integer class indices of shape"):
        tiny_head(num_classes=10)(torch.randn(2, 64, 4, 4), torch.rand(2), labels)


@pytest.mark.parametrize(
    "option, match",
    [
        ({"pool": "spatial"}, "pool must be one of"),
        ({"model_channels": 48}, "multiples of 32"),
        ({"image_size": 7}, "image_size must be divisible"),
        ({"num_head_channels": 24}, "num_head_channels must divide"),
    ],
)
def test_encoder_rejects_bad_configs(option, match):
    kw = dict(image_size=8, in_channels=3, model_channels=32, out_channels=5, num_res_blocks=1,
              attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=16)
    with pytest.raises(ValueError, match=match):
        adm.EncoderUNet(**{**kw, **option})


def test_discriminator_rejects_mismatched_head_and_bad_tau():
    with pytest.raises(ValueError, match="head must take the extractor's features"):
        adm.Discriminator(tiny_extractor(), tiny_extractor())
    with pytest.raises(ValueError, match=r"tau must have shape \(2,\)"):
        tiny_discriminator()(torch.randn(2, 3, 8, 8), torch.tensor(0.5))


def test_adm256_classifier_matches_released_256x256_classifier():
    with torch.device("meta"):
        net = adm.adm256_classifier()
        features = net(torch.empty(2, 3, 256, 256), torch.empty(2), features=True)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert (len(shapes), sum(p.numel() for p in net.parameters())) == (249, 54_096_360)
    assert tuple(features.shape) == (2, 512, 8, 8)
    # 0 conv | 1-2 Res128 | 3 down | 4-5 Res128 | 6 down | 7-8 Res256 | 9 down | 10-11 Res256+Attn (factor 8) | ...
    assert shapes["input_blocks.7.0.skip_connection.weight"] == (256, 128, 1, 1)
    assert "input_blocks.8.1.qkv.weight" not in shapes and shapes["input_blocks.10.1.qkv.weight"] == (768, 256, 1)
    assert shapes["input_blocks.17.1.qkv.weight"] == (1536, 512, 1)
    assert shapes["out.2.positional_embedding"] == (512, 65)
    assert shapes["out.2.c_proj.weight"] == (1000, 512, 1)


# --- EncoderDiscriminator: DG's discriminator trained whole (LSGM-G++) ---

def test_lsgm_discriminator_config_has_table_8s_blocks():
    """conf/discriminator/lsgm_latent.yaml: 180 x 16 x 16 in, one logit; Table 8's 5 ResBlocks and 3 attention blocks
    (besides the attention pool), attention at resolutions 16 and 8."""
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "discriminator" / "lsgm_latent.yaml").net
    with torch.device("meta"):
        net = adm.EncoderDiscriminator(instantiate(node))
    blocks = [m for m in net.modules() if isinstance(m, (adm.ResBlock, adm.AttentionBlock))]
    assert sum(isinstance(m, adm.ResBlock) for m in blocks) == 5
    attention_widths = [m.norm.num_channels for m in blocks if isinstance(m, adm.AttentionBlock)]
    assert attention_widths == [128, 256, 256]  # at 16 x 16 (width 128), at 8 x 8 and in the middle block (256)
    assert (net.net.in_channels, net.net.image_size, net.net.out_channels) == (180, 16, 1)


def test_encoder_discriminator_is_its_encoders_logit_at_999_tau():
    torch.manual_seed(0)
    encoder = adm.EncoderUNet(image_size=8, in_channels=3, model_channels=32, out_channels=1, num_res_blocks=1,
                              attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=32).eval()
    x, tau = torch.randn(3, 3, 8, 8), torch.tensor([0.01, 0.5, 1.0])
    with torch.no_grad():
        assert torch.equal(adm.EncoderDiscriminator(encoder)(x, tau), encoder(x, 999.0 * tau).squeeze(1))
    with pytest.raises(ValueError, match="tau must have shape"):
        adm.EncoderDiscriminator(encoder)(x, tau[:2])


def test_encoder_discriminator_refuses_more_than_one_logit():
    encoder = adm.EncoderUNet(image_size=8, in_channels=3, model_channels=32, out_channels=2, num_res_blocks=1,
                              attention_resolutions=(), channel_mult=(1,), num_head_channels=32)
    with pytest.raises(ValueError, match="out_channels=1"):
        adm.EncoderDiscriminator(encoder)
