"""Reads the HTML pages the toolkit writes (reports, galleries) the way a test needs them."""

from html.parser import HTMLParser
from pathlib import Path


class PageParser(HTMLParser):
    """Collects <img> attributes, <meta> tags, link targets and the visible text of a page."""

    def __init__(self):
        super().__init__()
        self.images, self.metas, self.links, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.links.append(dict(attrs).get("href", ""))
        elif tag == "img":
            self.images.append(dict(attrs))
        elif tag == "meta":
            self.metas.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


def parse(html_path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(html_path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def image_sources(html_path: Path) -> list[str]:
    """The src of every <img> on the page, in order."""
    return [image.get("src", "") for image in parse(html_path).images]
