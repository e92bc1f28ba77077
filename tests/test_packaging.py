"""A wheel, not only the editable install the README uses, must carry every subpackage and the shipped recipes."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from cxr_fast.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_a_wheel_install_has_every_subpackage_and_finds_the_shipped_recipes(tmp_path):
    # built from a copy: setuptools leaves build/ behind, whose stale files a later build would ship
    source = tmp_path / "source"
    for name in ("cxr_fast", "recipes"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    # --no-build-isolation: build with this environment's setuptools, so the test needs no network
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("cxr_fast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    source_packages = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "cxr_fast").rglob("__init__.py")}
    assert {f"{package}/__init__.py" for package in source_packages} <= names
    recipes = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))
    assert recipes and {f"cxr_fast/recipes/{name}" for name in recipes} <= names

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    found = subprocess.run(
        [sys.executable, "-c", "from cxr_fast.config import find_recipe, load_recipe; "
                               "print(find_recipe('demo')); print(load_recipe('demo')['arch'])"],
        cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": ""}, check=True, capture_output=True, text=True,
    ).stdout.split()
    assert Path(found[0]) == site / "cxr_fast" / "recipes" / "demo.yaml"
    assert found[1] == load_recipe(ROOT / "recipes" / "demo.yaml")["arch"]
