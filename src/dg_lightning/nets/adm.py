"""ADM's noise-aware encoder and DG's discriminator built from it.

`EncoderUNet` reproduces guided-diffusion's `EncoderUNetModel` module by module: the names and shapes
of its parameters are those of the released state_dicts (OpenAI's classifiers, DG's
`32x32_classifier.pt` and `discriminator_*.pt`), so they load with `strict=True`.
Two attention layouts coexist: the attention blocks pack their qkv
channels as [head][q|k|v][c] (ADM's "legacy" order), the attention pool as [q|k|v][head][c].
"""

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from dg_lightning.nets.attention import image_tokens, packed_attention, pointwise, tokens_to_image
from dg_lightning.nets.embedding import timestep_embedding

POOLS = ("attention", "adaptive")


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups, computed in float32 and cast back to the input dtype."""

    def __init__(self, channels):
        super().__init__(32, channels)

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def zero_init(module):
    """Zero every parameter of `module` (ADM starts residual branches as the identity) and return it."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class ResBlock(nn.Module):
    """ADM's residual block: skip(x) + conv(SiLU(FiLM(GN(conv(SiLU(GN(x)))), emb))), optionally halving or doubling H, W.

    With scale-shift norm the time embedding gives (scale, shift) and the second norm becomes
    GN(h) * (1 + scale) + shift; without it the embedding is added to h before that norm. Down-sampling
    (down=True) is a 2x2 average pool of both paths, up-sampling (up=True) a nearest-neighbour 2x copy of both,
    applied after the first SiLU.
    """

    def __init__(self, channels, emb_channels, out_channels, use_scale_shift_norm, down=False, up=False):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.down = down
        self.up = up
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Identity(),  # ADM's dropout slot (p = 0 in every released config); keeps the key out_layers.3
            zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        norm, act, conv = self.in_layers
        h = act(norm(x))
        if self.down:
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        elif self.up:
            h, x = F.interpolate(h, scale_factor=2, mode="nearest"), F.interpolate(x, scale_factor=2, mode="nearest")
        h = conv(h)

        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        out_norm, out_act, _, out_conv = self.out_layers
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_norm(h) * (1 + scale) + shift
        else:
            h = out_norm(h + emb_out)
        return self.skip_connection(x) + out_conv(out_act(h))


class Downsample(nn.Module):
    """Stride-2 3x3 convolution, ADM's down-sampling between levels when resblock_updown is False."""

    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions with a residual: x + proj_out(attention(qkv(GN(x)))), legacy head layout."""

    def __init__(self, channels, num_head_channels):
        super().__init__()
        self.num_heads = channels // num_head_channels
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_init(nn.Conv1d(channels, channels, 1))

    def forward(self, x):
        tokens = image_tokens(self.norm(x))
        h = packed_attention(pointwise(self.qkv, tokens), self.num_heads, heads_first=True)
        return x + tokens_to_image(pointwise(self.proj_out, h), *x.shape[2:])


class AttentionPool2d(nn.Module):
    """CLIP-style pooling: the mean token joins the H*W tokens, learned positions are added, all attend, and c_proj of
    the mean token's output gives [B, out_channels]."""

    def __init__(self, spatial_size, channels, num_head_channels, out_channels):
        super().__init__()
        self.num_heads = channels // num_head_channels
        self.positional_embedding = nn.Parameter(torch.randn(channels, spatial_size**2 + 1) / channels**0.5)
        self.qkv_proj = nn.Conv1d(channels, 3 * channels, 1)
        self.c_proj = nn.Conv1d(channels, out_channels, 1)

    def forward(self, x):
        tokens = image_tokens(x)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1) + self.positional_embedding.t().to(x.dtype)
        h = packed_attention(pointwise(self.qkv_proj, tokens), self.num_heads, heads_first=False)
        return pointwise(self.c_proj, h[:, 0])


