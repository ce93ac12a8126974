"""CI-friendly forms of a `kvtrace parity` report (kvtrace.runtime.parity.make_report + judge):

  junit_xml(report)    JUnit XML: one test case per prompt row; a failing row's <failure> names its
                       first failing step (prefill or decode step s, the position) and its figures
  markdown(report)     a short Markdown summary for CI job pages (GitHub's $GITHUB_STEP_SUMMARY, ...)
  plot_png(report)     max |Δlogit| per step and row, with the tolerance (needs matplotlib)
  write(path, text/bytes, what)  atomically, as every kvtrace output

No torch; the standard library (and matplotlib, optional, for the plot).
"""
from __future__ import annotations

import io
import math
import xml.etree.ElementTree as ET
from pathlib import Path

from kvtrace.runtime.parity import _fmt, describe_failure, describe_reference


def _step_name(kind: str, step: int) -> str:
    return "prefill" if kind == "prefill" else f"step {step}"


def _tolerance_text(tol: dict) -> str:
    return (f"|Δlogit| <= max({tol['max_abs']:g}, {tol.get('max_rel', 0):g} x std of the reference's logits) per "
            f"position; top-1 >= {tol['top1']:g} over decisive positions")


def _row_steps(report: dict, row: dict) -> list[str]:
    """The row's figures per step, one line each; failing steps marked."""
    failed = set(row["failed_steps"])
    lines = [f"{'step':>8}  {'max|Δlogit|':>11}  {'max rel':>9}"]
    for st, a, r in zip(report["per_step"], row["max_abs"], row["max_rel"]):
        mark = "  FAIL" if st["step"] in failed else ""
        lines.append(f"{_step_name(st['kind'], st['step']):>8}  {_fmt(a):>11}  {_fmt(r):>9}{mark}")
    return lines


def junit_xml(report: dict, table: str | None = None) -> bytes:
    """One <testcase> per prompt row, inside one <testsuite> for the artifact."""
    rows = report.get("rows") or []
    art = Path(str(report["artifact"])).name or str(report["artifact"])
    extra = [] if report["passed"] or any(not r["passed"] for r in rows) else ["verdict"]
    n_fail = sum(not r["passed"] for r in rows) + len(extra)
    secs = (report.get("seconds") or {}).get("artifact") or 0.0
    suites = ET.Element("testsuites", name="kvtrace parity", tests=str(len(rows) + len(extra)),
                        failures=str(n_fail), errors="0", time=f"{secs:.3f}")
    suite = ET.SubElement(suites, "testsuite", name=f"kvtrace parity {art}", tests=str(len(rows) + len(extra)),
                          failures=str(n_fail), errors="0", skipped="0", time=f"{secs:.3f}")
    props = ET.SubElement(suite, "properties")
    s, tol = report["summary"], report["tolerance"]
    for k, v in (("artifact", report["artifact"]), ("architecture", report["architecture"]),
                 ("dtype", report["dtype"]), ("layout", report["layout"]), ("backend", report["backend"]),
                 ("against", report["against"]), ("reference", describe_reference(report["reference"])),
                 ("tolerance", _tolerance_text(tol)), ("max_abs", _fmt(s["max_abs"], ".4g")),
                 ("max_rel", _fmt(s["max_rel"], ".4g")), ("top1", _fmt(s["top1"], ".4f")),
                 ("kl_mean", _fmt(s["kl_mean"], ".4g"))):
        ET.SubElement(props, "property", name=k, value=str(v))
    classname = f"kvtrace.parity.{art}"
    per = secs / max(len(rows), 1)
    for row in rows:
        case = ET.SubElement(suite, "testcase", classname=classname,
                             name=f"row {row['row']} (prompt {row['prompt_len']} tokens, {report['steps']} steps)",
                             time=f"{per:.3f}")
        if not row["passed"]:
            f = row["first_failure"]
            msg = f"first failing: {describe_failure(f)}"
            fail = ET.SubElement(case, "failure", type="ParityFailure", message=msg)
            fail.text = "\n".join([msg, f"failing steps: {', '.join(map(str, row['failed_steps']))}",
                                   f"tolerance: {_tolerance_text(tol)}", *_row_steps(report, row)])
    if extra:
        case = ET.SubElement(suite, "testcase", classname=classname, name="verdict", time="0")
        ET.SubElement(case, "failure", type="ParityFailure", message="; ".join(report["failures"]))
    if table:
        ET.SubElement(suite, "system-out").text = table
    ET.indent(suites)
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True) + b"\n"


