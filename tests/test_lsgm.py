"""LSGM's latent score model (nets.ncsnpp.LSGMScore: NCSN++ with FIR resampling and the mixed score prediction) and
its checkpoint loader. Every file is written here, in tmp_path, by tests/netutils.write_lsgm_checkpoint."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from dg_lightning.checkpoints import CheckpointError, load_lsgm
from dg_lightning.nets import ncsnpp, nvae
from dg_lightning.ode import rk45_vp_sampler
from dg_lightning.solvers import SCORE_KINDS
from netutils import randomized, write_lsgm_checkpoint
from payloads import EXPLOITS, Exploit

# A tiny LSGM score model on 6-channel 8x8 latents: two resolutions (one FIR down- and one upsampling block),
# attention at 8x8, embedding width 8 (nf 16).
TINY = dict(img_resolution=8, in_channels=6, nf=16, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(8,),
            embedding_dim=8, dropout=0.0)
# The args of a run that trained TINY (the rest from the released run).
TINY_VAE = dict(img_resolution=16, channels=8, num_groups=3, latent_per_group=2)  # as tests/test_nets_nvae.py
TINY_ARGS = dict(num_channels_dae=16, num_scales_dae=2, num_cell_per_scale_dae=1, embedding_dim=8,
                 num_groups_per_scale=2, num_latent_per_group=3)


def tiny(seed=0, **overrides):
    """A tiny lsgm_cifar10 score model with random weights (mixing logit and GroupNorm scales too), in eval mode."""
    return randomized(ncsnpp.lsgm_cifar10(**{**TINY, **overrides}), seed=seed).eval()


def latents(batch=3, dtype=torch.float64):
    """Random latents [B, 6, 8, 8] and times t in (0, 1]."""
    z = torch.randn(batch, 6, 8, 8, generator=torch.Generator().manual_seed(5), dtype=dtype)
    return z, torch.tensor([1e-3, 0.4, 1.0], dtype=dtype)[:batch]


def sigma_vp(t):
    """sigma_t of LSGM's VP SDE (beta 0.1 to 20, sigma2_0 = 0): sqrt(1 - exp(-0.1 t - 9.95 t^2))."""
    return torch.sqrt(1 - torch.exp(-0.1 * t - 9.95 * t**2))


# --- the released CIFAR-10 score model (meta device: shapes only) ---
# Measured with LSGM's own NCSNpp (score_sde/ncsnpp.py with the run's args): 743 state-dict entries, all parameters,
# 375,561,064 parameters, 72 all_modules, mixing_logit first; the same keys, order and shapes as here.

def test_released_lsgm_cifar10_has_upstreams_layout():
    with torch.device("meta"):
        net = ncsnpp.lsgm_cifar10()
    state = net.state_dict()
    assert sum(p.numel() for p in net.parameters()) == 375_561_064
    assert len(list(net.parameters())) == len(state) == 743 and not list(net.buffers())
    assert len(net.all_modules) == 72 and list(state)[:2] == ["mixing_logit", "all_modules.0.weight"]
    assert next(iter(net.named_parameters()))[0] == "mixing_logit"  # parameters() order: upstream's EMA order
    shapes = {
        "mixing_logit": [1, 180, 1, 1],
        "all_modules.0.weight": [512, 128],  # time embedding 128 -> 4 x 128
        "all_modules.1.weight": [512, 512],
        "all_modules.2.weight": [512, 180, 3, 3],  # input convolution on the 180 latent channels
        "all_modules.3.Dense_0.weight": [512, 512],
        "all_modules.4.NIN_0.W": [512, 512],  # attention at 16x16
        "all_modules.19.Conv_2.weight": [512, 512, 1, 1],  # the FIR downsampling blocks' skips
        "all_modules.28.Conv_2.weight": [512, 512, 1, 1],
        "all_modules.38.NIN_3.W": [512, 512],  # middle attention
        "all_modules.40.Conv_0.weight": [512, 1024, 3, 3],  # the first decoder block: 512 + 512 skip channels in
        "all_modules.49.Conv_2.weight": [512, 512, 1, 1],  # the FIR upsampling blocks' skips
        "all_modules.59.Conv_2.weight": [512, 512, 1, 1],
        "all_modules.69.NIN_0.W": [512, 512],
        "all_modules.70.weight": [512],  # output GroupNorm
        "all_modules.71.weight": [180, 512, 3, 3],  # output convolution
    }
    assert {k: list(state[k].shape) for k in shapes} == shapes
    assert sum(k.endswith("Conv_2.weight") for k in state) == 31
    resampling = [i for i, m in enumerate(net.all_modules) if isinstance(m, ncsnpp.ResBlock) and (m.up or m.down)]
    assert resampling == [19, 28, 49, 59] and all(net.all_modules[i].fir for i in resampling)
    assert (net.kind, net.img_resolution, net.img_channels, net.label_dim) == ("vp_score", 16, 180, 0)
    assert net.kind in SCORE_KINDS