class TimestepEmbedSequential(nn.Sequential):
    """nn.Sequential that also hands the time embedding to the ResBlocks it holds."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class ADMTrunk(nn.Module):
    """What ADM's encoder and U-Net share: the time embedding (sinusoidal embedding of ADM timesteps, then a 2-layer MLP of
    width 4 * model_channels, plus a learned class embedding with num_classes) and the down half (see down_half)."""

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 channel_mult, num_head_channels, use_scale_shift_norm, resblock_updown, num_classes, pool="attention"):
        super().__init__()
        self.widths = [int(mult * model_channels) for mult in channel_mult]
        check_config(image_size, self.widths, attention_resolutions, num_head_channels, pool)
        self.image_size, self.in_channels, self.model_channels = image_size, in_channels, model_channels
        self.out_channels, self.num_classes = out_channels, num_classes

        emb_channels = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels)
        )
        self.label_emb = None if num_classes is None else nn.Embedding(num_classes, emb_channels)
        self.res_block = partial(ResBlock, emb_channels=emb_channels, use_scale_shift_norm=use_scale_shift_norm)
        self.input_blocks, self.middle_block, self.skip_channels, self.factor = down_half(
            in_channels, self.widths, num_res_blocks, attention_resolutions, num_head_channels, self.res_block,
            resblock_updown
        )

    def embed(self, timesteps, class_labels):
        """The time embedding of timesteps (B,), plus the class embedding of class_labels (B,) for a conditional net."""
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        return emb if self.label_emb is None else emb + self.label_emb(class_labels)

    def down(self, x, emb):
        """(the middle block's output, the output of every input block in order: the U-Net's skips) for x and emb."""
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        return self.middle_block(h, emb), skips


class EncoderUNet(ADMTrunk):
    """ADM's noise-aware encoder (guided-diffusion `EncoderUNetModel`), the down half of a U-Net plus a pooling head.

    Per level (channel_mult): num_res_blocks ResBlocks to width model_channels * mult, each followed by
    attention when the down-sampling factor is in attention_resolutions; between levels one 2x down-sampling
    (a ResBlock with down=True if resblock_updown, else a strided conv). Then the middle block
    (ResBlock, attention, ResBlock) and the output head: GN, SiLU and an attention pool (or, for
    pool="adaptive", a global average and a zero-initialised 1x1 conv). Time enters through the sinusoidal
    embedding of ADM timesteps and a 2-layer MLP of width 4 * model_channels; with num_classes, a learned
    class embedding is added to it (DG's conditional heads). Defaults are those of every released config.
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        channel_mult,
        num_head_channels=64,
        use_scale_shift_norm=True,
        resblock_updown=True,
        pool="attention",
        num_classes=None,
    ):
        super().__init__(image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                         channel_mult, num_head_channels, use_scale_shift_norm, resblock_updown, num_classes, pool)
        channels = self.widths[-1]
        self.feature_channels = channels
        self.feature_size = image_size // self.factor

        if pool == "attention":
            pool_layer = AttentionPool2d(self.feature_size, channels, num_head_channels, out_channels)
            self.out = nn.Sequential(GroupNorm32(channels), nn.SiLU(), pool_layer)
        else:
            self.out = nn.Sequential(
                GroupNorm32(channels),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d(1),
                zero_init(nn.Conv2d(channels, out_channels, 1)),
                nn.Flatten(),
            )

    def forward(self, x, timesteps, class_labels=None, features=False):
        """Logits [B, out_channels] of x [B, in_channels, image_size, image_size] at ADM timesteps (B,) (DDPM-index scale,
        fractional allowed); with features=True, the middle-block map [B, feature_channels, feature_size, feature_size]."""
        check_inputs(self, x, timesteps, class_labels)
        h, _ = self.down(x, self.embed(timesteps, class_labels))
        return h if features else self.out(h)


