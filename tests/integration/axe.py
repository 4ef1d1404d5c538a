"""axe-core in the browser tests: ``assert_no_axe_violations(page)``.

The engine is the axe.min.js that the PyPI package axe-playwright-python ships (a dev
dependency); it is injected into the page under test, nothing is fetched from elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# WCAG 2.0/2.1 A and AA, and axe's best practices.
TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"]


def axe_script() -> str:
    import axe_playwright_python

    return (Path(axe_playwright_python.__file__).parent / "axe.min.js").read_text()


def axe_violations(page: Any, tags: list[str] | None = None) -> list[dict[str, Any]]:
    """Run axe on the page as it is now; its violations (id, impact, help, nodes' targets)."""
    if not page.evaluate("() => typeof window.axe !== 'undefined'"):
        page.add_script_tag(content=axe_script())
    result = page.evaluate(
        "async (tags) => { const r = await axe.run(document, {runOnly: {type: 'tag', values: tags}});"
        " return r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,"
        " nodes: v.nodes.map(n => n.target.join(' ')).slice(0, 10)})); }",
        tags or TAGS,
    )
    return list(result)


def assert_no_axe_violations(page: Any, tags: list[str] | None = None) -> None:
    violations = axe_violations(page, tags)
    assert not violations, "axe-core violations on " + page.url + ":\n" + "\n".join(
        f"- {v['id']} ({v['impact']}): {v['help']} at {v['nodes']}" for v in violations
    )
