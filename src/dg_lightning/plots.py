"""Figures: the toy 2-D panels (paper Figures 6 and 8) and sweep plots."""

import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dg_lightning.files import write_atomic  # noqa: E402


def save(fig, path):
    """Lay out fig, write it as a PNG to path atomically (files.write_atomic) and close it."""
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def toy2d_figure(reference, samples, taus, curves, metrics, path):
    """Data, samples without DG, with DG and with the optimal d*, and the mean log ratio over VP time."""
    panels = [("data", reference, None)] + [(name, x, metrics.get(f"toy/swd_{name}")) for name, x in samples.items()]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4 * (len(panels) + 1), 4))
    lim = reference.abs().max().item() * 1.3
    for ax, (name, x, swd) in zip(axes, panels):
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4)
        ax.set_title(name if swd is None else f"{name} (SWD {swd:.3f})")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    for name, values in curves.items():
        axes[-1].plot(taus, values, label=name)
    axes[-1].axhline(0.0, color="grey", lw=0.5)
    axes[-1].set_xscale("log")
    axes[-1].set_xlabel("VP time t")
    axes[-1].set_ylabel("mean log d/(1-d)")
    axes[-1].legend()
    save(fig, path)


def sweep_figure(cells, metric, x_key, line_name, path):
    """A metric against the x_key values, one line per column value, from report.pooled's {(x, column): values}: each
    point the mean of its values, with the sample std as an error bar where there are several."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for col in dict.fromkeys(col for _, col in cells):
        points = [(x, values) for (x, c), values in cells.items() if c == col and x != "all"]
        means = [statistics.mean(v) for _, v in points]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in points]
        ax.errorbar([x for x, _ in points], means, yerr=stds, marker="o", capsize=3, label=f"{line_name}={col}")
    ax.set_xlabel(x_key)
    ax.set_ylabel(metric)
    ax.legend()
    save(fig, path)


def image_grid(samples, path, count=64):
    """One panel per named uint8 NHWC sample set: the first `count` images tiled in a square grid."""
    fig, axes = plt.subplots(1, len(samples), figsize=(4 * len(samples), 4))
    for ax, (name, images) in zip(axes, samples.items()):
        n = int(min(count, len(images)) ** 0.5)
        h, w, c = images.shape[1:]
        tiles = images[: n * n].reshape(n, n, h, w, c).transpose(0, 2, 1, 3, 4).reshape(n * h, n * w, c)
        ax.imshow(tiles.squeeze(-1) if c == 1 else tiles, cmap="gray" if c == 1 else None, vmin=0, vmax=255)
        ax.set_title(name)
        ax.axis("off")
    save(fig, path)
