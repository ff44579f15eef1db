"""score_sde's NCSN++ network (Song et al. 2021) in its DDPM++ configuration, as Soft Truncation (Kim et al. 2022)
trained it on CelebA 64 and LSGM (Vahdat et al. 2021) on CIFAR-10 latents, and the continuous-time VP scores they
parametrise.

Written from the architecture description, with score_sde's module tree: one ModuleList `all_modules` in the order
upstream builds it, the blocks' parameter names (GroupNorm_0, Conv_0, Dense_0, NIN_0.W, ...) and the VE noise-level
buffer `sigmas` upstream registers (unused in this configuration), so that a released state dict loads with strict=True.

The configuration (Soft Truncation's configs/vp/CELEBA/ddpmpp_fid_st.py and ddpmpp_nll_st.py, whose networks are the
same): sinusoidal embedding of the time label 999 t, BigGAN residual blocks that do the 2x down/upsampling themselves
(2x2 mean / nearest-neighbour copy, no FIR filter), no progressive input or output paths, residual sums scaled by
1/sqrt(2), single-head attention at the attn_resolutions, GroupNorm over min(C / 4, 32) groups with eps 1e-6, SiLU.

LSGM's score model (its score_sde/ncsnpp.py with the CIFAR-10 run's args) is the same network on 180-channel 16x16
latents, with three differences: the BigGAN blocks resample with the FIR filter [1, 3, 3, 1] (fir=True), the time
embedding has its own width (embedding_dim 128, not nf) and the time label is 1000 t; it has no `sigmas` buffer and
adds the mixing logit of its mixed score prediction (LSGMScore).
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dg_lightning.nets.attention import image_tokens, tokens_to_image
from dg_lightning.sde import LinearVP

SKIP_SCALE = 1 / math.sqrt(2)  # skip_rescale: (skip + residual) / sqrt(2)

# score_sde config options that this network fixes to the released values; any other value is refused.
RELEASED_OPTIONS = dict(resblock_type="biggan", embedding_type="positional", progressive="none",
                        progressive_input="none", progressive_combine="sum", skip_rescale=True,
                        conditional=True, centered=True, scale_by_sigma=False, attention_type="ddpm",
                        nonlinearity="swish", normalization="GroupNorm", resamp_with_conv=True,
                        auxiliary_resblock=True, attention=True, fourier_feature=False, lsgm=False)

# Soft Truncation's CelebA 64 network (configs/vp/CELEBA/ddpmpp_fid_st.py on configs/default_celeba_configs.py).
CELEBA64 = dict(img_resolution=64, in_channels=3, nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4,
                attn_resolutions=(16,), dropout=0.1, sigma_min=0.01, sigma_max=90.0, num_scales=1000)
ST_TIME_SCALE = 999  # Soft Truncation's time label 999 t (score_sde's continuous VP models)

# LSGM's CIFAR-10 score model ("best FID" run: num_channels_dae 512, num_scales_dae 3, num_cell_per_scale_dae 8,
# dropout 0.2, fir, embedding_dim 128) on the NVAE's 20 x 9 = 180 latent channels at 16x16.
LSGM_CIFAR10 = dict(img_resolution=16, in_channels=180, nf=512, ch_mult=(1, 1, 1), num_res_blocks=8,
                    attn_resolutions=(16,), dropout=0.2, fir=True, embedding_dim=128, sigmas_buffer=False)
LSGM_TIME_SCALE = 1000  # LSGM's embedding_scale: time label 1000 t

FIR_KERNEL = (1.0, 3.0, 3.0, 1.0)  # score_sde's fir_kernel


def ddpm_init_(weight, scale=1.0):
    """DDPM's initialisation in place: U(-b, b), b = sqrt(3 scale / fan_avg) (scale 0 means 1e-10, as upstream)."""
    return nn.init.xavier_uniform_(weight, gain=math.sqrt(scale or 1e-10))


def conv(in_channels, out_channels, kernel, init_scale=1.0):
    """A kernel x kernel convolution keeping the size (padding kernel // 2), DDPM-initialised with zero bias."""
    layer = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)
    ddpm_init_(layer.weight, init_scale)
    nn.init.zeros_(layer.bias)
    return layer


