"""Run Starlette's and FastAPI's own test suites plain and inside bgtrace; compare outcomes.

bgtrace promises never to change the app it instruments. The frameworks' suites are the
largest body of "what the app must do" there is: each runs twice, from the source archive
(sdist) of the release installed beside bgtrace, once plain and once with every app wrapped
in ``BackgroundTaskMiddleware`` under a global SDK tracer provider (``bgtrace_everywhere.py``).
Any test whose outcome differs fails CI, unless ``framework-suite-differences.txt`` lists it
with its reason. Tests that need what this machine lacks are deselected in both runs
(``framework-suite-deselected.txt``).

The suites' dependencies go into a venv of their own (``.venv-frameworks``), from PyPI, so the
environment bgtrace's own suite ran in is untouched. Usage: ``python .ci/framework_suites.py``
(both suites) or ``python .ci/framework_suites.py starlette`` (one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from importlib.metadata import version
from pathlib import Path

import tomllib  # 3.11+: the frameworks' suites run on the newest Python only

CI = Path(__file__).resolve().parent
REPO = CI.parent
WORK = REPO / ".venv-frameworks"
VENV_PYTHON = WORK / "bin" / "python"
SUITES = ("starlette", "fastapi")

# What the suites' dependency lists hold to check code rather than run it: left out to save
# install time (nothing in their tests imports them).
NOT_NEEDED = {
    "mypy",
    "ty",
    "ruff",
    "twine",
    "pytest-cov",
    "pytest-sugar",  # also rewrites pytest's output
    "types-pyyaml",
}
# Which dependency groups of each pyproject.toml hold the test requirements.
TEST_GROUPS = {"starlette": "dev", "fastapi": "tests"}
# The extras their CI installs beside that group (Starlette's group names its own "full").
EXTRAS = {"starlette": "full", "fastapi": "all"}
# Two workers for the 2-core machine; outcomes were the same as serial runs (see README).
PYTEST_ARGS = ["-q", "-p", "no:cacheprovider", "-p", "outcomes", "-n", "2"]


def main(suites: list[str]) -> int:
    versions = {name: version(name) for name in SUITES}
    print("frameworks' suites:", ", ".join(f"{n} {v}" for n, v in versions.items()), flush=True)
    WORK.mkdir(exist_ok=True)
    sources = {name: source_tree(name, v) for name, v in versions.items()}
    install(versions, sources)
    deselected = listed(CI / "framework-suite-deselected.txt")
    allowed = listed(CI / "framework-suite-differences.txt")
    same = differ = 0
    for name in suites or SUITES:
        runs = {}
        for mode in ("plain", "bgtrace"):
            started = time.monotonic()
            runs[mode] = run_suite(name, sources[name], mode, deselected)
            counts = summary(runs[mode])
            print(f"{name} {mode}: {counts} in {time.monotonic() - started:.0f} s", flush=True)
        suite_same, suite_differ = compare(name, runs["plain"], runs["bgtrace"], allowed)
        same += suite_same
        differ += suite_differ
    # The closing line CI's log readers know: tests that ended alike (or as listed) in both
    # runs, and the failures of this check.
    print(f"frameworks: {same} passed, {differ} failed")
    return 1 if differ else 0


def source_tree(name: str, release: str) -> Path:
    """The release's sdist, unpacked: its tests/ (and FastAPI's docs_src/) are what runs."""
    tree = WORK / f"{name}-{release}"
    if (tree / "tests").is_dir():
        return tree
    sdists = WORK / "sdists"
    pip(
        sys.executable,
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--dest",
        str(sdists),
        f"{name}=={release}",
    )
    (archive,) = sdists.glob(f"{name}-{release}.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(WORK, filter="data")
    if not (tree / "tests").is_dir():
        raise SystemExit(f"{archive.name} has no tests/: the suite cannot run from it")
    return tree


def test_requirements(name: str, release: str, tree: Path) -> list[str]:
    """The test dependency group of the sdist's pyproject.toml, includes expanded."""
    groups = tomllib.loads((tree / "pyproject.toml").read_text())["dependency-groups"]

    def expand(group: str) -> list[str]:
        out: list[str] = []
        for item in groups[group]:
            if isinstance(item, dict):
                out += expand(item["include-group"])
            else:
                out.append(item)
        return out

    requirements = []
    for requirement in expand(TEST_GROUPS[name]):
        project = requirement.split(";")[0]
        for stop in "[<>=!~ ":
            project = project.split(stop)[0]
        if project.lower() in NOT_NEEDED:
            continue
        if project == name:  # starlette[full]: the extras, at the installed release
            requirement = requirement.split(";")[0].strip() + f"=={release}"
        requirements.append(requirement)
    return requirements


