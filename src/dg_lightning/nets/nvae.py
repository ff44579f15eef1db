"""NVAE (Vahdat & Kautz 2020), the hierarchical VAE whose latent space LSGM (Vahdat et al. 2021) models, in the
configuration of LSGM's released CIFAR-10 checkpoint (its `vae_state_dict`).

Written from the architecture description, with upstream's module tree and parameter names (stem, pre_process,
enc_tower, enc_sampler, eps_conv, dec_tower, post_process, image_conditional, prior_ftr0; bn_act, conv_0,
log_weight_norm, se.se.0, ...) so that the released state dict loads with strict=True.

The configuration: one latent scale at 16x16 holding 20 groups of 9 channels, residual cells of two
(BatchNorm, swish, weight-normalised 3x3 convolution) operations with squeeze-and-excitation, added to the skip as
skip + 0.1 branch, BatchNorm with its running statistics in eval mode, and a 10-component discretized mixture of
logistics over RGB as the decoder's output distribution, of which decode returns the mean. Images are in [-1, 1].
"""

import torch
import torch.nn.functional as F
from torch import nn

RESIDUAL_SCALE = 0.1  # cell output: skip(x) + 0.1 SE(ops(x))
WEIGHT_NORM_EPS = 1e-5  # w / (||w|| + eps), the eps outside the square root
BN_EPS, BN_MOMENTUM = 1e-5, 0.05
LOG_SIGMA_SCALE = 5.0  # soft clamp a tanh(x / a) of the posterior's mu and log sigma
NUM_MIXTURES = 10  # components of the discretized mixture of logistics

# LSGM's CIFAR-10 NVAE (README vae2 / lsgm2: num_channels_enc = num_channels_dec = 128, channel_mult [1, 2],
# num_groups_per_scale 20, num_latent_per_group 9, num_cell_per_cond_{enc,dec} 2, num_{pre,post}process_cells 2 in one
# block, arch_instance res_bnswish, use_se, decoder_dist dml).
CIFAR10 = dict(img_resolution=32, img_channels=3, channels=128, channel_mult=(1, 2), num_groups=20,
               latent_per_group=9, cells_per_group=2, pre_cells=2, post_cells=2, use_se=True)


def soft_clamp(x, scale=LOG_SIGMA_SCALE):
    """The smooth clamp of x to (-scale, scale): scale tanh(x / scale)."""
    return x.div(scale).tanh().mul(scale)


class WNConv2d(nn.Conv2d):
    """A convolution with weight normalisation: it applies exp(log_weight_norm) w / (||w||_2 + 1e-5), the norm taken
    per output channel; padding kernel // 2 (size kept at stride 1)."""

    def __init__(self, in_channels, out_channels, kernel, stride=1, bias=True):
        super().__init__(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=bias)
        with torch.no_grad():
            init = self.weight.square().sum((1, 2, 3), keepdim=True).sqrt()
        self.log_weight_norm = nn.Parameter(torch.log(init + 1e-2))

    def normalized_weight(self):
        """The effective kernel exp(log_weight_norm) w / (||w|| + eps)."""
        norm = self.weight.square().sum((1, 2, 3), keepdim=True).sqrt()
        return torch.exp(self.log_weight_norm) * self.weight / (norm + WEIGHT_NORM_EPS)

    def forward(self, x):
        return self._conv_forward(x, self.normalized_weight(), self.bias)


class BNSwish(nn.BatchNorm2d):
    """BatchNorm (eps 1e-5; running statistics in eval mode) followed by swish x sigmoid(x)."""

    def __init__(self, channels):
        super().__init__(channels, eps=BN_EPS, momentum=BN_MOMENTUM)

    def forward(self, x):
        return F.silu(super().forward(x))


class BNSwishConv(nn.Module):
    """One operation of a residual cell: conv_0(r(bn_act(x))), conv_0 a 3x3 weight-normalised convolution with bias at
    stride 2 (down) or 1, r a 2x nearest-neighbour copy (up) or the identity."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.upsample = stride == -1
        self.bn_act = BNSwish(in_channels)
        self.conv_0 = WNConv2d(in_channels, out_channels, 3, stride=abs(stride))

    def forward(self, x):
        x = self.bn_act(x)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv_0(x)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: x sigmoid(se.2(relu(se.0(mean_hw(x))))), the gate computed in at least float32."""

    def __init__(self, channels):
        super().__init__()
        hidden = max(channels // 16, 4)
        self.se = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x):
        squeezed = x.mean((2, 3)).to(torch.promote_types(x.dtype, torch.float32))
        with torch.autocast(x.device.type, enabled=False):
            gate = self.se(squeezed)
        return x * gate[:, :, None, None]


