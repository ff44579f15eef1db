"""EDM's denoisers (Karras et al. 2022): the DDPM++/NCSN++ and ADM U-Nets and their preconditioners.

Written from the published architecture description, with EDM's module
tree, parameter/buffer names and constructor arguments, so that the state dict of a released EDM pickle
loads with strict=True and the `_init_kwargs` recorded in it can be passed straight to the constructor.

A preconditioner wraps a U-Net F into the denoiser D(x; sigma) = c_skip x + c_out F(c_in x, c_noise),
the estimate of the clean image underlying x = x0 + sigma n.
"""

import contextlib
import math

import torch
from torch.nn.functional import avg_pool2d, interpolate, silu

from dg_lightning.nets.attention import image_tokens, packed_attention, tokens_to_image


def _draw(shape, mode, fan_in, fan_out, gain):
    """EDM's initial values times gain: U(-b, b) with b = sqrt(6 / (fan_in + fan_out)) (xavier_uniform) or
    sqrt(3 / fan_in) (kaiming_uniform), or N(0, 1 / fan_in) (kaiming_normal)."""
    if mode == "xavier_uniform":
        bound = gain * math.sqrt(6 / (fan_in + fan_out))
        return torch.empty(shape).uniform_(-bound, bound)
    if mode == "kaiming_uniform":
        bound = gain * math.sqrt(3 / fan_in)
        return torch.empty(shape).uniform_(-bound, bound)
    if mode == "kaiming_normal":
        return torch.empty(shape).normal_(0, gain * math.sqrt(1 / fan_in))
    raise ValueError(f"init_mode must be 'xavier_uniform', 'kaiming_uniform' or 'kaiming_normal', got {mode!r}")


class Linear(torch.nn.Module):
    """Fully connected layer x W^T + b; W and b are `init_weight` and `init_bias` times a draw of `init_mode`."""

    def __init__(self, in_features, out_features, bias=True, init_mode="kaiming_normal", init_weight=1.0,
                 init_bias=0.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = (init_mode, in_features, out_features)
        self.weight = torch.nn.Parameter(_draw([out_features, in_features], *fans, init_weight))
        self.bias = torch.nn.Parameter(_draw([out_features], *fans, init_bias)) if bias else None

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


class Conv2d(torch.nn.Module):
    """k x k convolution (none when kernel = 0), optionally preceded by 2x up- or downsampling.

    Resampling is a depthwise convolution with the separable filter f f^T / (sum f)^2 (buffer
    `resample_filter`): [1, 3, 3, 1] FIR resampling; the box filter [1, 1] is 2x2 average pooling / nearest-neighbour
    upsampling and runs as those (the same map, without a depthwise convolution's slow kernels). With
    `fused_resample` (NCSN++'s residual encoder) the convolution comes first, at full resolution, and the filtered
    downsampling second. The bias is added in the convolution's output dtype, as upstream (bf16 under autocast).
    """

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False, resample_filter=(1, 1),
                 fused_resample=False, init_mode="kaiming_normal", init_weight=1.0, init_bias=0.0):
        super().__init__()
        if up and down:
            raise ValueError("Conv2d: up and down cannot both be True")
        if fused_resample and not (down and kernel):
            raise ValueError("Conv2d: fused_resample requires down=True and kernel > 0")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = (init_mode, in_channels * kernel * kernel, out_channels * kernel * kernel)
        shape = [out_channels, in_channels, kernel, kernel]
        self.weight = torch.nn.Parameter(_draw(shape, *fans, init_weight)) if kernel else None
        self.bias = torch.nn.Parameter(_draw([out_channels], *fans, init_bias)) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        self.register_buffer("resample_filter", (f.outer(f) / f.sum().square())[None, None] if up or down else None)
        self.box_filter = len(resample_filter) == 2 and float(resample_filter[0]) == float(resample_filter[1])

    def _resample(self, x, padding):
        """Depthwise 2x resampling of x with the filter (transposed, with gain 4, when upsampling)."""
        if self.box_filter:  # padding is 0 for a 2-tap filter
            return interpolate(x, scale_factor=2, mode="nearest") if self.up else avg_pool2d(x, 2)
        f = self.resample_filter.expand(x.shape[1], 1, -1, -1)
        if self.up:
            return torch.nn.functional.conv_transpose2d(x, 4 * f, groups=x.shape[1], stride=2, padding=padding)
        return torch.nn.functional.conv2d(x, f, groups=x.shape[1], stride=2, padding=padding)

    def forward(self, x):
        f_pad = (self.resample_filter.shape[-1] - 1) // 2 if self.resample_filter is not None else 0
        w_pad = self.weight.shape[-1] // 2 if self.weight is not None else 0
        if self.fused_resample:
            x = self._resample(torch.nn.functional.conv2d(x, self.weight, padding=w_pad + f_pad), padding=0)
        else:
            if self.up or self.down:
                x = self._resample(x, padding=f_pad)
            if self.weight is not None:
                x = torch.nn.functional.conv2d(x, self.weight, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype)[:, None, None]
        return x


