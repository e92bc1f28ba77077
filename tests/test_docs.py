"""The documentation site builds in strict mode, and its generated CLI reference covers every command and option.

Strict mode turns every MkDocs warning into a failure: a broken link, a missing picture in docs/img, an API page
naming a module or object that no longer exists, a docstring griffe cannot parse. The CLI page is generated from the
Typer app by mkdocs-typer2, so checking it against the app itself catches a reference that silently went empty or
lost a command.
"""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]
MKDOCS = Path(sys.executable).parent / "mkdocs"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    if not MKDOCS.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but mkdocs is not installed next to {sys.executable} (install the 'docs' extra)")
        pytest.skip("mkdocs not installed (pip install -e '.[docs]')")
    site_dir = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's banner about MkDocs 2.0: noise here
    result = subprocess.run(
        [str(MKDOCS), "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(site_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    return site_dir


def _commands(command, path: str):
    """(full name, click command) for the app and every command and sub-command below it."""
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, f"{path} {name}")


def _sections(page: str) -> dict[str, str]:
    """Text of the CLI page cut at each generated command heading: {"cxrfast data prepare": text, ...}."""
    parts = re.split(r"<h[1-6][^>]*>\s*<code>(cxrfast[^<]*)</code>", page)
    sections = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        sections[html.unescape(name).strip()] = html.unescape(re.sub(r"<[^>]+>", " ", body))
    return sections


def test_site_builds_with_every_page(site):
    assert (site / "index.html").is_file()
    for page in ("getting-started", "data", "training", "evaluation", "interpretation", "using-a-model",
                 "benchmarks", "cli", "api", "developing"):
        assert (site / page / "index.html").is_file(), f"{page}.md was not built"
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for module in ("cxr_fast.data.manifest", "cxr_fast.archs", "cxr_fast.evaluate", "cxr_fast.attribution"):
        assert f'id="{module}"' in api, f"the API page lacks {module}"


def test_cli_reference_lists_every_command_and_option(site):
    from cxr_fast.cli import app

    sections = _sections((site / "cli" / "index.html").read_text(encoding="utf-8"))
    commands = list(_commands(typer.main.get_command(app), "cxrfast"))
    assert len(commands) > 5
    for name, command in commands:
        assert name in sections, f"`{name}` has no section in the CLI reference; found {sorted(sections)}"
        text = sections[name]
        for param in command.params:
            if param.param_type_name == "option":
                for flag in [*param.opts, *param.secondary_opts]:
                    assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"{name}: {flag} missing"
            else:
                assert param.name in text, f"{name}: argument {param.name} missing"
        if command.help:
            first_words = " ".join(command.help.split()[:4])
            assert first_words in " ".join(text.split()), f"{name}: help text missing"


def test_cli_reference_keeps_metavars_visible(site):
    # Typer writes placeholders such as <path>; rendered as raw tags they would vanish from the page.
    page = (site / "cli" / "index.html").read_text(encoding="utf-8")
    assert "&lt;path&gt;" in page
    assert "<path>" not in page


def test_getting_started_quotes_the_readme_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    page = (ROOT / "docs" / "getting-started.md").read_text(encoding="utf-8")
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv")]
    assert len(commands) == 2, commands
    for command in commands:
        assert command in page, f"docs/getting-started.md no longer quotes the README command:\n{command}"


def test_every_shipped_recipe_is_listed_in_training_md_and_the_readme():
    recipes = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    assert len(recipes) >= 5
    table = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    layout = re.search(r"^recipes/ +YAML training recipes \(([^)]*)\)", (ROOT / "README.md").read_text(encoding="utf-8"),
                       flags=re.M)
    assert layout, "README.md's Layout no longer has its recipes/ line"
    for name in recipes:
        assert f"| `{name}.yaml` |" in table, f"recipes/{name}.yaml is missing from the shipped recipes table in training.md"
        assert name in layout.group(1).replace(" ", "").split(","), f"recipes/{name}.yaml is missing from README.md's Layout"


# An HTML comment on the line above a ```python block, `<!-- tested with: replace `OLD` with `NEW` -->`, makes
# test_the_python_examples_run run the block with OLD replaced by NEW (the page shows OLD): for sizes and epochs only,
# so that an example that trains for minutes runs in seconds. Several comments may stand above one block.
TESTED_WITH = r"<!-- tested with: replace `([^`]+)` with `([^`]*)` -->"


def _python_blocks():
    """(page, code, [(old, new), ...] from its `tested with` comments) of every ```python block in README.md and
    docs/*.md."""
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        for comments, code in re.findall(r"((?:<!-- tested with:[^\n]*-->\n)*)```python\n(.*?)```", text, flags=re.S):
            yield page.name, code, re.findall(TESTED_WITH, comments)


def test_every_name_the_docs_import_exists():
    # The examples' imports, run in this process: quick, and the first place a rename shows
    # (test_the_python_examples_run runs the whole examples).
    import ast

    checked = 0
    for page, code, _ in _python_blocks():
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.Import | ast.ImportFrom) and "cxr_fast" in ast.unparse(node):
                exec(compile(ast.Module([node], type_ignores=[]), page, "exec"), {})  # noqa: S102
                checked += 1
    assert checked >= 4  # the examples are still found (using-a-model.md, scaling-out.md)


