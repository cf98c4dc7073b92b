"""Every reference to the docs and to files of the repository resolves in a clone of it.

The code cites the method notes as ``docs/method.md section N``; code and docs name files of
the repository (``docs/...``, ``tests/...``, ``kalmannorm/<module>.py``) and link to each other.
A reference to a missing file or section is a broken promise to the reader; this catches the
ones a move or a rename leaves behind.
"""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["src", "benchmarks", "experiments", "tests", "README.md", "docs", "Makefile"]

# A repo-relative path (<name>: a placeholder), or a module path inside the package.
REPO_PATH = re.compile(
    r"(?<![\w./])(?:docs|src|tests|experiments|benchmarks|\.ci)/[\w./<>-]*[\w/>]")
PACKAGE_PATH = re.compile(r"(?<![\w./])kalmannorm/[\w/]+\.py")
METHOD_SECTIONS = re.compile(
    r"method\.md`{0,2}[\s#]+sections?[\s#]+(\d+(?:(?:,|,? and)\s*\d+)*)")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def method_sections(text):
    """Numbers of the ``## N. Title`` headings of docs/method.md."""
    return {int(n) for n in re.findall(r"^## (\d+)\. \S", text, flags=re.M)}


def exists_in(root):
    """Whether a repo-relative path exists; ``<placeholder>`` parts match any name."""
    def exists(path):
        pattern = re.sub(r"<[^>]*>", "*", path)
        return any(root.glob(pattern.rstrip("/"))) if pattern != path else (root / path).exists()
    return exists


def broken_references(text, sections, exists):
    """The file paths and ``method.md section N`` references of ``text`` that fail."""
    paths = REPO_PATH.findall(text) + ["src/" + p for p in PACKAGE_PATH.findall(text)]
    broken = [path for path in paths if not exists(path)]
    for match in METHOD_SECTIONS.finditer(text):
        broken += [f"method.md section {n}" for n in re.findall(r"\d+", match.group(1))
                   if int(n) not in sections]
    return broken


def source_files():
    for name in SOURCES:
        path = ROOT / name
        if path.is_file():
            yield path
        elif path.is_dir():
            for file in sorted(path.rglob("*")):
                if (file.suffix in (".py", ".md") and "records" not in file.parts
                        and file != Path(__file__).resolve()):  # its examples are broken
                    yield file


def test_checker_finds_broken_references():
    sections = {2, 3}
    exists = {"docs/method.md", "docs/perf"}.__contains__
    text = """See ``docs/method.md`` section 3 and method.md sections 2, 3 and 9.
    # ``docs/method.md``
    # section 4: across a comment line break
    Tables in docs/perf and docs/missing.md; ../shared/docs/method.md is not ours.
    Tested in `tests/test_gone.py`; the kernel in ``kalmannorm/_gone.py``."""
    assert broken_references(text, sections, exists) == [
        "docs/missing.md", "tests/test_gone.py", "src/kalmannorm/_gone.py",
        "method.md section 9", "method.md section 4"]
    exists = exists_in(ROOT)
    assert exists("docs/perf/bench-<device>-<time>.json") and exists("docs/method.md")
    assert not exists("docs/perf/nothing-<time>.json") and not exists("docs/nothing.md")
    assert method_sections("## 1. Problem\n### 1.1 Sub\n## 2. Notation\n## Appendix") == {1, 2}


def test_code_and_docs_references_resolve():
    method = ROOT / "docs" / "method.md"
    assert method.is_file(), "the code cites docs/method.md; it must be in the repository"
    sections = method_sections(method.read_text())
    assert sections == set(range(1, len(sections) + 1))
    broken = {}
    for file in source_files():
        found = broken_references(file.read_text(), sections, exists_in(ROOT))
        if found:
            broken[str(file.relative_to(ROOT))] = found
    assert not broken, f"references to missing docs or sections: {broken}"
    # Every section the code cites exists, and the code cites the method notes at all.
    assert any("method.md" in f.read_text() for f in (ROOT / "src").rglob("*.py"))


def test_markdown_links_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = {}
    for page in pages:
        missing = [link for link in MARKDOWN_LINK.findall(page.read_text())
                   if "://" not in link and not (page.parent / link).exists()]
        if missing:
            broken[str(page.relative_to(ROOT))] = missing
    assert not broken, f"links to missing files: {broken}"