def markdown(report: dict) -> str:
    s, tol = report["summary"], report["tolerance"]
    verdict = "PASS" if report["passed"] else "FAIL"
    t1 = "n/a" if s["top1"] is None else f"{100 * s['top1']:.2f}%"
    lines = [
        f"### kvtrace parity: {verdict} — `{report['artifact']}`",
        "",
        f"{report['architecture']} {report['dtype']} ({report['layout']} cache), backend `{report['backend']}`; "
        f"reference: {report['against']} ({describe_reference(report['reference'])}).",
        f"{report['batch']} prompts (lengths {', '.join(map(str, report['prompt_lengths']))}), "
        f"{report['steps']} decode steps, teacher forced. Tolerance: {_tolerance_text(tol)}.",
        "",
        "| max \\|Δlogit\\| | max relative | top-1 | top-10 overlap | KL mean | KL max | greedy |",
        "|---|---|---|---|---|---|---|",
        f"| {_fmt(s['max_abs'], '.3g')} | {_fmt(s['max_rel'], '.3g')} | {t1} | {s['top10_overlap']:.3f} | "
        f"{_fmt(s['kl_mean'], '.3g')} | {_fmt(s['kl_max'], '.3g')} | "
        f"{'identical' if s.get('greedy_match') else 'differs'} |",
        "",
        "| row | prompt | verdict | first failing step | max \\|Δlogit\\| | max relative |",
        "|---|---|---|---|---|---|",
    ]
    for row in report.get("rows") or []:
        first = describe_failure(row["first_failure"]).replace("|", "\\|") if row["first_failure"] else ""
        lines.append(f"| {row['row']} | {row['prompt_len']} | {'pass' if row['passed'] else '**FAIL**'} | {first} | "
                     f"{_fmt(max(row['max_abs']), '.3g')} | {_fmt(max(row['max_rel']), '.3g')} |")
    if report["failures"]:
        lines += ["", "Failures:", *[f"- {f}" for f in report["failures"]]]
    if report.get("notes"):
        lines += ["", "Notes:", *[f"- {n}" for n in report["notes"]]]
    lines += ["", "<details><summary>per step</summary>", "", "| step | positions | max \\|Δlogit\\| | max relative | "
              "top-1 | KL mean |", "|---|---|---|---|---|---|"]
    for st in report["per_step"]:
        t = "n/a" if st["top1"] is None else f"{st['top1']:.3f}"
        lines.append(f"| {_step_name(st['kind'], st['step'])} | {st['positions']} | {_fmt(st['max_abs'], '.3g')} | "
                     f"{_fmt(st['max_rel'], '.3g')} | {t} | {_fmt(st['kl_mean'], '.3g')} |")
    lines += ["", "</details>", ""]
    return "\n".join(lines)


def plot_available() -> str | None:
    """None when --plot can run, else why not."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install 'kvtrace[plot]')"
    return None


def plot_png(report: dict) -> bytes:
    """max |Δlogit| per step (0 = prefill), one line per prompt row, log scale; the absolute
    tolerance as a dashed line; failing steps marked."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    steps = [st["step"] for st in report["per_step"]]
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    tiny = 1e-12
    for row in report.get("rows") or []:
        ys = [max(v, tiny) if math.isfinite(v) else float("nan") for v in row["max_abs"]]
        ax.plot(steps, ys, marker=".", linewidth=1, label=f"row {row['row']} (prompt {row['prompt_len']})")
        bad = [(s, y) for s, y in zip(steps, ys) if s in set(row["failed_steps"])]
        if bad:
            ax.plot([b[0] for b in bad], [b[1] if math.isfinite(b[1]) else tiny for b in bad], "x", color="red",
                    markersize=8)
    ax.axhline(report["tolerance"]["max_abs"], color="gray", linestyle="--", linewidth=1,
               label=f"absolute tolerance {report['tolerance']['max_abs']:g}")
    ax.set_yscale("log")
    ax.set_xlabel("step (0 = prefill)")
    ax.set_ylabel("max |Δlogit|")
    ax.set_title(f"kvtrace parity {Path(str(report['artifact'])).name} ({report['dtype']}): "
                 f"{'PASS' if report['passed'] else 'FAIL'}", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write(path, data, *, what: str) -> Path:
    """Atomically (temporary file beside it, renamed when complete)."""
    from kvtrace.files import atomic_write_bytes

    return atomic_write_bytes(Path(path), data.encode("utf-8") if isinstance(data, str) else data, what=what)