def test_the_api_reference_documents_what_the_examples_use(site):
    import ast

    page = (site / "api" / "index.html").read_text(encoding="utf-8")
    names = ["cxr_fast.bundle.Run", "cxr_fast.bundle.Run.classes", "cxr_fast.bundle.Run.temperature"]  # run.…
    for _, code, _ in _python_blocks():
        names += [f"{node.module}.{alias.name}" for node in ast.walk(ast.parse(code))
                  if isinstance(node, ast.ImportFrom) and node.module.startswith("cxr_fast") for alias in node.names]
    assert len(names) > 8
    for name in names:
        assert f'id="{name}"' in page, f"{name}, used by an example in the docs, is missing from docs/api.md's page"


@pytest.fixture(scope="module")
def workshop(tiny_data, tiny_runs, tmp_path_factory) -> Path:
    """A folder holding every path the examples name, as a user's project would: data/ (tiny_data), models/lite0 (a
    tiny run, its temperature set to 0.5: the tiny runs' is exactly 1, which would hide a missing calibration), and
    new/patient1.dcm and new/patient2.png (phantoms of tiny_data's test split, the first one as a 12-bit DICOM)."""
    import shutil

    import numpy as np
    from PIL import Image

    from cxr_fast.data.manifest import read_manifest
    from tests.conftest import write_dicom

    folder = tmp_path_factory.mktemp("workshop")
    (folder / "data").symlink_to(tiny_data, target_is_directory=True)
    shutil.copytree(tiny_runs[0], folder / "models" / "lite0")
    config = folder / "models" / "lite0" / "config.json"
    text = config.read_text(encoding="utf-8")
    assert '"temperature": 1.0,' in text
    config.write_text(text.replace('"temperature": 1.0,', '"temperature": 0.5,'), encoding="utf-8")
    test = read_manifest(tiny_data).query("split == 'test'")
    (folder / "new").mkdir()
    pixels = np.asarray(Image.open(test["path"].iloc[0]).convert("L"), dtype=np.uint16)
    write_dicom(folder / "new" / "patient1.dcm", pixels * 16)
    shutil.copy(test["path"].iloc[1], folder / "new" / "patient2.png")
    return folder


# What the text around an example promises, checked in the example's own process after it (a registration lasts for
# that process only); the prediction example's output is checked against `cxrfast predict` below.
AFTER = {
    "training.md": """
import torch
from cxr_fast.archs import create_model
wide = create_model("tinynet_wide", n_classes=2)
assert wide(torch.zeros(1, 1, 48, 48)).shape == (1, 2)
assert wide.body[0].conv.out_channels == 32 and create_model("tinynet").body[0].conv.out_channels == 16
""",
    "scaling-out.md": """
if __name__ == "__main__":
    from cxr_fast.bundle import load_run
    assert load_run(run_dir).path == run_dir and run_dir.as_posix() == "models/ddp", run_dir
""",
}


def _needs_distributed():
    import importlib.util

    import torch

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch build has no Gloo backend")  # as tests/test_distributed.py
    if importlib.util.find_spec("accelerate") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but accelerate is not installed: the data-parallel example cannot run")
        pytest.skip("accelerate not installed (pip install accelerate)")


@pytest.mark.parametrize("page, code, replacements",
                         [pytest.param(*block, id=f"{block[0]}-{i}") for i, block in enumerate(_python_blocks())])
def test_the_python_examples_run(page, code, replacements, workshop):
    # Each example runs as a script of its own (data-parallel workers import it again), in the workshop folder, on
    # the CPU (the launcher would take one GPU per process), with only its `tested with` replacements made.
    for old, new in replacements:
        assert old in code, f"{page}: a `tested with` comment replaces `{old}`, which its example no longer holds"
        code = code.replace(old, new)
    if "cxr_fast.distributed" in code:
        _needs_distributed()
    name = f"example_{page.removesuffix('.md').replace('-', '_')}.py"
    (workshop / name).write_text(code + AFTER.get(page, ""), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, name], cwd=workshop, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"the example in {page} failed:\n{code}\n{result.stdout}\n{result.stderr}"
    if page == "using-a-model.md":
        _check_printed_predictions(result.stdout, workshop)


def _check_printed_predictions(stdout: str, workshop: Path) -> None:
    """The example prints `file {class: calibrated probability}` per file, as `cxrfast predict` computes them."""
    import ast

    from cxr_fast.predict import predict

    printed = dict(line.split(" ", 1) for line in stdout.splitlines())
    files = ["new/patient1.dcm", "new/patient2.png"]
    assert sorted(printed) == files, stdout
    results, skipped = predict(workshop / "models" / "lite0", [workshop / f for f in files], progress=False)
    assert not skipped and len(results) == 2
    rows = {Path(row["path"]).name: row for _, row in results.iterrows()}
    for file in files:
        row, probabilities = rows[Path(file).name], ast.literal_eval(printed[file])
        assert list(probabilities) == ["COVID-19", "Normal", "Pneumonia"]
        for label, p in probabilities.items():
            assert abs(p - row[f"p_{label}"]) < 0.0015, (file, probabilities, row.to_dict())


def test_the_api_reference_documents_the_function_behind_every_command(site):
    page = (site / "api" / "index.html").read_text(encoding="utf-8")
    for function in ("cxr_fast.data.manifest.prepare", "cxr_fast.train.train", "cxr_fast.ensemble.build_ensemble",
                     "cxr_fast.evaluate.evaluate", "cxr_fast.compare.compare_runs", "cxr_fast.compare.compare_archs",
                     "cxr_fast.interpret.interpret", "cxr_fast.predict.predict", "cxr_fast.export.export_onnx",
                     "cxr_fast.serve.serve"):
        assert f'id="{function}"' in page, f"{function} is missing from docs/api.md's page"
