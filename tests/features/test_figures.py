"""Every features figure: panels, titles, colour scales, saved files, no figure leak."""

from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest

import reconviz.features as rf
from reconviz.errors import InputError
from features_fixtures import _one_thread, digits  # noqa: F401 (fixtures)

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def made(digits):
    """The results the figures draw, computed once."""
    model, x, y, names = digits
    x, y = x[:120], y[:120]
    return {
        "model": model, "x": x, "y": y, "names": names,
        "dead": rf.dead_units(model, (x, y)),
        "patches": rf.top_patches(model, (x, y), "features.6", [0, 1, 2], k=4),
        "embedding": rf.embedding(model, (x, y), method="pca"),
        "max": rf.maximise(model, x[:1], [0, 1, 2], steps=10, clip=(0, 1)),
        "neurons": rf.cluster_neurons(model, (x, y), "features.6", 3),
    }


@pytest.fixture(autouse=True)
def _close_new_figures():
    """The panel tests draw unsaved (pyplot) figures, which is cheaper than rendering: close them."""
    before = set(plt.get_fignums())
    yield
    for n in set(plt.get_fignums()) - before:
        plt.close(n)


def image_axes(fig):
    return [ax for ax in fig.axes if ax.images]


def colorbars(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def title(fig):
    return fig._suptitle.get_text() if fig._suptitle else " ".join(ax.get_title() for ax in fig.axes)


FIGURES = {
    "feature_maps": lambda d, p: rf.feature_maps(d["model"], d["x"], "features.2", probe=3, path=p),
    "feature_maps signed": lambda d, p: rf.feature_maps(d["model"], d["x"], "features.0", max_channels=8, path=p),
    "dead_units_bar": lambda d, p: rf.dead_units_bar(d["dead"], path=p),
    "patches_figure": lambda d, p: rf.patches_figure(d["patches"], class_names=d["names"], path=p),
    "filters": lambda d, p: rf.filters(d["model"], path=p),
    "filters deep": lambda d, p: rf.filters(d["model"], "features.4", max_filters=10, path=p),
    "embedding_scatter": lambda d, p: rf.embedding_scatter(d["embedding"], class_names=d["names"], path=p),
    "embedding_images": lambda d, p: rf.embedding_images(d["embedding"], (d["x"], d["y"]), grid=6, path=p),
    "maximisation_figure": lambda d, p: rf.maximisation_figure(d["model"], d["max"], d["x"], d["y"], path=p),
    "clustering_figure": lambda d, p: rf.clustering_figure(d["neurons"], patches=d["patches"], path=p),
}


@pytest.mark.parametrize("name", list(FIGURES))
def test_saved_without_leak(made, name, tmp_path):
    before = plt.get_fignums()
    path = tmp_path / "sub" / f"{name}.png"
    fig = FIGURES[name](made, str(path))  # dpi 100: a few hundred pixels per side
    assert plt.get_fignums() == before, "a saved figure was registered with pyplot"
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    assert fig.axes and title(fig)


@pytest.mark.parametrize("name", ["feature_maps", "filters"])
def test_unsaved_figure_is_a_pyplot_figure(made, name):
    before = set(plt.get_fignums())
    fig = FIGURES[name](made, None)
    new = set(plt.get_fignums()) - before
    assert len(new) == 1
    plt.close(fig)
    assert set(plt.get_fignums()) == before


def test_feature_map_mosaic_and_scales(made):
    fig = FIGURES["feature_maps"](made, None)
    (ax,) = image_axes(fig)
    im = ax.images[0]
    assert im.get_array().shape == (4 * 9 - 1, 4 * 9 - 1)  # 16 maps of 8 x 8, 4 per row, 1-pixel gaps
    assert [t.get_text() for t in ax.get_yticklabels()] == ["ch 0", "ch 4", "ch 8", "ch 12"]
    acts = rf.activations(made["model"], made["x"], "features.2")["features.2"][3].double().numpy()
    np.testing.assert_allclose(np.asarray(im.get_array())[9:17, 0:8], acts[4], rtol=1e-6)  # row 1, column 0: ch 4
    assert im.get_clim() == (0, pytest.approx(float(acts.max()), rel=1e-6))  # sequential from 0: ReLU maps
    assert "features.2" in title(fig) and "probe 3" in title(fig) and len(colorbars(fig)) == 1
    signed = FIGURES["feature_maps signed"](made, None)
    im = image_axes(signed)[0].images[0]
    lo, hi = im.get_clim()
    assert im.get_array().shape == (3 * 9 - 1, 3 * 9 - 1) and lo == -hi and im.cmap.name == "RdBu_r"
    assert "first 8 of 16" in title(signed)


def test_filters_mosaic_and_scales(made):
    fig = FIGURES["filters"](made, None)
    (ax,) = image_axes(fig)
    assert ax.images[0].get_array().shape == (15, 15) and ax.images[0].get_clim() == (-1, 1)
    assert "features.0" in title(fig) and "per-filter scale" in title(fig) and len(colorbars(fig)) == 1
    deep = FIGURES["filters deep"](made, None)
    im = image_axes(deep)[0].images[0]
    assert im.get_array().shape == (3 * 4 - 1, 4 * 4 - 1) and im.cmap.name == "inferno"
    assert "hard to read" in title(deep)


def test_patches_rows(made):
    fig = FIGURES["patches_figure"](made, None)
    rows = image_axes(fig)
    p = made["patches"]
    h, w = p.field.extent
    assert len(rows) == 3 and [ax.get_ylabel() for ax in rows] == ["ch 0", "ch 1", "ch 2"]
    assert rows[0].images[0].get_array().shape == (h, 4 * (w + 1) - 1)
    ticks = [t.get_text() for t in rows[1].get_xticklabels()]
    assert ticks == [f"{float(p.values[1, j]):.3g}\ny={made['names'][int(p.labels[1, j])]}" for j in range(4)]
    assert "Top-4 patches of features.6 over 120 inputs" in title(fig)


def test_dead_units_bars(made, tmp_path):
    fig = FIGURES["dead_units_bar"](made, None)
    bars = fig.axes[0].patches
    dead = made["dead"]
    assert len(bars) == 2 * len(dead.layers)
    np.testing.assert_allclose([b.get_height() for b in bars[: len(dead.layers)]], list(dead.fraction.values()))
    assert f"{dead.n_inputs} inputs" in title(fig)


def test_embedding_figures(made, tmp_path):
    fig = FIGURES["embedding_scatter"](made, None)
    ax = fig.axes[0]
    assert len(ax.collections) == len(np.unique(made["y"])) and "5-NN accuracy" in ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()][:2] == ["0", "1"]
    grid = FIGURES["embedding_images"](made, None)
    canvas = np.asarray(image_axes(grid)[0].images[0].get_array())
    assert canvas.shape == (6 * 8, 6 * 8)
    filled = sum(not np.isnan(canvas[r * 8, c * 8]) for r in range(6) for c in range(6))
    assert 6 <= filled <= 36 and f"{filled} of 36 cells" in title(grid)