def dense(in_features, out_features):
    """A fully connected layer, DDPM-initialised with zero bias."""
    layer = nn.Linear(in_features, out_features)
    ddpm_init_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def group_norm(channels):
    """score_sde's GroupNorm: min(C // 4, 32) groups, eps 1e-6."""
    return nn.GroupNorm(min(channels // 4, 32), channels, eps=1e-6)


def fir_filter(x):
    """The 2-D FIR filter outer(k, k) / sum(k)^2 of FIR_KERNEL as a depthwise kernel [C, 1, 4, 4] in x's dtype."""
    k = torch.tensor(FIR_KERNEL, dtype=x.dtype, device=x.device)
    return (torch.outer(k, k) / k.sum() ** 2).repeat(x.shape[1], 1, 1, 1)


def fir_downsample(x):
    """score_sde's downsample_2d with FIR_KERNEL: each channel filtered by fir_filter on x zero-padded by 1 pixel, taken
    at stride 2 ([B, C, H, W] -> [B, C, H/2, W/2]; a constant image stays constant away from the border)."""
    return F.conv2d(F.pad(x, (1, 1, 1, 1)), fir_filter(x), stride=2, groups=x.shape[1])


def fir_upsample(x):
    """score_sde's upsample_2d with FIR_KERNEL: x zero-stuffed 2x and filtered by 4 fir_filter, per channel, i.e. the
    transposed convolution of stride 2 and padding 1 ([B, C, H, W] -> [B, C, 2H, 2W])."""
    return F.conv_transpose2d(x, 4 * fir_filter(x), stride=2, padding=1, groups=x.shape[1])


def sinusoidal_embedding(labels, dim, max_positions=10000):
    """score_sde's embedding of (fractional) labels l (B,): [sin(l f_i), cos(l f_i)], f_i = max_positions^(-i / (dim/2 - 1))
    for i < dim / 2, in the labels' dtype."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=labels.dtype, device=labels.device) * (-math.log(max_positions) / (half - 1)))
    args = labels[:, None] * freqs
    return torch.cat([args.sin(), args.cos()], dim=1)


class NIN(nn.Module):
    """Per-token linear map over channels, tokens W + b, with W stored [in, out] (score_sde's "network in network")."""

    def __init__(self, in_channels, out_channels, init_scale=0.1):
        super().__init__()
        self.W = nn.Parameter(ddpm_init_(torch.empty(in_channels, out_channels), init_scale))
        self.b = nn.Parameter(torch.zeros(out_channels))

    def forward(self, tokens):
        return tokens @ self.W + self.b


class AttnBlock(nn.Module):
    """DDPM's single-head self-attention over the pixels: (x + NIN_3(softmax(q k^T / sqrt(C)) v)) / sqrt(2), with
    q, k, v = NIN_0, NIN_1, NIN_2 of GroupNorm_0(x)."""

    def __init__(self, channels):
        super().__init__()
        self.GroupNorm_0 = group_norm(channels)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=0.0)

    def forward(self, x):
        tokens = image_tokens(self.GroupNorm_0(x))
        h = F.scaled_dot_product_attention(self.NIN_0(tokens), self.NIN_1(tokens), self.NIN_2(tokens))
        return (x + tokens_to_image(self.NIN_3(h), *x.shape[2:])) * SKIP_SCALE


class ResBlock(nn.Module):
    """BigGAN residual block: (skip(r(x)) + Conv_1(dropout(silu(GroupNorm_1(Conv_0(r(silu(GroupNorm_0(x))))
    + Dense_0(emb)))))) / sqrt(2), with r a 2x up- or downsampling (nearest-neighbour copy and 2x2 mean, or with fir
    fir_upsample and fir_downsample) or the identity, and skip the 1x1 convolution Conv_2 when the block changes the
    channels or resamples, else the identity. emb is the silu of the time embedding."""

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, dropout=0.0, fir=False):
        super().__init__()
        self.up, self.down, self.dropout, self.fir = up, down, dropout, fir
        self.GroupNorm_0 = group_norm(in_channels)
        self.Conv_0 = conv(in_channels, out_channels, 3)
        self.Dense_0 = dense(emb_channels, out_channels)
        self.GroupNorm_1 = group_norm(out_channels)
        self.Conv_1 = conv(out_channels, out_channels, 3, init_scale=0.0)
        self.Conv_2 = conv(in_channels, out_channels, 1) if in_channels != out_channels or up or down else None

    def resample(self, x):
        """x doubled (nearest neighbour or FIR), halved (2x2 mean or FIR) or unchanged."""
        if self.up:
            return fir_upsample(x) if self.fir else F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return fir_downsample(x) if self.fir else F.avg_pool2d(x, 2)
        return x

    def forward(self, x, emb):
        h = self.Conv_0(self.resample(F.silu(self.GroupNorm_0(x)))) + self.Dense_0(emb)[:, :, None, None]
        h = self.Conv_1(F.dropout(F.silu(self.GroupNorm_1(h)), p=self.dropout, training=self.training))
        x = self.resample(x)
        return ((x if self.Conv_2 is None else self.Conv_2(x)) + h) * SKIP_SCALE


class NCSNpp(nn.Module):
    """score_sde's NCSN++ U-Net in the DDPM++ configuration: F(x, labels) for images x [B, C, H, W] in [-1, 1] (centered
    data) or latents, and time labels (B,) (999 t for a continuous-time VP model, 1000 t for LSGM's).

    all_modules holds, in order: the two embedding layers, the input convolution, per resolution num_res_blocks
    ResBlocks (each followed by an AttnBlock at attn_resolutions) and a downsampling ResBlock (not at the lowest),
    ResBlock, AttnBlock, ResBlock in the middle, per resolution upwards num_res_blocks + 1 ResBlocks on the input
    concatenated with an encoder activation, an AttnBlock at attn_resolutions and an upsampling ResBlock (not at the
    highest), then GroupNorm, silu and the output convolution. `roles` says what forward does with each after the
    embedding. The sinusoidal time embedding has embedding_dim channels (default nf) and the ResBlocks take
    4 embedding_dim; fir makes the resampling ResBlocks use the FIR filter. With sigmas_buffer, `sigmas` is upstream's
    VE noise-level buffer exp(linspace(ln sigma_max, ln sigma_min, num_scales)), kept for the state dict only.
    `options` are score_sde config options; only their released values (RELEASED_OPTIONS) are accepted.
    """

    def __init__(self, img_resolution, in_channels, nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4,
                 attn_resolutions=(16,), dropout=0.1, sigma_min=0.01, sigma_max=90.0, num_scales=1000, fir=False,
                 embedding_dim=None, sigmas_buffer=True, **options):
        super().__init__()
        for name, value in options.items():
            if name not in RELEASED_OPTIONS:
                raise ValueError(f"NCSNpp: unknown option {name!r}; the options are {sorted(RELEASED_OPTIONS)}")
            if value != RELEASED_OPTIONS[name]:
                raise ValueError(f"NCSNpp: {name}={value!r} is not supported; only the released DDPM++ configuration "
                                 f"{name}={RELEASED_OPTIONS[name]!r} is implemented")
        if img_resolution % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"NCSNpp: img_resolution must be divisible by 2^(len(ch_mult) - 1) = "
                             f"{2 ** (len(ch_mult) - 1)}, got {img_resolution} with ch_mult={tuple(ch_mult)}")
        embedding_dim = nf if embedding_dim is None else embedding_dim
        if embedding_dim % 2:
            raise ValueError(f"NCSNpp: the time embedding width must be even (embedding_dim, default nf), got "
                             f"{embedding_dim}")
        self.img_resolution, self.in_channels = img_resolution, in_channels
        self.nf, self.embedding_dim = nf, embedding_dim
        if sigmas_buffer:
            sigmas = np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), num_scales))
            self.register_buffer("sigmas", torch.from_numpy(sigmas))
        emb_channels = 4 * embedding_dim
        block = dict(emb_channels=emb_channels, dropout=dropout, fir=fir)
        modules, roles = [dense(embedding_dim, emb_channels), dense(emb_channels, emb_channels)], []

        def add(role, module):
            """Append module to all_modules with its role in forward."""
            modules.append(module)
            roles.append(role)

        add("encoder", conv(in_channels, nf, 3))
        skips, channels = [nf], nf
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                add("encoder", ResBlock(channels, nf * mult, **block))
                channels = nf * mult
                if img_resolution >> level in attn_resolutions:
                    add("encoder_attn", AttnBlock(channels))
                skips.append(channels)
            if level < len(ch_mult) - 1:
                add("encoder", ResBlock(channels, channels, down=True, **block))
                skips.append(channels)
        add("plain", ResBlock(channels, channels, **block))
        add("plain", AttnBlock(channels))
        add("plain", ResBlock(channels, channels, **block))
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                add("decoder", ResBlock(channels + skips.pop(), nf * mult, **block))
                channels = nf * mult
            if img_resolution >> level in attn_resolutions:
                add("plain", AttnBlock(channels))
            if level > 0:
                add("plain", ResBlock(channels, channels, up=True, **block))
        add("out_norm", group_norm(channels))
        add("plain", conv(channels, in_channels, 3, init_scale=0.0))
        self.all_modules = nn.ModuleList(modules)
        self.roles = tuple(roles)

    def embed(self, labels):
        """silu of the time embedding every ResBlock takes: silu(dense1(silu(dense0(sinusoidal(labels)))))."""
        dense0, dense1 = self.all_modules[0], self.all_modules[1]
        emb = sinusoidal_embedding(labels.to(dense0.weight.dtype), self.embedding_dim)
        return F.silu(dense1(F.silu(dense0(emb))))

    def forward(self, x, labels):
        emb = self.embed(labels)
        h, skips = x, []
        for role, module in zip(self.roles, self.all_modules[2:]):
            if role == "decoder":
                h = torch.cat([h, skips.pop()], dim=1)
            h = module(h, emb) if isinstance(module, ResBlock) else module(h)
            if role == "encoder":
                skips.append(h)
            elif role == "encoder_attn":
                skips[-1] = h
            elif role == "out_norm":
                h = F.silu(h)
        return h


