"""The project's documentation stands alone: no file cites documents outside the repository, and every
`docs/<name>.md §N` citation names a file of docs/ that has a section N. README, setup.py and pyproject.toml
state one Python version, which the pinned torch and triton accept."""
from __future__ import annotations

import re
import subprocess
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Citations of documents that are not part of the repository (written so this file does not match itself).
OUTSIDE = re.compile(r"\b(?:SPEC|DESIGN|BASELINES|STYLE)\.md\b|\bSPEC ?§|\bthe SPEC\b|/work/share[d]")
#: A citation: `docs/<name>.md` followed by its sections, e.g. "§4", "§1, §4", "§6-7", "§2-§3".
CITATION = re.compile(r"docs/([\w-]+\.md)`?((?:(?:,| and)? ?§\d+(?:-§?\d+)?)*)")
SECTION = re.compile(r"§(\d+)(?:-§?(\d+))?")
HEADING = re.compile(r"^#{1,6} (\d+)\. ", re.MULTILINE)


def _project_files() -> list[Path]:
    """Tracked and new (not ignored) files of the repository that are text."""
    listing = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split("\n")
    files = []
    for name in filter(None, listing):
        path = ROOT / name
        if path.is_file() and path.suffix in (".py", ".md", ".cpp", ".h", ".txt", ".toml", ".cfg", ".sh", ""):
            files.append(path)
    return files


def _lines(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return
    yield from enumerate(text.splitlines(), 1)


def test_no_file_cites_documents_outside_the_repository():
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for path in _project_files() for number, line in _lines(path) if OUTSIDE.search(line)]
    assert not found, "cite docs/semantics.md, docs/design.md or docs/baselines.md instead:\n" + "\n".join(found)


def test_docs_citations_name_existing_sections():
    sections = {path.name: {int(n) for n in HEADING.findall(path.read_text(encoding="utf-8"))}
                for path in (ROOT / "docs").glob("*.md")}
    assert {"semantics.md", "design.md", "baselines.md"} <= set(sections), sorted(sections)
    cited, broken = 0, []
    for path in _project_files():
        for number, line in _lines(path):
            for match in CITATION.finditer(line):
                name, where = match.group(1), f"{path.relative_to(ROOT)}:{number}"
                if name not in sections:
                    broken.append(f"{where}: docs/{name} does not exist")
                    continue
                for first, last in SECTION.findall(match.group(2)):
                    for section in {int(first), int(last or first)}:
                        cited += 1
                        if section not in sections[name]:
                            broken.append(f"{where}: docs/{name} has no section {section} ({line.strip()})")
    assert not broken, "\n".join(broken)
    assert cited >= 40, f"only {cited} section citations found: the citation pattern no longer matches"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_python_requirement_is_stated_alike_and_met_by_the_pinned_torch_and_triton():
    readme = re.search(r"Python ≥ (3\.\d+)", (ROOT / "README.md").read_text(encoding="utf-8"))
    setup = re.search(r'python_requires=">=(3\.\d+)"', (ROOT / "setup.py").read_text(encoding="utf-8"))
    ruff = re.search(r'target-version = "py3(\d+)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert readme and setup and ruff, "README, setup.py and pyproject.toml must each state the Python version"
    stated = {readme.group(1), setup.group(1), f"3.{ruff.group(1)}"}
    assert len(stated) == 1, f"README, setup.py and pyproject.toml state different Python versions: {stated}"
    required = readme.group(1)
    for package in ("torch", "triton"):  # installed at the versions requirements-ci.txt pins
        needed = re.search(r">=\s*(3\.\d+)", metadata.metadata(package)["Requires-Python"] or "")
        assert needed, f"{package} states no lower bound on Python"
        assert _version(required) >= _version(needed.group(1)), (
            f"{package} {metadata.version(package)} needs Python >= {needed.group(1)}, the project says >= {required}")
