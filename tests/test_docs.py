"""The docs hold together: links resolve, every flag is documented, the README stays short.

Plain file reading and the command line's own parser: no server, no network.
Links are checked the way GitHub renders them: a relative link must name a
file or directory of the repository, and a ``#anchor`` into a Markdown file
must name one of its headings (GitHub's slugs) or an explicit ``<a id>``.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

import pytest

from counter_sync.flags import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
OPERATIONS = ROOT / "docs" / "operations.md"
# The bound: the README is the door (what, how to run, the protocol,
# the flags in short, the layout); the reference lives in docs/.
README_MAX_LINES = 250

FENCE = re.compile(r"^\s{0,3}(```|~~~)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
CODE_SPAN = re.compile(r"(`+)[^`]*?\1")
# [text](target "title") and ![alt](target); the text may wrap onto the next line.
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?([^\s>]+)>?", re.MULTILINE)
HTML_ANCHOR = re.compile(r"<a\s[^>]*\b(?:id|name)=\"([^\"]+)\"")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
LONG_FLAG = re.compile(r"--[a-z0-9][a-z0-9-]*")


def markdown_files() -> list[Path]:
    """The README, every document in docs/, and the bench's README."""
    return [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]


def outside_fences(text: str) -> list[str]:
    """The lines of ``text``, those of fenced blocks blanked: a ``# comment`` is no heading."""
    lines = []
    in_fence = False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            lines.append("")
        else:
            lines.append("" if in_fence else line)
    return lines


def prose(text: str) -> str:
    """``text`` without fenced blocks and code spans, line breaks kept.

    ``[x](y)`` in code is no link.
    """
    without_blocks = "\n".join(outside_fences(text))
    return CODE_SPAN.sub(lambda span: "\n" * span.group().count("\n"), without_blocks)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every ``#anchor`` a link into ``path`` may use."""
    text = path.read_text(encoding="utf-8")
    found: set[str] = set()
    seen: Counter[str] = Counter()
    # Headings are read with their code spans: GitHub slugs their text.
    for line in outside_fences(text):
        if match := HEADING.match(line):
            base = slug(match.group(2))
            # A repeated heading gets -1, -2, ... after the first.
            found.add(f"{base}-{seen[base]}" if seen[base] else base)
            seen[base] += 1
    found.update(HTML_ANCHOR.findall(text))
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """Every link target in ``path`` outside code, with its line number."""
    text = prose(path.read_text(encoding="utf-8"))
    targets = [*INLINE_LINK.finditer(text), *REFERENCE_DEFINITION.finditer(text)]
    return sorted((text.count("\n", 0, match.start()) + 1, match.group(1)) for match in targets)


def broken(path: Path, target: str) -> str | None:
    """Why a link from ``path`` to ``target`` does not resolve, or None when it does."""
    if SCHEME.match(target):
        return None  # https:, mailto: and the like: not checked here (no network)
    location, _, anchor = target.partition("#")
    if not location and not anchor:
        return "empty link"
    resolved = (path.parent / unquote(location)).resolve() if location else path
    if not resolved.is_relative_to(ROOT):
        return "outside the repository"
    if not resolved.exists():
        return "no such file"
    if anchor and resolved.suffix == ".md" and unquote(anchor) not in anchors(resolved):
        return f"no heading #{anchor} in {resolved.relative_to(ROOT)}"
    return None


def section(path: Path, title: str) -> list[str]:
    """The lines under the heading ``title``, up to the next heading of its level or above."""
    lines = outside_fences(path.read_text(encoding="utf-8"))
    for index, line in enumerate(lines):
        match = HEADING.match(line)
        if match and match.group(2) == title:
            level = len(match.group(1))
            body = []
            for following in lines[index + 1 :]:
                heading = HEADING.match(following)
                if heading and len(heading.group(1)) <= level:
                    break
                body.append(following)
            return body
    raise AssertionError(f"{path.relative_to(ROOT)} has no heading {title!r}")