# --- FIR resampling against closed forms ---

def fir_down_1d(x):
    """score_sde's 1-D FIR [1, 3, 3, 1] / 8 downsampling, written out: y_m = (x_{2m-1} + 3 x_{2m} + 3 x_{2m+1}
    + x_{2m+2}) / 8, zero outside."""
    p = F.pad(x, (1, 1))
    return (p[0:-2:2] + 3 * p[1:-1:2] + 3 * p[2::2] + p[3::2]) / 8


def fir_up_1d(x):
    """score_sde's 1-D FIR [1, 3, 3, 1] upsampling, written out: y_{2m} = (3 x_m + x_{m-1}) / 4,
    y_{2m+1} = (3 x_m + x_{m+1}) / 4, zero outside."""
    p = F.pad(x, (1, 1))
    return torch.stack([3 * x + p[:-2], 3 * x + p[2:]], dim=1).flatten() / 4


@pytest.mark.parametrize("resample, reference", [("down", fir_down_1d), ("up", fir_up_1d)])
def test_fir_resampling_is_the_separable_1d_filter(resample, reference):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    image = torch.stack([torch.outer(a, b), -2 * torch.outer(a, b)])[None]  # [1, 2, 8, 8], two channels
    out = getattr(ncsnpp, f"fir_{resample}sample")(image)
    expected = torch.outer(reference(a), reference(b))
    assert out.shape == ((1, 2, 4, 4) if resample == "down" else (1, 2, 16, 16))
    assert torch.allclose(out[0, 0], expected, rtol=0, atol=1e-14)
    assert torch.allclose(out[0, 1], -2 * expected, rtol=0, atol=1e-14)  # depthwise: channels do not mix


def test_fir_resampling_keeps_a_constant_image_constant_away_from_the_border():
    image = torch.full((2, 3, 8, 8), 1.5, dtype=torch.float64)
    down, up = ncsnpp.fir_downsample(image), ncsnpp.fir_upsample(image)
    assert torch.equal(down[:, :, 1:-1, 1:-1], torch.full((2, 3, 2, 2), 1.5, dtype=torch.float64))
    assert torch.equal(up[:, :, 1:-1, 1:-1], torch.full((2, 3, 14, 14), 1.5, dtype=torch.float64))
    # at the border the zero padding weighs in: 1/8 of the down filter and 1/4 of the up filter per axis
    assert down[0, 0, 0, 1].item() == 1.5 * 7 / 8 and down[0, 0, 0, 0].item() == 1.5 * (7 / 8) ** 2
    assert up[0, 0, 0, 1].item() == 1.5 * 3 / 4 and up[0, 0, -1, -1].item() == 1.5 * (3 / 4) ** 2


@pytest.mark.parametrize("resample", ["up", "down"])
def test_fir_resblock_filters_both_paths(resample):
    block = randomized(ncsnpp.ResBlock(4, 4, emb_channels=6, fir=True, **{resample: True}), seed=3).double().eval()
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    emb = torch.randn(2, 6, dtype=torch.float64)
    r = getattr(ncsnpp, f"fir_{resample}sample")
    h = block.Conv_0(r(F.silu(block.GroupNorm_0(x)))) + block.Dense_0(emb)[:, :, None, None]
    h = block.Conv_1(F.silu(block.GroupNorm_1(h)))
    assert torch.allclose(block(x, emb), (block.Conv_2(r(x)) + h) / math.sqrt(2), rtol=0, atol=1e-12)