def group_norm(num_channels, eps):
    """Group normalisation over min(32, C // 4) groups, EDM's choice."""
    return torch.nn.GroupNorm(min(32, num_channels // 4), num_channels, eps=eps)


def qkv_rows_head_first(param, num_heads):
    """The rows (dim 0) of EDM's qkv projection, laid out [head][channel][q, k, v], reordered to [head][q, k, v][channel]."""
    return param.unflatten(0, (num_heads, -1, 3)).transpose(1, 2).flatten(0, 2)


class UNetBlock(torch.nn.Module):
    """Residual block of both U-Nets, with optional 2x up/downsampling and multi-head self-attention.

    h = conv0(silu(norm0(x))); the embedding enters as h = silu(norm1(h + affine(emb))) (DDPM++/NCSN++)
    or, with `adaptive_scale` (ADM), as h = silu(shift + norm1(h) (1 + scale)) with (scale, shift) =
    affine(emb); then x = (conv1(dropout(h)) + skip(x)) skip_scale. Attention adds
    proj(softmax(q^T k / sqrt(c_head)) v) of norm2(x), again scaled by skip_scale. The channels of qkv
    are laid out [head][channel of head][q, k, v], as in EDM's checkpoints. `init`, `init_zero` (conv1 and
    proj, which close a residual branch) and `init_attn` (qkv; default `init`) are Linear/Conv2d init arguments.
    """

    def __init__(self, in_channels, out_channels, emb_channels, init, init_zero, init_attn=None, up=False, down=False,
                 num_heads=0, dropout=0.0, skip_scale=1.0, eps=1e-5, resample_filter=(1, 1), resample_proj=False,
                 adaptive_scale=True):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_heads = num_heads
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = group_norm(in_channels, eps)
        resample = dict(up=up, down=down, resample_filter=resample_filter)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, **resample, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = group_norm(out_channels, eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if in_channels != out_channels or up or down:
            kernel = 1 if resample_proj or in_channels != out_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, **resample, **init)
        if num_heads:
            self.norm2 = group_norm(out_channels, eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **(init if init_attn is None else init_attn))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def attention(self, x):
        """Multi-head dot-product self-attention over the pixels of x (before the output projection).

        The qkv rows [head][channel][q, k, v] are reordered to [head][q, k, v][channel] (a permutation of the weights,
        not of the activations), so the tokens' q, k, v come out with contiguous channels.
        """
        weight, bias = (None if p is None else qkv_rows_head_first(p, self.num_heads) for p in (self.qkv.weight, self.qkv.bias))
        qkv = torch.nn.functional.linear(image_tokens(x), weight.flatten(1), bias)
        return tokens_to_image(packed_attention(qkv, self.num_heads, heads_first=True), *x.shape[2:])

    def forward(self, x, emb):
        h = self.conv0(silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None]
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = silu(shift + self.norm1(h) * (scale + 1))
        else:
            h = silu(self.norm1(h + params))
        h = self.conv1(torch.nn.functional.dropout(h, p=self.dropout, training=self.training))
        x = (h + (self.skip(x) if self.skip is not None else x)) * self.skip_scale
        if self.num_heads:
            x = (self.proj(self.attention(self.norm2(x))) + x) * self.skip_scale
        return x


class PositionalEmbedding(torch.nn.Module):
    """Sinusoidal embedding [cos(x f_i), sin(x f_i)], f_i = (1 / max_positions)^(i / (C/2 - endpoint)), i < C/2."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - int(self.endpoint))
        x = x.outer((1 / self.max_positions) ** freqs)
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(torch.nn.Module):
    """Random Fourier features [cos(2 pi x f_i), sin(2 pi x f_i)], f_i ~ N(0, scale^2) stored in buffer `freqs`."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = x.outer(2 * math.pi * self.freqs)
        return torch.cat([x.cos(), x.sin()], dim=1)


def _check_resolution(img_resolution, channel_mult):
    """Raise unless img_resolution can be halved once per extra level of channel_mult."""
    factor = 2 ** (len(channel_mult) - 1)
    if img_resolution % factor:
        raise ValueError(f"img_resolution must be divisible by 2^(len(channel_mult) - 1) = {factor}, "
                         f"got {img_resolution} with channel_mult={list(channel_mult)}")


class SongUNet(torch.nn.Module):
    """DDPM++ / NCSN++ U-Net of Song et al. (2021) as re-implemented by EDM: F(x, c_noise, labels).

    DDPM++: embedding_type='positional', channel_mult_noise=1, encoder_type='standard', resample_filter=[1,1].
    NCSN++: embedding_type='fourier', channel_mult_noise=2, encoder_type='residual', resample_filter=[1,3,3,1].
    `augment_dim` > 0 adds EDM's `map_augment` layer so that checkpoints trained with augmentation load;
    like EDM at sampling time, no augmentation labels are fed, so it does not change the output.
    """

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=128,
                 channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), dropout=0.10,
                 embedding_type="positional", channel_mult_noise=1, encoder_type="standard", decoder_type="standard",
                 resample_filter=(1, 1)):
        super().__init__()
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(f"embedding_type must be 'positional' or 'fourier', got {embedding_type!r}")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"encoder_type must be 'standard', 'skip' or 'residual', got {encoder_type!r}")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type must be 'standard' or 'skip', got {decoder_type!r}")
        _check_resolution(img_resolution, channel_mult)
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                            init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping network: noise level (and class) -> embedding.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder; `caux` tracks the channels of the auxiliary path of the skip/residual encoders.
        self.enc = torch.nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res, width = img_resolution >> level, model_channels * mult
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels, kernel=3, **init)
                cout = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, kernel=3, down=True, fused_resample=True,
                                                                   resample_filter=resample_filter, **init)
                    caux = cout
            for idx in range(num_blocks):
                heads = int(res in attn_resolutions)
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cout, width, num_heads=heads, **block_kwargs)
                cout = width
        skips = [block.out_channels for name, block in self.enc.items() if "_aux_" not in name]

        # Decoder; every `block` takes the matching encoder activation concatenated to its input.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res, width = img_resolution >> level, model_channels * mult
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, num_heads=1, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                heads = int(idx == num_blocks and res in attn_resolutions)
                cin = cout + skips.pop()
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, width, num_heads=heads, **block_kwargs)
                cout = width
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = group_norm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def embed(self, noise_labels, class_labels):
        """The conditioning vector: a two-layer silu MLP of noise embedding (sin half first) + class embedding."""
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # [cos, sin] -> [sin, cos]
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels * math.sqrt(self.map_label.in_features))
        return silu(self.map_layer1(silu(self.map_layer0(emb))))

    def forward(self, x, noise_labels, class_labels=None):
        emb = self.embed(noise_labels, class_labels)
        skips, aux = [], x
        for name, block in self.enc.items():
            if name.endswith("_aux_down"):
                aux = block(aux)
            elif name.endswith("_aux_skip"):
                x = skips[-1] = x + block(aux)
            elif name.endswith("_aux_residual"):
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)
        out = None
        for name, block in self.dec.items():
            if name.endswith("_aux_up"):
                out = block(out)
            elif name.endswith("_aux_norm"):
                h = block(x)
            elif name.endswith("_aux_conv"):
                h = block(silu(h))
                out = h if out is None else out + h
            else:
                if "_block" in name:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return out