class FactorizedReduce(nn.Module):
    """The skip of a downsampling cell: swish, then four 1x1 stride-2 weight-normalised convolutions (C_out / 4
    channels each, the last taking the remainder) of x, x[1:, 1:], x[:, 1:] and x[1:, :] (rows, columns), concatenated
    in that order."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        if out_channels % 2:
            raise ValueError(f"FactorizedReduce: out_channels must be even, got {out_channels}")
        quarter = out_channels // 4
        self.conv_1 = WNConv2d(in_channels, quarter, 1, stride=2)
        self.conv_2 = WNConv2d(in_channels, quarter, 1, stride=2)
        self.conv_3 = WNConv2d(in_channels, quarter, 1, stride=2)
        self.conv_4 = WNConv2d(in_channels, out_channels - 3 * quarter, 1, stride=2)

    def forward(self, x):
        x = F.silu(x)
        return torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:]), self.conv_3(x[:, :, :, 1:]),
                          self.conv_4(x[:, :, 1:, :])], dim=1)


def up_skip(in_channels, out_channels):
    """The skip of an upsampling cell: 2x bilinear upsampling (align_corners=True), then a 1x1 weight-normalised
    convolution without bias (keys skip.1.*)."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                         WNConv2d(in_channels, out_channels, 1, bias=False))


class Cell(nn.Module):
    """NVAE's residual cell: skip(x) + 0.1 se(_ops.1(_ops.0(x))). stride 1 (normal: identity skip), 2 (down:
    factorized-reduce skip) or -1 (up: bilinear skip); _ops.0 carries the stride and the change of channels."""

    def __init__(self, in_channels, out_channels, stride=1, use_se=True):
        super().__init__()
        if stride == 1 and in_channels != out_channels:
            raise ValueError(f"Cell: a stride-1 cell keeps the channels, got {in_channels} -> {out_channels}")
        skips = {1: nn.Identity, 2: FactorizedReduce, -1: up_skip}
        if stride not in skips:
            raise ValueError(f"Cell: stride must be 1, 2 (down) or -1 (up), got {stride}")
        self.skip = skips[stride]() if stride == 1 else skips[stride](in_channels, out_channels)
        self._ops = nn.ModuleList([BNSwishConv(in_channels, out_channels, stride),
                                   BNSwishConv(out_channels, out_channels)])
        self.se = SqueezeExcite(out_channels) if use_se else nn.Identity()

    def forward(self, x):
        h = x
        for op in self._ops:
            h = op(h)
        return self.skip(x) + RESIDUAL_SCALE * self.se(h)


class EncCombinerCell(nn.Module):
    """Encoder combiner: the recorded encoder state x plus conv(decoder state d), conv 1x1 weight-normalised."""

    def __init__(self, enc_channels, dec_channels):
        super().__init__()
        self.conv = WNConv2d(dec_channels, enc_channels, 1)

    def forward(self, x, d):
        return x + self.conv(d)


class DecCombinerCell(nn.Module):
    """Decoder combiner: conv(cat[d, z]) of the decoder state d and the embedded latent group z, conv 1x1
    weight-normalised back to d's channels."""

    def __init__(self, channels, latent_channels):
        super().__init__()
        self.conv = WNConv2d(channels + latent_channels, channels, 1)

    def forward(self, d, z):
        return self.conv(torch.cat([d, z], dim=1))


def posterior_sample(params, rho, scale=LOG_SIGMA_SCALE):
    """The posterior sample mu + exp(log sigma) rho of one latent group, [mu, log sigma] the two channel halves of
    params, each soft-clamped to (-scale, scale)."""
    mu, log_sigma = params.chunk(2, dim=1)
    return rho * soft_clamp(log_sigma, scale).exp() + soft_clamp(mu, scale)


