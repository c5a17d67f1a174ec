"""Figures: panels, colour scales, captions, files, class names, grey-scale and RGB
inputs, no figure leaks, and the digits example script."""

from __future__ import annotations

import gc
import os
import weakref

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reconviz as rv
from reconviz.errors import InputError

matplotlib.use("Agg")

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


class SmallCNN(nn.Module):
    """conv -> ReLU -> max-pool -> linear, for (C, S, S) inputs."""

    def __init__(self, channels: int, size: int, classes: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.fc = nn.Linear(4 * (size // 2) ** 2, classes)

    def forward(self, x):
        return self.fc(F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1))


def _setup(channels: int, size: int, classes: int, n: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    model = SmallCNN(channels, size, classes).eval()
    x = torch.randn(n, channels, size, size)
    return model, x, rv.reconstruct(model, x)


@pytest.fixture(scope="module")
def grey():
    return _setup(1, 8, 10)


@pytest.fixture(scope="module")
def rgb():
    return _setup(3, 16, 4)


def image_axes(fig):
    return [ax for ax in fig.axes if ax.images]


def texts(fig) -> str:
    parts = [fig._suptitle.get_text() if fig._suptitle else ""]
    for ax in fig.axes:
        parts += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        parts += [t.get_text() for t in ax.texts]
        parts += [t.get_text() for t in ax.get_xticklabels()]
        if ax.get_legend() is not None:
            parts += [t.get_text() for t in ax.get_legend().get_texts()]
        for tab in ax.tables:
            parts += [c.get_text().get_text() for c in tab.get_celld().values()]
    return "\n".join(parts)


def check_file(path, min_bytes=5000):
    assert os.path.getsize(path) > min_bytes, f"{path} is only {os.path.getsize(path)} bytes"
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".tmp")]  # no temp file left


# --------------------------------------------------------------------------
# templates
# --------------------------------------------------------------------------


def test_templates_grey(grey, tmp_path):
    model, x, rec = grey
    path = tmp_path / "templates.png"
    fig = rv.plot.templates(rec, probe=1, class_names=NAMES, path=path)
    check_file(path)
    axes = image_axes(fig)
    assert len(axes) == 10
    lim = float(rec.weight[1].abs().max())
    for k, ax in enumerate(axes):
        im = ax.images[0]
        np.testing.assert_allclose(im.get_array(), rec.weight[1, k, 0].numpy())
        assert im.get_clim() == pytest.approx((-lim, lim))  # centred at 0, shared
        assert im.get_cmap().name == "RdBu_r"
        assert ax.get_title().startswith(NAMES[k])
        assert f"logit {float(rec.logits[1, k]):.4f}" in ax.get_xlabel()
        assert f"bias {float(rec.bias[1, k]):.4f}" in ax.get_xlabel()
    pred = int(rec.predicted[1])
    assert "predicted" in axes[pred].get_title()
    assert sum("predicted" in ax.get_title() for ax in axes) == 1
    assert fig not in [plt.figure(n) for n in plt.get_fignums()]  # path=: not kept by pyplot


def test_templates_per_class_limits_subset_and_svg(grey, tmp_path):
    model, x, rec = grey
    path = tmp_path / "t.svg"
    fig = rv.plot.templates(rec, probe=0, classes=[7, 2], shared_limits=False, path=path)
    check_file(path)
    axes = image_axes(fig)
    assert len(axes) == 2
    for ax, c in zip(axes, [7, 2]):
        lim = float(rec.weight[0, c].abs().max())
        assert ax.images[0].get_clim() == pytest.approx((-lim, lim))
        assert ax.get_title().startswith(f"class {c}")  # no class_names: "class c"
    # class names as a mapping (missing ones fall back to "class c") or a numpy array
    fig = rv.plot.templates(rec, classes=[7, 2], class_names={7: "seven"}, path=tmp_path / "m.png")
    assert [ax.get_title().split("  ")[0] for ax in image_axes(fig)] == ["seven", "class 2"]
    fig = rv.plot.templates(rec, classes=[7], class_names=np.array(NAMES), path=tmp_path / "a.png")
    assert image_axes(fig)[0].get_title().startswith("seven")


def test_templates_rgb(rgb, tmp_path):
    model, x, rec = rgb
    path = tmp_path / "rgb.png"
    fig = rv.plot.templates(rec, probe=0, class_names=NAMES[:4], path=path)
    check_file(path)
    axes = image_axes(fig)
    assert len(axes) == 4 * 4  # R, G, B and the colour composite per class
    lim = float(rec.weight[0].abs().max())
    w = rec.weight[0].numpy()
    for k in range(4):
        r, g, b, colour = axes[4 * k : 4 * k + 4]
        for j, ax in enumerate((r, g, b)):
            np.testing.assert_allclose(ax.images[0].get_array(), w[k, j])
            assert ax.images[0].get_clim() == pytest.approx((-lim, lim))
        comp = np.asarray(colour.images[0].get_array())
        assert comp.shape == (16, 16, 3) and comp.min() >= 0 and comp.max() <= 1
        np.testing.assert_allclose(comp, np.clip(0.5 + w[k].transpose(1, 2, 0) / (2 * lim), 0, 1))
        assert r.get_ylabel().startswith(NAMES[k])
    assert "logit" in texts(fig) and "colour" in texts(fig)


def test_templates_errors(grey, tmp_path):
    model, x, rec = grey
    sub = rv.reconstruct(model, x, classes=[1, 3])
    with pytest.raises(InputError, match="class 5 was not reconstructed"):
        rv.plot.templates(sub, classes=[5])
    with pytest.raises(InputError, match="out of range"):
        rv.plot.templates(rec, probe=9)
    with pytest.raises(InputError, match="format"):
        rv.plot.templates(rec, path=tmp_path / "t.bmpx")
    assert not os.listdir(tmp_path)  # nothing written, no temp file left
    fig = rv.plot.templates(sub, path=tmp_path / "sub.png")
    assert [ax.get_title() for ax in image_axes(fig)][0].startswith("class 1")


def test_one_dimensional_inputs(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    rec = rv.reconstruct(model, torch.randn(2, 12))
    fig = rv.plot.templates(rec, path=tmp_path / "t.png")
    assert len(image_axes(fig)) == 3 and image_axes(fig)[0].images[0].get_array().shape == (1, 12)
    fig = rv.plot.contributions(rec, path=tmp_path / "c.png")
    assert len(image_axes(fig)) == 3


# --------------------------------------------------------------------------
# class-mean templates
# --------------------------------------------------------------------------


def test_class_mean_templates(grey, tmp_path):
    model, x, rec = grey
    labels = [3, 1, 3, 7]
    path = tmp_path / "mean.png"
    fig = rv.plot.class_mean_templates(rec, labels, class_names=NAMES, path=path)
    check_file(path)
    axes = image_axes(fig)
    assert [ax.get_title() for ax in axes] == ["one", "three", "seven"]
    np.testing.assert_allclose(axes[1].images[0].get_array(), rec.weight[[0, 2], 3, 0].mean(0).numpy())
    np.testing.assert_allclose(axes[0].images[0].get_array(), rec.weight[1, 1, 0].numpy())
    assert "n = 2 probes" in axes[1].get_xlabel() and "n = 1 probe\n" in axes[0].get_xlabel()
    # the same through templates(mean_over=...), and a class without probes
    fig2 = rv.plot.templates(rec, mean_over=torch.tensor(labels), classes=[3, 5], path=tmp_path / "m2.png")
    assert len(image_axes(fig2)) == 1 and "n = 0 probes" in texts(fig2) and "no probes" in texts(fig2)
    with pytest.raises(InputError, match="labels has 3 entries"):
        rv.plot.class_mean_templates(rec, [1, 2, 3])


def test_class_mean_templates_rgb(rgb, tmp_path):
    model, x, rec = rgb
    fig = rv.plot.class_mean_templates(rec, [0, 0, 2, 3], path=tmp_path / "m.png")
    check_file(tmp_path / "m.png")
    assert len(image_axes(fig)) == 3 * 4


# --------------------------------------------------------------------------
# contributions
# --------------------------------------------------------------------------


def _bars(ax):
    return [p for p in ax.patches]


@pytest.mark.parametrize("which", ["grey", "rgb"])
def test_contributions(which, grey, rgb, tmp_path):
    model, x, rec = grey if which == "grey" else rgb
    path = tmp_path / "c.png"
    n = 2
    logits = rec.logits[n]
    order = torch.argsort(logits, descending=True).tolist()
    chosen = [c for c in range(rec.n_classes) if c not in order[:2]][:1]
    fig = rv.plot.contributions(rec, probe=n, classes=chosen, class_names=NAMES, path=path)
    check_file(path)
    axes = image_axes(fig)
    assert len(axes) == 1 + 2  # the input, the predicted class, the chosen class
    assert "predicted" in axes[1].get_title() and axes[1].get_title().startswith(NAMES[order[0]])
    assert axes[2].get_title().startswith(NAMES[chosen[0]])
    contrib = rec.contributions()[n]
    for ax, k in zip(axes[1:], [order[0], chosen[0]]):
        shown = np.asarray(ax.images[0].get_array())
        np.testing.assert_allclose(shown, contrib[k].sum(0).numpy(), atol=1e-12)  # summed over channels
        # completeness, as drawn: the map sums with the bias to the logit
        assert shown.sum() + float(rec.bias[n, k]) == pytest.approx(float(logits[k]), abs=1e-9)
    # the bar panels: positive + negative + bias stack to the logit bar; the marker is the model's logit
    bar_axes = [ax for ax in fig.axes if len(ax.patches) == 4]
    assert len(bar_axes) == 2
    for ax, k in zip(bar_axes, [order[0], chosen[0]]):
        pos, neg, bias, total = _bars(ax)
        assert pos.get_height() + neg.get_height() + bias.get_height() == pytest.approx(total.get_height())
        assert total.get_height() == pytest.approx(float(logits[k]), abs=1e-9)
        marker = ax.lines[0].get_ydata()[0]
        assert marker == pytest.approx(float(logits[k]), abs=1e-12)
    # default: the predicted class and the runner-up
    fig = rv.plot.contributions(rec, probe=n, path=tmp_path / "c2.png")
    assert [ax.get_title().split("  ")[0] for ax in image_axes(fig)[1:]] == [f"class {c}" for c in order[:2]]


# --------------------------------------------------------------------------
# equivalence (the paper's Table 1)
# --------------------------------------------------------------------------


def test_equivalence(grey, tmp_path):
    model, x, rec = grey
    report = rv.verify(model, rec, radius=False, class_names=NAMES)
    path = tmp_path / "eq.png"
    fig = rv.plot.equivalence(report, probes=[0, 3], path=path)
    check_file(path)
    assert len(fig.axes) == 2 * 3  # per probe: table, outputs, error
    text = texts(fig)
    assert "PASS" in text and "probe 3" in text and "nine" in text and "tolerance 1e-09" in text
    cells = fig.axes[0].tables[0].get_celld()
    header = [cells[0, j].get_text().get_text() for j in range(4)]
    assert header == ["class", "original", "reconstructed", "difference"]
    first = [cells[1, j].get_text().get_text() for j in range(3)]
    assert first == ["zero", f"{float(rec.logits[0, 0]):.10f}", f"{float(rec(rec.probes)[0, 0]):.10f}"]
    # the bars are the two columns
    heights = [p.get_height() for p in fig.axes[1].patches]
    np.testing.assert_allclose(heights[:10], rec.logits[0].numpy())
    with pytest.raises(InputError):
        rv.plot.equivalence(rec)
    with pytest.raises(InputError):
        rv.plot.equivalence(report, probes=[7])


def test_equivalence_many_classes_rgb(tmp_path):
    model, x, rec = _setup(3, 16, 30, n=1)
    report = rv.verify(model, rec, radius=False)
    fig = rv.plot.equivalence(report, path=tmp_path / "eq.png", max_classes=8)
    check_file(tmp_path / "eq.png")
    assert "top 8 of 30" in texts(fig)
    assert len(fig.axes[0].tables[0].get_celld()) == 9 * 4


# --------------------------------------------------------------------------
# figure bookkeeping: no leaks, nothing of the user's closed
# --------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_no_figure_or_memory_leak(grey, tmp_path):
    model, x, rec = grey
    mine = plt.figure()  # the user's own figure stays open
    try:
        before = set(plt.get_fignums())
        refs = []
        for i in range(110):
            fig = rv.plot.templates(rec, classes=[0], path=tmp_path / "leak.png", colorbar=False, dpi=30,
                                    panel_size=1.0)
            refs.append(weakref.ref(fig))
            del fig
            if i == 9:  # warm-up done (font caches, ...)
                gc.collect()
                start = _rss()
        gc.collect()
        grown = _rss() - start
        assert set(plt.get_fignums()) == before
        assert plt.fignum_exists(mine.number)
        assert sum(r() is not None for r in refs) == 0  # every figure was freed
        assert grown < 30 * 2**20, f"memory grew by {grown / 2**20:.1f} MiB over 100 figures"
    finally:
        plt.close(mine)


def test_without_path_the_figure_belongs_to_pyplot(grey):
    model, x, rec = grey
    before = set(plt.get_fignums())
    fig = rv.plot.templates(rec, classes=[0, 1])
    try:
        assert set(plt.get_fignums()) == before | {fig.number}
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------
# overview
# --------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["grey", "rgb"])
def test_overview(which, grey, rgb, tmp_path):
    from reconviz.saliency import guided

    model, x, rec = grey if which == "grey" else rgb
    path = tmp_path / "overview.png"
    n = 1
    fig = rv.plot.overview(model, x, rec, probe=n, class_names=NAMES, path=path)
    check_file(path)
    axes = image_axes(fig)
    assert len(axes) == 7
    assert [ax.get_title() for ax in axes] == [
        f"input (probe {n})", "template $W_c$", "contribution $W_c \\odot x$", "gradient saliency",
        "guided backprop", "deconvnet", "occlusion",
    ]
    k = int(rec.predicted[n])
    assert fig._suptitle.get_text().startswith(NAMES[k])
    w = rec.weight[n, k].numpy()
    # gradient saliency of a piecewise-linear net is |W_c| (max over channels), and the caption says so
    np.testing.assert_allclose(axes[3].images[0].get_array(), np.abs(w).max(0), atol=1e-12)
    assert "0.0e+00" in axes[3].get_xlabel() or "e-1" in axes[3].get_xlabel()
    np.testing.assert_allclose(axes[2].images[0].get_array(), (w * x[n].double().numpy()).sum(0), atol=1e-12)
    gb = guided.guided_backprop(model, x[n : n + 1].double(), k)[0].numpy()
    if which == "grey":
        np.testing.assert_allclose(axes[4].images[0].get_array(), gb[0], atol=1e-12)
    else:
        lim = np.abs(gb).max()
        np.testing.assert_allclose(axes[4].images[0].get_array(), np.clip(0.5 + gb.transpose(1, 2, 0) / (2 * lim), 0, 1))


def test_overview_several_probes_and_target(grey, tmp_path):
    model, x, rec = grey
    figs = rv.plot.overview(model, x, rec, probe=[0, 3], target=5, path=tmp_path / "o_{probe}.png",
                            occlusion={"window": 3, "stride": 1})
    assert len(figs) == 2 and all(len(image_axes(f)) == 7 for f in figs)
    check_file(tmp_path / "o_0.png")
    check_file(tmp_path / "o_3.png")
    assert figs[1]._suptitle.get_text().startswith("class 5")
    sub = rv.reconstruct(model, x, classes=[1, 2])
    with pytest.raises(InputError, match="not reconstructed"):
        rv.plot.overview(model, x, sub, target=5)
    with pytest.raises(InputError, match="probe batch"):
        rv.plot.overview(model, x[:2], rec)


def _tiny_setup():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 2)).eval()
    x = torch.randn(2, 1, 4, 4)
    rec = rv.reconstruct(m, x)
    return m, x, rec, rv.verify(m, rec, radius=False)