def down_half(in_channels, widths, num_res_blocks, attention_resolutions, num_head_channels, res_block, resblock_updown):
    """ADM's encoder path: a stem conv; per level, num_res_blocks res_block(channels, out_channels=width) each followed by
    attention when the down-sampling factor is in attention_resolutions, and between levels one 2x down-sampling (a
    ResBlock with down=True if resblock_updown, else a strided conv); then the middle block (ResBlock, attention,
    ResBlock). Returns (input_blocks, middle_block, the channels of each input block's output, the final factor)."""
    channels = widths[0]
    blocks = [TimestepEmbedSequential(nn.Conv2d(in_channels, channels, 3, padding=1))]
    block_channels = [channels]
    factor = 1
    for level, width in enumerate(widths):
        for _ in range(num_res_blocks):
            layers = [res_block(channels, out_channels=width)]
            channels = width
            if factor in attention_resolutions:
                layers.append(AttentionBlock(channels, num_head_channels))
            blocks.append(TimestepEmbedSequential(*layers))
            block_channels.append(channels)
        if level < len(widths) - 1:
            down = res_block(channels, out_channels=channels, down=True) if resblock_updown else Downsample(channels)
            blocks.append(TimestepEmbedSequential(down))
            block_channels.append(channels)
            factor *= 2
    middle_block = TimestepEmbedSequential(
        res_block(channels, out_channels=channels),
        AttentionBlock(channels, num_head_channels),
        res_block(channels, out_channels=channels),
    )
    return nn.ModuleList(blocks), middle_block, block_channels, factor


def check_inputs(net, x, timesteps, labels, labels_name="class_labels"):
    """Raise ValueError unless x, timesteps and labels have the shapes `net` (in_channels, image_size, num_classes)
    expects; labels_name is the argument's name in the caller's signature."""
    expected = (net.in_channels, net.image_size, net.image_size)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(f"x must have shape [B, {', '.join(map(str, expected))}], got {list(x.shape)}")
    if timesteps.shape != (x.shape[0],):
        raise ValueError(f"timesteps must have shape ({x.shape[0]},) to match x, got {tuple(timesteps.shape)}")
    if net.num_classes is None:
        if labels is not None:
            raise ValueError(f"{labels_name} were given but this network is unconditional (num_classes=None)")
    elif labels is None or labels.shape != (x.shape[0],) or labels.is_floating_point():
        got = None if labels is None else f"{labels.dtype} {tuple(labels.shape)}"
        raise ValueError(f"{labels_name} must be integer class indices of shape ({x.shape[0]},) for this "
                         f"class-conditional network (num_classes={net.num_classes}), got {got}")


def check_config(image_size, widths, attention_resolutions, num_head_channels, pool):
    """Raise ValueError for EncoderUNet / UNet hyper-parameters that cannot build a working network."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if any(width % 32 for width in widths):
        raise ValueError(f"model_channels * channel_mult must be multiples of 32 (GroupNorm32), got widths {widths}")
    if image_size % 2 ** (len(widths) - 1):
        raise ValueError(f"image_size must be divisible by 2**(len(channel_mult) - 1), got {image_size} for {len(widths)} levels")
    attention_widths = [w for level, w in enumerate(widths) if 2**level in attention_resolutions] + widths[-1:]
    if any(width % num_head_channels for width in attention_widths):
        raise ValueError(
            f"num_head_channels must divide every attention width {attention_widths}, got {num_head_channels}"
        )


def check_times(x_vp, tau):
    """Raise ValueError unless tau holds one time per input of x_vp."""
    if tau.shape != (x_vp.shape[0],):
        raise ValueError(f"tau must have shape ({x_vp.shape[0]},) to match x_vp, got {tuple(tau.shape)}")


class Discriminator(nn.Module):
    """DG's time-dependent discriminator: logit log(d/(1-d)) of a trainable head on a frozen ADM classifier's
    middle-block features. Both networks see timesteps 999 * time_map(tau)."""

    def __init__(self, feature_extractor, head, time_map=None):
        super().__init__()
        wanted = (feature_extractor.feature_channels, feature_extractor.feature_size, 1)
        if (head.in_channels, head.image_size, head.out_channels) != wanted:
            raise ValueError(
                "head must take the extractor's features and give one logit: (in_channels, image_size, out_channels) "
                f"= {wanted}, got {(head.in_channels, head.image_size, head.out_channels)}"
            )
        self.feature_extractor = feature_extractor.requires_grad_(False).eval()
        self.head = head
        self.time_map = time_map

    def train(self, mode=True):
        """Set the head's training mode; the frozen feature extractor always stays in eval mode."""
        super().train(mode)
        self.feature_extractor.eval()
        return self

    def forward(self, x_vp, tau, class_labels=None):
        """Logit (B,) for inputs x_vp in VP coordinates at LVP times tau (B,); class_labels are int64 indices (B,)."""
        check_times(x_vp, tau)
        timesteps = 999.0 * (tau if self.time_map is None else self.time_map(tau))
        features = self.feature_extractor(x_vp, timesteps, features=True)
        return self.head(features, timesteps, class_labels).squeeze(1)


