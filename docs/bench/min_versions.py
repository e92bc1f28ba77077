"""Install the oldest (or newest) versions pyproject.toml allows into a scratch venv and run tests there.

    python3 docs/bench/min_versions.py /tmp/venv-min                 # lower bounds, then the default tests
    python3 docs/bench/min_versions.py /tmp/venv-new --newest        # today's releases (pip install -U)
    python3 docs/bench/min_versions.py /tmp/venv-docs --extras docs,test --override rich==13.8 tests/test_docs.py

Torch is installed first, as given (`--torch`); every other dependency `name>=X` of the project and of the
extras in `--extras` is then pinned to `name==X` in one `pip install` (an extra's bound wins over the main
one: `docs` asks a newer typer), so pip resolves their own dependencies as it would for a user who has exactly
those versions. When pip finds the pins impossible because a pinned package needs more of another (typer 0.27,
the `docs` floor, needs rich 13.8), `--override` lifts that pin. The project goes in with `--no-deps`, and the
tests run with `nice -n 19`. Nothing here runs inside the test suite: it downloads packages.
"""

import argparse
import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
# Every module but test_docs (it needs the docs extra: run it on its own, as above) and test_demo (slow; run
# `cxrfast demo --out /tmp/demo` in the venv instead): 4-10 minutes on 2 shared cores, plus 2-3 for the installs.
TESTS = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "tests").glob("test_*.py")
               if path.name not in ("test_docs.py", "test_demo.py"))
INSTALLED_FIRST = {"torch", "torchvision"}


def lower_bound_pins(extras: list[str], overrides: list[str] = ()) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    pins = {}
    for requirement in [*requirements, *overrides]:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+(?:\[[^\]]*\])?)\s*(?:[>=]=\s*([^,;\s]+))?", requirement.strip())
        if match is None:
            sys.exit(f"cannot read a lower bound from {requirement!r}: pin it by hand")
        name, lowest = match.groups()
        key = re.sub(r"\[.*", "", name).lower()
        if key not in INSTALLED_FIRST:
            pins[key] = f"{name}=={lowest}" if lowest else name  # no bound: whatever pip picks
    return list(pins.values())


def run(command: list[str]) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("venv", type=Path, help="a new folder for the scratch venv")
    parser.add_argument("tests", nargs="*", default=TESTS, help="test files (default: a representative set)")
    parser.add_argument("--torch", default="torch torchvision",
                        help="torch's install line, e.g. 'torch==2.14.1 torchvision==0.29.1'")
    parser.add_argument("--extras", default="weights,onnx,distributed,dicom,test")
    parser.add_argument("--override", action="append", default=[], metavar="NAME==VERSION",
                        help="replace one lower-bound pin (repeatable)")
    parser.add_argument("--newest", action="store_true", help="today's releases instead of the lower bounds")
    args = parser.parse_intermixed_args()  # test files may follow the options
    extras = [e for e in args.extras.split(",") if e]
    python = str(args.venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q"]
    run([sys.executable, "-m", "venv", str(args.venv)])
    run(["nice", "-n", "19", *pip, *args.torch.split()])
    if args.newest:  # the torch just installed stays: -U without --upgrade-strategy eager leaves it alone
        run(["nice", "-n", "19", *pip, "-U", "-e", f"{ROOT}[{','.join(extras)}]"])
    else:
        run(["nice", "-n", "19", *pip, *lower_bound_pins(extras, args.override), *([] if "test" in extras else ["pytest"])])
        run(["nice", "-n", "19", *pip, "--no-deps", "-e", str(ROOT)])
    run([python, "-m", "pip", "check"])
    run([python, "-m", "pip", "list"])
    tests = subprocess.run(["nice", "-n", "19", python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-ra",
                            *args.tests], cwd=ROOT)
    sys.exit(tests.returncode)


if __name__ == "__main__":
    main()
