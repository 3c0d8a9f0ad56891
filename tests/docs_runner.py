"""Executable docs: the ```sh blocks of README.md and docs/*.md, run as written.

The convention (README.md, "Examples in the docs are tested"):
- Every fenced block opened by a line that is exactly ```sh is run; other fences (```, ```json,
  ```text) are not. The blocks of one `## ` section run in order in one bash session
  (`set -eo pipefail`; a fresh shell per section, the same running stack for all, sections in
  file order), in the directory where `flashgate up` runs, so `source .run/flashgate.env` and
  the CLI's discovery of that file work as written.
- `<!-- docs-test: skip (why) -->` on the line before a fence skips that block; the reason is
  required and shows on GitHub's source view.
- A line `# → <answer>` after a command states what it prints:
  `# → 201 {"order_id":"…","status":"reserved",…}`: HTTP status of the last curl since the
  previous `# →` line (optional), then the last JSON document printed. Objects need exactly the
  keys shown unless a bare `…` member allows others; `"ch_…"` is a string with that prefix
  (`…` matches any text); a bare `…` value or array element matches anything (`[…]`: any
  list); other values must be equal. A text answer (`# → alive: …`) must match one line of
  the output. Text after the JSON is a comment.

Lines are not parsed by a Markdown library: the convention is line-based (fences at column 0,
the skip comment on the line before) and a 20-line scanner keeps it exact.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ARROW = "# →"
SKIP = re.compile(r"^<!--\s*docs-test:\s*skip\s*\((.+)\)\s*-->\s*$")
ELLIPSIS = "…"
_MORE = "\0more"  # a bare … member or element: others allowed
_ANY = "\0any"  # a bare … value: anything


@dataclass
class Step:
    line: int  # the doc line of the step's first command (1-based)
    code: list[str]
    expect: str | None = None
    expect_line: int = 0


@dataclass
class Block:
    path: Path
    line: int  # the fence's line
    lines: list[str]
    skip: str | None = None
    section: str = ""  # the `## ` heading above it
    steps: list[Step] = field(default_factory=list)


def blocks(path: Path) -> list[Block]:
    """Every ```sh block of a Markdown file, with its skip reason if any, split into steps."""
    text = path.read_text().splitlines()
    found: list[Block] = []
    section = ""
    i = 0
    while i < len(text):
        if text[i].startswith("## "):
            section = text[i][3:].strip()
        elif text[i].startswith("```") and text[i].rstrip() != "```sh":  # another fence
            i = next((j for j in range(i + 1, len(text)) if text[j].rstrip() == "```"), i)
        elif text[i].rstrip() == "```sh":
            prev = text[i - 1].strip() if i else ""
            m = SKIP.match(prev)
            if prev.startswith("<!--") and "docs-test" in prev and m is None:
                raise ValueError(f"{path}:{i}: malformed docs-test comment: {prev}")
            end = next((j for j in range(i + 1, len(text)) if text[j].rstrip() == "```"), None)
            if end is None:
                raise ValueError(f"{path}:{i + 1}: unclosed ```sh block")
            block = Block(path, i + 1, text[i + 1 : end], m[1] if m else None, section)
            block.steps = _steps(block)
            found.append(block)
            i = end
        i += 1
    return found


def _steps(block: Block) -> list[Step]:
    steps = [Step(block.line + 1, [])]
    for n, line in enumerate(block.lines, start=block.line + 1):
        if line.lstrip().startswith(ARROW):
            steps[-1].expect = line.lstrip()[len(ARROW) :].strip()
            steps[-1].expect_line = n
            steps.append(Step(n + 1, []))
        else:
            if not steps[-1].code:
                steps[-1].line = n
            steps[-1].code.append(line)
    return [s for s in steps if s.code or s.expect is not None]


# -- the bash session -----------------------------------------------------------------------
PRELUDE = r"""
set -eo pipefail
trap 'echo "docs-test: exit $? at doc line ${__fg_line:-?}: $BASH_COMMAND" >&2' ERR
# curl as written, plus the status of its last response appended to $__fg_dir/status.
curl() {
  local h rc=0
  h=$(mktemp "$__fg_dir/headers.XXXXXX")
  command curl -D "$h" "$@" || rc=$?
  sed -n 's/^HTTP\/[0-9.]* \([0-9][0-9][0-9]\).*/\1/p' "$h" | tail -n 1 >> "$__fg_dir/status"
  rm -f "$h"
  return $rc
}
"""


