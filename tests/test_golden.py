"""Golden files: record with the torch reference (`kvtrace parity --save-golden`), replay through
the runtime alone (`--golden`, in a process where torch cannot be imported), the sparse metric
definitions, identity checks, CI outputs (JUnit, Markdown, plot) and the pytest plugin."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from kvtrace import cli
from kvtrace.errors import KvtraceError, ParityFailure
from kvtrace.runtime import golden as G
from kvtrace.runtime import parity as P

ROOT = Path(__file__).resolve().parents[1]
BATCH, STEPS = "4", "6"


def blocker(*names: str) -> str:
    """A sitecustomize.py that makes importing any of `names` (or their submodules) raise."""
    return textwrap.dedent(f'''
        import sys
        _BLOCKED = {names!r}
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if any(name == b or name.startswith(b + ".") for b in _BLOCKED):
                    raise ImportError(f"{{name}} is blocked in this test")
                return None
        sys.meta_path.insert(0, _Block())
    ''')


def run_blocked(tmp_path: Path, blocked: tuple, code: str, *args: str, env=None) -> subprocess.CompletedProcess:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(blocker(*blocked))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), **(env or {})}
    return subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)


# the CLI in a fresh process; prints, as its last line, which forbidden modules got imported
CLI_CODE = textwrap.dedent('''
    import json, sys
    from kvtrace.cli import main
    rc = main(sys.argv[1:])
    bad = sorted(n for n in sys.modules if n == "torch" or n.startswith("torch.") or n.startswith("kvtrace.models")
                 or n == "kvtrace.exporter.references" or n == "kvtrace.exporter.export")
    print(json.dumps({"rc": rc, "forbidden_modules": bad}))
''')


def cli_blocked(tmp_path, *args):
    p = run_blocked(tmp_path, ("torch",), CLI_CODE, *args)
    assert p.stdout.strip(), p.stderr
    result = json.loads(p.stdout.strip().splitlines()[-1])
    return result["rc"], p.stdout, p.stderr, result["forbidden_modules"]


def export(args: list[str]) -> None:
    assert cli.main(["export", *args]) == 0


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    out = tmp_path_factory.mktemp("golden") / "neox-fp32"
    export(["--arch", "gpt_neox", "--max-seq", "64", "--max-batch", "4", "--out", str(out), "--no-validate"])
    return out


@pytest.fixture(scope="module")
def golden_file(art, tmp_path_factory):
    path = tmp_path_factory.mktemp("golden-file") / "neox.npz"
    rc = cli.main(["parity", str(art), "--save-golden", str(path), "--batch", BATCH, "--steps", STEPS])
    assert rc == 0 and path.is_file()
    return path


def export_model(model, out: Path, source: dict, **kw) -> Path:
    from kvtrace.exporter.export import export_model as _export

    return _export(model, out, validate=False, log=lambda m: None, source=source,
                   **{"max_seq": 64, "max_batch": 4, **kw})


def builtin_source(seed: int) -> dict:
    return {"kind": "builtin", "path": None, "sha256": None, "seed": seed}


# --------------------------------------------------------------------------- sparse metrics
def _kl_dense(ref, got) -> np.ndarray:
    """KL(softmax(ref) || softmax(got)) per row, float64, written out independently of compare()."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    lp = ref - np.log(np.exp(ref - ref.max(-1, keepdims=True)).sum(-1, keepdims=True)) - ref.max(-1, keepdims=True)
    lq = got - np.log(np.exp(got - got.max(-1, keepdims=True)).sum(-1, keepdims=True)) - got.max(-1, keepdims=True)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def test_dense_reference_is_the_k_equals_v_case():
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 2, (6, 40)).astype(np.float32)
    got = ref + rng.normal(0, 0.01, ref.shape).astype(np.float32)
    a, b = P.compare(ref, got), P.compare(P.RefLogits.from_dense(ref), got)
    for k in ("max_abs", "mean_abs", "max_rel", "top1", "top1_strict", "top10_overlap", "kl_mean", "kl_max"):
        assert a[k] == b[k], k
    d = np.abs(ref.astype(np.float64) - got)
    assert a["max_abs"] == pytest.approx(d.max(), rel=1e-12)
    assert a["mean_abs"] == pytest.approx(d.mean(), rel=1e-12)
    assert a["max_rel"] == pytest.approx((d.max(-1) / ref.astype(np.float64).std(-1)).max(), rel=1e-12)
    assert a["kl_max"] == pytest.approx(_kl_dense(ref, got).max(), rel=1e-9)
    assert a["tail_mass"] == 0.0


