"""Held-out diagnostics of the discriminator and the DG window chosen from them (guidance.dg.t_max=auto).

Every epoch, HeldOutDiagnostics measures the head's BCE and accuracy per noise-level bin of VP time t on a held-out
split of real and fake samples (data.num_held_out of each) that training never sees. Held-out sample i of the real (or
fake) split is diffused at its own VP time t_i, uniform inside bin i mod K of the K equal bins of [0, 1] (above the
training's t_min), with its own noise z_i, both drawn from its seed sample_seed(seed, 2 i + is_real): every epoch sees
the same diffused set, on any number of ranks, so the epochs' figures are comparable.

The rule of t_max=auto (chosen before any FID was looked at): a bin is informative when its held-out BCE is below
chance, ln 2, by more than AUTO_MARGIN standard errors of its mean (the per-sample BCE's sample standard deviation over
sqrt(n)); bins are kept from the lowest t up while they are informative, and t_max is the upper edge of the last one
kept. Above it the head's ratio is noise on held-out data, and guiding with it there adds that noise to the samples.
"""

import json
import logging
import math
from pathlib import Path

import lightning as L
import matplotlib
import torch
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from torch.nn import functional as F

from dg_lightning.config import ConfigError
from dg_lightning.files import write_atomic
from dg_lightning.plots import save
from dg_lightning.seeds import sample_seed

log = logging.getLogger(__name__)
LN2 = math.log(2.0)
AUTO_MARGIN = 2.0  # standard errors below ln 2 that make a bin informative
FIGURES = "held_out.json"  # in the train stage's folder: the figures of every epoch
FIGURE = "held_out.png"


def bin_edges(num_bins):
    """The K + 1 edges of K equal noise-level bins of VP time on [0, 1]."""
    return torch.linspace(0.0, 1.0, num_bins + 1, dtype=torch.float64)


def times_and_noise(indices, is_real, shape, num_bins, seed, t_min):
    """(bins (B,), VP times t (B,), noise z (B, *shape)) of the held-out samples `indices` of the real or fake split:
    sample i in bin i mod K at a time uniform in the bin (at least t_min), t and z from its seed."""
    edges, times, noise = bin_edges(num_bins), [], []
    bins = torch.as_tensor(indices, dtype=torch.int64) % num_bins
    for i, k in zip(indices, bins.tolist()):
        generator = torch.Generator().manual_seed(sample_seed(seed, 2 * int(i) + int(is_real)))
        low = max(float(edges[k]), t_min)
        times.append(low + (float(edges[k + 1]) - low) * torch.rand((), generator=generator, dtype=torch.float64))
        noise.append(torch.randn(shape, generator=generator))
    return bins, torch.stack(times).float(), torch.stack(noise)


def bin_sums(logit, is_real, bins, num_bins):
    """(4, K) sums per bin of [1, BCE, BCE^2, correct] for logits of samples labelled is_real (BCE: -log d on real,
    -log(1 - d) on fake; correct: logit > 0 exactly on real)."""
    bce = torch.where(is_real, F.softplus(-logit), F.softplus(logit)).double()
    values = torch.stack([torch.ones_like(bce), bce, bce**2, ((logit > 0) == is_real).double()])
    return torch.zeros(4, num_bins, dtype=torch.float64, device=logit.device).index_add_(1, bins.to(logit.device), values)


def figures(sums, edges):
    """Per-bin figures from bin_sums (summed over every sample): count, mean BCE, its standard error (sample std /
    sqrt(n); 0 for n < 2) and accuracy, as lists, with the bins' edges."""
    count, total, squares, correct = sums.double().cpu()
    mean = total / count.clamp(min=1)
    variance = (squares - count * mean**2).clamp(min=0) / (count - 1).clamp(min=1)
    se = torch.where(count > 1, (variance / count.clamp(min=1)).sqrt(), torch.zeros_like(mean))
    return {"edges": edges.tolist(), "count": count.long().tolist(), "bce": mean.tolist(), "bce_se": se.tolist(),
            "accuracy": (correct / count.clamp(min=1)).tolist()}