_FIGURES = {
    "class_mean_templates": (100, lambda m, x, rec, rep, p: rv.plot.class_mean_templates(
        rec, [0, 1], path=p, dpi=20, colorbar=False)),
    "contributions": (12, lambda m, x, rec, rep, p: rv.plot.contributions(rec, path=p, dpi=20)),
    "equivalence": (12, lambda m, x, rec, rep, p: rv.plot.equivalence(rep, path=p, dpi=20, max_probes=1)),
    "overview": (12, lambda m, x, rec, rep, p: rv.plot.overview(m, x, rec, path=p, dpi=20,
                                                               occlusion={"window": 2, "stride": 2})),
}


@pytest.mark.parametrize("name", list(_FIGURES))
def test_every_figure_function_frees_its_figures(name, tmp_path):
    """Saved figures are never registered with pyplot and are freed once dropped (every one,
    checked by weak reference), so repeated calls do not pile up; without ``path`` the figure is
    pyplot's until the caller closes it, and then it is freed too. (templates: see
    test_no_figure_or_memory_leak, 110 calls.)"""
    calls, make = _FIGURES[name]
    args = _tiny_setup()
    make(*args, tmp_path / "warm.png")
    gc.collect()
    before, start = set(plt.get_fignums()), _rss()
    refs = []
    for i in range(calls):
        fig = make(*args, tmp_path / "f.png")
        refs.append(weakref.ref(fig))
        del fig
    gc.collect()
    gc.collect()  # a second pass: objects whose finalizers ran in the first one
    assert set(plt.get_fignums()) == before
    assert sum(r() is not None for r in refs) == 0, "a saved figure is still referenced"
    assert _rss() - start < 30 * 2**20, f"memory grew by {(_rss() - start) / 2**20:.1f} MiB over {calls} figures"
    check_file(tmp_path / "f.png", min_bytes=1000)
    fig = make(*args, None)
    assert set(plt.get_fignums()) == before | {fig.number}
    ref = weakref.ref(fig)
    plt.close(fig)
    del fig
    gc.collect()
    gc.collect()
    assert ref() is None and set(plt.get_fignums()) == before
