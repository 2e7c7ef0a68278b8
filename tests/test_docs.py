"""The docs tell the truth about the repository.

* README.md's Python code blocks run, each in a fresh namespace, importing
  every module it uses itself (a block's hidden setup may define data, never
  modules the block relies on).
* Every path at the start of a line of README's layout exists, and every
  tracked ``lsce/*.py`` module and top-level entry is listed there.
* Every repository path that README.md or docs/*.md names in backticks
  exists; every relative link in them resolves inside the repository.
* Every "design.md §N" cited anywhere in the repository names a section of
  docs/design.md.

Markers in README.md, each an HTML comment right before a ```python block:

    <!-- not run: why -->                  the block is skipped, for that reason
    <!-- test setup: what it provides
    python lines run before the block (not shown to readers)
    -->
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, NamedTuple, Optional

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DESIGN = ROOT / "docs" / "design.md"
DOCS = [README] + sorted((ROOT / "docs").glob("*.md"))


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# --------------------------------------------------------------------------
# README's code blocks

_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
_ANY_MARKER = re.compile(r"<!--\s*(not run:|test setup)", re.S)


class Block(NamedTuple):
    line: int  # of the opening fence
    code: str
    setup: str
    skip: Optional[str]


def readme_blocks(text: str) -> List[Block]:
    blocks = []
    for m in _FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[:m.start()].rstrip()
        setup, skip = "", None
        if before.endswith("-->"):  # an HTML comment right before the fence
            body = before[before.rfind("<!--") + 4:-3].strip()
            if body.startswith("not run:"):
                skip = body[len("not run:"):].strip()
            elif body.startswith("test setup"):
                setup = body.split("\n", 1)[1] if "\n" in body else ""
        blocks.append(Block(line, m.group(1), setup, skip))
    return blocks


BLOCKS = readme_blocks(_text(README))


def test_readme_has_python_blocks_and_every_marker_belongs_to_one():
    text = _text(README)
    assert BLOCKS, "README.md has no ```python block: the parser or the README changed"
    assert len(BLOCKS) == text.count("```python"), "a ```python fence that the parser did not read"
    marked = sum(1 for b in BLOCKS if b.setup or b.skip is not None)
    assert marked == len(_ANY_MARKER.findall(text)), \
        "a '<!-- not run: ... -->' or '<!-- test setup ... -->' comment that is not right before a ```python block"
    for b in BLOCKS:
        assert b.skip is None or b.skip, f"README.md:{b.line}: 'not run:' needs a reason"
        assert not (b.setup and "--" in b.setup), f"README.md:{b.line}: '--' inside an HTML comment"
    assert sum(b.skip is None for b in BLOCKS) >= 1, "every README block is skipped"


@pytest.fixture(scope="module")
def plain_import_modules(tmp_path_factory):
    """The lsce modules that a plain ``import lsce`` makes available, from a fresh
    interpreter outside the checkout (the installed lsce)."""
    code = "import sys, lsce; print('\\n'.join(m for m in sys.modules if m == 'lsce' or m.startswith('lsce.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(tmp_path_factory.mktemp("plain_import")), timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


_IMPORT_LINE = re.compile(r"^\s*(import|from)\s", re.M)


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _imported(code: str) -> set:
    """Modules a block imports, with the packages above them (which Python imports too)."""
    names = set()
    for m in re.finditer(r"^\s*import\s+(.+)$", code, re.M):
        names |= {part.split()[0] for part in m.group(1).split(",")}
    for m in re.finditer(r"^\s*from\s+([\w.]+)\s+import\s+\(?([^)#\n]+)", code, re.M):
        names.add(m.group(1))
        names |= {f"{m.group(1)}.{part.split()[0]}" for part in m.group(2).split(",") if part.strip()}
    return {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 2)}


def _unimported(code: str, plain: set) -> List[str]:
    """The modules a block reaches as ``lsce.x.y`` without importing them, where
    a plain ``import lsce`` does not import them either."""
    uses = "\n".join(line for line in code.splitlines() if not _IMPORT_LINE.match(line))
    available = plain | _imported(code)
    missing = []
    for dotted in sorted(set(re.findall(r"\blsce(?:\.[A-Za-z_]\w*)+", uses))):
        parts = dotted.split(".")
        modules = [".".join(parts[:i]) for i in range(2, len(parts) + 1) if _is_module(".".join(parts[:i]))]
        if modules and any(m not in available for m in modules) and modules[-1] not in missing:
            missing.append(modules[-1])
    return missing


def test_missing_import_is_detected(plain_import_modules):
    """The rule of test_readme_block_imports_what_it_uses, on a block that
    breaks it were ``import lsce`` to import only lsce itself. (It imports
    every module, lsce.integrations.transformers included.)"""
    assert "lsce.integrations.transformers" in plain_import_modules
    bad = "import lsce\nlsce.integrations.transformers.apply_lsce(model)\n"
    assert _unimported(bad, {"lsce"}) == ["lsce.integrations.transformers"]
    assert _unimported(bad, plain_import_modules) == []
    body = bad.split("\n", 1)[1]
    for imports in ("import lsce.integrations.transformers\n", "from lsce.integrations import transformers\n"):
        assert _unimported(imports + body, {"lsce"}) == []
    assert _unimported("import lsce\nlsce.cache.set_limit(0)\n", plain_import_modules) == []


@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:{b.line}" for b in BLOCKS])
def test_readme_block_imports_what_it_uses(block, plain_import_modules):
    """A block that uses a submodule that ``import lsce`` does not import
    must import it."""
    assert _unimported(block.code, plain_import_modules) == [], \
        f"README.md:{block.line} uses these modules without importing them"


@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:{b.line}" for b in BLOCKS])
def test_readme_block_runs(block):
    if block.skip is not None:
        pytest.skip(f"README.md:{block.line} not run: {block.skip}")
    if "transformers" in block.code + block.setup:
        pytest.importorskip("transformers")
    import torch.distributed as dist

    env, threads = dict(os.environ), torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            ns = {"__name__": "readme_block"}
            if block.setup:
                exec(compile(block.setup, f"README.md (setup of the block at line {block.line})", "exec"), ns)
                # The setup provides data; the block must import its modules itself.
                ns = {k: v for k, v in ns.items() if k == "__name__" or not isinstance(v, type(os))}
            exec(compile(block.code, f"README.md:{block.line}", "exec"), ns)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(env)
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------
# README's layout


def layout_paths(text: str) -> List[str]:
    """The first word of each unindented line of the code block under '## Layout'."""
    m = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, "README.md has no '## Layout' section"
    paths = []
    for line in m.group(1).splitlines():
        if line.startswith("    ") and len(line) > 4 and not line[4].isspace():
            paths.append(line.split()[0])
    return paths


def test_layout_paths_exist():
    paths = layout_paths(_text(README))
    assert paths, "README.md's layout lists no path"
    missing = sorted({p for p in paths if not (ROOT / p).exists()})
    assert not missing, f"README.md's layout names paths that do not exist: {missing}"


def _tracked() -> List[str]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        pytest.skip("not a git checkout")
    return out.stdout.splitlines()


def test_layout_lists_every_module_and_top_level_entry():
    listed = [p.rstrip("/") for p in layout_paths(_text(README))]
    tracked = _tracked()
    # A module is listed by its own path (or a folder above it); a top-level
    # entry also by any path inside it.
    modules = {f for f in tracked if re.fullmatch(r"lsce/[^/]+\.py", f)}
    top = {f.split("/")[0] for f in tracked} - {".gitignore"}
    unlisted = sorted(
        [f for f in modules if not any(f == p or f.startswith(p + "/") for p in listed)]
        + [t for t in top if not any(p == t or p.startswith(t + "/") for p in listed)])
    assert not unlisted, f"README.md's layout does not mention: {unlisted}"


# --------------------------------------------------------------------------
# Paths and links named in the docs

_TOP = {p.name for p in ROOT.iterdir()}


def named_paths(text: str) -> List[str]:
    """Backticked words that look like a path inside this repository."""
    out = []
    for word in re.findall(r"`([^`\s]+)`", text):
        if re.fullmatch(r"[\w.-]+(/[\w.*-]+)*/?", word) and "/" in word and word.split("/")[0] in _TOP:
            out.append(word)
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_paths_exist(doc):
    paths = named_paths(_text(doc))
    missing = sorted({p for p in paths if not any(ROOT.glob(p.rstrip("/")))})
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


def test_readme_names_design_doc_and_it_exists():
    text = _text(README)
    assert "docs/design.md" in text, "README.md does not point to docs/design.md"
    assert DESIGN.is_file(), "docs/design.md is cited but does not exist"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(doc):
    bad = []
    for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _text(doc)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        path = (doc.parent / target.split("#")[0]).resolve()
        if not path.exists() or ROOT not in (path, *path.parents):
            bad.append(target)
    assert not bad, f"{doc.name} has links that do not resolve inside the repository: {bad}"


# --------------------------------------------------------------------------
# "design.md §N" citations


def design_sections() -> set:
    return {int(n) for n in re.findall(r"^## (\d+)\. ", _text(DESIGN), re.M)}


def test_design_keeps_its_numbered_sections():
    """Code comments cite §1-§6 by number: what it computes, how data flows,
    where things live, what fast means, how it is tested, peer failure modes."""
    titles = dict(re.findall(r"^## (\d+)\. (.*)$", _text(DESIGN), re.M))
    expected = {"1": "What it computes", "2": "How data flows", "3": "Where things live",
                "4": "What \"fast\" means", "5": "How it is tested", "6": "Known failure modes"}
    for n, start in expected.items():
        assert titles.get(n, "").startswith(start), f"docs/design.md §{n} should be '{start}...', got {titles.get(n)!r}"


def test_every_design_citation_names_a_section():
    sections = design_sections()
    cited = {}
    files = [ROOT / f for f in _tracked_or_walk() if f.endswith((".py", ".h", ".cpp", ".md", ".sh", ".toml"))]
    for f in files:
        if not f.is_file():
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        refs = re.findall(r"design\.md\s*§\s*(\d+)", text)
        if f == DESIGN:
            refs += re.findall(r"§\s*(\d+)", text)
        for n in refs:
            cited.setdefault(int(n), set()).add(str(f.relative_to(ROOT)))
    assert cited, "nothing in the repository cites design.md §N: the scan is broken"
    unknown = {n: sorted(fs) for n, fs in cited.items() if n not in sections}
    assert not unknown, f"citations of docs/design.md sections that do not exist: {unknown}"


def _tracked_or_walk() -> List[str]:
    if shutil.which("git"):
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.splitlines() + [str(DESIGN.relative_to(ROOT))]
    return [str(p.relative_to(ROOT)) for d in ("lsce", "csrc", "triton_kernels", "tests", "benchmarks", "docs")
            for p in (ROOT / d).rglob("*") if p.is_file()] + ["README.md"]
