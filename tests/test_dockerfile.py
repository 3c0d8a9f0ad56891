"""The Dockerfile, parsed (no Docker daemon needed): base images pinned by digest, every Python
package installed from a hashed lock file, nothing but the virtual environment carried into the
final stage, non-root, and the lock files themselves: the runtime part of requirements.lock, with
hashes, without the dev extras."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from cli.main import build_parser
from tests.test_k8s import OVERLAYS, flashgate_containers, render

ROOT = Path(__file__).resolve().parents[1]
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}(\s|$)")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", re.M)


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def stages(text: str) -> list[Stage]:
    """Instructions (keyword, arguments) per stage, continuation lines joined, comments out."""
    logical: list[str] = []
    parts: list[str] = []
    for line in text.splitlines():
        if not parts and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        parts.append(line.rstrip().removesuffix("\\"))
        if not line.rstrip().endswith("\\"):
            logical.append(" ".join(p.strip() for p in parts))
            parts = []
    found: list[Stage] = []
    for instruction in logical:
        keyword, _, args = instruction.partition(" ")
        if keyword.upper() == "FROM":
            words = args.split()
            found.append(Stage(words[0], words[-1] if len(words) == 3 else str(len(found))))
        elif found:
            found[-1].instructions.append((keyword.upper(), args))
    return found


def dockerfile() -> list[Stage]:
    return stages((ROOT / "Dockerfile").read_text())


def pip_installs(stage: Stage) -> list[list[str]]:
    """Every `pip ... install ...` of a stage's RUN instructions, as argv."""
    found = []
    for keyword, args in stage.instructions:
        if keyword != "RUN":
            continue
        for command in re.split(r"&&|;", args):
            argv = shlex.split(command)
            if argv and argv[0].endswith("pip") and "install" in argv:
                found.append(argv)
    return found


def pins(path: Path) -> dict[str, str]:
    text = path.read_text()
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text)
    for block in blocks:
        if PIN.match(block):
            assert "--hash=sha256:" in block, f"{path.name}: {block.splitlines()[0]}"
    return {m[0].lower(): m[1] for m in PIN.findall(text)}


def test_every_base_image_is_pinned_by_digest() -> None:
    found = dockerfile()
    assert len(found) >= 2  # a build stage and a final one
    for stage in found:
        assert DIGEST.search(stage.base + " "), stage.base
    assert len({s.base for s in found}) == 1  # the venv's python is the final base's python


def test_python_packages_come_from_hashed_lock_files() -> None:
    """Each install is either a hashed lock file (--require-hashes --no-deps: nothing resolved,
    nothing unpinned) or Flashgate's own wheel, built in the stage, from no index."""
    installs = [argv for stage in dockerfile() for argv in pip_installs(stage)]
    locks = set()
    for argv in installs:
        if "--require-hashes" in argv:
            assert "--no-deps" in argv and "--only-binary=:all:" in argv, argv
            lock = argv[argv.index("-r") + 1]
            assert (ROOT / lock).is_file(), lock
            locks.add(lock)
        else:
            assert "--no-index" in argv and argv[-1].endswith(".whl"), argv
            assert "flashgate" in argv[-1], argv
    assert locks == {"requirements-runtime.lock", "requirements-build.lock"}


def test_the_final_stage_carries_only_the_virtual_environment() -> None:
    """No wheel directory, no source tree, no pip run in the final stage: what an earlier layer
    of it held would stay in the image even if removed later."""
    final = dockerfile()[-1]
    copies = [args for keyword, args in final.instructions if keyword in ("COPY", "ADD")]
    assert copies == ["--from=build /opt/flashgate /opt/flashgate"]
    for keyword, args in final.instructions:
        assert not re.search(r"\.whl|/wheels|/dist\b|\bpip\b", args), (keyword, args)
    env = " ".join(args for keyword, args in final.instructions if keyword == "ENV")
    assert "PATH=/opt/flashgate/bin:" in env


def test_the_image_is_non_root_and_runs_the_cli() -> None:
    final = dockerfile()[-1]
    users = [args for keyword, args in final.instructions if keyword == "USER"]
    assert users and not users[-1].startswith(("root", "0"))
    (cmd,) = [json.loads(args) for keyword, args in final.instructions if keyword == "CMD"]
    assert build_parser().parse_args(cmd[1:]).handler.__name__ == "cmd_gateway"
    exposed = {
        int(p) for keyword, args in final.instructions if keyword == "EXPOSE" for p in args.split()
    }
    assert {8000, 9100, 9108} <= exposed
    images = {
        c["image"].rsplit(":", 1)[0] for o in OVERLAYS for _, c in flashgate_containers(render(o))
    }
    assert images == {"registry.example.com/flashgate/flashgate"}


def test_the_runtime_lock_is_requirements_lock_without_the_extras() -> None:
    """Same versions as requirements.lock (what the tests ran), every runtime dependency of
    pyproject.toml present, none of the dev or embedded extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    runtime = pins(ROOT / "requirements-runtime.lock")
    full = pins(ROOT / "requirements.lock")

    def name(req: str) -> str:
        return re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower().replace("_", "-")

    for req in project["project"]["dependencies"]:
        assert name(req) in runtime, req
    for extra in project["project"]["optional-dependencies"].values():
        for req in extra:
            if not name(req).startswith("flashgate"):
                assert name(req) not in runtime or name(req) in map(
                    name, project["project"]["dependencies"]
                ), req
    assert {k: full.get(k) for k in runtime} == runtime
    build = pins(ROOT / "requirements-build.lock")
    for req in project["build-system"]["requires"]:
        assert name(req) in build, req
