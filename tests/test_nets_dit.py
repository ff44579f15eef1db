"""DiT: upstream parameter names and shapes, closed forms of its embeddings and layouts, adaLN-Zero at init."""

import math

import pytest
import torch
from netutils import randomized

from dg_lightning.nets import dit

TINY = {"input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 32, "depth": 2, "num_heads": 4, "num_classes": 10}


def xl2_documented_shapes():
    """The DiT-XL/2 256x256 state dict of facebookresearch/DiT."""
    shapes = {
        "pos_embed": (1, 256, 1152),
        "x_embedder.proj.weight": (1152, 4, 2, 2), "x_embedder.proj.bias": (1152,),
        "t_embedder.mlp.0.weight": (1152, 256), "t_embedder.mlp.0.bias": (1152,),
        "t_embedder.mlp.2.weight": (1152, 1152), "t_embedder.mlp.2.bias": (1152,),
        "y_embedder.embedding_table.weight": (1001, 1152),
        "final_layer.linear.weight": (32, 1152), "final_layer.linear.bias": (32,),
        "final_layer.adaLN_modulation.1.weight": (2304, 1152), "final_layer.adaLN_modulation.1.bias": (2304,),
    }
    for i in range(28):
        for name, (rows, cols) in {"attn.qkv": (3456, 1152), "attn.proj": (1152, 1152), "mlp.fc1": (4608, 1152),
                                   "mlp.fc2": (1152, 4608), "adaLN_modulation.1": (6912, 1152)}.items():
            shapes[f"blocks.{i}.{name}.weight"] = (rows, cols)
            shapes[f"blocks.{i}.{name}.bias"] = (rows,)
    return shapes


def test_xl2_state_dict_matches_the_released_checkpoint_layout():
    with torch.device("meta"):
        net = dit.DIT_MODELS["DiT-XL/2"]()
    state = {name: tuple(tensor.shape) for name, tensor in net.state_dict().items()}
    assert state == xl2_documented_shapes()
    assert len(state) == 292
    assert sum(p.numel() for p in net.parameters()) == 675_129_632
    assert sum(p.numel() for p in net.parameters() if not p.requires_grad) == 294_912  # pos_embed only


@pytest.mark.parametrize("name, depth, hidden, patch, heads", [
    ("DiT-XL/4", 28, 1152, 4, 16), ("DiT-L/2", 24, 1024, 2, 16), ("DiT-B/8", 12, 768, 8, 12), ("DiT-S/2", 12, 384, 2, 6),
])
def test_configs(name, depth, hidden, patch, heads):
    with torch.device("meta"):
        net = dit.DIT_MODELS[name](input_size=32)
    assert len(net.blocks) == depth and net.blocks[0].attn.num_heads == heads
    assert net.x_embedder.proj.weight.shape == (hidden, 4, patch, patch)
    assert net.pos_embed.shape == (1, (32 // patch) ** 2, hidden)
    assert net.final_layer.linear.weight.shape == (patch * patch * 8, hidden)  # learn_sigma: 2 x 4 channels
    assert len(dit.DIT_MODELS) == 12


def test_label_table_and_output_channels_follow_the_config():
    assert dit.DiT(**TINY).y_embedder.embedding_table.num_embeddings == 11  # + the null class
    net = dit.DiT(**TINY, class_dropout_prob=0.0, learn_sigma=False)
    assert net.y_embedder.embedding_table.num_embeddings == 10
    assert net(torch.zeros(2, 4, 8, 8), torch.zeros(2), torch.zeros(2, dtype=torch.long)).shape == (2, 4, 8, 8)


def test_pos_embed_closed_form():
    dim, grid = 16, 3
    expected = torch.empty(grid * grid, dim, dtype=torch.float64)
    for row in range(grid):
        for col in range(grid):
            for j in range(dim // 4):
                omega = 10000.0 ** (-j / (dim / 4))
                token = expected[row * grid + col]
                token[j], token[dim // 4 + j] = math.sin(col * omega), math.cos(col * omega)
                token[dim // 2 + j], token[3 * dim // 4 + j] = math.sin(row * omega), math.cos(row * omega)
    torch.testing.assert_close(dit.sincos_pos_embed_2d(dim, grid), expected, rtol=0, atol=1e-15)
    net = dit.DiT(input_size=6, patch_size=2, hidden_size=dim, depth=1, num_heads=2, num_classes=3)
    torch.testing.assert_close(net.pos_embed[0], expected.float())
    assert not net.pos_embed.requires_grad and "pos_embed" in net.state_dict()


def test_timestep_embedding_closed_form():
    embedder = dit.TimestepEmbedder(hidden_size=8)
    t = torch.tensor([0.0, 3.0, 250.0, 999.0])
    freqs = torch.tensor([10000.0 ** (-i / 128) for i in range(128)])
    sinusoid = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)  # [cos, sin]
    torch.testing.assert_close(embedder(t), embedder.mlp(sinusoid))


def test_patch_tokens_are_in_raster_order_and_unpatchify_is_their_inverse_layout():
    net = dit.DiT(**TINY)
    # Patch (r, c) of a constant image r * 10 + c; a conv that averages its patch gives token r * 4 + c that value.
    rows = torch.arange(4.0).repeat_interleave(2)
    image = (10 * rows[:, None] + rows[None, :]).expand(1, 4, 8, 8)
    with torch.no_grad():
        net.x_embedder.proj.weight.fill_(1.0 / 16)
        net.x_embedder.proj.bias.zero_()
    tokens = net.x_embedder(image)[0, :, 0]
    torch.testing.assert_close(tokens, torch.tensor([10.0 * r + c for r in range(4) for c in range(4)]))
    # Token r * 4 + c holds its p x p x C patch with the channel fastest: value encodes (r, c, pi, qi, ch).
    g, p, c = 4, 2, net.out_channels
    code = torch.tensor([[1000 * r + 100 * cc + 10 * pi + qi + 0.01 * ch for pi in range(p) for qi in range(p) for ch in range(c)]
                         for r in range(g) for cc in range(g)])
    out = net.unpatchify(code[None])
    for r, cc, pi, qi, ch in [(0, 0, 0, 0, 0), (1, 2, 1, 0, 5), (3, 3, 1, 1, 7), (2, 0, 0, 1, 3)]:
        assert out[0, ch, r * p + pi, cc * p + qi].item() == pytest.approx(1000 * r + 100 * cc + 10 * pi + qi + 0.01 * ch)


def test_attention_matches_naive_softmax_attention_with_qkv_heads_layout():
    torch.manual_seed(0)
    attn = randomized(dit.Attention(hidden_size=12, num_heads=3))
    x = torch.randn(2, 5, 12)
    q, k, v = attn.qkv(x).split(12, dim=-1)  # [q|k|v], each [head][head_dim]
    heads = []
    for h in range(3):
        qh, kh, vh = (m[..., 4 * h:4 * h + 4] for m in (q, k, v))
        heads.append(torch.softmax(qh @ kh.transpose(1, 2) / 2.0, dim=-1) @ vh)
    torch.testing.assert_close(attn(x), attn.proj(torch.cat(heads, dim=-1)), atol=1e-5, rtol=1e-5)


def test_mlp_uses_tanh_gelu():
    mlp = randomized(dit.Mlp(4, 8))
    x = torch.randn(3, 4)
    h = mlp.fc1(x)
    gelu_tanh = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    torch.testing.assert_close(mlp(x), mlp.fc2(gelu_tanh))


def test_adaln_zero_init_blocks_are_identities_and_output_is_zero():
    torch.manual_seed(0)
    net = dit.DiT(**TINY)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0.0, 10.0, 999.0]), torch.tensor([0, 4, 10])
    tokens, c = torch.randn(3, 16, 32), torch.randn(3, 32)
    for block in net.blocks:
        torch.testing.assert_close(block(tokens, c), tokens, rtol=0, atol=0)
    assert torch.equal(net(x, t, y), torch.zeros(3, 8, 8, 8))
    randomized(net)
    out = net(x, t, y)
    assert out.abs().min() > 0 and not torch.equal(out, net(x, t, torch.tensor([1, 4, 10])))  # y conditions


def test_strict_state_dict_round_trip_gives_the_same_function():
    source, target = randomized(dit.DiT(**TINY), seed=1, scale=0.1), dit.DiT(**TINY)
    target.load_state_dict(source.state_dict(), strict=True)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5.0, 700.0]), torch.tensor([3, 10])
    assert torch.equal(source(x, t, y), target(x, t, y))


def test_wrong_input_shape_is_named():
    net = dit.DiT(**TINY)
    with pytest.raises(ValueError, match=r"DiT built for inputs \[B, 4, 8, 8\].*input_size"):
        net(torch.zeros(1, 4, 16, 16), torch.zeros(1), torch.zeros(1, dtype=torch.long))
