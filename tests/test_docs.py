"""The README fits on a few screens and leads into docs/; the pages generated from code match it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from agent.settings import Settings
from agent.settings.reference import settings_reference

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
LINK = re.compile(r"\]\(([^)\s]+)\)")
PROJECT_FILES = (
    "https://github.com/edgeai/edgeai-agent/blob/main/",
    "https://raw.githubusercontent.com/edgeai/edgeai-agent/main/",
)
"""The project's own files by their public address: the README's links, which must work where
Home Assistant's app store shows it (it has no folder to resolve a relative link in)."""


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    found = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^a-z0-9 _-]", "", title).replace(" ", "-"))
    return found


def test_the_readme_fits_on_a_few_screens_and_names_the_test_command():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    assert "scripts/test" in readme
    assert "scripts/test" in (ROOT / ".ci" / "run").read_text()


def test_the_readme_links_by_address_as_the_app_store_shows_it():
    relative = [
        target
        for target in LINK.findall((ROOT / "README.md").read_text())
        if not target.startswith(("http://", "https://", "#"))
    ]
    assert relative == []


def test_every_link_in_the_readme_and_docs_leads_somewhere():
    pages = [ROOT / "README.md", *DOCS.glob("*.md")]
    checked = 0
    for page in pages:
        for link in LINK.findall(page.read_text()):
            target, base = link, page.parent
            for prefix in PROJECT_FILES:
                if link.startswith(prefix):
                    target, base = link.removeprefix(prefix), ROOT
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            linked = (base / path).resolve() if path else page
            assert linked.exists(), f"{page.name} links to {target}, which does not exist"
            if anchor:
                assert anchor in anchors(linked), f"{page.name}: no heading #{anchor} in {path}"
            checked += 1
    assert checked >= 10


def test_the_readme_leads_to_every_page_of_docs():
    readme = (ROOT / "README.md").read_text()
    for page in DOCS.glob("*.md"):
        assert f"main/docs/{page.name}" in readme, f"the README does not lead to docs/{page.name}"


def test_the_settings_page_is_the_one_the_settings_model_writes():
    page = (DOCS / "settings.md").read_text()
    assert page == settings_reference(), (
        "docs/settings.md is stale: python -m agent.settings.reference > docs/settings.md"
    )
    for name in Settings.model_fields:
        assert f"`EDGEAI_{name.upper()}`" in page


def test_the_performance_chart_is_drawn_from_the_saved_run(tmp_path):
    run = DOCS / "performance-run.json"
    drawn = tmp_path / "chart.svg"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "bench" / "suite.py"),
            "--chart",
            str(run),
            str(drawn),
        ],
        check=True,
        cwd=ROOT,
    )
    assert drawn.read_text() == (DOCS / "performance.svg").read_text()
    svg = ET.fromstring(drawn.read_text())  # noqa: S314 - the file this test just drew
    texts = " ".join(element.text or "" for element in svg.iter("{http://www.w3.org/2000/svg}text"))
    for case in json.loads(run.read_text())["cases"]:
        assert f"({case['case']})" in texts
        assert f"{case['latency_median_s']:.2f} s" in texts
    performance = (DOCS / "performance.md").read_text()
    assert performance.index("performance.svg") < performance.index("| case |")


def test_the_cpu_class_table_quotes_its_saved_run():
    """docs/performance.md's per-class figures are the saved run's, to the hundredth."""
    run = json.loads((DOCS / "performance-cpu-classes-run.json").read_text())
    performance = (DOCS / "performance.md").read_text()
    section = performance[performance.index("## Per CPU class") :]
    for case in run["cases"]:
        if case["case"] in ("c", "x", "e", "a4"):
            assert f"{case['latency_median_s']:.2f} ({case['latency_min_s']:.2f})" in section
    assert "AMD EPYC (avx512_bf16)" in run["machine"]
