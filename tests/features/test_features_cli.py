"""``reconviz features``: figures and features.json written atomically; usage errors exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image


from reconviz.cli import main
from features_fixtures import _one_thread, digits  # noqa: F401 (fixtures)

FIGURES = ["filters.png", "feature_maps.png", "dead_units.png", "top_patches.png", "embedding.png",
           "embedding_images.png", "maximisation.png", "clusters_classes.png", "clusters_neurons_activation.png",
           "clusters_neurons_contribution.png"]
ARCH = ["--arch", "reconviz.models.digits:DigitsCNN"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits):
    model, x, y, _ = digits
    root = tmp_path_factory.mktemp("cli")
    torch.save(model.state_dict(), root / "digits.pt")
    np.savez(root / "data.npz", x=x[:80].numpy(), y=y[:80].numpy())
    return root


def test_features_command(files, capsys):
    out = files / "out"
    code = main(["features", str(files / "digits.pt"), str(files / "data.npz"), *ARCH, "--out", str(out),
                 "--embedding", "pca", "--steps", "15", "--k", "3", "--channels", "0,1,2", "--clusters", "3",
                 "--no-contributions",
                 "--class-names", ",".join("zero one two three four five six seven eight nine".split())])
    text = capsys.readouterr().out
    assert code == 0, text
    for name in FIGURES[:-1]:  # --no-contributions: no contribution clusters
        assert (out / name).stat().st_size > 2_000, name
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary file
    summary = json.loads((out / "features.json").read_text())
    assert summary["layer"] == "features.6" and summary["settings"]["k"] == 3
    assert summary["dead_units"]["n_inputs"] == 80
    assert [c["channel"] for c in summary["top_patches"]["channels"]] == [0, 1, 2]
    assert summary["embedding"]["method"] == "pca" and 0 < summary["embedding"]["separation"]["knn_accuracy"] <= 1
    assert len(summary["maximisation"]["target_wins"]) == 10
    assert set(summary["clusters"]) == {"classes", "neurons_activation"}
    assert sorted(m for c in summary["clusters"]["classes"]["clusters"] for m in c["members"]) == sorted(
        "zero one two three four five six seven eight nine".split())
    assert sorted(summary["files"]) == sorted(FIGURES[:-1] + ["features.json"])
    assert "dead units of features.2" in text and "activation maximisation" in text


def test_features_of_an_image_folder(files, digits, capsys):
    model, x, y, _ = digits
    folder = files / "images"
    for i in range(30):
        (folder / f"digit{int(y[i])}").mkdir(parents=True, exist_ok=True)
        pixels = (x[i, 0].numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels, "L").save(folder / f"digit{int(y[i])}" / f"{i}.png")
    out = files / "out-folder"
    code = main(["features", str(files / "digits.pt"), str(folder), *ARCH, "--out", str(out), "--embedding", "pca",
                 "--steps", "5", "--k", "2", "--layer", "features.2", "--no-contributions", "--classes", "0,1"])
    assert code == 0, capsys.readouterr()
    summary = json.loads((out / "features.json").read_text())
    assert summary["layer"] == "features.2" and "neurons_contribution" not in summary["clusters"]
    assert summary["maximisation"]["classes"] == [0, 1]
    assert "digit" in (out / "features.json").read_text()


@pytest.mark.parametrize("extra, fragment", [
    (["--layer", "nope"], "no module named"),
    (["--channels", "a,b"], "--channels"),
    (["--output", "0"], "--output"),
    (["--k", "0"], "positive integer"),
])
def test_usage_errors_exit_2(files, capsys, extra, fragment):
    code = main(["features", str(files / "digits.pt"), str(files / "data.npz"), *ARCH, "--out",
                 str(files / "bad"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and "Traceback" not in err


def test_missing_data_exits_2(files, capsys):
    code = main(["features", str(files / "digits.pt"), str(files / "nothing.npz"), *ARCH, "--out", str(files / "b")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_the_demo_features(tmp_path, digits):
    """What ``reconviz demo`` adds (out/features/): every figure and the summary, cheaply."""
    from reconviz.features.command import demo_features

    model, _, _, names = digits
    written = demo_features(model, names, tmp_path, n=40)
    assert sorted(p.name for p in written) == sorted(FIGURES + ["features.json"])
    summary = json.loads((tmp_path / "features" / "features.json").read_text())
    assert all(summary["maximisation"]["target_wins"])  # 30 steps suffice on the digits model
    assert summary["embedding"]["method"] == "pca"

