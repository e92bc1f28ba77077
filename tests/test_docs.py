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


def _python_blocks():
    """(page, code) of every ```python block in README.md and docs/*.md."""
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for code in re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S):
            yield page.name, code


def test_every_name_the_docs_import_exists():
    # The examples' imports, run as written: an API renamed or moved breaks the page that shows it (the rest of an
    # example needs a trained run; the imports are where a rename shows).
    import ast

    checked = 0
    for page, code in _python_blocks():
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.Import | ast.ImportFrom) and "cxr_fast" in ast.unparse(node):
                exec(compile(ast.Module([node], type_ignores=[]), page, "exec"), {})  # noqa: S102
                checked += 1
    assert checked >= 4  # the examples are still found (using-a-model.md, scaling-out.md)


def test_the_api_reference_documents_what_the_examples_use(site):
    import ast

    page = (site / "api" / "index.html").read_text(encoding="utf-8")
    names = ["cxr_fast.bundle.Run", "cxr_fast.bundle.Run.classes", "cxr_fast.bundle.Run.temperature"]  # run.…
    for _, code in _python_blocks():
        names += [f"{node.module}.{alias.name}" for node in ast.walk(ast.parse(code))
                  if isinstance(node, ast.ImportFrom) and node.module.startswith("cxr_fast") for alias in node.names]
    assert len(names) > 8
    for name in names:
        assert f'id="{name}"' in page, f"{name}, used by an example in the docs, is missing from docs/api.md's page"


def test_the_api_reference_documents_the_function_behind_every_command(site):
    page = (site / "api" / "index.html").read_text(encoding="utf-8")
    for function in ("cxr_fast.data.manifest.prepare", "cxr_fast.train.train", "cxr_fast.ensemble.build_ensemble",
                     "cxr_fast.evaluate.evaluate", "cxr_fast.compare.compare_runs", "cxr_fast.compare.compare_archs",
                     "cxr_fast.interpret.interpret", "cxr_fast.predict.predict", "cxr_fast.export.export_onnx",
                     "cxr_fast.serve.serve"):
        assert f'id="{function}"' in page, f"{function} is missing from docs/api.md's page"
