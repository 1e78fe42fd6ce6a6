"""The installed layout: our folders live under the cmt namespace, `import datasets` is never ours,
and every console script starts."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["cmt-train", "cmt-build", "cmt-inspect", "cmt-sample", "cmt-eval", "cmt-convert", "cmt-ema", "cmt-encode"]


def test_top_level_datasets_is_not_ours(tmp_path):
    # Run from an empty folder so the repository root is not on sys.path.
    probe = ("import importlib.util, cmt.datasets, cmt.builders, cmt.trainers; "
             "spec = importlib.util.find_spec('datasets'); "
             "print(spec.origin if spec else 'none'); print(cmt.datasets.__file__)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    top_level, ours = result.stdout.split()
    assert ours.endswith("datasets/__init__.py")
    assert top_level != ours   # `import datasets` is Hugging Face's (or absent), never ours



def run_python(code, cwd, pythonpath=()):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(str(path) for path in pythonpath)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)


# The two ways the repository root gets onto sys.path: as the working directory of `python -c` /
# `python -m pytest` (sys.path[0] = "" or the absolute path), or named on PYTHONPATH.
ROOT_ON_PATH = {"cwd": lambda tmp_path: (ROOT, []), "pythonpath": lambda tmp_path: (tmp_path, [ROOT])}


@pytest.mark.parametrize("how", ROOT_ON_PATH)
def test_import_datasets_from_the_repository_root_gives_the_other_package(tmp_path, how):
    fake = tmp_path / "site" / "datasets"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("MARKER = 'hugging-face-like'\n")
    cwd, pythonpath = ROOT_ON_PATH[how](tmp_path)
    probe = "import datasets, cmt.datasets; print(datasets.MARKER); print(cmt.datasets.resolve_data('toy:moons'))"
    result = run_python(probe, cwd, [*pythonpath, tmp_path / "site"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["hugging-face-like", "ToyData('toy:moons')"]


@pytest.mark.parametrize("how", ROOT_ON_PATH)
def test_import_datasets_from_the_repository_root_without_another_fails(tmp_path, how):
    probe = ("import importlib.util\n"
             "try:\n"
             "    import datasets\n"
             "    print('imported', datasets.__file__)\n"
             "except ModuleNotFoundError as error:\n"
             "    print('missing', error.name)\n"
             "import cmt.datasets\n"
             "print(cmt.datasets.resolve_data('toy:moons'))\n")
    cwd, pythonpath = ROOT_ON_PATH[how](tmp_path)
    result = run_python(probe, cwd, pythonpath)
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()
    if first.startswith("imported"):    # Hugging Face's datasets is installed here
        assert not Path(first.split(maxsplit=1)[1]).resolve().is_relative_to(ROOT)
    else:
        assert first == "missing datasets"
    assert second == "ToyData('toy:moons')"


@pytest.mark.parametrize("script", SCRIPTS)
def test_console_scripts_answer_help(script):
    path = shutil.which(script) or str(Path(sys.executable).parent / script)
    result = subprocess.run([path, "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout
