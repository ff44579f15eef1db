"""Held-out diagnostics and guidance.dg.t_max=auto: per-bin BCE by hand, the rule on heads whose answer is known (exact
at every t: no cut; blind above a known t: the cut there), 2 DDP ranks against 1 (with the sampling callback's figures), and the stages that read the rule."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HANG_GUARD_S
from torch import nn

from dg_lightning.config import ConfigError
from dg_lightning.data import ArraySource
from dg_lightning.files import load_weights
from dg_lightning.held_out import FIGURE, FIGURES, LN2, auto_t_max, bin_edges, bin_sums, figures, resolve_t_max, \
    times_and_noise
from dg_lightning.pipelines import digits, toy2d
from dg_lightning.sde import LinearVP

ROOT = Path(__file__).resolve().parents[1]
M, N_TRAIN, N_HELD = 1.0e4, 32, 40  # real x0 = +M, fake x0 = -M (1-D); rows of each source


class PointMassHead(nn.Module):
    """The exact log ratio 2 alpha(t) M x / sigma(t)^2 of the point masses +M (real) and -M (fake) diffused to VP time
    t, for t < cut; logit 0 (blind: BCE exactly ln 2) from cut on. Its one parameter gets a zero gradient, so training
    leaves it as it is."""

    def __init__(self, cut=1.1):
        super().__init__()
        self.cut, self.vp, self.unused = cut, LinearVP(), nn.Parameter(torch.zeros(()))

    def forward(self, x, t, class_labels=None):
        logit = 2 * self.vp.alpha(t) * M * x[:, 0] / self.vp.sigma(t) ** 2
        return torch.where(t < self.cut, logit, torch.zeros_like(logit)) + 0 * self.unused


def point_masses(sign):
    """N_TRAIN + N_HELD rows at sign * M: the last N_HELD are the held-out split."""
    return ArraySource(np.full((N_TRAIN + N_HELD, 1), sign * M, np.float32), name="real" if sign > 0 else "fake")


HELD_OUT = ["logger=csv", "~callbacks.progress", "callbacks.held_out.num_bins=4", f"data.num_held_out={N_HELD}",
            "data.batch_size=16", "trainer.max_epochs=2", "trainer.max_steps=-1", "guidance.dg.t_max=auto"]


class Flat(nn.Module):
    """Identity features of uint8 (B, 1, 1, 2) images."""

    num_features = 2

    def forward(self, images):
        return images.flatten(1).float() / 64


def guided_by_the_head(discriminator, latents, labels, noise):
    """Images that depend on the head's logit at t = 0.5 (for the sampling callback)."""
    logit = discriminator(latents.flatten(1), torch.full((len(latents),), 0.5))
    return torch.tanh(0.4 * latents + 1e-5 * logit.view(-1, 1, 1, 1))