class DhariwalUNet(torch.nn.Module):
    """ADM U-Net of Dhariwal & Nichol (2021) as re-implemented by EDM: F(x, c_noise, labels).

    Attention heads have 64 channels: an attention block of width c has c // 64 heads, so none below 64 channels
    (EDM's channels_per_head=64). `augment_dim` > 0 adds EDM's `map_augment` layer for checkpoint compatibility only
    (see SongUNet).
    """

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=192,
                 channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3, attn_resolutions=(32, 16, 8),
                 dropout=0.10):
        super().__init__()
        _check_resolution(img_resolution, channel_mult)
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0.0, init_bias=0.0)
        block_kwargs = dict(emb_channels=emb_channels, dropout=dropout, init=init, init_zero=init_zero)

        # Mapping network: noise level (and class) -> embedding.
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = None
        if label_dim:
            self.map_label = Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                    init_weight=math.sqrt(label_dim))

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res, width = img_resolution >> level, model_channels * mult
            heads = width // 64 if res in attn_resolutions else 0
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, width, kernel=3, **init)
                cout = width
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cout, width, num_heads=heads, **block_kwargs)
                cout = width
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder; every `block` takes the matching encoder activation concatenated to its input.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res, width = img_resolution >> level, model_channels * mult
            heads = width // 64 if res in attn_resolutions else 0
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, num_heads=cout // 64, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, width, num_heads=heads, **block_kwargs)
                cout = width
        self.out_norm = group_norm(cout, eps=1e-5)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def embed(self, noise_labels, class_labels):
        """The conditioning vector: silu(MLP(noise embedding) + class embedding)."""
        emb = self.map_layer1(silu(self.map_layer0(self.map_noise(noise_labels))))
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels)
        return silu(emb)

    def forward(self, x, noise_labels, class_labels=None):
        emb = self.embed(noise_labels, class_labels)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(silu(self.out_norm(x)))


