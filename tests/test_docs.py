"""The docs' relative links point at files that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "spec" / "README.md"]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = [
        target
        for target in LINK.findall(page.read_text())
        if "://" not in target and not (page.parent / target).exists()
    ]
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


@pytest.mark.parametrize("name", ["zmq", "ucx", "nixl", "mooncake"])
def test_each_transport_page_lists_every_option_with_its_default(name: str) -> None:
    from kvpoll.cli.config_show import toml_value
    from kvpoll.transports import resolve
    from kvpoll.transports.options import schema
    from tests.helpers import need_transport

    need_transport(name)  # skips with the reason (fails under CI_REQUIRE_ENGINES)
    options = schema(resolve(name))
    assert options is not None
    page = (ROOT / "docs" / "transports" / f"{name}.md").read_text()
    page = page.split("## Options", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| (`[^`]*`|unset) \|", page, re.M))
    assert set(rows) == set(options), f"{name}.md's table differs from the options"
    for option in options.values():
        documented = rows[option.name]
        actual = "unset" if option.default is None else f"`{toml_value(option.default)}`"
        assert documented == actual, f"{name}.md: {option.name} documented {documented}"
