"""Figures, labelled in words: the toy 2-D panels (paper Figures 6 and 8), sample grids and sweep plots."""

import statistics

import numpy as np
from matplotlib.figure import Figure

from dg_lightning.files import write_atomic

SETS = {  # sample sets by their internal names (pipeline keys, metric prefixes), in a reader's words
    "data": "real data", "floor": "2nd real-data sample", "no_dg": "no DG", "dg": "DG (trained)", "dg_optimal": "DG with d*",
    "eval": "DG (trained)", "eval_unguided": "no DG", "eval_floor": "real digits",
}
QUANTITIES = {"swd": "SWD", "fid": "FID", "sfid": "sFID", "kid": "KID", "is": "Inception score", "precision": "Precision",
              "recall": "Recall"}
KEYS = {"guidance.dg.weight": "DG weight", "guidance.dg.t_min": "DG window start", "guidance.dg.t_max": "DG window end"}



def save(fig, path):
    """Write fig as a PNG to path atomically (files.write_atomic)."""
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))


def split_metric(metric):
    """(set, quantity, pattern) of a metric name, pattern.format(set) giving it back: eval_floor/fid -> ("eval_floor",
    "fid", "{}/fid"); toy/swd_dg -> ("dg", "swd", "toy/swd_{}")."""
    group, _, name = metric.partition("/")
    if group == "toy":
        quantity, _, sample_set = name.partition("_")
        return sample_set, quantity, f"toy/{quantity}_{{}}"
    return group, name, f"{{}}/{name}"


def metric_words(metric):
    """A metric in words ("FID of no DG"), or its name when it is not a known quantity of a known set."""
    sample_set, quantity, _ = split_metric(metric)
    if sample_set not in SETS or quantity not in QUANTITIES:
        return metric
    return f"{QUANTITIES[quantity]} of {SETS[sample_set]}"


def short_key(key):
    """The last part of a dotted config key (guidance.dg.t_min -> t_min), for column and line labels."""
    return key.rsplit(".", 1)[-1]


def key_words(key):
    """A config key in words with the key itself ("DG weight (guidance.dg.weight)"), or the key."""
    return f"{KEYS[key]} ({key})" if key in KEYS else key


def plane_axes(ax, reference):
    """Square axes x_1, x_2 of the 2-D plane, 1.3 times the largest coordinate of the reference points."""
    lim = reference.abs().max().item() * 1.3
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xlabel="$x_1$", ylabel="$x_2$")


def toy2d_figure(reference, samples, taus, curves, swd, path):
    """Real data, the named sample sets (no DG, DG, DG with d*) with their SWD to it, and the discriminator's mean log
    ratio over VP time for each named set of `curves`; `swd` also holds the floor (a second data sample)."""
    panels = {"data": reference, **samples}
    fig = Figure(figsize=(3.6 * (len(panels) + 1) + 2, 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels) + 1)
    for ax, (name, x) in zip(axes, panels.items()):
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4)
        score = f"floor ({SETS['floor']}): SWD {swd['floor']:.3f}" if name == "data" else f"SWD {swd[name]:.3f}"
        ax.set_title(f"{SETS[name]}\n{score}", fontsize=10)
        plane_axes(ax, reference)
    ax = axes[-1]
    for name, values in curves.items():
        ax.plot(taus, values, label=SETS[name])
    ax.axhline(0.0, color="grey", lw=0.8, ls="--", label="0: d = 1/2 (real and fake alike)")
    ax.set(xscale="log", xlabel="VP diffusion time t (log scale)", ylabel="mean log d / (1 - d)")
    ax.set_title("trained discriminator's mean log ratio\non each set diffused to time t", fontsize=10)
    ax.legend(title="discriminator on", fontsize=8, title_fontsize=8,  # outside the axes: the curves fill them
              loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("Toy 2-D mixture: samples from a wrong score model, without and with DG\n"
                 "SWD: sliced Wasserstein distance to real data, lower is better; d*: the exact optimal discriminator")
    save(fig, path)
    return fig


def sampling_points_figure(reference, points, path, epoch, results):
    """The guided-sampling callback's figure for 2-D points: the DG samples of one evaluation over real data, with
    the epoch and the task's metrics in the title."""
    fig = Figure(figsize=(5.2, 5.4), layout="constrained")
    ax = fig.subplots()
    ax.scatter(reference[:, 0], reference[:, 1], s=1, alpha=0.3, color="grey", label=SETS["data"])
    ax.scatter(points[:, 0], points[:, 1], s=1, alpha=0.5, label="DG samples with this epoch's head")
    plane_axes(ax, reference)
    ax.legend(loc="upper right", markerscale=8, fontsize=8)
    scores = ", ".join(f"{QUANTITIES.get(name, name)} {value:.3f}" for name, value in results.items())
    ax.set_title(f"DG samples after {epoch + 1} epochs of discriminator training\n{scores}", fontsize=10)
    save(fig, path)
    return fig


def tiles(images, count, gap=1):
    """The first `count` images (uint8 NHWC) tiled in a square grid with `gap` pixels of mid grey between them."""
    n = int(min(count, len(images)) ** 0.5)
    h, w, c = images.shape[1:]
    grid = np.full((n * (h + gap) - gap, n * (w + gap) - gap, c), 128, dtype=np.uint8)
    for i, image in enumerate(images[: n * n]):
        row, col = divmod(i, n)
        grid[row * (h + gap): row * (h + gap) + h, col * (w + gap): col * (w + gap) + w] = image
    return grid


def image_grid(samples, fid, path, title, count=64):
    """One panel per named uint8 NHWC sample set, its first `count` images tiled, titled with its FID where `fid`
    (set name -> value or None) gives one."""
    fig = Figure(figsize=(3.6 * len(samples), 4.2), layout="constrained")
    for ax, (name, images) in zip(fig.subplots(1, len(samples), squeeze=False)[0], samples.items()):
        grid = tiles(images, count)
        ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255)
        ax.set_title(SETS[name] if fid.get(name) is None else f"{SETS[name]} (FID {fid[name]:.2f})")
        ax.axis("off")
    fig.suptitle(title)
    save(fig, path)
    return fig


def sweep_figure(cells, baselines, label, x_key, col_key, path):
    """`label` against the x_key values, one line per col_key value, from report.pooled's {(x, column): values}: each
    point the mean of its values, with the sample std as an error bar where there are several; each of `baselines`
    ({legend text: value}) a dashed, then dotted, horizontal line."""
    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.subplots()
    for col in dict.fromkeys(col for _, col in cells):
        points = [(x, values) for (x, c), values in cells.items() if c == col and x != "all"]
        means = [statistics.mean(v) for _, v in points]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in points]
        ax.errorbar([x for x, _ in points], means, yerr=stds, marker="o", capsize=3, label=f"{short_key(col_key)} = {col}")
    for (text, value), style in zip(baselines.items(), ("--", ":")):
        ax.axhline(value, color="black", lw=1, ls=style, label=text)
    ax.set(xlabel=key_words(x_key), ylabel=label)
    ax.set_title(f"{label}\none line per {key_words(col_key)}\nmean ± sample std of the jobs at each point", fontsize=10)
    ax.legend(fontsize=8)
    save(fig, path)
    return fig