def auto_t_max(figure, margin=AUTO_MARGIN):
    """The upper edge of the last bin, counted from the lowest t, of the unbroken run of bins whose held-out BCE is
    below ln 2 by more than `margin` standard errors; None when the lowest bin already is not."""
    t_max = None
    for k, (count, bce, se) in enumerate(zip(figure["count"], figure["bce"], figure["bce_se"])):
        if count < 2 or LN2 - bce <= margin * se:
            break
        t_max = figure["edges"][k + 1]
    return t_max


class HeldOutDiagnostics(L.Callback):
    """At every training epoch's end: the discriminator's BCE and accuracy per noise-level bin on the data module's
    held-out split (its `held_out`: (real, fake) ArraySources; a fit without one is left alone), logged as
    held_out/bce_bin<k>, held_out/accuracy_bin<k>, held_out/bce and held_out/accuracy, and written with every earlier
    epoch's to held_out.json and held_out.png in the trainer's folder (rank 0). Rank r evaluates the samples i with
    i % world_size == r; the per-bin sums are added over the ranks, so the figures do not depend on their number."""

    def __init__(self, num_bins=10, seed=0, batch_size=256):
        if not isinstance(num_bins, int) or num_bins < 1:
            raise ValueError(f"HeldOutDiagnostics num_bins must be an integer >= 1, got {num_bins!r}")
        self.num_bins, self.seed, self.batch_size = num_bins, seed, batch_size
        self.data, self.splits, self.history = None, None, []

    def setup(self, trainer, pl_module, stage):
        """This rank's share of the held-out split: (source, indices, is_real) of each of its halves (None without
        a split)."""
        held_out = getattr(trainer.datamodule, "held_out", None)
        if held_out is None:
            return
        self.data, rank, world_size = trainer.datamodule, trainer.global_rank, trainer.world_size
        self.splits = [(source, list(range(rank, len(source), world_size)), is_real)
                       for source, is_real in zip(held_out, (True, False))]

    def on_train_epoch_end(self, trainer, pl_module):
        """Measure and log this epoch's figures, and keep them in the history."""
        if self.splits is None:
            return
        sums = self.measure(pl_module)
        if trainer.world_size > 1:
            sums = trainer.strategy.reduce(sums, reduce_op="sum")
        figure = {"epoch": trainer.current_epoch, **figures(sums, bin_edges(self.num_bins))}
        self.history = [h for h in self.history if h["epoch"] < figure["epoch"]] + [figure]
        logged = {f"held_out/{name}_bin{k}": value for name in ("bce", "accuracy") for k, value in enumerate(figure[name])}
        count, total, _, correct = sums.sum(dim=1).tolist()
        logged.update({"held_out/bce": total / count, "held_out/accuracy": correct / count})
        pl_module.log_dict(logged, sync_dist=True)  # equal on every rank already: the mean keeps them

    def on_train_end(self, trainer, pl_module):
        """Write every epoch's figures once, at the end (per epoch, a long run would redraw them O(epochs^2))."""
        if self.splits is not None and trainer.is_global_zero:
            write_figures(self.history, Path(trainer.default_root_dir))

    def measure(self, pl_module):
        """(4, K) bin_sums of this rank's held-out samples, diffused batch by batch at their own times and noise
        (times_and_noise), under the module's current discriminator."""
        sums = torch.zeros(4, self.num_bins, dtype=torch.float64, device=pl_module.device)
        device = pl_module.device
        with pl_module.guiding_weights(), torch.no_grad():
            for source, indices, is_real in self.splits:
                for start in range(0, len(indices), self.batch_size):
                    batch = indices[start:start + self.batch_size]
                    x0, labels = source.fetch(batch)
                    bins, t, z = times_and_noise(batch, is_real, x0.shape[1:], self.num_bins, self.seed, self.data.t_min)
                    x_t = self.data.vp.diffuse(x0, t, z).to(device)
                    labels = labels.to(device) if labels is not None and self.data.conditional else None
                    logit = pl_module(x_t, t.to(device), labels).float()
                    sums += bin_sums(logit, torch.full_like(logit, is_real, dtype=torch.bool), bins, self.num_bins)
        return sums

    def state_dict(self):
        """The figures of every epoch so far (a resumed run keeps them)."""
        return {"history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict):
        """Restore the figures of the epochs before the resume."""
        self.history = [dict(h) for h in state_dict["history"]]


def write_figures(history, folder: Path):
    """held_out.json ({"auto_margin", "epochs": history}) and held_out.png (figure) in folder."""
    record = {"auto_margin": AUTO_MARGIN, "epochs": history}
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / FIGURES, lambda f: f.write((json.dumps(record, indent=1) + "\n").encode()))
    save(held_out_figure(history), folder / FIGURE)