def test_sparse_metrics_by_hand():
    # one position, 8 entries; top 3 stored exactly, 2 sampled from the other 5
    ref = np.array([[4.0, 3.0, 2.5, 0.0, -1.0, 0.5, -2.0, 1.0]], np.float32)
    got = ref.copy()
    got[0, :3] += np.array([0.01, -0.02, 0.0], np.float32)
    got[0, 3:] += 0.3  # the same shift on every tail entry: the tail's inner distribution is unchanged
    s = P.RefLogits.from_dense(ref, top=3, sample=2, seed=1)
    assert s.indices[0, :3].tolist() == [0, 1, 2] and set(s.indices[0, 3:]) <= {3, 4, 5, 6, 7}
    m = P.compare(s, got)
    assert m["max_abs"] == pytest.approx(0.3, abs=1e-6)  # every stored tail entry differs by 0.3
    assert m["top1"] == 1.0 and m["decisive"] == 1
    p = np.exp(ref[0].astype(np.float64)) / np.exp(ref[0].astype(np.float64)).sum()
    assert s.tail[0] == pytest.approx(p[3:].sum(), rel=1e-12)
    # a tail shifted uniformly keeps p_tail/P_tail = q_tail/Q_tail: grouping loses nothing, KL exact
    assert m["kl_max"] == pytest.approx(_kl_dense(ref, got)[0], rel=1e-9)
    assert m["tail_mass"] == pytest.approx(p[3:].sum(), rel=1e-12)


def test_sparse_kl_is_a_lower_bound_within_its_stated_error():
    rng = np.random.default_rng(3)
    for _ in range(20):
        V, k = 200, 16
        ref = rng.normal(0, 3, (4, V)).astype(np.float32)
        got = ref + rng.normal(0, 0.2, ref.shape).astype(np.float32)
        s = P.RefLogits.from_dense(ref, top=k, sample=8, seed=0)
        m = P.compare(s, got)
        true = _kl_dense(ref, got)
        for n in range(4):
            one = P.compare(s[n:n + 1], got[n:n + 1])
            tail = np.setdiff1d(np.arange(V), s.indices[n, :k])
            delta = ref[n, tail].astype(np.float64) - got[n, tail]
            gap = true[n] - one["kl_max"]
            assert -1e-12 <= gap <= s.tail[n] * (delta.max() - delta.min()) + 1e-12
        assert m["kl_max"] <= true.max() + 1e-12


def test_sparse_top1_ties_and_non_finite_entries_outside_the_stored_ones():
    ref = np.array([[2.0, 2.0, 0.0, -1.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0, -9.0, -10.0]], np.float32)
    s = P.RefLogits.from_dense(ref, top=10, sample=0)
    assert s.argmax().tolist() == [0]  # lowest id first among equal values, like np.argmax
    got = ref.copy()
    got[0, 1] += 0.5  # the artifact picks the other tied entry
    m = P.compare(s, got)
    assert m["decisive"] == 0 and m["top1"] is None and m["top1_strict"] == 1.0  # a tie either way agrees
    got = ref.copy()
    got[0, 11] = np.nan  # an entry that is not stored
    m = P.compare(s, got)
    assert not m["finite"] and math.isinf(m["max_abs"])
    assert P.verdict(P.summarize([m]), [m], {"max_abs": 1.0, "max_rel": 1.0, "top1": 0.0})[0]


def test_golden_top_must_cover_the_overlap():
    tr = P.Trace(prompts=[[1, 2]], prefill=[np.zeros((2, 50), np.float32)])
    with pytest.raises(KvtraceError, match="--golden-top 5"):
        G.from_trace(tr, manifest={"config": {"vocab_size": 50}}, artifact="a", reference={}, prompt_spec={}, top=5)


