"""The README stays true: its quickstart runs, its stated numbers match the code, its links exist."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import torch

import reconviz as rv

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_quickstart_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (code,) = _blocks("python")
    exec(compile(code, "README quickstart", "exec"), {})
    assert "region-exact, float64: PASS" in capsys.readouterr().out
    for name in ("templates.png", "overview.png", "rec.npz", "rec.onnx"):
        assert (tmp_path / name).stat().st_size > 1_000, name


def test_stated_accuracy_and_size_match_the_bundled_model():
    model, data = rv.models.digits()
    with torch.no_grad():
        right = int((model(torch.as_tensor(data.x_test)).argmax(1) == torch.as_tensor(data.y_test)).sum())
    n = len(data.y_test)
    assert f"**Held-out test accuracy: {100 * right / n:.2f} %** ({right} of {n})" in README
    assert f"{sum(p.numel() for p in model.parameters()):,} parameters" in README
    assert f"{len(data.y_train):,} train / {n} test" in README


def test_two_commands_are_first_and_ci_runs_them():
    commands = [line for line in _blocks("bash")[0].splitlines() if line.startswith("python3 -m venv")]
    assert len(commands) == 2
    assert commands[0].endswith("reconviz demo") and commands[1].endswith("python -m pytest -q")
    assert all("pip install torch==2.13.0 && pip install -e '.[test]'" in c for c in commands)
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'bash -c "$test_cmd"' in ci and 'bash -c "$demo_cmd"' in ci
    # .ci/run extracts exactly these two lines from the README
    script = ci.split("readme_command() {")[1].split("\n}")[0]
    awk = re.search(r"awk (.*) README.md", script).group(1)
    got = [subprocess.run(["bash", "-c", f"awk {awk.replace('$1', key)} README.md"], cwd=ROOT, text=True,
                          capture_output=True, check=True).stdout.strip()
           for key in ("bundled digits", "run the tests")]
    assert got == commands


def test_links_exist():
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if "://" not in target:
            assert (ROOT / target).exists(), target