def dml_mean(logits, num_mixtures=NUM_MIXTURES):
    """The mean image in [-1, 1] of NVAE's discretized mixture of logistics over RGB (B, 3, H, W) from its logits
    (B, 10 M, H, W): mixture weights pi = softmax(logits[:, :M]); channel 10... viewed as (B, 3, 3M, H, W) holding per
    colour the M means, M log-scales and M tanh-squashed autoregressive coefficients; with m, a their pi-averages,
    x0 = clamp(m0), x1 = clamp(m1 + a0 x0), x2 = clamp(m2 + a1 x0 + a2 x1), clamp to [-1, 1]."""
    batch, channels, height, width = logits.shape
    if channels != 10 * num_mixtures:
        raise ValueError(f"dml_mean: expected {10 * num_mixtures} logit channels for {num_mixtures} mixtures, "
                         f"got {channels}")
    weights = torch.softmax(logits[:, :num_mixtures], dim=1)[:, None]
    params = logits[:, num_mixtures:].reshape(batch, 3, 3 * num_mixtures, height, width)
    means = (params[:, :, :num_mixtures] * weights).sum(2)
    coeffs = (torch.tanh(params[:, :, 2 * num_mixtures:]) * weights).sum(2)
    x0 = means[:, 0].clamp(-1, 1)
    x1 = (means[:, 1] + coeffs[:, 0] * x0).clamp(-1, 1)
    x2 = (means[:, 2] + coeffs[:, 1] * x0 + coeffs[:, 2] * x1).clamp(-1, 1)
    return torch.stack([x0, x1, x2], dim=1)