def flags_in_table(lines: list[str]) -> set[str]:
    """The long flags named in the first column of the table rows among ``lines``."""
    flags: set[str] = set()
    for line in lines:
        if line.lstrip().startswith("|"):
            first_cell = line.strip().strip("|").split("|")[0]
            flags.update(LONG_FLAG.findall(first_cell))
    return flags


def cli_flags() -> set[str]:
    """Every long flag ``--help`` prints, read from the parser the command line uses."""
    parser = build_parser("server.py")
    return {
        option
        for action in parser._actions
        if action.help != argparse.SUPPRESS and not isinstance(action, argparse._HelpAction)
        for option in action.option_strings
        if option.startswith("--")
    }


# --- The checker itself -----------------------------------------------------


def test_a_heading_slug_drops_punctuation_and_code_marks_like_github() -> None:
    assert slug("Shared mode: several instances (`--redis`)") == (
        "shared-mode-several-instances---redis"
    )
    assert slug("Write side: skip, then catch up") == "write-side-skip-then-catch-up"


def test_links_in_code_are_not_links_and_wrapped_link_text_is(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "See [the\nflags](#flags) and `[not](a-link)`.\n\n```md\n[nor](this)\n```\n",
        encoding="utf-8",
    )
    assert links(page) == [(1, "#flags")]


def test_a_repeated_heading_gets_a_numbered_anchor(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Notes\n\n## Notes\n\n```sh\n# not a heading\n```\n", encoding="utf-8")
    assert anchors(page) == {"notes", "notes-1"}


def test_a_link_to_a_missing_file_or_heading_is_reported() -> None:
    page = ROOT / "docs" / "page.md"  # where it would be: links resolve from there
    assert broken(page, "../README.md#contents") is None
    assert (
        broken(page, "../README.md#no-such-heading") == "no heading #no-such-heading in README.md"
    )
    assert broken(page, "no-such-file.md") == "no such file"
    assert broken(page, "https://example.com/anything") is None


# --- The documentation ------------------------------------------------------


@pytest.mark.parametrize("path", markdown_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(path: Path) -> None:
    problems = [
        f"{path.relative_to(ROOT)}:{line}: {target}: {reason}"
        for line, target in links(path)
        if (reason := broken(path, target)) is not None
    ]
    assert problems == []


def test_every_flag_of_the_command_line_is_in_the_operations_flags_table() -> None:
    missing = cli_flags() - flags_in_table(section(OPERATIONS, "Flags"))
    assert not missing, f"add to the Flags table of docs/operations.md: {sorted(missing)}"


def test_the_operations_flags_table_names_no_flag_the_command_line_lacks() -> None:
    stale = flags_in_table(section(OPERATIONS, "Flags")) - cli_flags()
    assert not stale, f"not flags of the command line: {sorted(stale)}"


def test_the_readme_is_at_most_250_lines() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move reference to docs/"


# A house you can read in an evening: the learner's module on a few screens,
# no module or bench file that has to be read in pieces. Only the two stores,
# each a backend in full, may run longer.
LEARNERS_MODULE_MAX_LINES = 300
MODULE_MAX_LINES = 500
BENCH_FILE_MAX_LINES = 600
LONG_MODULES = {"sqlite_store.py", "redis_store.py"}


def line_count(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def test_the_learners_module_and_every_other_file_stay_within_their_length() -> None:
    assert line_count(ROOT / "counter_sync" / "counter.py") <= LEARNERS_MODULE_MAX_LINES
    long = {
        path.name: line_count(path)
        for path in (ROOT / "counter_sync").glob("*.py")
        if path.name not in LONG_MODULES and line_count(path) > MODULE_MAX_LINES
    }
    assert not long, f"modules over {MODULE_MAX_LINES} lines: {long}"
    long_bench = {
        str(path.relative_to(ROOT)): line_count(path)
        for path in (ROOT / "bench").rglob("*.py")
        if line_count(path) > BENCH_FILE_MAX_LINES
    }
    assert not long_bench, f"bench files over {BENCH_FILE_MAX_LINES} lines: {long_bench}"
