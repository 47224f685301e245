"""Tests of the user documentation: README.md and docs/*.md.

Every relative link resolves (files, and #anchors as GitHub renders them), the
README stays short and its quick start runs, and no shipped file speaks of the
project's own work items.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
LINKED_PAGES = [README, *DOCS, REPO / "experiments" / "README.md", REPO / "benchmarks" / "README.md"]

# Pages that work in progress adds. A link to one of them is not checked while
# the file does not exist; once it exists it is checked like any other.
# Delete an entry (or this whole exception) when its file is on main.
PLANNED_PAGES = {"docs/backends.md", "CONTRIBUTING.md"}

FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.S | re.M)
INLINE_CODE = re.compile(r"`+[^`\n]*`+")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", re.M)


def without_code(text):
    """The Markdown text with fenced blocks removed and inline code blanked."""
    text = FENCE.sub("", text)
    return INLINE_CODE.sub(lambda m: "x" * len(m.group(0)), text)


def github_anchor(heading):
    """The id GitHub gives a heading: text content, lowercased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path):
    """Every heading anchor of a Markdown file, duplicates numbered as GitHub does."""
    seen, found = {}, set()
    for _, title in HEADING.findall(FENCE.sub("", path.read_text())):
        base = github_anchor(title)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(path):
    for target in LINK.findall(without_code(path.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        yield target


def broken_links(path, repo=REPO):
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        try:
            name = resolved.relative_to(repo).as_posix()
        except ValueError:
            broken.append(f"{target} (outside the repository)")
            continue
        if not resolved.exists():
            if name not in PLANNED_PAGES:
                broken.append(f"{target} (no file {name})")
            continue
        if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading #{anchor} in {name})")
    return broken


@pytest.mark.backend_independent
@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves(page):
    assert list(relative_links(page)), f"{page} has no relative link: the scan sees none"
    assert broken_links(page) == []


@pytest.mark.backend_independent
def test_the_docs_pages_exist():
    names = {p.name for p in DOCS}
    assert {"api.md", "optimizers.md", "distributed.md", "diagnostics.md", "performance.md"} <= names


@pytest.mark.backend_independent
def test_anchors_are_made_as_github_makes_them(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# Choosing `stddev`\n## 32K batches on small hardware\n## Results (2026-11-28, 2-core VM)\n"
        "## Results (2026-11-28, 2-core VM)\n```\n# not a heading\n```\n### `make demo`\n"
    )
    assert anchors(page) == {
        "choosing-stddev", "32k-batches-on-small-hardware", "results-2026-11-28-2-core-vm",
        "results-2026-11-28-2-core-vm-1", "make-demo",
    }


@pytest.mark.backend_independent
def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "other.md").write_text("# Real heading\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#real-heading) [gone](missing.md) [bad anchor](other.md#nope) "
        "[self](#nowhere) `[in code](missing2.md)` [web](https://example.com/x.md)\n"
    )
    assert broken_links(page, repo=tmp_path) == [
        "missing.md (no file missing.md)",
        "other.md#nope (no heading #nope in other.md)",
        "#nowhere (no heading #nowhere in page.md)",
    ]


@pytest.mark.backend_independent
def test_readme_is_short_and_names_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert "make test" in text and "make demo" in text


def quick_start_code():
    section = README.read_text().split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```", section, re.S | re.M)
    assert len(blocks) == 1, "the quick start has one Python block"
    return blocks[0]


@pytest.mark.slow
def test_the_readme_quick_start_runs(tmp_path):
    """The README's quick start, as a user would paste it, on the TensorFlow backend."""
    script = tmp_path / "quick_start.py"
    script.write_text(quick_start_code())
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # It mixed: the README says gradmix_gamma is about 1 + stddev**2 = 2 (512 draws: std of the mean ~0.11).
    printed = re.search(r"loss (\S+) gamma (\S+)", result.stdout)
    assert printed, result.stdout
    loss, gamma = map(float, printed.groups())
    assert 1.5 < gamma < 2.5 and loss == loss  # not NaN


SHIPPED = ["README.md", "docs", "tf_gradmix", "examples", "experiments", "benchmarks"]
WORK_ITEMS = re.compile(r"issue ?#?[0-9]|must-show|(?<!clear_)session", re.I)  # not Keras's clear_session()


@pytest.mark.backend_independent
def test_shipped_files_do_not_speak_of_the_projects_work_items():
    found = []
    for entry in SHIPPED:
        root = REPO / entry
        for path in [root] if root.is_file() else sorted(root.rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts or path.suffix == ".png":
                continue
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if WORK_ITEMS.search(line):
                    found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:100]}")
    assert found == []