def sessions(path: Path) -> list[list[Block]]:
    """The runnable blocks of a file, one list per `## ` section that has any."""
    grouped: dict[str, list[Block]] = {}
    for block in blocks(path):
        if block.skip is None:
            grouped.setdefault(block.section, []).append(block)
    return list(grouped.values())


def script(doc_blocks: list[Block], work: Path) -> str:
    """One bash script for a section's runnable blocks: each step's output goes to out.<n>, the
    statuses of its curls to status.<n>, and both are echoed for the test's log."""
    out = [f"__fg_dir={work}", PRELUDE]
    n = 0
    for block in doc_blocks:
        if block.skip is not None:
            continue
        for step in block.steps:
            n += 1
            out.append(f"__fg_line={block.path.name}:{step.line}")
            out.append(f': > "$__fg_dir/status"; echo "\\$ {block.path.name}:{step.line}"')
            out.append("{ :")
            out.extend(step.code)
            out.append(f'}} > "$__fg_dir/out.{n}"')
            out.append(f'cp "$__fg_dir/status" "$__fg_dir/status.{n}"; cat "$__fg_dir/out.{n}"')
    out.append("echo docs-test: done")
    return "\n".join(out) + "\n"


@dataclass
class Failure:
    where: str
    why: str

    def __str__(self) -> str:
        return f"{self.where}: {self.why}"