def install(versions: dict[str, str], sources: dict[str, Path]) -> None:
    if not VENV_PYTHON.exists():
        subprocess.run([sys.executable, "-m", "venv", str(WORK)], check=True)
    pins = WORK / "pins.txt"
    pins.write_text("".join(f"{n}=={v}\n" for n, v in versions.items()))
    requirements = [f"{n}[{EXTRAS[n]}]=={v}" for n, v in versions.items()]
    for name in SUITES:
        requirements += test_requirements(name, versions[name], sources[name])
    # bgtrace from this checkout; pytest-xdist for the two workers.
    pip(
        str(VENV_PYTHON),
        "install",
        "-q",
        "-c",
        str(pins),
        "-e",
        str(REPO),
        "pytest-xdist",
        *requirements,
    )


def pip(python: str, *args: str) -> None:
    subprocess.run([python, "-m", "pip", *args], check=True)


def listed(path: Path) -> dict[str, str]:
    """``node id  # reason`` lines; every entry must give its reason."""
    entries = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        nodeid, _, reason = line.partition(" # ")
        if not reason.strip():
            raise SystemExit(f"{path.name}:{number}: no reason given for {nodeid.strip()}")
        entries[nodeid.strip()] = reason.strip()
    return entries


def run_suite(name: str, tree: Path, mode: str, deselected: dict[str, str]) -> dict[str, str]:
    outcomes_file = WORK / f"outcomes-{name}-{mode}.json"
    outcomes_file.unlink(missing_ok=True)
    args = [str(VENV_PYTHON), "-m", "pytest", *PYTEST_ARGS]
    if mode == "bgtrace":
        args += ["-p", "bgtrace_everywhere"]
    prefix = f"{name}::"
    for nodeid in deselected:
        if nodeid.startswith(prefix):
            args += ["--deselect", nodeid[len(prefix) :]]
    args.append("tests")
    env = {**os.environ, "PYTHONPATH": str(CI), "OUTCOMES_FILE": str(outcomes_file)}
    log = WORK / f"pytest-{name}-{mode}.log"
    with log.open("w") as out:
        code = subprocess.run(
            args, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT
        ).returncode
    # 0: all passed, 1: some failed (compared below); 5 (no test ran) or anything else is a
    # broken run, never a pass.
    if code not in (0, 1) or not outcomes_file.exists():
        sys.stdout.write(log.read_text()[-5000:])
        raise SystemExit(f"{name} {mode}: pytest exited {code} (log: {log})")
    outcomes: dict[str, str] = json.loads(outcomes_file.read_text())
    if not outcomes:
        raise SystemExit(f"{name} {mode}: no test ran")
    return {f"{prefix}{nodeid}": outcome for nodeid, outcome in outcomes.items()}


def summary(outcomes: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    return ", ".join(f"{n} {o}" for o, n in sorted(counts.items(), key=lambda c: -c[1]))


def compare(
    name: str, plain: dict[str, str], traced: dict[str, str], allowed: dict[str, str]
) -> tuple[int, int]:
    """Prints every difference; returns (tests that passed this check, failures)."""
    broken = sorted(n for n, o in plain.items() if o in ("failed", "error", "xpassed"))
    if broken:
        # A test that fails without bgtrace cannot show what bgtrace changes.
        print(f"{name}: {len(broken)} tests fail WITHOUT bgtrace (deselect them with a reason):")
        for nodeid in broken:
            print(f"  {nodeid}  ({plain[nodeid]})")
    differences = sorted(
        n for n in plain.keys() | traced.keys() if plain.get(n, "absent") != traced.get(n, "absent")
    )
    for nodeid in differences:
        was, now = plain.get(nodeid, "absent"), traced.get(nodeid, "absent")
        if nodeid in allowed:
            print(f"  listed difference: {nodeid}: {was} -> {now} ({allowed[nodeid]})")
        else:
            print(f"  DIFFERENCE: {nodeid}: {was} plain, {now} with bgtrace")
    stale = sorted(n for n in allowed if n.startswith(f"{name}::") and n not in differences)
    for nodeid in stale:
        # Fixed (or gone): the line must go, or it would hide the next regression there.
        print(f"  listed but no longer different (remove it from the list): {nodeid}")
    unlisted = [n for n in differences if n not in allowed]
    print(f"{name}: {len(plain)} tests, {len(differences)} differ ({len(unlisted)} not listed)")
    failures = set(broken) | set(unlisted) | set(stale)
    return len((plain.keys() | traced.keys()) - failures), len(failures)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
