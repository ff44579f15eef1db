"""ADM's noise predictor: guided-diffusion's `UNetModel`, the score model of ADM-G++.

The names and shapes of the parameters are those of guided-diffusion's module tree, so OpenAI's released plain
state dicts (`256x256_diffusion.pt`, class-conditional, and `256x256_diffusion_uncond.pt` with num_classes=None)
load with `strict=True`. The building blocks are those of the encoder in nets/adm.py; attention uses the legacy
qkv order and num_head_channels, as every 256 and 512 model (not the 64x64 model, which uses the new order).
The network predicts, from x_k at the DDPM timestep k and a class label y, the noise eps (channels 0..C-1)
and, with learn_sigma (out_channels = 2C), the learned-range variance interpolation v in [-1, 1] (channels C..2C-1).
"""

import torch
import torch.nn.functional as F
from torch import nn

from dg_lightning.nets.adm import (
    ADMTrunk,
    AttentionBlock,
    GroupNorm32,
    TimestepEmbedSequential,
    check_inputs,
    zero_init,
)


class Upsample(nn.Module):
    """Nearest-neighbour 2x up-sampling then a 3x3 convolution, ADM's up-sampling when resblock_updown is False."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(ADMTrunk):
    """ADM's U-Net (guided-diffusion `UNetModel`): (x_k [B, C, H, W], timesteps k (B,), y (B,)) -> [B, out_channels, H, W].

    The down half (stem conv, per-level ResBlocks with attention at the factors in attention_resolutions,
    down-sampling between levels, middle block) is the encoder's. The up half mirrors it: per level, from the
    deepest, num_res_blocks + 1 ResBlocks each taking the concatenation [h, skip] of the current map and the
    output of the matching input block (popped last-in first-out), attention at the same factors, and a 2x
    up-sampling after the level's last block (a ResBlock with up=True if resblock_updown, else Upsample).
    The head is GN, SiLU and a zero-initialised 3x3 conv, so a fresh network outputs 0. Time enters through the
    sinusoidal embedding and a 2-layer MLP of width 4 * model_channels, plus a class embedding with num_classes.
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
        num_classes=None,
    ):
        super().__init__(image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                         channel_mult, num_head_channels, use_scale_shift_norm, resblock_updown, num_classes)
        widths, skip_channels, factor, res_block = self.widths, list(self.skip_channels), self.factor, self.res_block
        channels = widths[-1]
        blocks = []
        for level in reversed(range(len(widths))):
            for index in range(num_res_blocks + 1):
                layers = [res_block(channels + skip_channels.pop(), out_channels=widths[level])]
                channels = widths[level]
                if factor in attention_resolutions:
                    layers.append(AttentionBlock(channels, num_head_channels))
                if level and index == num_res_blocks:
                    up = res_block(channels, out_channels=channels, up=True) if resblock_updown else Upsample(channels)
                    layers.append(up)
                    factor //= 2
                blocks.append(TimestepEmbedSequential(*layers))
        self.output_blocks = nn.ModuleList(blocks)
        self.out = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), zero_init(nn.Conv2d(channels, out_channels, 3, padding=1))
        )

    def forward(self, x, timesteps, y=None):
        """Output [B, out_channels, image_size, image_size] (eps, then v with learn_sigma) of x [B, in_channels,
        image_size, image_size] at DDPM timesteps (B,) (fractional allowed) and integer labels y (B,)."""
        check_inputs(self, x, timesteps, y, labels_name="y (class labels)")
        emb = self.embed(timesteps, y)
        h, skips = self.down(x, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


def adm256_cond(**overrides):
    """OpenAI's `256x256_diffusion.pt`: width 256, depth 2, mult (1,1,2,2,4,4), 64-channel heads, attention at
    resolutions 32, 16, 8 (down-sampling factors 8, 16, 32), scale-shift norm, ResBlock up/down-sampling,
    learn_sigma (6 output channels), 1000 classes; num_classes=None gives `256x256_diffusion_uncond.pt`."""
    config = {
        "image_size": 256,
        "in_channels": 3,
        "model_channels": 256,
        "out_channels": 6,
        "num_res_blocks": 2,
        "attention_resolutions": tuple(256 // r for r in (32, 16, 8)),
        "channel_mult": (1, 1, 2, 2, 4, 4),
        "num_classes": 1000,
    }
    return UNet(**{**config, **overrides})