# --- the mixed score prediction ---

def test_lsgm_score_is_the_mixed_prediction_formula():
    score = tiny().double()
    z, t = latents()
    with torch.no_grad():
        eps = ncsnpp.NCSNpp.forward(score, z, 1000 * t)  # eps_theta at the time label 1000 t
        assert torch.equal(score.eps(z, t), eps) and not torch.allclose(eps, ncsnpp.NCSNpp.forward(score, z, 999 * t))
        coeff = torch.sigmoid(score.mixing_logit)
        expected = -(1 - coeff) * z - coeff * eps / sigma_vp(t)[:, None, None, None]
        assert torch.allclose(score(z, t), expected, rtol=1e-12, atol=0)
        assert torch.allclose(score(z, t[1]), score(z, t[1].expand(3)), rtol=0, atol=0)  # a scalar t broadcasts


def test_lsgm_score_with_a_zero_network_output_is_the_linear_part():
    score = tiny().double()
    with torch.no_grad():
        score.all_modules[-1].weight.zero_()
        score.all_modules[-1].bias.zero_()
        z, t = latents()
        assert torch.equal(score.eps(z, t), torch.zeros_like(z))
        assert torch.allclose(score(z, t), -(1 - torch.sigmoid(score.mixing_logit)) * z, rtol=1e-15, atol=0)


def test_lsgm_score_without_mixing_weight_is_the_score_of_a_standard_normal():
    score = tiny().double()
    with torch.no_grad():
        score.mixing_logit.fill_(-1e4)  # sigmoid(m) = 0: s = -z, grad log N(z; 0, I), whatever the network says
        z, t = latents()
        assert torch.equal(score(z, t), -z)
        # N(0, I) data stay N(0, I) under the VP SDE: the probability-flow ODE drift -beta/2 (z + s) vanishes
        assert torch.equal(rk45_vp_sampler(score, z, dtype=torch.float64), z)


def test_lsgm_score_refuses_labels():
    z, t = latents()
    with pytest.raises(ValueError, match="class_labels must be None: LSGM's score model is unconditional"):
        tiny().double()(z, t, torch.zeros(3, dtype=torch.long))


# --- load_lsgm ---

@pytest.fixture
def checkpoint(tmp_path):
    """(path, score model, VAE state) of a tiny score model and a tiny NVAE saved in the released checkpoint_fid.pt
    layout."""
    dae, path = tiny(seed=2), tmp_path / "checkpoint_fid.pt"
    torch.manual_seed(3)
    vae = nvae.cifar10(**TINY_VAE).state_dict()
    vae["pre_process.0._ops.0.bn_act.running_mean"] += 0.5  # a buffer that differs from a fresh network's
    write_lsgm_checkpoint(path, dae.state_dict(), vae, **TINY_ARGS)
    return path, dae, vae


def test_load_lsgm_loads_the_score_model_and_the_vae(checkpoint):
    path, dae, vae = checkpoint
    loaded, loaded_vae = load_lsgm(path, TINY_VAE, **TINY)
    vae_state = loaded_vae.state_dict()
    assert isinstance(loaded_vae, nvae.NVAE) and not loaded_vae.training
    assert isinstance(loaded, ncsnpp.LSGMScore) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert list(loaded.state_dict()) == list(dae.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), dae.state_dict().values()))
    assert list(vae_state) == list(vae)
    assert all(torch.equal(vae_state[k], v) for k, v in vae.items())
    z, t = latents(dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(z, t), dae(z, t))


def test_load_lsgm_refuses_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent\.pt .*drive\.google\.com.*NVlabs/LSGM.*LSGM \(best FID\)"):
        load_lsgm(tmp_path / "absent.pt", **TINY)