def celeba64(**overrides):
    """Soft Truncation's CelebA 64 NCSN++ (CELEBA64), its arguments changed by overrides (tiny test networks)."""
    return NCSNpp(**{**CELEBA64, **overrides})


def lsgm_cifar10(**overrides):
    """LSGM's CIFAR-10 latent score model (LSGMScore on LSGM_CIFAR10), its arguments changed by overrides (tiny test
    networks)."""
    return LSGMScore(**{**LSGM_CIFAR10, **overrides})


def batch_times(t, x):
    """The time t (a number or a tensor of shape () or (B,)) as a tensor (B,) for the batch x [B, ...]."""
    return torch.broadcast_to(torch.as_tensor(t, device=x.device), x.shape[:1])


class VPScore(nn.Module):
    """The continuous-time VP score of a network trained with score_sde's ddpm_score parametrisation:
    s(x, t) = grad_x log p_t(x) = -net(x, 999 t) / sigma_vp(t), x in LVP coordinates (linear VP, beta 0.1 to 20), t (B,)
    in (0, 1]. A score model of kind "vp_score" (solvers.SCORE_KINDS); unconditional (label_dim 0)."""

    kind = "vp_score"

    def __init__(self, net, vp: LinearVP = LinearVP()):
        super().__init__()
        self.net, self.vp = net, vp
        self.img_resolution, self.img_channels, self.label_dim = net.img_resolution, net.in_channels, 0

    def forward(self, x, t, class_labels=None):
        if class_labels is not None:
            raise ValueError("class_labels must be None: this VP score model is unconditional (label_dim=0)")
        t = batch_times(t, x)
        return -self.net(x, ST_TIME_SCALE * t) / self.vp.sigma(t).to(x.dtype)[:, None, None, None]


