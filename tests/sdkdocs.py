"""The examples of docs/sdk.md, and the public names it lists (shared by the SDK tests)."""

from __future__ import annotations

import re

from tests.conftest import ROOT

SDK_DOC = ROOT / "docs" / "sdk.md"


def examples() -> list[str]:
    """Every ```python block of the page, in order."""
    return re.findall(r"```python\n(.*?)```", SDK_DOC.read_text(), flags=re.S)


def listed_names() -> set[str]:
    """The names between the public-names markers: `coi.X` items."""
    text = SDK_DOC.read_text()
    block = text.split("<!-- public-names -->")[1].split("<!-- /public-names -->")[0]
    return set(re.findall(r"`coi\.(\w+)", block))
