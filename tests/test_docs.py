"""The docs held to the code: docs/design.md's sections, tables, paths and variables, the
references to it from the sources, and the README's commands and links."""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path

import pytest

import fastkd
from fastkd._options import DIVERGENCES, TAILS, KernelArgs, LossOptions

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"
README = ROOT / "README.md"

SOURCE_DIRS = ("fastkd", "kernels", "csrc", "bench", "tests", "tools")
SOURCE_SUFFIXES = {".py", ".h", ".hpp", ".cpp", ".cu", ".cuh", ".cmake", ".sh"}
TOP_LEVEL_SOURCES = ("CMakeLists.txt", "setup.py", "Makefile", "pyproject.toml", ".ci/run")

# "docs/design.md §2", "docs/design.md §1-§2", "... §2 and §3", also wrapped onto the next
# comment line.
DESIGN_REF = re.compile(r"docs/design\.md((?:(?:[\s,/#*–-]|\band\b|\bor\b)*§\s*\d+)+)")
# Pointers out of the repository, or to the old design doc by a bare name.
FOREIGN_REF = re.compile(r"\.\./shared|shared/DESIGN\.md|\bDESIGN(?:\.md)?\s*§")


def source_files() -> list[Path]:
    files = [ROOT / name for name in TOP_LEVEL_SOURCES if (ROOT / name).is_file()]
    for top in SOURCE_DIRS:
        for path in sorted((ROOT / top).rglob("*")):
            if path.suffix in SOURCE_SUFFIXES and "__pycache__" not in path.parts:
                files.append(path)
    return files


@functools.cache
def source_text() -> str:
    return "\n".join(p.read_text(errors="replace") for p in source_files())


def where(path: Path, text: str, pos: int) -> str:
    """file:line of a position in a file's text."""
    line = text.count("\n", 0, pos) + 1
    return f"{path.relative_to(ROOT)}:{line}"


def sections(text: str) -> dict[int, str]:
    """Section number -> body, from the '## §N Title' headings."""
    parts = re.split(r"^## §(\d+) .*$", text, flags=re.M)
    return {int(num): body for num, body in zip(parts[1::2], parts[2::2])}


def tables(text: str) -> list[list[list[str]]]:
    """Markdown tables as lists of rows of stripped cells (separator rows dropped)."""
    found, rows = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                rows.append(cells)
        elif rows:
            found.append(rows)
            rows = []
    return found


def code_names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def fenced_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", markdown, flags=re.M | re.S)


def make_commands(code: str) -> list[str]:
    return re.findall(r"(?:^|\s)make\s+([a-z][\w-]*)", code, flags=re.M)


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, flags=re.M))


@pytest.fixture(scope="module")
def design() -> str:
    return DESIGN.read_text()


def test_sections_are_the_fixed_ones(design):
    assert list(sections(design)) == list(range(1, 13))


def test_design_references_name_existing_sections(design):
    known = set(sections(design))
    bad = []
    for path in source_files():
        text = path.read_text(errors="replace")
        for match in DESIGN_REF.finditer(text):
            for num in map(int, re.findall(r"\d+", match.group(1))):
                if num not in known:
                    bad.append(f"{where(path, text, match.start())}: §{num}")
    assert not bad, "references to sections docs/design.md does not have:\n" + "\n".join(bad)


def test_sources_point_into_the_repository():
    bad = []
    for path in source_files():
        text = path.read_text(errors="replace")
        bad += [f"{where(path, text, m.start())}: {m.group()}" for m in FOREIGN_REF.finditer(text)]
    assert not bad, "point to docs/design.md §N instead:\n" + "\n".join(bad)


def test_divergence_tables_list_every_divergence(design):
    """§1 and §2 each have a table with one row per divergence, in DIVERGENCES order."""
    for num in (1, 2):
        found = [
            [code_names(row[0])[0] for row in table[1:]]
            for table in tables(sections(design)[num])
            if table[0][0].strip("`") == "divergence"
        ]
        assert found == [list(DIVERGENCES)], f"§{num}: divergence table rows {found}"


def test_tail_table_lists_every_tail_mode(design):
    """§11 has a table with one row per tail mode of the sparse losses, in TAILS order."""
    found = [
        [code_names(row[0])[0] for row in table[1:]]
        for table in tables(sections(design)[11])
        if table[0][0].strip("`") == "tail"
    ]
    assert found == [list(TAILS)], f"§11: tail table rows {found}"