def run_session(
    doc_blocks: list[Block], cwd: Path, env: Mapping[str, str], work: Path, timeout_s: float = 60
) -> tuple[list[Failure], str]:
    """Run a section's blocks in one bash; returns the failures (the broken answers, in order;
    then the session's exit if it stopped early) and the session's output."""
    work.mkdir(parents=True, exist_ok=True)
    where = f"{doc_blocks[0].path.name}, ## {doc_blocks[0].section}"
    try:
        proc = subprocess.run(
            ["bash", "-c", script(doc_blocks, work)],
            cwd=cwd,
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired as exc:
        done = len(list(work.glob("status.*")))
        step = [s for b in doc_blocks for s in b.steps][
            min(done, sum(len(b.steps) for b in doc_blocks) - 1)
        ]
        return [
            Failure(where, f"timed out after {timeout_s:.0f} s in the step at line {step.line}")
        ], str(exc.stdout or "")
    log = proc.stdout + proc.stderr
    failures: list[Failure] = []
    n = 0
    for block in doc_blocks:
        for step in block.steps:
            n += 1
            out_file = work / f"out.{n}"
            if not out_file.exists():
                break
            if step.expect is not None:
                statuses = (
                    (work / f"status.{n}").read_text().split()
                    if (work / f"status.{n}").exists()
                    else []
                )
                why = check(step.expect, out_file.read_text(), statuses)
                if why:
                    failures.append(Failure(f"{block.path.name}:{step.expect_line}", why))
    if proc.returncode != 0 or "docs-test: done" not in proc.stdout:
        failures.append(
            Failure(where, f"the session stopped (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        )
    return failures, log


# -- answers --------------------------------------------------------------------------------
_STATUS = re.compile(r"^(\d{3})(?:\s+|$)")


def check(expect: str, output: str, statuses: list[str]) -> str | None:
    """None if `output` (and the last curl's status) give the answer `expect`, else why not."""
    m = _STATUS.match(expect)
    rest = expect[m.end() :] if m else expect
    if m:
        if not statuses:
            return f"expected HTTP {m[1]}, but no curl ran in this step"
        if statuses[-1] != m[1]:
            return f"expected HTTP {m[1]}, got {statuses[-1]}; output: {output[-500:]}"
    if not rest:
        return None
    if rest[0] in "{[":
        try:
            pattern = pattern_of(rest)
        except ValueError as exc:
            return f"the documented answer is not JSON with …: {exc}"
        docs = json_documents(output)
        if not docs:
            return f"expected JSON like {rest}, got: {output[-500:]!r}"
        why = match(pattern, docs[-1], "$")
        return f"{why}; got {json.dumps(docs[-1])[:800]}" if why else None
    regex = _glob(rest.strip())
    if any(regex.fullmatch(line.strip()) for line in output.splitlines()):
        return None
    return f"no output line matches {rest.strip()!r}; got: {output[-500:]!r}"


def _glob(text: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(p) for p in text.split(ELLIPSIS)), re.S)


def json_documents(output: str) -> list[Any]:
    """Every JSON document in the output, in order (curl bodies have no newline between)."""
    decoder = json.JSONDecoder()
    docs, i = [], 0
    while i < len(output):
        if output[i] in "{[":
            try:
                doc, end = decoder.raw_decode(output, i)
            except ValueError:
                i += 1
                continue
            docs.append(doc)
            i = end
        else:
            i += 1
    return docs


def pattern_of(text: str) -> Any:
    """The documented JSON, with every bare … turned into a marker, decoded (text after the
    first complete document is ignored)."""
    out: list[str] = []
    stack: list[str] = []
    in_string = escaped = False
    for ch in text:
        if in_string:
            out.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
            continue
        if ch == '"':
            in_string = True
        elif ch in "{[":
            stack.append(ch)
        elif ch in "}]":
            if stack:
                stack.pop()
        elif ch == ELLIPSIS:
            prev = "".join(out).rstrip()[-1:]
            if stack and stack[-1] == "{" and prev != ":":
                out.append(json.dumps(_MORE) + ": null")
            else:
                out.append(json.dumps(_ANY if prev == ":" else _MORE))
            continue
        out.append(ch)
        if not stack and ch in "}]":
            break
    doc, _end = json.JSONDecoder().raw_decode("".join(out))
    return doc


def match(pattern: Any, actual: Any, path: str) -> str | None:
    if pattern == _ANY:
        return None
    if isinstance(pattern, dict):
        if not isinstance(actual, dict):
            return f"{path}: expected an object, got {type(actual).__name__}"
        keys = [k for k in pattern if k != _MORE]
        missing = [k for k in keys if k not in actual]
        if missing:
            return f"{path}: missing {missing}"
        extra = [k for k in actual if k not in pattern]
        if extra and _MORE not in pattern:
            return f"{path}: keys not in the docs: {extra} (add them, or …)"
        for k in keys:
            why = match(pattern[k], actual[k], f"{path}.{k}")
            if why:
                return why
        return None
    if isinstance(pattern, list):
        if not isinstance(actual, list):
            return f"{path}: expected a list, got {type(actual).__name__}"
        items = [p for p in pattern if p != _MORE]
        open_ended = len(items) != len(pattern)
        if len(actual) < len(items) or (not open_ended and len(actual) != len(items)):
            return (
                f"{path}: expected {len(items)} items{' or more' if open_ended else ''}, "
                f"got {len(actual)}"
            )
        for i, p in enumerate(items):
            why = match(p, actual[i], f"{path}[{i}]")
            if why:
                return why
        return None
    if isinstance(pattern, str) and ELLIPSIS in pattern:
        if not isinstance(actual, str) or not _glob(pattern).fullmatch(actual):
            return f"{path}: {actual!r} does not match {pattern!r}"
        return None
    if pattern != actual or type(pattern) is not type(actual):
        return f"{path}: expected {pattern!r}, got {actual!r}"
    return None


CURL_BODY = re.compile(r"(^|\s)(-d|--data(-binary|-raw|-urlencode)?|--json|-F|--form)(\s|=|$)")


def curls_without_content_type(path: Path) -> list[str]:
    """Commands of the ```sh blocks (continuation lines joined) that run curl with a body but
    name no Content-Type."""
    bad = []
    for block in blocks(path):
        command: list[str] = []
        start = block.line + 1
        for n, line in enumerate(block.lines, start=block.line + 1):
            if not command:
                start = n
            command.append(line.split(" #", 1)[0] if not line.lstrip().startswith("#") else "")
            if line.rstrip().endswith("\\"):
                continue
            text = " ".join(command)
            command = []
            if (
                re.search(r"(^|[\s|(;])curl\s", text)
                and CURL_BODY.search(text)
                and "Content-Type" not in text
                and "--json" not in text
            ):
                bad.append(f"{path.name}:{start}: {text.strip()[:120]}")
    return bad