class EncoderDiscriminator(nn.Module):
    """DG's time-dependent discriminator trained whole, from scratch (LSGM-G++, where no pretrained classifier of the
    latents exists): the logit log(d/(1-d)) of one EncoderUNet with out_channels=1, at timesteps 999 tau."""

    def __init__(self, net: EncoderUNet):
        super().__init__()
        if net.out_channels != 1:
            raise ValueError(f"the discriminator's EncoderUNet must give one logit (out_channels=1), got {net.out_channels}")
        self.net = net

    def forward(self, x_vp, tau, class_labels=None):
        """Logit (B,) for inputs x_vp in VP coordinates at LVP times tau (B,); class_labels are int64 indices (B,)."""
        check_times(x_vp, tau)
        return self.net(x_vp, 999.0 * tau, class_labels).squeeze(1)


def adm_classifier(image_size, channel_mult, num_res_blocks, **overrides):
    """EncoderUNet with guided-diffusion's create_classifier settings: width 128, 64-channel heads, attention at
    resolutions 32, 16, 8 (factors image_size // r), scale-shift norm, ResBlock down-sampling, attention pool,
    1000 classes; `overrides` replace any other EncoderUNet argument. The builders below pass all their settings by
    keyword, so an override can replace any of them (image_size, channel_mult and num_res_blocks included)."""
    config = dict(
        image_size=image_size,
        in_channels=3,
        model_channels=128,
        out_channels=1000,
        num_res_blocks=num_res_blocks,
        attention_resolutions=tuple(image_size // r for r in (32, 16, 8)),
        channel_mult=channel_mult,
    )
    return EncoderUNet(**{**config, **overrides})


def cifar10_classifier(**overrides):
    """DG's CIFAR-10 feature extractor (`32x32_classifier.pt`): 3x32x32, depth 4, mult (1,2,4); features 512x8x8."""
    return adm_classifier(**{"image_size": 32, "channel_mult": (1, 2, 4), "num_res_blocks": 4, **overrides})


def latent_classifier(**overrides):
    """DG_imagenet's feature extractor for SD-VAE latents: 4x32x32, depth 2, mult (1,2,3); features 384x8x8."""
    return adm_classifier(**{"image_size": 32, "channel_mult": (1, 2, 3), "num_res_blocks": 2, "in_channels": 4,
                              **overrides})


def adm64_classifier(**overrides):
    """OpenAI's `64x64_classifier.pt` (cosine time: use time_map=cosine_time_from_tau): depth 4, mult (1,2,3,4);
    features 512x8x8."""
    return adm_classifier(**{"image_size": 64, "channel_mult": (1, 2, 3, 4), "num_res_blocks": 4, **overrides})


def adm256_classifier(**overrides):
    """OpenAI's `256x256_classifier.pt` (linear time, ADM-G++'s classifier): depth 2, mult (1,1,2,2,4,4);
    features 512x8x8."""
    return adm_classifier(**{"image_size": 256, "channel_mult": (1, 1, 2, 2, 4, 4), "num_res_blocks": 2, **overrides})


def dg_head(in_channels, num_classes=None, **overrides):
    """DG's trainable head on 8x8 features: one level of width 128, 2 ResBlocks with attention, middle block,
    attention pool -> 1 logit. The released conditional heads use num_classes=1000 (CIFAR-10 uses rows 0-9)."""
    return adm_classifier(**{"image_size": 8, "channel_mult": (1,), "num_res_blocks": 2, "in_channels": in_channels,
                              "out_channels": 1, "num_classes": num_classes, **overrides})
