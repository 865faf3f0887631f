"""docs/extending.md: each example's diff applies to this repository, touches two files (its module
and its test), and with the diffs applied the examples' tests pass."""

import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "extending.md")
EXAMPLE_TESTS = ["tests/test_example_trigger.py", "tests/test_example_loss.py",
                 "tests/test_example_epoch_pass.py", "tests/test_example_evaluator.py"]


def _diffs() -> list[str]:
    with open(DOC) as f:
        return re.findall(r"^```diff\n(.*?)^```$", f.read(), flags=re.S | re.M)


def _repository_copy(destination) -> str:
    """The working tree's files, without version control, environments and run outputs."""
    ignore = shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", "*.egg-info", ".pytest_cache")
    shutil.copytree(REPO, destination, ignore=ignore)
    return str(destination)


def _apply(diff: str, repository: str, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "apply", *options, "-"], input=diff, cwd=repository, capture_output=True, text=True, check=False)


def test_each_example_is_one_module_and_its_test_and_applies_cleanly(tmp_path):
    diffs = _diffs()
    assert len(diffs) == 4
    repository = _repository_copy(tmp_path / "repo")
    for diff, example_test in zip(diffs, EXAMPLE_TESTS):
        files = re.findall(r"^diff --git a/(\S+) b/", diff, flags=re.M)
        assert len(files) == 2 and files[0].startswith("bclip/") and files[1] == example_test, files
        assert not os.path.exists(os.path.join(REPO, example_test))  # the example is not in the code base
        checked = _apply(diff, repository, "--check")
        assert checked.returncode == 0, checked.stderr


@pytest.mark.slow
def test_examples_pass_their_tests_with_the_diffs_applied(tmp_path):
    repository = _repository_copy(tmp_path / "repo")
    for diff in _diffs():
        applied = _apply(diff, repository)
        assert applied.returncode == 0, applied.stderr
    # The copy's conftest sets the same 8 CPU devices; the session's compilation cache is shared.
    env = {**os.environ, "PYTHONPATH": repository}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *EXAMPLE_TESTS],
        cwd=repository, env=env, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "4 passed" in result.stdout
