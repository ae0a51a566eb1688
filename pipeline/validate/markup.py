"""HTML and XML files: the text a reader sees, and the document's title.

Embedding markup as it is spends the token budget on tags, scripts and styles. lxml parses
both (libxml2's HTML parser recovers from broken pages the way browsers do); scripts, styles,
templates and comments are dropped, block elements end a line, and runs of white space fold as a
browser folds them. XML is parsed without resolving external entities or touching the network.
"""

from __future__ import annotations

import re

from lxml import etree
from lxml import html as lxml_html

from pipeline.errors import ItemRejected, RejectReason
from pipeline.validate.text import decode_text

HTML_MIMES = frozenset({"text/html", "application/xhtml+xml"})
XML_MIMES = frozenset({"text/xml", "application/xml"})
MARKUP_MIMES = HTML_MIMES | XML_MIMES

_HIDDEN = frozenset({"head", "script", "style", "noscript", "template", "title", "svg", "math",
                     "iframe", "object", "canvas"})
_BLOCKS = frozenset({
    "address", "article", "aside", "blockquote", "br", "caption", "dd", "details", "div", "dl",
    "dt", "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5",
    "h6", "header", "hr", "li", "main", "nav", "ol", "p", "pre", "section", "summary", "table",
    "td", "th", "tr", "ul"})
_SPACES = re.compile(r"[ \t\r\f\v\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def visible_text(data: bytes, mime: str) -> tuple[str, str | None]:
    """(the visible text, the title or None) of an HTML or XML file."""
    try:
        if mime in HTML_MIMES:
            root = lxml_html.document_fromstring(decode_text(data))
        else:
            parser = etree.XMLParser(resolve_entities=False, no_network=True, recover=True,
                                     remove_comments=True, remove_pis=True)
            root = etree.fromstring(data, parser)
    except (etree.ParserError, etree.XMLSyntaxError, ValueError) as exc:
        raise ItemRejected(RejectReason.CORRUPT, f"{mime} does not parse: {exc}") from exc
    if root is None:
        raise ItemRejected(RejectReason.CORRUPT, f"{mime} holds no document")
    return _fold(_texts(root, html=mime in HTML_MIMES)), _title(root)


def _local(tag: object) -> str | None:
    """An element's lower-cased local name; None for comments and processing instructions."""
    return etree.QName(tag).localname.lower() if isinstance(tag, str) else None


def _texts(root: etree._Element, *, html: bool) -> list[str]:
    out: list[str] = []
    hidden = 0  # depth inside a hidden element
    for event, el in etree.iterwalk(root, events=("start", "end")):
        name = _local(el.tag)
        if event == "start":
            if name in _HIDDEN and html:
                hidden += 1
            elif not hidden and name is not None and el.text:
                out.append(el.text)
            continue
        if name in _HIDDEN and html:
            hidden -= 1
        elif not hidden and (name in _BLOCKS or not html):
            out.append("\n")
        if not hidden and el.tail and el is not root:
            out.append(el.tail)
    return out


def _fold(pieces: list[str]) -> str:
    lines = (_SPACES.sub(" ", line).strip() for line in "".join(pieces).split("\n"))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def _title(root: etree._Element) -> str | None:
    for el in root.iter():
        if _local(el.tag) == "title":
            text = _SPACES.sub(" ", "".join(el.itertext())).strip()
            return text or None
    return None