def point_mass_task():
    """The sampling callback's task: guided_by_the_head's 1x2 images, FID and precision / recall against 40 fixed
    real ones."""
    from dg_lightning.callbacks import SamplingTask
    from dg_lightning.metrics import GenerativeMetrics

    reals = torch.randint(0, 256, (40, 1, 1, 2), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    return SamplingTask(guided_by_the_head, GenerativeMetrics(Flat(), reset_real_features=False), (1, 1, 2),
                        real_images=reals, batch_size=8)


def point_swd_task():
    """The sampling callback's task on points, as the toy's: 30 2-D points that depend on the head's logit at t = 0.5,
    their SWD to 30 fixed reference points."""
    from dg_lightning.callbacks import SamplingTask
    from dg_lightning.metrics import SlicedWasserstein

    reference = torch.randn(30, 2, generator=torch.Generator().manual_seed(4))
    sample_fn = lambda discriminator, latents, labels, noise: latents + 1e-5 * discriminator(  # noqa: E731
        latents, torch.full((len(latents),), 0.5)).view(-1, 1)
    return SamplingTask(sample_fn, SlicedWasserstein(reference, 64), (2,), batch_size=8, convert=lambda x: x,
                        draw=lambda points, path, epoch, results: path.write_bytes(points.numpy().tobytes()))


def train_point_masses(cfg, cut, folder, task=None):
    """train_discriminator on the point masses with PointMassHead(cut) in folder (with the sampling callback bound to
    task() when `task` is given); the held-out figures it wrote."""
    from dg_lightning.training import train_discriminator

    train_discriminator(cfg, point_masses(1), point_masses(-1), PointMassHead(cut), [], folder, task)
    return json.loads((folder / FIGURES).read_text())


def test_bin_sums_and_figures_equal_a_hand_computation():
    logit = torch.tensor([2.0, 1.0, -2.0, -3.0, 0.5])
    is_real = torch.tensor([True, False, True, False, True])
    bins = torch.tensor([0, 0, 1, 1, 1])
    figure = figures(bin_sums(logit, is_real, bins, 3), bin_edges(3))
    sp = lambda v: math.log1p(math.exp(v))  # softplus
    bce = [[sp(-2.0), sp(1.0)], [sp(2.0), sp(-3.0), sp(-0.5)]]  # -log d on real, -log(1 - d) on fake
    assert figure["count"] == [2, 3, 0]
    assert figure["bce"][:2] == pytest.approx([np.mean(b) for b in bce], abs=1e-6)
    assert figure["bce_se"][:2] == pytest.approx([np.std(b, ddof=1) / math.sqrt(len(b)) for b in bce], abs=1e-6)
    assert figure["accuracy"] == [0.5, 2 / 3, 0.0]  # bin 0: real 2 right, fake 1 wrong; bin 1: -2 wrong, -3 and 0.5 right
    assert figure["edges"] == pytest.approx([0, 1 / 3, 2 / 3, 1])


def test_rule_keeps_bins_from_the_bottom_while_bce_is_two_standard_errors_below_ln2():
    edges = [0.0, 0.25, 0.5, 0.75, 1.0]
    figure = lambda bce, se: {"edges": edges, "count": [100] * 4, "bce": bce, "bce_se": se}
    assert auto_t_max(figure([0.1, 0.2, 0.3, 0.4], [0.01] * 4)) == 1.0
    assert auto_t_max(figure([0.1, 0.2, LN2, 0.1], [0.01] * 4)) == 0.5  # an informative bin above a blind one is cut
    assert auto_t_max(figure([0.1, LN2 - 0.019, 0.1, 0.1], [0.01] * 4)) == 0.25  # 1.9 standard errors: not enough
    assert auto_t_max(figure([0.1, LN2 - 0.021, 0.1, 0.1], [0.01] * 4)) == 1.0  # 2.1: enough
    assert auto_t_max(figure([LN2, 0.1, 0.1, 0.1], [0.0] * 4)) is None


def test_held_out_times_and_noise_are_per_sample_in_their_bins():
    bins, t, z = times_and_noise(range(9), True, (2,), 4, seed=0, t_min=1e-5)
    assert bins.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0]
    edges = bin_edges(4).float()
    assert torch.all((t >= edges[bins].clamp(min=1e-5)) & (t <= edges[bins + 1]))
    shares = [times_and_noise(range(r, 9, 2), True, (2,), 4, 0, 1e-5) for r in range(2)]  # rank r's share of 2
    assert torch.equal(torch.cat([shares[0][1], shares[1][1]]), t[[0, 2, 4, 6, 8, 1, 3, 5, 7]])
    assert torch.equal(shares[1][2], z[1::2])
    fake = times_and_noise(range(9), False, (2,), 4, 0, 1e-5)
    assert not torch.equal(fake[2], z)  # the fake split has its own draws


