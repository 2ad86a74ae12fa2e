"""The front page and docs/ cannot go stale: the quick start is run as written, the layout
page names exactly the package's files, and every relative link points at a file that exists."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PACKAGE = ROOT / "pipeline"
QUICK_START_MARKER = "<!-- quick-start: run by tests/test_readme.py -->"
LAYOUT_MARKER = "<!-- layout: the tree below is checked by tests/test_readme.py against the files under pipeline/ -->"
PACKAGE_PATH = re.compile(r"[a-z_]+(/[a-z_]+)*\.py")
TREE_LINE = re.compile(r"^((?:│   |    )*)(?:├── |└── )(\S+)")


def fenced_block_after(text: str, marker: str, language: str) -> list[str]:
    """The lines of the fenced block that opens on the line right after `marker`."""
    lines = text.splitlines()
    assert lines.count(marker) == 1, f"{marker!r} should appear exactly once"
    start = lines.index(marker) + 1
    assert start < len(lines) and lines[start] == f"```{language}", f"no ```{language} block right after {marker!r}"
    end = lines.index("```", start + 1)
    return lines[start + 1 : end]


def quick_start(path: Path) -> list[str]:
    return fenced_block_after(path.read_text(encoding="utf-8"), QUICK_START_MARKER, "sh")


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def without_code(text: str) -> str:
    """The text with fenced blocks and inline code removed: links and headings are only read outside them."""
    text = re.sub(r"^```.*?^```[ \t]*$", "", text, flags=re.DOTALL | re.MULTILINE)
    return re.sub(r"`[^`\n]*`", "", text)


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchor for every heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"^```.*?^```[ \t]*$", "", path.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)
    headings = re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_readme_is_a_front_page_with_a_quick_start():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    commands = quick_start(README)
    assert commands and all(line.startswith("pipeline ") for line in commands), commands
    for link in ("docs/README.md", "docs/costs.md", "docs/layout.md", "docs/several-machines.md", "docs/cluster.md"):
        assert f"]({link}" in text, link
    for command in ("prepare", "inspect", "train", "evaluate", "predict", "serve"):
        assert f"](docs/{command}.md)" in text, command


def test_the_quick_start_runs_as_written(tmp_path):
    """Each line exactly as a user types it, in a folder of its own: artifacts/ lands under tmp_path."""
    (tmp_path / "sample_data").symlink_to(ROOT / "sample_data", target_is_directory=True)
    entry = Path(sys.executable).parent / "pipeline"
    env = {**os.environ, "PIPELINE_PROGRESS": "never"}
    predicted = None
    for line in quick_start(README):
        args = shlex.split(line)
        assert args[0] == "pipeline", line
        done = subprocess.run(
            [str(entry), *args[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"{line}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}"
        if args[1] == "predict":
            predicted = (args, done.stdout)
    assert (tmp_path / "artifacts" / "model" / "model.keras").is_file()
    assert (tmp_path / "artifacts" / "reports" / "metrics.json").is_file()
    assert predicted is not None, "the quick start predicts nothing"
    args, stdout = predicted
    files = [arg for arg in args[2:] if (tmp_path / arg).is_file()]
    assert len(files) == 2, args
    lines = stdout.splitlines()
    for file in files:
        assert any(line.startswith(file) for line in lines), (file, stdout)


def test_the_japanese_quick_start_is_the_same_block():
    assert quick_start(DOCS / "ja" / "README.md") == quick_start(README)


def layout_tree() -> list[str]:
    """Every path in docs/layout.md's tree, relative to pipeline/ (folders end with a slash)."""
    block = fenced_block_after((DOCS / "layout.md").read_text(encoding="utf-8"), LAYOUT_MARKER, "text")
    assert block[0] == "pipeline/", block[0]
    folders: list[str] = []
    found = []
    for line in block[1:]:
        match = TREE_LINE.match(line)
        assert match, f"not a tree line: {line!r}"
        depth, name = len(match.group(1)) // 4, match.group(2)
        assert depth <= len(folders), f"{name} is deeper than its folder"
        del folders[depth:]
        found.append("/".join([*folders, name]))
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
    return found


def test_the_layout_page_names_exactly_the_package_files():
    modules = {path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py")}
    tree = layout_tree()
    named = {path for path in tree if PACKAGE_PATH.fullmatch(path)}
    assert sorted(modules - named) == [], "modules missing from docs/layout.md's tree"
    assert sorted(named - modules) == [], "docs/layout.md's tree names modules that do not exist"
    for path in tree:
        assert (PACKAGE / path).exists(), f"docs/layout.md's tree names pipeline/{path}, which does not exist"
    rows = re.findall(r"^\| `([^`]+)` \|", (DOCS / "layout.md").read_text(encoding="utf-8"), flags=re.MULTILINE)
    tabled = {row for row in rows if PACKAGE_PATH.fullmatch(row)}
    assert sorted(modules - tabled) == [], "modules missing from docs/layout.md's table"
    assert sorted(set(rows) - modules) == [], "docs/layout.md's table names files that are not modules"


def test_every_relative_link_points_at_a_file_that_exists():
    broken = []
    for page in markdown_files():
        for target in re.findall(r"\]\(([^)\s]+)\)", without_code(page.read_text(encoding="utf-8"))):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: {target}"
            if not linked.is_relative_to(ROOT) or not linked.exists():
                broken.append(where)
            elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
                broken.append(f"{where} (no such heading)")
    assert broken == []
