"""The pinned install: constraints.txt pins every package setup.py asks for, within setup.py's
bounds, and the README's install command and CI's both install with it."""

import ast
import pathlib
import re

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _setup_keywords() -> dict:
    """setup()'s keyword arguments, read from setup.py's syntax tree (setup.py is not run)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup"]
    assert len(calls) == 1
    wanted = ("install_requires", "extras_require")
    return {k.arg: ast.literal_eval(k.value) for k in calls[0].keywords if k.arg in wanted}


def _pins() -> dict[str, Version]:
    pins = {}
    for number, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        name, separator, version = line.partition("==")
        assert separator, f"constraints.txt:{number}: {line!r} is not an exact pin"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def test_constraints_pin_every_requirement_within_its_bounds():
    keywords = _setup_keywords()
    pins = _pins()
    requirements = [Requirement(text) for text in keywords["install_requires"] + keywords["extras_require"]["test"]]
    applicable = [r for r in requirements if r.marker is None or r.marker.evaluate()]
    assert {"jax", "flax", "optax", "orbax-checkpoint", "grain", "pytest"} <= {canonicalize_name(r.name) for r in applicable}
    for requirement in applicable:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"setup.py requires {requirement} but constraints.txt does not pin it"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside setup.py's {requirement.specifier}"
        )


def test_readme_and_ci_install_with_the_constraints():
    readme_installs = re.findall(r"pip install [^\n`]*", (ROOT / "README.md").read_text())
    assert readme_installs and all("-c constraints.txt" in command for command in readme_installs)
    ci_installs = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pip install" in line and " -e " in line]
    assert ci_installs and all("-c constraints.txt" in line for line in ci_installs)
