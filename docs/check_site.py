"""Check the built site (``nox -s docs`` runs it after ``mkdocs build``): roles rendered, API page ours only.

Usage: ``python docs/check_site.py site``. Exits 1 and lists what is wrong when:

- any page shows a raw Sphinx role (``:func:`x``` or ``:class:<code>x</code>``) instead of a link or code;
- the API page has no working cross-references from docstrings (the roles' links are gone);
- the API page documents a Lightning hook (``SNIPCallback.setup``, ``DigitsClassifier.training_step``...).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from griffe_lightning_prune import is_lightning_hook

RAW_ROLE = re.compile(r":(?:py:)?(?:func|meth|class|attr|mod|data|exc|obj|const):(?:`|<code>)")
ANCHOR = re.compile(r'id="(lightning_prune\.[\w.]+)"')
# a role of IterativeSNIPCallback's docstring, rendered as a link to the function's entry on the page
EXPECTED_LINK = 'href="#lightning_prune.schedules.snipit_schedule"'


def problems(site: Path) -> list[str]:
    """Everything wrong with the site built into ``site``."""
    found = []
    pages = sorted(site.rglob("*.html"))
    if not pages:
        return [f"no HTML pages under {site}"]
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for match in RAW_ROLE.finditer(text):
            context = re.sub(r"<[^>]+>", "", text[match.start() : match.start() + 120]).split("\n")[0]
            found.append(f"{page.relative_to(site)}: raw role {context!r}")
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    if EXPECTED_LINK not in api:
        found.append(f"api/index.html: no cross-reference link {EXPECTED_LINK}")
    for anchor in sorted(set(ANCHOR.findall(api))):
        if is_lightning_hook(anchor.rsplit(".", 1)[-1]):
            found.append(f"api/index.html: documents Lightning's hook {anchor}")
    return found


if __name__ == "__main__":
    site = Path(sys.argv[1] if len(sys.argv) > 1 else "site")
    issues = problems(site)
    for issue in issues:
        print(issue)
    print(f"check_site: {len(issues)} problem(s) in {site}")
    sys.exit(1 if issues else 0)
