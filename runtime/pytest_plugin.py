"""pytest plugin (entry point "pytest11": kvtrace): golden-file parity inside your own test suite.

    pytest --kvtrace-golden golden.npz --kvtrace-artifact ./my-artifact [--kvtrace-backend tensorrt]

adds one test per prompt row of each golden file (`golden.npz::row0`, ...) beside the suite's
own tests. The golden is replayed once through the runtime (kvtrace.runtime.golden.replay: no
torch), teacher forced on its tokens and judged by configs.TOLERANCES[the artifact's dtype]; a
row fails with its first failing step and its figures. A golden that does not fit the artifact
(another model, too many rows) fails every row with the reason.

Without the options the plugin does nothing. The same check as a plain test:

    from kvtrace.runtime.golden import check
    def test_parity():
        check("golden.npz", "my-artifact/")   # raises ParityFailure naming the first failing step
"""
from __future__ import annotations

from pathlib import Path

import pytest


def pytest_addoption(parser) -> None:
    g = parser.getgroup("kvtrace", "kvtrace golden-file parity")
    g.addoption("--kvtrace-golden", action="append", default=[], metavar="FILE",
                help="a golden file (kvtrace parity --save-golden); one test per prompt row. Repeatable")
    g.addoption("--kvtrace-artifact", metavar="DIR", help="the artifact directory the goldens are replayed on")
    g.addoption("--kvtrace-backend", default="auto", metavar="NAME",
                help="runtime backend: auto, onnxruntime, onnxruntime-cuda, tensorrt (default auto)")


@pytest.hookimpl(tryfirst=True)  # before -k / -m deselection, so those apply to these tests too
def pytest_collection_modifyitems(session, config, items) -> None:
    goldens = config.getoption("kvtrace_golden")
    if not goldens:
        return
    artifact = config.getoption("kvtrace_artifact")
    if not artifact:
        raise pytest.UsageError("--kvtrace-golden needs --kvtrace-artifact DIR (the artifact to replay it on)")
    for g in goldens:
        collector = GoldenFile.from_parent(session, path=Path(g).absolute())
        collector.artifact, collector.backend = artifact, config.getoption("kvtrace_backend")
        items.extend(collector.collect())


class GoldenFile(pytest.File):
    artifact: str
    backend: str = "auto"
    _report = None
    _error = None

    def collect(self):
        from kvtrace.runtime import golden

        try:
            rows = len(golden.load(self.path).prompts)
        except Exception as e:  # noqa: BLE001 - reported by the test, not as a collection crash
            self._error = e
            rows = 1
        for b in range(rows):
            yield GoldenRow.from_parent(self, name=f"row{b}", row=b)

    def report(self) -> dict:
        """The replay, run once for all rows of this golden."""
        from kvtrace.runtime import golden

        if self._report is None and self._error is None:
            try:
                self._report = golden.replay(self.artifact, self.path, backend=self.backend)
            except Exception as e:  # noqa: BLE001
                self._error = e
        if self._error is not None:
            raise GoldenError(f"{type(self._error).__name__}: {self._error}")
        return self._report


class GoldenError(Exception):
    """A golden row failed (or could not run); the message is the whole story."""


class GoldenRow(pytest.Item):
    def __init__(self, *, row: int, **kw):
        super().__init__(**kw)
        self.row = row

    def runtest(self) -> None:
        from kvtrace.runtime import parity
        from kvtrace.runtime.reports import _row_steps

        report = self.parent.report()
        row = report["rows"][self.row]
        if row["passed"]:
            if not report["passed"] and not any(not r["passed"] for r in report["rows"]):
                raise GoldenError("; ".join(report["failures"]))
            return
        tol = report["tolerance"]
        raise GoldenError("\n".join([
            f"{report['artifact']} ({report['dtype']}, {report['backend']}) against golden {self.path.name}, "
            f"row {self.row} (prompt {row['prompt_len']} tokens):",
            f"first failing: {parity.describe_failure(row['first_failure'])}",
            f"failing steps: {', '.join(map(str, row['failed_steps']))}",
            f"tolerance: |Δlogit| <= max({tol['max_abs']:g}, {tol.get('max_rel', 0):g} x std), "
            f"top-1 >= {tol['top1']:g}",
            *_row_steps(report, row)]))

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, GoldenError):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, None, f"kvtrace golden {self.path.name} row {self.row}"