# --------------------------------------------------------------------------- the file
def test_golden_round_trip_and_contents(art, golden_file):
    g = G.load(golden_file)
    h = g.header
    assert h["format"] == "kvtrace-golden" and h["format_version"] == G.FORMAT_VERSION
    assert h["model"]["architecture"] == "gpt_neox" and h["model"]["source"] == {"kind": "builtin", "seed": 1234}
    assert h["reference"]["kind"] == "builtin" and h["reference"]["torch_version"]
    assert h["artifact"]["dtype"] == "float32" and len(h["artifact"]["digest"]["sha256"]) == 64
    assert h["tolerance"]["row"]["max_rel"] > 0 and set(P.METRICS) <= set(h["metrics"])
    assert h["logits"] == {"vocab": 320, "top": 64, "sample": 64, "stored": 128, "sample_seed": 0}
    assert len(g.prompts) == int(BATCH) and g.steps == int(STEPS)
    assert len({len(p) for p in g.prompts}) == int(BATCH)  # ragged
    # the stored logits are the reference's own: recompute them and compare exactly
    from kvtrace.configs import BUILTIN, BUILTIN_SEED
    from kvtrace.exporter.references import TorchReference
    from kvtrace.models.transformer import random_model

    ref = P.record(TorchReference(random_model(BUILTIN["gpt_neox"], BUILTIN_SEED), {}), g.prompts, g.steps)
    assert ref.tokens == g.trace.tokens
    for s, d in enumerate(ref.decode):
        stored = g.trace.decode[s]
        assert np.array_equal(np.take_along_axis(d, stored.indices, -1), stored.values)
        assert np.array_equal(stored.indices[:, 0], d.argmax(-1))
        np.testing.assert_allclose(stored.lse, np.log(np.exp(d.astype(np.float64)).sum(-1)), rtol=1e-12)


