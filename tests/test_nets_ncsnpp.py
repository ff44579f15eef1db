"""score_sde's NCSN++ (DDPM++ configuration), its VP score and Soft Truncation's checkpoint loader. Every file is
written here, in tmp_path, by tests/netutils.write_soft_truncation_checkpoint."""

import math
import re

import pytest
import torch

from dg_lightning.checkpoints import CheckpointError, load_soft_truncation
from dg_lightning.nets import ncsnpp
from dg_lightning.solvers import SCORE_KINDS
from netutils import randomized, write_soft_truncation_checkpoint
from payloads import EXPLOITS, Exploit

# A tiny network for 16x16 RGB images: two resolutions, attention at 8x8.
TINY = dict(img_resolution=16, nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)


def tiny(seed=0, **overrides):
    """A tiny celeba64 NCSN++ with random weights (GroupNorm scales too), in eval mode."""
    return randomized(ncsnpp.celeba64(**{**TINY, **overrides}), seed=seed).eval()


def inputs(batch=3, size=16, dtype=torch.float32):
    """Random images and times t in (0, 1]."""
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(5), dtype=dtype)
    return x, torch.tensor([1e-3, 0.4, 1.0], dtype=dtype)[:batch]


# --- the released CelebA 64 network (meta device: shapes only) ---
# Checked against Soft Truncation's own NCSNpp (models/ncsnpp.py with configs/vp/CELEBA/ddpmpp_fid_st.py), run locally:
# 61,804,419 parameters in 564 tensors, 565 state-dict entries (with the buffer `sigmas`), the same keys, order and shapes.

def test_released_celeba64_has_upstreams_layout():
    with torch.device("meta"):
        net = ncsnpp.celeba64()
    state = net.state_dict()
    assert sum(p.numel() for p in net.parameters()) == 61_804_419
    assert len(list(net.parameters())) == 564 and len(state) == 565 and len(net.all_modules) == 55
    assert list(state)[:3] == ["sigmas", "all_modules.0.weight", "all_modules.0.bias"]
    shapes = {
        "sigmas": [1000],
        "all_modules.0.weight": [512, 128],  # time embedding nf -> 4 nf
        "all_modules.1.weight": [512, 512],
        "all_modules.2.weight": [128, 3, 3, 3],  # input convolution
        "all_modules.3.Dense_0.weight": [128, 512],
        "all_modules.7.Conv_2.weight": [128, 128, 1, 1],  # the first downsampling block's skip
        "all_modules.14.NIN_0.W": [256, 256],  # attention at 16x16
        "all_modules.14.GroupNorm_0.weight": [256],
        "all_modules.29.Conv_0.weight": [256, 512, 3, 3],  # the first decoder block: 256 + 256 skip channels in
        "all_modules.52.Conv_2.weight": [128, 256, 1, 1],
        "all_modules.53.weight": [128],  # output GroupNorm
        "all_modules.54.weight": [3, 128, 3, 3],  # output convolution
    }
    assert {k: list(state[k].shape) for k in shapes} == shapes
    assert not any(k.startswith("all_modules.55") for k in state)
    assert state["sigmas"].dtype == torch.float64


def test_sigmas_buffer_is_upstreams_ve_ladder():
    sigmas = ncsnpp.celeba64(**TINY).sigmas
    assert sigmas[0].item() == pytest.approx(90.0, rel=1e-12) and sigmas[-1].item() == pytest.approx(0.01, rel=1e-12)
    ratios = sigmas[1:] / sigmas[:-1]
    assert torch.allclose(ratios, torch.full_like(ratios, (0.01 / 90.0) ** (1 / 999)), rtol=1e-12, atol=0)


# --- network pieces against closed forms ---

def test_sinusoidal_embedding_closed_form():
    labels = torch.tensor([0.0, 1.0, 999.0], dtype=torch.float64)
    emb = ncsnpp.sinusoidal_embedding(labels, 8)
    freqs = torch.tensor([10000 ** (-i / 3) for i in range(4)], dtype=torch.float64)
    assert torch.allclose(emb[:, :4], torch.sin(labels[:, None] * freqs), rtol=0, atol=1e-12)
    assert torch.allclose(emb[:, 4:], torch.cos(labels[:, None] * freqs), rtol=0, atol=1e-12)
    assert emb[:, 0].tolist() == pytest.approx([0.0, math.sin(1.0), math.sin(999.0)], abs=1e-12)


