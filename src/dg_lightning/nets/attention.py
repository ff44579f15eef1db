"""Multi-head self-attention over token-major tensors, shared by the ADM, EDM and DiT networks.

Tokens are laid out [B, T, C] (channels last), which is what a channels_last image [B, C, H, W] already is in
memory: `image_tokens` and `tokens_to_image` are views, not copies, on that layout. Projections are matmuls over
the channel axis, and q, k, v reach scaled_dot_product_attention with a contiguous head dimension.
"""

import torch.nn.functional as F


def image_tokens(x):
    """The H*W pixels of an image batch [B, C, H, W] as tokens [B, H*W, C] (a view for a channels_last x)."""
    return x.flatten(2).transpose(1, 2)


def tokens_to_image(tokens, height, width):
    """Tokens [B, H*W, C] back to an image batch [B, C, H, W] (channels_last strides for contiguous tokens)."""
    return tokens.transpose(1, 2).unflatten(2, (height, width))


def pointwise(conv, tokens):
    """A 1x1 convolution's weights (Conv1d [C_out, C_in, 1] or Conv2d [C_out, C_in, 1, 1]) applied to tokens
    [B, T, C_in] as a matmul: [B, T, C_out]."""
    return F.linear(tokens, conv.weight.flatten(1), conv.bias)


def packed_attention(qkv, num_heads, heads_first):
    """softmax(q k^T / sqrt(c)) v per head over the T tokens of packed qkv [B, T, 3*H*c] -> [B, T, H*c], head-major.

    heads_first=True reads the channels as [head][q|k|v][c] (ADM's legacy order); False as [q|k|v][head][c]
    (ADM's attention pool, timm / DiT).
    """
    head_channels = qkv.shape[-1] // (3 * num_heads)
    if heads_first:
        q, k, v = qkv.unflatten(2, (num_heads, 3, head_channels)).unbind(3)
    else:
        q, k, v = qkv.unflatten(2, (3, num_heads, head_channels)).unbind(2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B, H, T, c]
    return out.transpose(1, 2).flatten(2)