class NVAE(nn.Module):
    """NVAE with one latent scale: images (B, img_channels, R, R) in [-1, 1] <-> latents (B, num_groups
    latent_per_group, r, r), r = R / 2^(len(channel_mult) - 1), channels 9g..9g+8 holding group g.

    stem (3x3) -> pre_process (per extra level: normal cells, then a down cell) -> enc_tower (per group
    cells_per_group cells, then an EncCombinerCell, except after the last group) at r x r. The decoder starts from the
    learned state prior_ftr0; dec_tower holds per group a DecCombinerCell and cells_per_group cells, eps_conv[g] embeds
    group g (3x3), enc_sampler[g] (ELU, 3x3) gives its posterior parameters; post_process (per level: an up cell, then
    normal cells) and image_conditional (ELU, 3x3) give the mixture-of-logistics logits.
    """

    def __init__(self, img_resolution=32, img_channels=3, channels=128, channel_mult=(1, 2), num_groups=20,
                 latent_per_group=9, cells_per_group=2, pre_cells=2, post_cells=2, use_se=True):
        super().__init__()
        levels = len(channel_mult) - 1
        if levels < 1 or img_resolution % 2 ** levels:
            raise ValueError(f"NVAE: channel_mult needs at least two levels and img_resolution divisible by "
                             f"2^(len(channel_mult) - 1); got img_resolution={img_resolution}, "
                             f"channel_mult={tuple(channel_mult)}")
        if img_channels != 3:
            raise ValueError(f"NVAE: the mixture-of-logistics decoder is RGB only, got img_channels={img_channels}")
        if min(num_groups, latent_per_group, cells_per_group, pre_cells, post_cells) < 1:
            raise ValueError("NVAE: num_groups, latent_per_group, cells_per_group, pre_cells and post_cells "
                             "must be >= 1")
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.num_groups, self.latent_per_group, self.cells_per_group = num_groups, latent_per_group, cells_per_group
        self.latent_channels, self.latent_resolution = num_groups * latent_per_group, img_resolution >> levels
        width = [channels * m for m in channel_mult]
        top = width[-1]
        cell = dict(use_se=use_se)

        self.prior_ftr0 = nn.Parameter(torch.rand(top, self.latent_resolution, self.latent_resolution))
        self.stem = WNConv2d(img_channels, width[0], 3)
        self.pre_process = nn.ModuleList()
        for level in range(levels):
            self.pre_process.extend(Cell(width[level], width[level], **cell) for _ in range(pre_cells - 1))
            self.pre_process.append(Cell(width[level], width[level + 1], stride=2, **cell))
        self.enc_tower = nn.ModuleList()
        for group in range(num_groups):
            self.enc_tower.extend(Cell(top, top, **cell) for _ in range(cells_per_group))
            if group < num_groups - 1:
                self.enc_tower.append(EncCombinerCell(top, top))
        self.enc_sampler = nn.ModuleList(nn.Sequential(nn.ELU(), WNConv2d(top, 2 * latent_per_group, 3))
                                         for _ in range(num_groups))
        self.eps_conv = nn.ModuleList(WNConv2d(latent_per_group, latent_per_group, 3) for _ in range(num_groups))
        self.dec_tower = nn.ModuleList()
        for _ in range(num_groups):
            self.dec_tower.append(DecCombinerCell(top, latent_per_group))
            self.dec_tower.extend(Cell(top, top, **cell) for _ in range(cells_per_group))
        self.post_process = nn.ModuleList()
        for level in reversed(range(levels)):
            self.post_process.append(Cell(width[level + 1], width[level], stride=-1, **cell))
            self.post_process.extend(Cell(width[level], width[level], **cell) for _ in range(post_cells - 1))
        self.image_conditional = nn.Sequential(nn.ELU(), WNConv2d(width[0], 10 * NUM_MIXTURES, 3))

    def check_shape(self, name, x, channels, resolution):
        """Refuse x unless it is (B, channels, resolution, resolution)."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (channels, resolution, resolution):
            raise ValueError(f"NVAE: {name} must be (B, {channels}, {resolution}, {resolution}), "
                             f"got {tuple(x.shape)}")

    def decoder_step(self, d, group, latent):
        """The decoder state after group `group`: its combiner on (d, eps_conv(latent)), then its cells."""
        start = group * (self.cells_per_group + 1)
        d = self.dec_tower[start](d, self.eps_conv[group](latent))
        for cell in self.dec_tower[start + 1:start + 1 + self.cells_per_group]:
            d = cell(d)
        return d

    def initial_state(self, batch):
        """The decoder's input, prior_ftr0 broadcast over the batch."""
        return self.prior_ftr0.expand(batch, -1, -1, -1)

    def encode(self, images, noise=None):
        """Latents (B, latent_channels, r, r) of images in [-1, 1]: per group g the posterior sample mu_g + sigma_g
        rho_g, rho_g = noise[:, 9g:9g+9] (drawn N(0, I) when noise is None). The encoder is bidirectional: the
        combiner recorded after group G-1-g's cells adds the decoder state that groups < g produce."""
        self.check_shape("images", images, self.img_channels, self.img_resolution)
        shape = (self.latent_channels, self.latent_resolution, self.latent_resolution)
        if noise is None:
            noise = torch.randn(images.shape[:1] + shape, dtype=images.dtype, device=images.device)
        self.check_shape("noise", noise, *shape[:2])
        if noise.shape[0] != images.shape[0]:
            raise ValueError(f"NVAE: noise has batch {noise.shape[0]}, images {images.shape[0]}")
        s = self.stem(images)
        for cell in self.pre_process:
            s = cell(s)
        recorded = []  # (combiner, encoder state) in tower order
        for module in self.enc_tower:
            if isinstance(module, EncCombinerCell):
                recorded.append((module, s))
            else:
                s = module(s)
        d, latents = self.initial_state(images.shape[0]), []
        for group, rho in enumerate(noise.chunk(self.num_groups, dim=1)):
            if group > 0:
                combiner, state = recorded[self.num_groups - 1 - group]
                s = combiner(state, d)
            latents.append(posterior_sample(self.enc_sampler[group](s), rho))
            d = self.decoder_step(d, group, latents[-1])
        return torch.cat(latents, dim=1)

    def decoder_logits(self, latents):
        """The mixture-of-logistics logits (B, 100, R, R) of latents (B, latent_channels, r, r)."""
        self.check_shape("latents", latents, self.latent_channels, self.latent_resolution)
        d = self.initial_state(latents.shape[0])
        for group, latent in enumerate(latents.chunk(self.num_groups, dim=1)):
            d = self.decoder_step(d, group, latent)
        for cell in self.post_process:
            d = cell(d)
        return self.image_conditional(d)

    def decode(self, latents):
        """Images in [-1, 1] (B, 3, R, R): the mean of the decoder's mixture of logistics given latents."""
        return dml_mean(self.decoder_logits(latents))


def cifar10(**overrides):
    """LSGM's CIFAR-10 NVAE (CIFAR10), its arguments changed by overrides (tiny test networks)."""
    return NVAE(**{**CIFAR10, **overrides})