def test_attention_block_is_single_head_softmax_attention():
    block = randomized(ncsnpp.AttnBlock(8), seed=1).double()
    x = torch.randn(2, 8, 3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    h = block.GroupNorm_0(x).flatten(2)  # [B, C, T]
    q, k, v = (torch.einsum("bct,cd->bdt", h, nin.W) + nin.b[:, None] for nin in (block.NIN_0, block.NIN_1, block.NIN_2))
    weights = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(8), dim=-1)
    out = torch.einsum("bts,bcs->bct", weights, v)
    out = torch.einsum("bct,cd->bdt", out, block.NIN_3.W) + block.NIN_3.b[:, None]
    expected = (x + out.reshape(x.shape)) / math.sqrt(2)
    assert torch.allclose(block(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("resample", ["up", "down"])
def test_resblock_resamples_both_paths(resample):
    block = randomized(ncsnpp.ResBlock(4, 4, emb_channels=6, **{resample: True}), seed=3).double().eval()
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    emb = torch.randn(2, 6, dtype=torch.float64)

    def r(a):
        """2x nearest-neighbour copy (up) or 2x2 mean (down) of a, written out."""
        if resample == "up":
            return a.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        return a.unflatten(2, (2, 2)).unflatten(4, (2, 2)).mean(dim=(3, 5))

    h = block.Conv_0(r(torch.nn.functional.silu(block.GroupNorm_0(x)))) + block.Dense_0(emb)[:, :, None, None]
    h = block.Conv_1(torch.nn.functional.silu(block.GroupNorm_1(h)))
    assert torch.allclose(block(x, emb), (block.Conv_2(r(x)) + h) / math.sqrt(2), rtol=0, atol=1e-12)


def test_network_is_deterministic_in_eval_and_keeps_the_image_shape():
    net = tiny(dropout=0.1)
    x, t = inputs()
    with torch.no_grad():
        out = net(x, 999 * t)
        assert out.shape == x.shape and torch.equal(out, net(x, 999 * t))
        assert not torch.allclose(out, net(x, 999 * t.flip(0)))  # the time label reaches the output


# --- the VP score ---

class Stub(torch.nn.Module):
    """A network with a known output: net(x, labels) = x * labels (labels per sample)."""

    img_resolution, in_channels = 16, 3

    def forward(self, x, labels):
        return x * labels[:, None, None, None]


def test_vp_score_is_minus_net_over_sigma_vp():
    score = ncsnpp.VPScore(Stub())
    x, t = inputs(dtype=torch.float64)
    sigma = torch.sqrt(1 - torch.exp(-(0.1 * t + 0.5 * 19.9 * t**2)))  # linear VP, beta 0.1 to 20
    expected = -x * (999 * t / sigma)[:, None, None, None]
    assert torch.allclose(score(x, t), expected, rtol=1e-12, atol=0)
    assert torch.allclose(score(x, t[1]), -x * (999 * t[1] / sigma[1]), rtol=1e-12, atol=0)  # a scalar t broadcasts


def test_vp_score_reads_like_a_score_model_and_refuses_labels():
    score = ncsnpp.VPScore(tiny())
    assert (score.img_resolution, score.img_channels, score.label_dim) == (16, 3, 0)
    assert score.kind in SCORE_KINDS
    x, t = inputs()
    with pytest.raises(ValueError, match="class_labels must be None: this VP score model is unconditional"):
        score(x, t, torch.zeros(3, dtype=torch.long))


# --- load_soft_truncation ---

@pytest.fixture
def checkpoint(tmp_path):
    """(path, network, shadow parameters) of a tiny network saved in the released checkpoint layout."""
    net = tiny()
    path = tmp_path / "checkpoint_26.pth"
    return path, net, write_soft_truncation_checkpoint(path, net, seed=7)


def test_load_soft_truncation_puts_the_ema_on_the_parameters(checkpoint):
    path, net, shadow = checkpoint
    ema, raw = load_soft_truncation(path, **TINY), load_soft_truncation(path, key="model", **TINY)

    for loaded in (ema, raw):
        assert isinstance(loaded, ncsnpp.VPScore) and not loaded.training
        assert not any(p.requires_grad for p in loaded.parameters())
        assert list(loaded.net.state_dict()) == list(net.state_dict())
    assert all(torch.equal(p, s) for p, s in zip(ema.net.parameters(), shadow))
    assert all(torch.equal(p, q) for p, q in zip(raw.net.parameters(), net.parameters()))
    assert torch.equal(ema.net.sigmas, net.sigmas) and torch.equal(raw.net.sigmas, net.sigmas)

    reference = tiny()
    with torch.no_grad():
        for p, s in zip(reference.parameters(), shadow):
            p.copy_(s)
        x, t = inputs()
        assert torch.equal(ema(x, t), ncsnpp.VPScore(reference)(x, t))
        assert torch.equal(raw(x, t), ncsnpp.VPScore(net)(x, t))
        assert not torch.allclose(ema(x, t), raw(x, t))


def test_load_soft_truncation_refuses_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent\.pth .*drive\.google\.com.*Soft-Truncation"):
        load_soft_truncation(tmp_path / "absent.pth", **TINY)


def test_load_soft_truncation_refuses_an_unknown_key(checkpoint):
    with pytest.raises(ValueError, match="key must be 'ema' .* or 'model' .*, got 'shadow'"):
        load_soft_truncation(checkpoint[0], key="shadow", **TINY)


@pytest.mark.parametrize("content, match", [
    ([1.0], "holds a list, not a state dict"),
    ({"model": {}}, (r"lacks \['ema'\]: a Soft Truncation checkpoint is a dict with the entries "
                     r"\['optimizer', 'model', 'ema', 'step'\], found \['model'\]")),
    ({"ema": {}}, r"lacks \['model'\]"),
    ({"model": [1.0], "ema": {}}, "'model' holds a list, not a state dict"),
    ({"model": {}, "ema": {"decay": 0.9999}}, r"'ema' must be a dict with a list 'shadow_params' .*found a dict with keys \['decay'\]"),
])
def test_load_soft_truncation_refuses_another_layout(tmp_path, content, match):
    path = tmp_path / "checkpoint.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=match) as info:
        load_soft_truncation(path, **TINY)
    assert str(path) in str(info.value)


def test_load_soft_truncation_refuses_an_ema_that_does_not_fit(checkpoint):
    path, _, shadow = checkpoint
    data = torch.load(path, weights_only=True)
    torch.save({**data, "ema": {**data["ema"], "shadow_params": shadow[:-1]}}, path)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: the EMA holds {len(shadow) - 1} shadow "
                                              rf"parameters but 'model' has {len(shadow)} parameters"):
        load_soft_truncation(path, **TINY)
    torch.save({**data, "ema": {**data["ema"], "shadow_params": shadow[::-1]}}, path)
    with pytest.raises(CheckpointError, match=r"do not fit 'model' in order: mismatches \(\d+\): all_modules.0.weight"):
        load_soft_truncation(path, **TINY)
    assert load_soft_truncation(path, key="model", **TINY) is not None  # the raw weights never read the EMA


def test_load_soft_truncation_refuses_another_architecture(checkpoint):
    path = checkpoint[0]
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))} does not match Soft Truncation's CelebA 64 "
                                              r"NCSN\+\+ .*\n  shape mismatches \(\d+\): all_modules.0.weight"):
        load_soft_truncation(path, key="model", **{**TINY, "nf": 32})
    with pytest.raises(CheckpointError, match=r"missing keys \(\d+\): .*\n  unexpected keys"):
        load_soft_truncation(path, key="model", **{**TINY, "num_res_blocks": 2})