def test_maximisation_rows(made):
    fig = FIGURES["maximisation_figure"](made, None)
    rows = image_axes(fig)
    assert [ax.get_ylabel() for ax in rows] == ["optimised image", "$W_c$ at the image", "class-mean $W_c$"]
    assert all(ax.images[0].get_array().shape == (8, 3 * 9 - 1) for ax in rows)  # classes 0, 1, 2 side by side
    np.testing.assert_allclose(np.asarray(rows[0].images[0].get_array())[:, :8], made["max"].images[0, 0].numpy())
    for ax in rows[1:]:
        lo, hi = ax.images[0].get_clim()
        assert lo == -hi and ax.images[0].cmap.name == "RdBu_r"
    ticks = [t.get_text() for t in rows[0].get_xticklabels()]
    assert len(ticks) == 3 and ticks[0].startswith("0\nlogit") and len(colorbars(fig)) == 2


def test_clustering_panels(made, tmp_path):
    fig = FIGURES["clustering_figure"](made, None)
    neurons = made["neurons"]
    heat = fig.axes[1]
    assert heat.images[0].get_array().shape == (32, 10)
    labels = [t.get_text() for t in heat.get_yticklabels()]
    assert len(labels) == 32 and all("[" in t for t in labels)
    assert "top classes per cluster" in title(fig) and "3 clusters" in title(fig)
    assert len(neurons.to_dict()["clusters"]) == 3


@pytest.mark.parametrize("call, fragment", [
    (lambda d: rf.dead_units_bar("x"), "dead_units"),
    (lambda d: rf.patches_figure(d["embedding"]), "top_patches"),
    (lambda d: rf.patches_figure(d["patches"], channels=[9]), "not searched"),
    (lambda d: rf.embedding_scatter(d["patches"]), "embedding"),
    (lambda d: rf.clustering_figure(d["patches"]), "Clustering"),
    (lambda d: rf.feature_maps(d["model"], d["x"], "features.2", probe=500), "probe"),
    (lambda d: rf.filters(d["model"], path="f.bmp"), "format"),
])
def test_bad_figure_input(made, call, fragment):
    before = plt.get_fignums()
    with pytest.raises(InputError, match=fragment):
        call(made)
    for n in set(plt.get_fignums()) - set(before):
        plt.close(n)