@pytest.mark.parametrize("cut, t_max", [(1.1, 1.0), (0.5, 0.5)])
def test_exact_head_is_not_cut_and_a_head_blind_above_a_known_t_is_cut_there(compose_cfg, tmp_path, cut, t_max):
    cfg = compose_cfg(*HELD_OUT)
    record = train_point_masses(cfg, cut, tmp_path / "train")
    assert [e["epoch"] for e in record["epochs"]] == [0, 1]
    last = record["epochs"][-1]
    assert last["count"] == [2 * N_HELD // 4] * 4  # bin i mod 4 of each split
    for k, bce in enumerate(last["bce"]):
        if last["edges"][k] >= cut:  # blind: logit 0 on every sample
            assert bce == pytest.approx(LN2, abs=1e-6) and last["accuracy"][k] == 0.5
        else:  # exact and far apart: BCE ~ 0 (at t = 1, alpha M ~ 67 standard deviations)
            assert bce < 1e-6 and last["accuracy"][k] == 1.0
    assert (tmp_path / "train" / FIGURE).is_file()
    metrics = {}
    resolved = resolve_t_max(cfg, tmp_path / "train", metrics)
    assert resolved.guidance.dg.t_max == t_max and metrics == {"guidance/t_max_auto": t_max}
    assert cfg.guidance.dg.t_max == "auto"  # the config itself is left as it is
    fixed = compose_cfg(*HELD_OUT[:-1], "guidance.dg.t_max=0.3")
    assert resolve_t_max(fixed, tmp_path / "train", metrics) is fixed  # a number is used as it is


def test_auto_without_held_out_figures_names_the_key_and_the_fix(compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"'guidance.dg.t_max': is auto but .* no held-out figures .*held_out.json.*"
                                          r"Fix: configure callbacks.held_out"):
        resolve_t_max(compose_cfg(*HELD_OUT), tmp_path, {})


@pytest.mark.parametrize("experiment, pipeline", [("toy2d", toy2d), ("digits_edm_g++", digits)])
def test_auto_leaves_the_train_stage_fingerprint_unchanged(compose_cfg, experiment, pipeline):
    from dg_lightning.pipelines.recipe import fingerprint

    (train,) = [s for s in pipeline.PIPELINE.stages if s.name == "train"]
    prints = {fingerprint(cfg, train.declared_keys(cfg)) for cfg in
              (compose_cfg(f"experiment={experiment}", f"guidance.dg.t_max={t_max}") for t_max in ("auto", 0.2, 1.0))}
    assert len(prints) == 1


DDP_SCRIPT = '''
import json, sys
from pathlib import Path
import torch
from hydra import compose, initialize_config_dir
sys.path.insert(0, sys.argv[3])
from test_held_out import HELD_OUT, point_mass_task, point_swd_task, train_point_masses
from dg_lightning.pipelines.recipe import launch
torch.set_num_threads(1)
out, trainer, task = Path(sys.argv[1]), sys.argv[4], sys.argv[5]
tasks = {"images": ("fid", point_mass_task), "points": ("swd", point_swd_task)}
with initialize_config_dir(config_dir=sys.argv[2], version_base="1.3"):
    cfg = compose("config", overrides=[*HELD_OUT, f"trainer={trainer}", f"paths.cache_dir={out}/cache",
                                       f"paths.output_dir={out}/out", "callbacks.sampling.every_n_epochs=1",
                                       "callbacks.sampling.num_samples=30", f"callbacks.sampling.monitor={tasks[task][0]}"])
launch(cfg)
train_point_masses(cfg, 0.5, out / "train", tasks[task][1])
'''


@pytest.mark.slow
def test_two_ddp_ranks_give_the_one_rank_figures(tmp_path):
    script = tmp_path / "held_out_ddp.py"
    script.write_text(DDP_SCRIPT)
    records, sampling, figures = {}, {}, {}
    for trainer, task in [(trainer, task) for trainer in ("default", "ddp_cpu") for task in ("images", "points")]:
        out = tmp_path / trainer / task
        result = subprocess.run([sys.executable, str(script), str(out), str(ROOT / "conf"), str(Path(__file__).parent),
                                 trainer, task], capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        records[trainer] = json.loads((out / "train" / FIGURES).read_text())["epochs"]
        state = load_weights(out / "train" / "checkpoints" / "last.ckpt")["callbacks"]
        sampling[trainer, task] = next(v for k, v in state.items() if k.startswith("GuidedSamplingCallback"))["history"]
        figures[trainer, task] = (out / "train" / "sampling" / "samples_epoch1.png").read_bytes()
    one, two = records["default"], records["ddp_cpu"]
    assert [e["count"] for e in two] == [e["count"] for e in one]
    for a, b in zip(one, two):  # the same samples, summed in another order
        for name in ("bce", "bce_se", "accuracy"):
            assert b[name] == pytest.approx(a[name], abs=1e-9), name
    # The sampling callback's figures (the head is left unchanged by training): the same 30 samples drawn on one rank
    # or split over two, the same real images; FID's float64 sums in another order, precision / recall exact.
    one, two = sampling["default", "images"], sampling["ddp_cpu", "images"]
    assert [h["epoch"] for h in one] == [h["epoch"] for h in two] == [0, 1]
    for a, b in zip(one, two):
        assert b["fid"] == pytest.approx(a["fid"], rel=1e-9) and a["fid"] > 0
        assert (b["precision"], b["recall"]) == (a["precision"], a["recall"])
    # The toy's kind of task: points gathered from two ranks in another order give the same SWD (sorted projections,
    # float64 sums) and the figure gets the same points in index order.
    one, two = sampling["default", "points"], sampling["ddp_cpu", "points"]
    assert [h["epoch"] for h in one] == [h["epoch"] for h in two] == [0, 1]
    for a, b in zip(one, two):
        assert b["swd"] == pytest.approx(a["swd"], rel=1e-9) and a["swd"] > 0
    assert figures["default", "points"] == figures["ddp_cpu", "points"]
