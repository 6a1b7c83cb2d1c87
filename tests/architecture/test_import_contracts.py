"""The import contracts in pyproject.toml (import-linter, run by `make lint`) hold, and they
break when one of the old cycles is put back, even through an import inside a function."""

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"][
    "root_packages"
]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [LINT_IMPORTS, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A copy of the project's code and its contracts, to put a bad import into."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("*.pyc"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def test_the_contracts_are_kept():
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


BAD_IMPORTS = {
    # (1) the agent process's modules importing each other in a circle
    "the agent process's control imports the process back": (
        "agents/process/control.py",
        "from agents.process.agent import current",
        "No cycle inside a package",
    ),
    # (2) placing jobs calling back up into the build services
    "dispatch imports builds.services": (
        "dispatch/leases.py",
        "from builds.services.progress import advance_build",
        "Dependencies run one way",
    ),
    # (3) a cycle hidden inside builds.services
    "progress imports cancellation, which imports progress": (
        "builds/services/progress.py",
        "from builds.services.cancellation import cancel_at_once",
        "No cycle inside a package",
    ),
    "builds imports the agent process": (
        "builds/services/execution.py",
        "from agents.process import agent",
        "Only agent entry points import the agent process",
    ),
}


@pytest.mark.parametrize("case", BAD_IMPORTS)
def test_a_contract_breaks_when_an_old_cycle_comes_back(checkout, case):
    path, statement, contract = BAD_IMPORTS[case]
    module = checkout / path
    # Inside a function, as the old cycles hid.
    module.write_text(module.read_text() + f"\n\ndef _sneaky():\n    {statement}\n")
    done = lint_imports(checkout)
    assert done.returncode == 1, done.stdout + done.stderr
    broken = [line for line in done.stdout.splitlines() if line.endswith("BROKEN")]
    assert any(line.startswith(contract) for line in broken), done.stdout