def held_out_figure(history):
    """Held-out accuracy and BCE against VP time t (bin centres), one line per epoch (darker: later)."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    cmap = matplotlib.colormaps["viridis_r"]
    for n, figure in enumerate(history):
        edges = figure["edges"]
        centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
        colour = cmap(n / max(1, len(history) - 1))
        label = f"epoch {figure['epoch'] + 1}" if n in (0, len(history) - 1) else None
        axes[0].plot(centres, figure["accuracy"], color=colour, label=label, marker=".")
        axes[1].plot(centres, figure["bce"], color=colour, label=label, marker=".")
    axes[0].axhline(0.5, color="grey", linestyle="--", label="chance (0.5)")
    axes[1].axhline(LN2, color="grey", linestyle="--", label="chance (ln 2)")
    for ax, what, better in zip(axes, ("accuracy", "BCE"), ("higher", "lower")):
        ax.set_xlabel("VP time t (noise level; 0 is clean data)")
        ax.set_ylabel(f"held-out {what} ({better} is better)")
        ax.set_title(f"Discriminator {what} on held-out real and fake\nsamples, per noise-level bin")
        ax.legend(fontsize="small")
    return fig


def resolve_t_max(cfg: DictConfig, train_folder, metrics):
    """cfg with guidance.dg.t_max=auto replaced by auto_t_max of the last epoch's figures in the train stage's
    held_out.json, recorded in metrics as guidance/t_max_auto (the lowest bin's upper edge, with a warning, when no bin
    is informative); cfg itself when t_max is a number."""
    if cfg.guidance.dg.t_max != "auto":
        return cfg
    path = Path(train_folder) / FIGURES
    if not path.is_file():
        raise ConfigError("guidance.dg.t_max", f"is auto but the train stage's folder has no held-out figures {path} "
                          "(the head was trained without HeldOutDiagnostics)", "configure callbacks.held_out "
                          "(conf/callbacks/default.yaml) and delete that folder to train the head again, or set a number")
    last = json.loads(path.read_text())["epochs"][-1]
    t_max = auto_t_max(last)
    if t_max is None:
        t_max = last["edges"][1]
        log.warning("guidance.dg.t_max=auto: no noise-level bin of %s has a held-out BCE below ln 2 by %s standard "
                    "errors; DG is kept to the lowest bin, t <= %s", path, AUTO_MARGIN, t_max)
    metrics["guidance/t_max_auto"] = t_max
    return with_t_max(cfg, t_max)


def with_t_max(cfg: DictConfig, t_max):
    """A copy of cfg with guidance.dg.t_max set to t_max."""
    cfg = cfg.copy()
    OmegaConf.update(cfg, "guidance.dg.t_max", t_max)
    return cfg


def sampling_window(cfg: DictConfig):
    """cfg as the guided-sampling callback samples with it while the head trains: guidance.dg.t_max=auto, which the
    trained head decides, as t_max = 1; cfg itself when t_max is a number."""
    return with_t_max(cfg, 1.0) if cfg.guidance.dg.t_max == "auto" else cfg
