"""The installed layout: our folders live under the cmt namespace and every console script starts."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = ["cmt-train", "cmt-build", "cmt-inspect", "cmt-sample", "cmt-eval", "cmt-convert"]


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


@pytest.mark.parametrize("script", SCRIPTS)
def test_console_scripts_answer_help(script):
    path = shutil.which(script) or str(Path(sys.executable).parent / script)
    result = subprocess.run([path, "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout
