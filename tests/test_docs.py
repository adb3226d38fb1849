"""The repository stands on its own: every Markdown file it names exists, every heading of docs/ that a
comment cites exists, and model-facing text cites no document.

A reference is a path ending in ``.md`` (or the design page's bare name, ARCHITECTURE) in any tracked
text file: code, comments, docs, the README. It must resolve from the citing file's folder or from the
repository root, so ``docs/engine.md, Retries and backoff`` is fine anywhere and ``engine.md`` only inside docs/.
In tests only comments and docstrings count: their string literals name Markdown files that handlers
write (``post.md``), which are data, not documents. A citation names a page and a heading,
"docs/engine.md, Retries and backoff"; numbered sections (``§``) belong to documents we do not ship.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import tokenize
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from datamachine_mcp.abilities.registry import load_all as load_abilities
from datamachine_mcp.resources.registry import load_all as load_resources

ROOT = Path(__file__).resolve().parent.parent
SELF = Path(__file__).resolve()
TEXT_SUFFIXES = {".py", ".md", ".toml", ".txt", ".cfg", ".ini", ".yaml", ".yml", ".json", ".mako", ""}
SKIP_DIRS = {".git", ".venv", "build", "dist", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}

MD_REF = re.compile(r"(?<![\w/.-])((?:\.{1,2}/)?(?:[\w.-]+/)*\w[\w.-]*\.md)\b")
DESIGN_REF = re.compile(r"\bARCHITECTURE\b")
URL = re.compile(r"[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)
HEADING_CITE = re.compile(r"\bdocs/(\w+\.md), +(\S.*)$")


def _repo_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
        names = [ROOT / name for name in out.decode().split("\0") if name]
    except (OSError, subprocess.SubprocessError):  # not a git checkout: walk the tree
        names = [p for p in ROOT.rglob("*") if not SKIP_DIRS.intersection(p.relative_to(ROOT).parts)]
    return [p for p in names if p.is_file() and p.suffix in TEXT_SUFFIXES and p.resolve() != SELF]


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """The comments and docstrings of Python source, as (line number, text) pairs."""
    out: list[tuple[int, str]] = []
    previous = tokenize.NEWLINE
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        docstring = tok.type == tokenize.STRING and previous in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
        if tok.type == tokenize.COMMENT or docstring:
            out += [(tok.start[0] + i, line) for i, line in enumerate(tok.string.splitlines())]
        if tok.type not in (tokenize.NL, tokenize.COMMENT):
            previous = tok.type
    return out


def _lines() -> Iterator[tuple[Path, str, int, str]]:
    """(path, relative path, line number, text) of every line that may cite a document."""
    for path in _repo_files():
        try:
            text = path.read_text("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        rel = path.relative_to(ROOT).as_posix()
        in_tests = rel.startswith("tests/") and path.suffix == ".py"
        for number, line in _prose_lines(text) if in_tests else enumerate(text.splitlines(), 1):
            yield path, rel, number, line


def dead_references() -> list[tuple[str, int, str]]:
    """(file, line, reference) for every named Markdown file that does not exist in the repository."""
    dead = []
    for path, rel, number, line in _lines():
        urls = [m.span() for m in URL.finditer(line)]
        for match in MD_REF.finditer(line):
            if any(start <= match.start() < end for start, end in urls):
                continue  # a web address, not a file of ours
            ref = match.group(1)
            if not ((path.parent / ref).is_file() or (ROOT / ref).is_file()):
                dead.append((rel, number, ref))
        dead.extend((rel, number, "ARCHITECTURE") for _ in DESIGN_REF.finditer(line))
    return dead


def _headings(page: str) -> list[str]:
    path = ROOT / "docs" / page
    lines = path.read_text("utf-8").splitlines() if path.is_file() else []
    return [line.lstrip("#").strip() for line in lines if line.startswith("#")]


def miscited_headings() -> list[tuple[str, int, str]]:
    """(file, line, citation) for every "docs/<page>.md, <Heading>" whose heading the page lacks.

    The text after the comma must start with a heading of the page; a citation wrapped onto the next
    line is read on with that line.
    """
    headings = {page.name: _headings(page.name) for page in (ROOT / "docs").glob("*.md")}
    lines = list(_lines())
    bad = []
    for i, (_, rel, number, line) in enumerate(lines):
        for match in HEADING_CITE.finditer(line):
            page, cited = match.group(1), match.group(2).strip()
            if i + 1 < len(lines) and lines[i + 1][1] == rel:
                cited += " " + lines[i + 1][3].strip().lstrip("#*").strip()
            if not any(cited.startswith(h) for h in headings.get(page, [])):
                bad.append((rel, number, f"docs/{page}, {cited}"))
    return bad


def summary(dead: list[tuple[str, int, str]]) -> str:
    by_file = Counter(file for file, _, _ in dead)
    lines = [f"{len(dead)} references to Markdown files not in the repository:"]
    lines += [f"  {n:4d}  {file}" for file, n in by_file.most_common()]
    return "\n".join(lines)


def test_the_reference_finder_resolves_paths_like_a_reader() -> None:
    assert MD_REF.findall("see docs/engine.md, Retries and backoff") == ["docs/engine.md"]
    assert MD_REF.findall("a rule (storage.md §7.4) and ../README.md") == ["storage.md", "../README.md"]
    assert MD_REF.findall("no match in engine.mdx, readme_md or <date>-hello.md") == []
    assert (ROOT / "docs" / "engine.md").is_file() and not (ROOT / "engine" / "engine.md").exists()


def test_every_markdown_file_named_in_the_repository_exists() -> None:
    dead = dead_references()
    assert not dead, summary(dead)


def test_cited_headings_exist_in_docs() -> None:
    assert HEADING_CITE.search("# Retries (docs/engine.md, Retries and backoff).").groups() == (
        "engine.md",
        "Retries and backoff).",
    )
    assert not miscited_headings(), miscited_headings()


def test_no_numbered_section_is_cited() -> None:
    cited = [(rel, number) for _, rel, number, line in _lines() if "\N{SECTION SIGN}" in line]
    assert not cited, cited


def _model_facing_texts() -> dict[str, str]:
    texts = {}
    for slug, ability in load_abilities().items():
        texts[f"tool {slug}"] = " ".join(
            [ability.title, ability.description, json.dumps(ability.input_schema), json.dumps(ability.output_schema)]
        )
    for resource in load_resources():
        texts[f"resource {resource.uri}"] = f"{resource.name} {resource.description}"
    return texts


def test_model_facing_text_cites_no_document() -> None:
    citing = {
        where: sorted(set(re.findall(r"[\w./-]+\.md\b|\bARCHITECTURE\b", text)))
        for where, text in _model_facing_texts().items()
    }
    citing = {where: refs for where, refs in citing.items() if refs}
    assert not citing, citing
