"""The figures read without the code: every panel titled in words inside the figure, axes labelled, the sample sets
named in the legends, and the 8x8 tiles of a sample grid parted by background rows and columns."""

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg

from dg_lightning.plots import image_grid, metric_words, sweep_figure, tiles, toy2d_figure


def texts_inside(fig):
    """Every non-empty title, suptitle, axis label and legend text of a drawn figure lies inside the figure."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer, box = canvas.get_renderer(), fig.bbox
    texts = [fig._suptitle] + [t for ax in fig.axes for t in (ax.title, ax.xaxis.label, ax.yaxis.label)]
    texts += [t for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    for text in texts:
        if text is not None and text.get_text():
            extent = text.get_window_extent(renderer)
            assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0 and extent.y1 <= box.y1, \
                f"{text.get_text()!r} is clipped: {extent} outside {box}"


def test_the_toy_figure_names_every_set_in_words_and_titles_every_panel(tmp_path):
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(50, 2, generator=generator)
    samples = {name: torch.randn(50, 2, generator=generator) for name in ("no_dg", "dg", "dg_optimal")}
    taus = [0.01, 0.1, 1.0]
    curves = {"data": [1.0, 0.5, 0.0], "no_dg": [-1.0, -0.5, 0.0], "dg": [-0.2, -0.1, 0.0]}
    swd = {"no_dg": 0.25, "dg": 0.125, "dg_optimal": 0.0625, "floor": 0.03125}
    fig = toy2d_figure(reference, samples, taus, curves, swd, tmp_path / "toy2d.png")
    assert (tmp_path / "toy2d.png").stat().st_size > 10000
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:4] == ["real data\nfloor (2nd real-data sample): SWD 0.031", "no DG\nSWD 0.250",
                          "DG (trained)\nSWD 0.125", "DG with d*\nSWD 0.062"]
    assert titles[4].startswith("trained discriminator's mean log ratio")
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes)
    legend = fig.axes[4].get_legend()
    assert [t.get_text() for t in legend.get_texts()][:3] == ["real data", "no DG", "DG (trained)"]
    assert "d*: the exact optimal discriminator" in fig.get_suptitle()
    texts_inside(fig)


def test_tiles_are_parted_by_background_rows_and_columns():
    """9 images of 2x3 pixels, image i all i (never the background 128): a 3x3 grid of 8x11 pixels whose gap rows and
    columns are 128 and whose tiles are the images in row order."""
    images = np.broadcast_to(np.arange(9, dtype=np.uint8)[:, None, None, None], (9, 2, 3, 1)).copy()
    grid = tiles(images, count=10)
    assert grid.shape == (8, 11, 1)
    assert (grid[[2, 5]] == 128).all() and (grid[:, [3, 7]] == 128).all()
    for i in range(9):
        row, col = divmod(i, 3)
        assert (grid[3 * row: 3 * row + 2, 4 * col: 4 * col + 3] == i).all()


def test_the_digits_grid_names_the_sets_in_words_with_their_fid(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (64, 8, 8, 1), dtype=np.uint8)
    samples = {"eval": images, "eval_unguided": images[::-1].copy(), "eval_floor": images}
    fig = image_grid(samples, {"eval": 3.5, "eval_unguided": 5.25, "eval_floor": 1.0}, tmp_path / "digits.png",
                     "8x8 digits")
    assert [ax.get_title() for ax in fig.axes] == ["DG (trained) (FID 3.50)", "no DG (FID 5.25)", "real digits (FID 1.00)"]
    assert fig.get_suptitle() == "8x8 digits"
    np.testing.assert_array_equal(fig.axes[1].images[0].get_array(), tiles(samples["eval_unguided"], 64)[..., 0])
    assert fig.axes[0].images[0].get_array().shape == (71, 71)  # 8 tiles of 8 pixels and 7 gaps a side
    texts_inside(fig)


def test_the_sweep_figure_of_a_paired_difference_fits_its_texts(tmp_path):
    cells = {(0.0, 0.0): [0.5, 0.25], (1.0, 0.0): [-1.0, -1.5], (0.0, 0.2): [0.75], (1.0, 0.2): [-0.5]}
    lines = {"no DG (baseline): 0": 0.0, "real digits (floor): -5.075": -5.075}
    fig = sweep_figure(cells, lines, metric_words("eval/fid") + " - " + metric_words("eval_unguided/fid"),
                       "guidance.dg.weight", "guidance.dg.t_min", tmp_path / "report.png")
    assert fig.axes[0].get_xlabel() == "DG weight (guidance.dg.weight)"
    assert fig.axes[0].get_ylabel() == "FID of DG (trained) - FID of no DG"
    texts_inside(fig)


@pytest.mark.parametrize("metric, words", [
    ("toy/swd_dg_optimal", "SWD of DG with d*"), ("toy/swd_floor", "SWD of 2nd real-data sample"),
    ("eval_unguided/fid", "FID of no DG"), ("eval/sfid", "sFID of DG (trained)"), ("train/loss", "train/loss"),
])
def test_metric_words(metric, words):
    assert metric_words(metric) == words
