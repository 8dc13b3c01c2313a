"""The documentation site builds strictly and its API reference reads as one:
no Sphinx role (``:class:`` …) left as raw text, every model field and error
attribute shown with its type.  Skipped where mkdocs is not installed (it is
in the ``docs`` dependency group, which CI's first stage installs)."""

from __future__ import annotations

import html
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
    reason="mkdocs is not installed (pip install --group docs)",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = importlib.util.spec_from_file_location("check_docs", ROOT / "scripts/check_docs.py")
    assert spec is not None
    assert spec.loader is not None
    check_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_docs)
    out = tmp_path_factory.mktemp("site")
    check_docs.build(out)
    found = check_docs.raw_roles(out)
    assert found == [], "raw Sphinx roles on the pages:\n" + "\n".join(found)
    return out


def _flat(page: Path) -> str:
    """The page's text without tags or whitespace (signatures are split in spans)."""
    text = html.unescape(re.sub(r"<[^>]+>", "", page.read_text("utf-8")))
    return re.sub(r"\s+", "", text).replace("'", '"')


def test_no_raw_sphinx_role_on_any_page(site: Path) -> None:
    # The fixture fails on any; this names the check in the report.
    assert list(site.rglob("*.html"))


@pytest.mark.parametrize(
    ("page", "fields"),
    [
        (
            "reference/aiodetach/index.html",
            {
                "domain_uuid": "str",
                "alias": "str | None",
                "attempts": "int",
                "elapsed": "float",
                "confirmed_by": "Literal['event', 'xml'] | None",
                "timeout": "float",
                "connections": "int",
                "journal_sync": "Literal['full', 'normal']",
            },
        ),
        (
            "reference/aiodetach.errors/index.html",
            {
                "domain": "str | None",
                "alias": "str | None",
                "libvirt_code": "int | None",
                "persistent_done": "bool",
                "reason": "str",
                "attempts": "int",
                "unfinished": "list[int]",
                "path": "str",
            },
        ),
    ],
)
def test_fields_are_shown_with_their_types(site: Path, page: str, fields: dict[str, str]) -> None:
    text = _flat(site / page)
    for name, annotation in fields.items():
        shown = f"{name}:{annotation}".replace(" ", "").replace("'", '"')
        assert shown in text, f"{name}: {annotation} not on {page}"


def test_signatures_are_typed(site: Path) -> None:
    text = _flat(site / "reference/aiodetach/index.html")
    assert "detach(self,domain:DomainRef," in text or "detach(domain:DomainRef," in text
    assert "live:bool|None=None,persistent:bool|None=None,)->DetachResult" in text


@pytest.mark.parametrize(
    ("module", "page"),
    [
        ("aiodetach", "reference/aiodetach/index.html"),
        ("aiodetach.errors", "reference/aiodetach.errors/index.html"),
        ("aiodetach.testing", "reference/aiodetach.testing/index.html"),
    ],
)
def test_every_public_name_has_its_entry(site: Path, module: str, page: str) -> None:
    names = importlib.import_module(module).__all__
    text = (site / page).read_text("utf-8")
    missing = [n for n in names if not n.startswith("__") and f'id="{module}.{n}"' not in text]
    assert missing == []