def test_load_soft_truncation_refuses_pickled_code_without_running_it(tmp_path):
    func, code = EXPLOITS[0]
    marker = tmp_path / "executed"
    path = tmp_path / "checkpoint_26.pth"
    torch.save({"model": Exploit(func, code.format(marker=str(marker)))}, path)
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))}: refused unread, its pickle would call"):
        load_soft_truncation(path, **TINY)
    assert not marker.exists()


@pytest.mark.parametrize("option, value", [("resblock_type", "ddpm"), ("skip_rescale", False),
                                           ("progressive", "output_skip"),
                                           ("embedding_type", "fourier"), ("centered", False)])
def test_unreleased_options_are_refused(option, value):
    with pytest.raises(ValueError, match=rf"{option}={value!r} is not supported; only the released DDPM\+\+ "
                                         rf"configuration {option}="):
        ncsnpp.celeba64(**TINY, **{option: value})


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown option 'fir_kernel'"):
        ncsnpp.celeba64(**TINY, fir_kernel=(1, 3, 3, 1))
    with pytest.raises(ValueError, match=r"img_resolution must be divisible by 2\^\(len\(ch_mult\) - 1\) = 2, got 15"):
        ncsnpp.celeba64(**{**TINY, "img_resolution": 15})
    with pytest.raises(ValueError, match=r"the time embedding width must be even \(embedding_dim, default nf\), got 15"):
        ncsnpp.celeba64(**{**TINY, "nf": 15})
    with pytest.raises(ValueError, match=r"the time embedding width must be even .*, got 7"):
        ncsnpp.celeba64(**TINY, embedding_dim=7)