NETWORKS = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


class Precond(torch.nn.Module):
    """Denoiser D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, labels) around a U-Net F (attribute `model`).

    Subclasses give the coefficients in `scalings`. x is computed in float32; with `use_fp16` the U-Net
    runs under float16 autocast on CUDA (otherwise in the caller's precision). Conditional nets take
    one-hot float `class_labels` of shape [N, label_dim] (None: the all-zero label).
    """

    def __init__(self, img_resolution, img_channels, label_dim, use_fp16, model_type, out_channels, model_kwargs):
        super().__init__()
        if model_type not in NETWORKS:
            raise ValueError(f"model_type must be one of {sorted(NETWORKS)}, got {model_type!r}")
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.model = NETWORKS[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                          out_channels=out_channels, label_dim=label_dim, **model_kwargs)

    def scalings(self, sigma):
        """(c_skip, c_out, c_in, c_noise) at noise level sigma."""
        raise NotImplementedError

    def round_sigma(self, sigma):
        """The noise level the network supports nearest to sigma (identity for continuous-time nets)."""
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            if class_labels is not None:
                raise ValueError("class_labels must be None for an unconditional network (label_dim=0)")
        elif class_labels is None:
            class_labels = torch.zeros(1, self.label_dim, device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        fp16 = self.use_fp16 and x.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.float16) if fp16 else contextlib.nullcontext():
            F_x = self.model(c_in * x, c_noise.flatten(), class_labels)
        return c_skip * x + c_out * F_x[:, : self.img_channels].to(torch.float32)


def vp_sigma(t, beta_d=19.9, beta_min=0.1):
    """Noise level of the VP SDE at time t: sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    t = torch.as_tensor(t)
    return torch.expm1(0.5 * beta_d * t**2 + beta_min * t).sqrt()


class VPPrecond(Precond):
    """VP preconditioning (Song et al. 2021): c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1),
    c_noise = (M - 1) t(sigma) with t(sigma) the inverse of vp_sigma; sigma in [sigma(epsilon_t), sigma(1)]."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, beta_d=19.9, beta_min=0.1, M=1000,
                 epsilon_t=1e-5, model_type="SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels, model_kwargs)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = float(self.sigma(torch.tensor(epsilon_t, device="cpu")))
        self.sigma_max = float(self.sigma(torch.tensor(1.0, device="cpu")))

    def sigma(self, t):
        """sigma(t) of this VP schedule."""
        return vp_sigma(t, self.beta_d, self.beta_min)

    def sigma_inv(self, sigma):
        """t(sigma) = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d."""
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min**2 + 2 * self.beta_d * torch.log1p(sigma**2)).sqrt() - self.beta_min) / self.beta_d

    def scalings(self, sigma):
        return 1, -sigma, 1 / (sigma**2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)