def test_unreadable_goldens_are_refused_by_name(golden_file, tmp_path, art, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_text("not a zip")
    with pytest.raises(KvtraceError, match=f"--golden {bad}: not a readable kvtrace golden file"):
        G.load(bad)
    with pytest.raises(KvtraceError, match="file not found"):
        G.load(tmp_path / "absent.npz")
    arrays = dict(np.load(golden_file, allow_pickle=False))
    del arrays["tail"]
    np.savez(bad, **arrays)
    with pytest.raises(KvtraceError, match="array\\(s\\) tail missing"):
        G.load(bad)
    arrays = dict(np.load(golden_file, allow_pickle=False))
    header = json.loads(bytes(arrays["header"]).decode())
    arrays["header"] = np.frombuffer(json.dumps({**header, "format_version": 99}).encode(), np.uint8)
    np.savez(bad, **arrays)
    with pytest.raises(KvtraceError, match="format_version 99 is newer"):
        G.load(bad)
    arrays["header"] = np.frombuffer(json.dumps({**header, "steps": 99}).encode(), np.uint8)
    np.savez(bad, **arrays)
    with pytest.raises(KvtraceError, match="tokens has shape"):
        G.load(bad)
    # one flipped byte in the stored data: the zip member's CRC no longer matches
    np.savez(bad, **dict(np.load(golden_file, allow_pickle=False)))  # uncompressed: values are raw bytes
    blob = bytearray(bad.read_bytes())
    at = blob.find(b"values.npy") + 200
    blob[at] ^= 0xFF
    bad.write_bytes(bytes(blob))
    with pytest.raises(KvtraceError, match="not a readable kvtrace golden file"):
        G.load(bad)
    # through the CLI: one line, exit 2
    rc = cli.main(["parity", str(art), "--golden", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and str(bad) in err


# --------------------------------------------------------------------------- acceptance
def test_replay_without_torch_passes_and_a_damaged_artifact_fails(art, golden_file, tmp_path):
    from tests.test_parity import perturb_one_row

    junit = tmp_path / "ok.xml"
    rc, out, err, forbidden = cli_blocked(tmp_path, "parity", str(art), "--golden", str(golden_file),
                                          "--junit-xml", str(junit), "--json", str(tmp_path / "ok.json"))
    assert rc == 0, out + err
    assert forbidden == []  # no torch, nothing from kvtrace.models, no torch reference
    assert "PASS" in out and "another artifact" not in out
    cases = ET.parse(junit).getroot().findall(".//testcase")
    assert len(cases) == int(BATCH) and not ET.parse(junit).getroot().findall(".//failure")
    r = json.loads((tmp_path / "ok.json").read_text())
    assert r["against"] == "golden" and r["passed"] and r["summary"]["max_abs"] < 1e-5
    assert len(r["per_step"]) == 1 + int(STEPS) and r["reference"]["recorded"]["kind"] == "builtin"

    bad = tmp_path / "bad"
    name = perturb_one_row(art, bad, factor=1.05)
    junit = tmp_path / "bad.xml"
    rc, out, err, forbidden = cli_blocked(tmp_path, "parity", str(bad), "--golden", str(golden_file),
                                          "--junit-xml", str(junit), "--summary", str(tmp_path / "bad.md"))
    assert rc == 1, f"one row of {name} scaled by 1.05 was not caught:\n{out}"
    assert forbidden == [] and "FAIL" in out and "parity failed" in err
    root = ET.parse(junit).getroot()
    failures = root.findall(".//failure")
    assert root.find("testsuite").get("failures") == str(len(failures)) and failures
    for f in failures:  # each names its first failing step, the position and the figures
        assert f.get("message").startswith("first failing: prefill, position ") or \
            f.get("message").startswith("first failing: decode step ")
        assert "max |Δlogit|" in f.get("message") and "> bound" in f.get("message")
        assert "failing steps:" in f.text
    md = (tmp_path / "bad.md").read_text()
    assert md.startswith("### kvtrace parity: FAIL") and "**FAIL**" in md


def test_fp16_export_of_the_same_model_replays_the_fp32_golden(golden_file, tmp_path, capsys):
    fp16 = tmp_path / "neox-fp16"
    export(["--arch", "gpt_neox", "--fp16", "--cache", "dynamic", "--max-seq", "64", "--max-batch", "4", "--out",
            str(fp16), "--no-validate"])
    report = tmp_path / "r.json"
    rc = cli.main(["parity", str(fp16), "--golden", str(golden_file), "--json", str(report)])
    out = capsys.readouterr().out
    assert rc == 0, out
    r = json.loads(report.read_text())
    assert r["dtype"] == "float16" and r["layout"] == "dynamic" and r["summary"]["max_abs"] > 0
    assert any("another artifact of the same model" in n for n in r["notes"])
    from kvtrace.configs import TOLERANCES

    assert r["tolerance"] == TOLERANCES["float16"]  # judged by the replayed artifact's dtype


def test_goldens_for_another_model_are_refused(golden_file, tmp_path, capsys):
    from kvtrace.configs import BUILTIN, BUILTIN_SEED
    from kvtrace.models.transformer import random_model

    cases = {
        "llama": (random_model(BUILTIN["llama"], BUILTIN_SEED), builtin_source(BUILTIN_SEED),
                  ["architecture gpt_neox (artifact: llama)"]),
        "seed": (random_model(BUILTIN["gpt_neox"], 99), builtin_source(99),
                 ["source weights built-in, seed 1234 (artifact: built-in, seed 99)"]),
        "config": (random_model(BUILTIN["gpt_neox"].replace(vocab_size=300, norm_eps=1e-6), BUILTIN_SEED),
                   builtin_source(BUILTIN_SEED),
                   ["vocabulary of 320 tokens (artifact: 300)", "model config norm_eps=1e-05 (artifact: 1e-06)"]),
    }
    for name, (model, source, expected) in cases.items():
        other = export_model(model, tmp_path / name, source)
        rc = cli.main(["parity", str(other), "--golden", str(golden_file)])
        err = capsys.readouterr().err
        assert rc == 2, (name, err)
        assert "was recorded for a different model" in err and err.count("\n") == 1
        for e in expected:
            assert e in err, (name, err)


def test_prompt_options_and_artifact_limits_are_checked(art, golden_file, tmp_path, capsys):
    rc = cli.main(["parity", str(art), "--golden", str(golden_file), "--steps", "3"])
    err = capsys.readouterr().err
    assert rc == 2 and f"--steps 3: golden {golden_file} holds {STEPS}" in err
    rc = cli.main(["parity", str(art), "--golden", str(golden_file), "--against", "torch"])
    assert rc == 2 and "--against: not with --golden" in capsys.readouterr().err
    small = tmp_path / "small"
    shutil.copytree(art, small)
    m = json.loads((small / "kvtrace.json").read_text())
    m["io"]["max_batch"] = 2
    (small / "kvtrace.json").write_text(json.dumps(m))
    rc = cli.main(["parity", str(small), "--golden", str(golden_file)])
    assert rc == 2 and "at most 2 (max_batch)" in capsys.readouterr().err


def test_golden_for_a_50k_vocabulary_stays_under_1mb(tmp_path):
    from kvtrace.configs import BUILTIN
    from kvtrace.exporter.references import TorchReference
    from kvtrace.manifest import load_manifest
    from kvtrace.models.transformer import random_model

    cfg = BUILTIN["gpt_neox"].replace(vocab_size=50_000, hidden_size=32, n_heads=2, n_kv_heads=2, head_dim=16,
                                      intermediate_size=64)
    model = random_model(cfg, 7)
    art = export_model(model, tmp_path / "v50k", builtin_source(7))
    prompts = P.make_prompts(4, 16, cfg.vocab_size, 0, avoid=(0, 1))
    trace = P.record(TorchReference(model, {"kind": "test"}), prompts, 32)
    path = G.save(G.from_trace(trace, manifest=load_manifest(art).data, artifact=art, reference={"kind": "test"},
                               prompt_spec={"seed": 0}), tmp_path / "v50k.npz")
    size = path.stat().st_size
    assert size < 1_000_000, f"{size} bytes for 4 prompts x 32 steps of a 50k vocabulary"
    # and it replays (sparse, 128 of 50,000 entries per position): the untouched artifact passes
    report = G.check(path, art, backend="onnxruntime")
    assert report["reference"]["logits"]["stored"] == 128 and report["summary"]["positions"] == 52 + 4 * 32
    assert 0 < report["summary"]["tail_mass"] <= 1


# --------------------------------------------------------------------------- outputs
def test_summary_plot_and_output_checks(art, golden_file, tmp_path, capsys):
    md, png = tmp_path / "s.md", tmp_path / "p.png"
    rc = cli.main(["parity", str(art), "--golden", str(golden_file), "--summary", str(md), "--plot", str(png)])
    out = capsys.readouterr().out
    assert rc == 0
    text = md.read_text()
    assert text.startswith("### kvtrace parity: PASS") and text.count("| pass |") == int(BATCH)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "--plot" in out and "skipped: matplotlib is not installed" in out and not png.exists()
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a missing directory is refused before anything runs: no golden is written either
    g2 = tmp_path / "new.npz"
    rc = cli.main(["parity", str(art), "--save-golden", str(g2), "--junit-xml", str(tmp_path / "no" / "j.xml")])
    assert rc == 2 and "--junit-xml" in capsys.readouterr().err and not g2.exists()
    rc = cli.main(["parity", str(art), "--golden", str(golden_file), "--json", str(md), "--summary", str(md)])
    assert rc == 2 and "the same file as --json" in capsys.readouterr().err
    rc = cli.main(["parity", str(art), "--golden", str(golden_file), "--summary", str(art / "s.md")])
    assert rc == 2 and "inside the artifact directory" in capsys.readouterr().err
    assert not (art / "s.md").exists()


def test_plot_is_skipped_with_the_reason_without_matplotlib(art, golden_file, tmp_path):
    png = tmp_path / "p.png"
    p = run_blocked(tmp_path, ("torch", "matplotlib"), CLI_CODE, "parity", str(art), "--golden", str(golden_file),
                    "--plot", str(png))
    assert json.loads(p.stdout.strip().splitlines()[-1])["rc"] == 0, p.stderr
    assert f"note: --plot {png} skipped: matplotlib is not installed" in p.stdout and not png.exists()


# --------------------------------------------------------------------------- users' suites
def test_python_api_check(art, golden_file, tmp_path):
    from tests.test_parity import perturb_one_row

    assert G.check(golden_file, art)["passed"]
    bad = tmp_path / "bad"
    perturb_one_row(art, bad, factor=1.05)
    with pytest.raises(ParityFailure, match="row 0: (prefill|decode step)"):
        G.check(golden_file, bad)


def test_pytest_plugin_one_test_per_row_without_torch(art, golden_file, tmp_path):
    from tests.test_parity import perturb_one_row

    bad = tmp_path / "bad"
    perturb_one_row(art, bad, factor=1.05)
    code = "import sys, pytest; sys.exit(pytest.main(sys.argv[1:]))"
    common = ["-p", "kvtrace.runtime.pytest_plugin", "-p", "no:cacheprovider", "-q", "--rootdir", str(tmp_path),
              "--kvtrace-golden", str(golden_file)]
    env = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # load the plugin by -p alone, installed or not
    p = run_blocked(tmp_path, ("torch",), code, *common, "--kvtrace-artifact", str(art), env=env)
    assert p.returncode == 0 and f"{BATCH} passed" in p.stdout, p.stdout + p.stderr
    p = run_blocked(tmp_path, ("torch",), code, *common, "--kvtrace-artifact", str(bad), env=env)
    assert p.returncode == 1 and f"{BATCH} failed" in p.stdout, p.stdout + p.stderr
    assert "neox.npz::row0" in p.stdout and "first failing: " in p.stdout and "Traceback" not in p.stdout
    p = run_blocked(tmp_path, ("torch",), code, *common, env=env)
    assert p.returncode != 0 and "--kvtrace-golden needs --kvtrace-artifact" in p.stderr
