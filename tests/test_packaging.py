"""The version is set once (pyproject.toml) and the changelog has an entry for it."""

from __future__ import annotations

import re
from pathlib import Path

import lightning_prune

ROOT = Path(__file__).resolve().parents[1]


def test_version_comes_from_pyproject_and_has_a_changelog_entry():
    (version,) = re.findall(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert lightning_prune.__version__ == version  # read from the installed metadata
    assert f"\n## {version}\n" in (ROOT / "CHANGELOG.md").read_text()