def test_load_lsgm_refuses_pickled_code_without_running_it(tmp_path):
    for func, code in EXPLOITS:
        marker, path = tmp_path / "executed", tmp_path / "checkpoint_fid.pt"
        torch.save({"dae_state_dict": Exploit(func, code.format(marker=str(marker)))}, path)
        with pytest.raises(CheckpointError, match=f"{re.escape(str(path))}: refused unread, its pickle would call"):
            load_lsgm(path, **TINY)
        assert not marker.exists()


@pytest.mark.parametrize("args, match", [
    (dict(num_channels_dae=32), "num_channels_dae: 32 in the file, 16 here"),
    (dict(num_cell_per_scale_dae=2, fir=False),
     "num_cell_per_scale_dae: 2 in the file, 1 here; fir: False in the file, True here"),
    (dict(num_latent_per_group=4), r"num_latent_per_group\*num_groups_per_scale: 8 in the file, 6 here"),
    (dict(embedding_scale=999.0), "embedding_scale: 999.0 in the file, 1000 here"),
    (dict(mixed_prediction=False, sde_type="vesde"),
     "mixed_prediction: False in the file, True here; sde_type: 'vesde'"),
    (dict(dae_arch="unet"), "dae_arch: 'unet' in the file, 'ncsnpp' here"),
    (dict(embedding_dim=None), "embedding_dim: absent$"),
])
def test_load_lsgm_refuses_args_of_another_model(tmp_path, checkpoint, args, match):
    path, dae, vae = checkpoint
    write_lsgm_checkpoint(path, dae.state_dict(), vae, **{**TINY_ARGS, **args})
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: the run's args do not fit this LSGM score "
                                              rf"model \(nets.ncsnpp.lsgm_cifar10 with .*\): {match}"):
        load_lsgm(path, **TINY)


def test_load_lsgm_refuses_a_state_dict_of_another_layout(checkpoint):
    path, dae, vae = checkpoint
    state = dae.state_dict()
    del state["all_modules.3.Conv_0.bias"]
    write_lsgm_checkpoint(path, state, vae, **TINY_ARGS)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))} does not match LSGM's CIFAR-10 latent score "
                                              r"model .*\n  missing keys \(1\): all_modules.3.Conv_0.bias"):
        load_lsgm(path, **TINY)


@pytest.mark.parametrize("content, match", [
    ([1.0], "holds a list, not a state dict"),
    ({"state_dict": {}, "args": None, "epoch": 1},  # NVAE's stage-1 checkpoint
     (r"lacks \['global_step', 'best_score_fid', 'best_score_nll', 'dae_state_dict', 'vae_state_dict'\]: an LSGM "
      r"checkpoint \(checkpoint_fid.pt\) is a dict .*found \['args', 'epoch', 'state_dict'\] \(the NVAE stage-1 "
      r"checkpoint has no score model")),
    ({"dae_state_dict": {}, "dae_optimizer": {"state": {}}},
     (r"is LSGM's periodic training checkpoint \(checkpoint.pt: raw score-model weights, their EMA inside "
      r"'dae_optimizer'\); use checkpoint_fid.pt from the same folder")),
    ({k: {} for k in ("epoch", "global_step", "args", "best_score_fid", "best_score_nll", "vae_state_dict")}
     | {"dae_state_dict": [1.0]}, "'dae_state_dict' holds a list, not a state dict"),
    ({k: {} for k in ("epoch", "global_step", "args", "best_score_fid", "best_score_nll", "dae_state_dict",
                      "vae_state_dict")}, "'args' holds a dict, not LSGM's argparse.Namespace"),
])
def test_load_lsgm_refuses_another_layout(tmp_path, content, match):
    path = tmp_path / "checkpoint_fid.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=match) as info:
        load_lsgm(path, **TINY)
    assert str(path) in str(info.value)


def test_load_lsgm_refuses_a_vae_of_another_layout_naming_the_nvae(checkpoint):
    path, dae, vae = checkpoint
    with pytest.raises(CheckpointError, match=r"(?s)LSGM's CIFAR-10 NVAE \(nets.nvae.cifar10\).*missing keys \(1564\)"):
        load_lsgm(path, **TINY)  # the released NVAE's configuration: the tiny file's VAE does not fit it
