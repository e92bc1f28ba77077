"""MkDocs hook: lets mkdocs-typer2 render the `cxrfast` reference faithfully.

`docs/cli.md` holds only a `::: mkdocs-typer2` block. mkdocs-typer2 (0.4.x, "legacy" engine) runs Typer's own
generator, `typer cxr_fast.cli utils docs`, and turns its Markdown into HTML, so every command and option on the
page comes from the Typer app itself. Four gaps between that plugin and this project are closed here, without
copying any of the CLI by hand:

1. The plugin finds `typer` on PATH. Running `.venv/bin/mkdocs` without activating the venv would then produce an
   empty page without any error, so the venv's own bin folder goes first on PATH.
2. The plugin's HTML is scanned again by the page's inline Markdown, which takes placeholders such as `<path>` or
   `models/<arch>-<time>` for HTML tags and hides them. Its text is marked atomic (left as it is).
3. Its inner Markdown run lacks fenced code, so each usage block came out as inline text starting with "console".
4. Typer's headings start at h1; they are moved one level down so the page keeps a single title.

A block that produces nothing (Typer failed) stops the build instead of publishing an empty reference.
(The plugin's "native" engine is no way out: it reads `param.type`, which Typer 0.29's parameters lack.)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import markdown as python_markdown
from markdown.util import AtomicString
from mkdocs_typer2 import markdown as typer2_markdown

_HEADINGS = ("h1", "h2", "h3", "h4", "h5")


def _put_venv_first_on_path() -> None:
    bin_dir = str(Path(sys.executable).parent)
    parts = os.environ.get("PATH", "").split(os.pathsep)
    if parts[:1] != [bin_dir]:
        os.environ["PATH"] = os.pathsep.join([bin_dir, *parts])


class _MarkdownWithFencedCode:
    """Stands in for the `markdown` module inside mkdocs_typer2.markdown, adding fenced code to its inner run."""

    def __getattr__(self, name):
        return getattr(python_markdown, name)

    @staticmethod
    def markdown(text, **kwargs):
        kwargs["extensions"] = [*kwargs.get("extensions", []), "fenced_code"]
        return python_markdown.markdown(text, **kwargs)


def _finish(element) -> None:
    for node in element.iter():
        if node.tag in _HEADINGS:
            node.tag = f"h{int(node.tag[1]) + 1}"
        if node.text:
            node.text = AtomicString(node.text)
        if node.tail:
            node.tail = AtomicString(node.tail)


def _patch_processor() -> None:
    processor = typer2_markdown.TyperProcessor
    if getattr(processor, "_cxr_fast_patched", False):
        return
    original_run = processor.run

    def run(self, parent, blocks):
        block = blocks[0] if blocks else ""
        before = len(parent)
        handled = original_run(self, parent, blocks)
        added = list(parent)[before:]
        if not added or not any(len(element) for element in added):
            raise RuntimeError(
                "mkdocs-typer2 produced no CLI reference for this block:\n"
                f"{block}\nRun `typer cxr_fast.cli utils docs --name cxrfast` to see why."
            )
        for element in added:
            _finish(element)
        return handled

    processor.run = run
    processor._cxr_fast_patched = True
    typer2_markdown.markdown = _MarkdownWithFencedCode()


_put_venv_first_on_path()
_patch_processor()