class LSGMScore(NCSNpp):
    """LSGM's latent score model: the NCSN++ eps_theta(z, 1000 t) plus its mixing logit m (1, C, 1, 1), first in the
    state dict as in upstream's dae_state_dict. The mixed noise prediction (1 - sigmoid(m)) sigma_t z
    + sigmoid(m) eps_theta mixes in the noise of an N(0, I) latent distribution, so the score on latents z (LVP
    coordinates, linear VP beta 0.1 to 20, t (B,) in (0, 1]) is
      s(z, t) = -(1 - sigmoid(m)) z - sigmoid(m) eps_theta(z, 1000 t) / sigma_vp(t).
    sigma_vp is LinearVP's expm1 form; upstream's 1 - exp(.) in float32 loses digits at small t (a relative error of
    about 1e-4 in sigma at t = 1e-3). A score model of kind "vp_score" (solvers.SCORE_KINDS); unconditional
    (label_dim 0). `net_args` are NCSNpp's; mixing_logit_init is upstream's initial m (the checkpoint replaces it)."""

    kind = "vp_score"

    def __init__(self, vp: LinearVP = LinearVP(), mixing_logit_init=-3.0, **net_args):
        super().__init__(**net_args)
        self.mixing_logit = nn.Parameter(torch.full((1, self.in_channels, 1, 1), float(mixing_logit_init)))
        self.vp, self.img_channels, self.label_dim = vp, self.in_channels, 0

    def eps(self, z, t):
        """The network's noise prediction eps_theta(z, 1000 t) for latents z [B, C, H, W] and times t (B,)."""
        return super().forward(z, LSGM_TIME_SCALE * t)

    def forward(self, z, t, class_labels=None):
        if class_labels is not None:
            raise ValueError("class_labels must be None: LSGM's score model is unconditional (label_dim=0)")
        t = batch_times(t, z)
        coeff = torch.sigmoid(self.mixing_logit)
        sigma = self.vp.sigma(t).to(z.dtype)[:, None, None, None]
        return -(1 - coeff) * z - coeff * self.eps(z, t) / sigma
