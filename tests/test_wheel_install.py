"""A wheel of monte-ds, installed in a fresh virtual environment, evaluates offline from outside
the source tree: the task definitions and the evaluation sample ship inside the package.

The new environment reuses the installed dependencies (torch, lm-eval, ... through a .pth
file; there is no network) and gets monte-ds itself from the wheel only.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from monte_ds.evaluation.tasks import BUNDLED_SAMPLE_DIR
from monte_ds.tiny import build_tiny_llama


REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "monte_ds", "evals")


def run(*command: str | Path, cwd: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run(
        [str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


def sources(root: Path, pattern: str) -> set[Path]:
    return {path.relative_to(root) for path in root.rglob(pattern)}


@pytest.mark.slow
def test_an_installed_wheel_evaluates_offline_from_outside_the_source_tree(tmp_path):
    source = tmp_path / "source"  # a copy: the build writes build/ and egg-info beside the sources
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, source / name)
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        source,
        "-w",
        tmp_path / "dist",
        cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("monte_ds-*.whl")

    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=False, system_site_packages=True)
    python = env_dir / "bin" / "python"
    env_site = Path(
        run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip()
    )
    (env_site / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        wheel,
        cwd=tmp_path,
    )

    # pyproject.toml lists the packages (evals/ is mapped in): a module left off the list fails here.
    shipped = {path.relative_to(env_site / "monte_ds") for path in (env_site / "monte_ds").rglob("*.py")}
    assert shipped == sources(source / "monte_ds", "*.py") | {
        "evals" / path for path in sources(source / "evals", "*.py")
    }
    yamls = {
        path.relative_to(env_site / "monte_ds" / "evals") for path in (env_site / "monte_ds" / "evals").rglob("*.yaml")
    }
    assert yamls == sources(source / "evals", "*.yaml") != set()

    work = tmp_path / "elsewhere"  # outside the source tree: nothing can be found relative to it
    work.mkdir()
    installed = run(python, "-c", "import monte_ds; print(monte_ds.__file__)", cwd=work).strip()
    assert Path(installed).is_relative_to(env_site)

    texts = [path.read_text() for path in sorted(BUNDLED_SAMPLE_DIR.rglob("*.jsonl"))]
    model = build_tiny_llama(tmp_path / "tiny", texts, vocab_size=512, seed=0)
    run(
        env_dir / "bin" / "monte-ds",
        "eval",
        "--model",
        model,
        "--suites",
        "arc_easy,gsm8k",
        "--data-dir",
        "bundled:eval",
        "--limit",
        "1",
        "--max-gen-toks",
        "4",
        "--output",
        work / "report",
        cwd=work,
    )
    report = json.loads((work / "report" / "report.json").read_text())
    assert {name: suite["status"] for name, suite in report["suites"].items()} == {
        "arc_easy": "completed",
        "gsm8k": "completed",
    }
    assert report["lm_eval"]["n-samples"]["gsm8k"]["effective"] == 1
    assert report["lm_eval"]["configs"]["arc_easy"]["dataset_kwargs"]["data_files"]["test"].startswith(str(env_site))
