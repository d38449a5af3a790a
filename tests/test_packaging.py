"""The wheel holds what a plain `pip install` needs: the product (gridclip) with its named configs and
commands, and the lab (gridclip_lab) beside it with its configs, commands, benchmarks and entry points."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from gridclip.cli import COMMANDS
from gridclip_lab.cli import COMMANDS as LAB_COMMANDS
from gridclip.config import packaged_configs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    pytest.importorskip("setuptools", reason="the build backend (setuptools, in the dev extra) is not installed")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "project"  # a copy, so that the build writes nothing into the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp),
                    str(src)], check=True, capture_output=True)
    (whl,) = tmp.glob("gridclip-*.whl")
    with zipfile.ZipFile(whl) as z:
        return set(z.namelist())


def test_wheel_ships_the_named_configs(wheel_names):
    assert len(packaged_configs()) >= 12
    for name, path in packaged_configs().items():  # the product's and the lab's (a plugin's) named configs
        assert f"{path.parent.parent.name}/configs/{path.name}" in wheel_names, name


def test_wheel_ships_every_command_and_the_benchmarks(wheel_names):
    for name, (module, _) in {**COMMANDS, **LAB_COMMANDS}.items():
        assert module.replace(".", "/") + ".py" in wheel_names, name
    bench = {p.name for p in (ROOT / "src" / "gridclip_lab" / "bench").glob("*.py")}
    assert {"cases.py", "measure.py", "suite.py"} <= bench
    assert {f"gridclip_lab/bench/{n}" for n in bench} <= wheel_names
    assert not any(n.startswith("benchmarks/") for n in wheel_names)


def test_both_packages_and_the_lab_entry_points(wheel_names):
    from importlib.metadata import entry_points

    assert any(n.startswith("gridclip/") for n in wheel_names) and any(n.startswith("gridclip_lab/") for n in wheel_names)
    assert any(n.endswith(".dist-info/entry_points.txt") for n in wheel_names)
    assert [e.value for e in entry_points(group="gridclip.plugins") if e.name == "lab"] == ["gridclip_lab.plugin:register"]
    assert {"gridclip", "gridclip-lab"} <= {e.name for e in entry_points(group="console_scripts")}