def test_kernel_args_table_follows_the_named_tuple(design):
    (table,) = [t for t in tables(sections(design)[2]) if t[0][0] == "field"]
    names = [name for row in table[1:] for name in code_names(row[0])]
    assert names == list(KernelArgs._fields)


def test_divergence_dispatch_lives_in_the_header():
    """§8: a new divergence touches csrc/kd_math.h and no other C++ file. kl and reverse_kl have
    one-pass accumulators that the kernels name; every other divergence takes the generic
    two-pass path, so a switch that names one of those by hand would miss a new one (switches
    take their cases from the header's FASTKD_DIVERGENCES list instead)."""
    header = (ROOT / "csrc" / "kd_math.h").read_text()
    listed = re.search(r"#define FASTKD_DIVERGENCES\(X\)(.*?)\n\n", header, flags=re.S)
    codes = re.findall(r"X\((k\w+),", listed.group(1))
    assert len(codes) == len(DIVERGENCES), f"csrc/kd_math.h: divergence list {codes}"
    two_pass = [c for c in codes if c not in ("kKL", "kReverseKL")]
    case = re.compile(r"\bcase\s+(?:fastkd::)?(" + "|".join(two_pass) + r")\b")
    bad = []
    for path in source_files():
        if path.parts[-2:] == ("csrc", "kd_math.h"):
            continue
        text = path.read_text(errors="replace")
        bad += [f"{where(path, text, m.start())}: {m.group()}" for m in case.finditer(text)]
    assert not bad, "divergences named by hand outside csrc/kd_math.h:\n" + "\n".join(bad)


def test_public_api_is_documented(design):
    """§9 names every public name of fastkd and lists the loss options in LossOptions' order."""
    api = sections(design)[9]
    missing = [name for name in fastkd.__all__ if f"fastkd.{name}" not in api]
    assert not missing, f"§9 does not document {missing}"
    listed = re.search(r"in this order:(.*?)\.\n", api, flags=re.S)
    assert listed, "§9 has no list of the loss options"
    assert code_names(listed.group(1)) == [f.name for f in dataclasses.fields(LossOptions)]


def test_paths_in_the_docs_exist(design):
    """Backticked repository paths and relative links of docs/design.md and the README."""
    tops = (*SOURCE_DIRS, "docs", ".ci")
    missing = []
    for doc, text in ((DESIGN, design), (README, README.read_text())):
        spans = re.findall(r"`([^`\s]+)`", text)
        candidates = [s for s in spans if s.split("/")[0] in tops and "<" not in s]
        links = [t for t in re.findall(r"\]\(([^)#\s]+)", text) if "://" not in t]
        for ref in candidates + links:
            if not any(ROOT.glob(ref.rstrip("/"))):  # a path, or a glob such as csrc/cuda/*.cu
                missing.append(f"{doc.name}: {ref}")
    assert not missing, "paths that do not exist:\n" + "\n".join(sorted(set(missing)))


def test_identifiers_in_the_design_exist(design):
    """Every backticked name in docs/design.md (a function, type, option, field, macro) is
    spelled somewhere in the sources, so a rename in the code cannot leave the doc behind."""
    code = source_text()
    names = {n.removesuffix("()") for n in re.findall(r"`([^`]+)`", design)}
    idents = sorted(n for n in names if re.fullmatch(r"[A-Za-z_]\w*", n))
    unknown = [n for n in idents if not re.search(rf"\b{re.escape(n)}\b", code)]
    assert not unknown, f"names in docs/design.md the sources do not have: {unknown}"


def test_environment_variables_in_the_docs_exist(design):
    code = source_text()
    named = set(re.findall(r"\bFASTKD_[A-Z0-9_]+", design + README.read_text()))
    assert named, "the docs name no FASTKD_* variable"
    unknown = sorted(v for v in named if v not in code)
    assert not unknown, f"FASTKD_* names the code does not have: {unknown}"


def test_readme_make_commands_are_makefile_targets():
    readme = README.read_text()
    quick_start = re.search(r"^## Quick start$(.*?)^## ", readme, flags=re.M | re.S)
    assert quick_start, "README has no '## Quick start' section"
    assert make_commands("\n".join(fenced_blocks(quick_start.group(1)))) == ["demo", "test"]
    # Every make command anywhere in the README: fenced blocks and inline code spans.
    inline = re.findall(r"`([^`]+)`", re.sub(r"^```.*?^```", "", readme, flags=re.M | re.S))
    used = make_commands("\n".join(fenced_blocks(readme) + inline))
    unknown = sorted(set(used) - makefile_targets())
    assert not unknown, f"README uses make targets the Makefile lacks: {unknown}"