class VEPrecond(Precond):
    """VE preconditioning (Song et al. 2021): c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma / 2)."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0.02, sigma_max=100,
                 model_type="SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels, model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def scalings(self, sigma):
        return 1, sigma, 1, (0.5 * sigma).log()


class iDDPMPrecond(Precond):
    """Improved-DDPM preconditioning (Nichol & Dhariwal 2021) on the discrete noise levels u_0 > ... > u_M = 0.

    u_{j-1} = sqrt((u_j^2 + 1) / max(abar(j-1) / abar(j), C_1) - 1), abar(j) = sin^2(pi j / (2 M (C_2 + 1))).
    c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1), c_noise = M - 1 - j for the u_j nearest sigma.
    The U-Net predicts 2 img_channels (ADM's learned variance); only the first half is used.
    """

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, C_1=0.001, C_2=0.008, M=1000,
                 model_type="DhariwalUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, 2 * img_channels, model_kwargs)
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        j = torch.arange(M + 1, dtype=torch.float64, device="cpu")
        alpha_bar = torch.sin(0.5 * math.pi * j / (M * (C_2 + 1))) ** 2
        u = torch.zeros(M + 1, dtype=torch.float64, device="cpu")
        for j in range(M, 0, -1):
            u[j - 1] = ((u[j] ** 2 + 1) / (alpha_bar[j - 1] / alpha_bar[j]).clip(min=C_1) - 1).sqrt()
        self.register_buffer("u", u.float())

    @property
    def sigma_min(self):
        """The smallest nonzero level u_{M-1} (read from the buffer, so it follows a loaded checkpoint)."""
        return float(self.u[self.M - 1])

    @property
    def sigma_max(self):
        """The largest level u_0."""
        return float(self.u[0])

    def _nearest_index(self, sigma):
        """Index j of the u_j nearest to each entry of sigma."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=self.u.device)
        return (sigma.reshape(-1, 1) - self.u).abs().argmin(dim=1).reshape(sigma.shape)

    def round_sigma(self, sigma):
        sigma = torch.as_tensor(sigma)
        return self.u[self._nearest_index(sigma)].to(sigma.device, sigma.dtype)

    def scalings(self, sigma):
        c_noise = (self.M - 1 - self._nearest_index(sigma)).to(torch.float32)
        return 1, -sigma, 1 / (sigma**2 + 1).sqrt(), c_noise


class EDMPrecond(Precond):
    """EDM preconditioning (Karras et al. 2022, Table 1): with s = sigma_data,
    c_skip = s^2 / (sigma^2 + s^2), c_out = sigma s / sqrt(sigma^2 + s^2), c_in = 1 / sqrt(sigma^2 + s^2),
    c_noise = ln(sigma) / 4."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0, sigma_max=float("inf"),
                 sigma_data=0.5, model_type="DhariwalUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels, model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data

    def scalings(self, sigma):
        total = sigma**2 + self.sigma_data**2
        return self.sigma_data**2 / total, sigma * self.sigma_data / total.sqrt(), 1 / total.sqrt(), sigma.log() / 4


class IndexLabels(torch.nn.Module):
    """An EDM network D(x; sigma, one-hot float labels) called with int64 class indices (B,), the labels that the
    generator draws and DG's heads take: the one place where index labels become EDM's one-hot vectors. It keeps the
    network's supported noise levels (sigma_min, sigma_max, round_sigma), which the EDM sampler fits its schedule to."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.img_channels, self.img_resolution, self.label_dim = net.img_channels, net.img_resolution, net.label_dim
        self.sigma_min, self.sigma_max, self.round_sigma = net.sigma_min, net.sigma_max, net.round_sigma

    def forward(self, x, sigma, class_labels=None):
        """D(x; sigma, one_hot(class_labels)); class_labels None for an unconditional network."""
        one_hot = None if class_labels is None else torch.nn.functional.one_hot(class_labels, self.label_dim)
        return self.net(x, sigma, None if one_hot is None else one_hot.to(x.dtype))
