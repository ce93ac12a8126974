"""`kvtrace parity`: the metrics, the verdict (exit 0 / 1) and the JSON report.

Artifacts come from the real exporter (`kvtrace export`); the references are our PyTorch
model and, for `--against hf`, transformers on a tiny random checkpoint (tests/tiny_hf.py).
"""
from __future__ import annotations

import json
import math
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from kvtrace import cli
from kvtrace.runtime import parity as P

STEPS, BATCH = "6", "3"


def export(args: list[str]) -> None:
    rc = cli.main(["export", *args])
    assert rc == 0, f"kvtrace export {' '.join(args)} failed with {rc}"


@pytest.fixture(scope="module")
def builtin_art(tmp_path_factory):
    out = tmp_path_factory.mktemp("parity") / "neox-fp32"
    # no export-time validation: checking the artifact is this file's job
    export(["--arch", "gpt_neox", "--max-seq", "64", "--max-batch", "4", "--out", str(out), "--no-validate"])
    return out


def perturb_one_row(src, dst, factor: float = 1.1) -> str:
    """Copy an artifact and scale one row of one weight matrix by `factor` (a 10% error in
    one output/input channel of the last layer's MLP down projection: the kind of damage a
    wrong scale or a botched conversion of one tensor does). Returns the tensor's name."""
    import onnx
    from onnx import numpy_helper

    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "model.onnx"))
    mats = [t for t in model.graph.initializer if len(t.dims) == 2 and "layers." in t.name]
    assert mats, "no per-layer weight matrix among the initializers of model.onnx"
    downs = [t for t in mats if t.name.endswith("mlp.down.weight")]
    target = (downs or mats)[-1]
    w = numpy_helper.to_array(target).copy()
    w[w.shape[0] // 2] *= factor
    target.CopyFrom(numpy_helper.from_array(w, target.name))
    tmp = dst / "model.onnx.tmp"
    onnx.save(model, str(tmp))
    os.replace(tmp, dst / "model.onnx")
    # a wrong *export* (the manifest's digests describe the wrong file), not a file damaged
    # afterwards (which the digest check refuses before any comparison: test_hostile.py)
    from kvtrace.manifest import file_digests, load_manifest, write_manifest

    data = dict(load_manifest(dst).data)
    if data.get("files"):
        data["files"] = file_digests(dst, list(data["files"]))
        write_manifest(dst, data)
    return target.name


# --------------------------------------------------------------------------- metrics
def test_compare_metrics_by_hand():
    ref = np.log(np.array([[0.5, 0.5], [0.9, 0.1]], dtype=np.float32))
    got = np.log(np.array([[0.75, 0.25], [0.9, 0.1]], dtype=np.float32))
    m = P.compare(ref, got)
    # KL(ref || artifact) row 0: 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25); row 1: 0 (the reverse KL is 0.1308)
    kl0 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert m["kl_max"] == pytest.approx(kl0, rel=1e-5)
    assert m["kl_mean"] == pytest.approx(kl0 / 2, rel=1e-5)
    assert m["max_abs"] == pytest.approx(abs(math.log(0.25) - math.log(0.5)), rel=1e-5)
    assert m["positions"] == 2 and m["decisive"] == 1  # row 0 is an exact tie in ref: not judged
    assert m["top1"] == 1.0 and m["top1_strict"] == 1.0


def test_top1_ignores_near_ties_and_is_none_without_decisive_positions():
    ref = np.array([[1.0, 1.005, 0.0], [3.0, 0.0, 0.0]], np.float32)  # row 0: margin 0.005 < TIE_MARGIN
    got = np.array([[1.005, 1.0, 0.0], [0.0, 3.0, 0.0]], np.float32)  # both argmaxes flip
    m = P.compare(ref, got)
    assert m["decisive"] == 1 and m["top1"] == 0.0 and m["top1_strict"] == 0.0
    m = P.compare(ref[:1], got[:1])  # only the near tie
    assert m["decisive"] == 0 and m["top1"] is None
    tol = {"max_abs": 1e-2, "max_rel": 0.0, "top1": 0.99}
    fails, notes = P.verdict(P.summarize([m]), [m], tol)
    assert not fails and "judged on the logit tolerances alone" in notes[0]
    got2 = got[:1].copy()
    got2[0, 2] = 0.5  # beyond the absolute tolerance: still judged, and fails
    m2 = P.compare(ref[:1], got2)
    assert P.verdict(P.summarize([m2]), [m2], tol)[0]


def test_relative_tolerance_scales_with_the_logits():
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 20, size=(3, 100)).astype(np.float32)  # logits spanning ~100 units
    got = ref + rng.normal(0, 0.3, size=ref.shape).astype(np.float32)  # ~1.5% of the spread
    m = P.compare(ref, got)
    tol = {"max_abs": 0.5, "max_rel": 0.1, "top1": 0.0}
    assert m["max_abs"] > 0.5 and not P.verdict(P.summarize([m]), [m], tol)[0]  # passes on the relative bound
    assert P.verdict(P.summarize([m]), [m], {**tol, "max_rel": 0.0})[0]  # fails on the absolute one alone


def test_nan_logits_fail_the_verdict():
    ref = np.zeros((2, 5), np.float32)
    got = ref.copy()
    got[1, 2] = np.nan
    m = P.compare(ref, got)
    assert not m["finite"]
    fails, _ = P.verdict(P.summarize([m]), [m], {"max_abs": 1e-3, "max_rel": 1e-3, "top1": 0.99})
    assert fails and "non-finite" in fails[0]


def test_prompts_deterministic_ragged_and_free_of_special_tokens():
    a = P.make_prompts(4, 20, 50, seed=3, avoid=(0, 1))
    assert a == P.make_prompts(4, 20, 50, seed=3, avoid=(0, 1))
    assert len({len(p) for p in a}) == 4 and max(map(len, a)) == 20
    assert all(0 < t < 50 and t != 1 for p in a for t in p)


# --------------------------------------------------------------------------- the CLI
def test_good_artifact_passes_with_report(builtin_art, tmp_path, capsys):
    report = tmp_path / "r.json"
    rc = cli.main(["parity", str(builtin_art), "--steps", STEPS, "--batch", BATCH, "--json", str(report)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PASS" in out and "prefill" in out
    r = json.loads(report.read_text())
    for key in ("artifact", "dtype", "backend", "against", "reference", "tolerance", "prompt_lengths",
                "per_step", "summary", "greedy", "passed", "failures"):
        assert key in r, key
    assert r["passed"] is True and r["dtype"] == "float32" and r["against"] == "torch"
    assert len(set(r["prompt_lengths"])) == int(BATCH)  # ragged batch
    assert len(r["per_step"]) == 1 + int(STEPS)
    for st in r["per_step"]:
        for key in ("step", "max_abs", "mean_abs", "top1", "kl_mean", "kl_max", "positions"):
            assert key in st
    assert r["per_step"][0]["positions"] == sum(r["prompt_lengths"])
    # fp32 against fp32: far inside the tolerance, greedy identical
    assert r["summary"]["max_abs"] < 1e-4
    assert r["summary"]["greedy_match"] and all(len(g["reference"]) == 1 + int(STEPS) for g in r["greedy"])


def test_one_perturbed_weight_fails(builtin_art, tmp_path, capsys):
    bad = tmp_path / "bad"
    name = perturb_one_row(builtin_art, bad)
    report = tmp_path / "r.json"
    rc = cli.main(["parity", str(bad), "--steps", STEPS, "--batch", BATCH, "--json", str(report)])
    captured = capsys.readouterr()
    assert rc == 1, f"a 10% error in one row of {name} was not caught:\n{captured.out}"
    assert "FAIL" in captured.out and "parity failed" in captured.err
    r = json.loads(report.read_text())
    assert r["passed"] is False and any("max |Δlogit|" in f for f in r["failures"])
    # the error shows from the prefill on, not only in one step
    assert all(st["max_abs"] > r["tolerance"]["max_abs"] for st in r["per_step"])


def test_tolerance_override(builtin_art, tmp_path, capsys):
    # a tolerance tighter than the real fp32 rounding fails the good artifact ...
    rc = cli.main(["parity", str(builtin_art), "--steps", "2", "--batch", BATCH, "--max-abs", "1e-12",
                   "--max-rel", "0"])
    out = capsys.readouterr().out
    assert rc == 1 and "|Δlogit| <= max(1e-12, 0 x std" in out
    # ... and a looser one lets the 10%-perturbed artifact through on max |Δ| (top-1 still judged)
    bad = tmp_path / "bad"
    perturb_one_row(builtin_art, bad)
    report = tmp_path / "r.json"
    cli.main(["parity", str(bad), "--steps", "2", "--batch", BATCH, "--max-abs", "100", "--min-top1", "0",
              "--json", str(report)])
    r = json.loads(report.read_text())
    assert r["tolerance"]["max_abs"] == 100.0 and r["tolerance"]["top1"] == 0.0 and r["passed"] is True


def test_against_hf_refused_for_builtin(builtin_art, capsys):
    rc = cli.main(["parity", str(builtin_art), "--against", "hf", "--steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "built-in" in err and "--against torch" in err


def test_steps_beyond_the_cache_are_an_error(builtin_art, capsys):
    rc = cli.main(["parity", str(builtin_art), "--steps", "60", "--prompt-len", "16"])
    assert rc == 2 and "--steps" in capsys.readouterr().err


def test_fp16_artifact_judged_by_the_fp16_row(tmp_path, capsys):
    art = tmp_path / "neox-fp16"
    export(["--arch", "gpt_neox", "--fp16", "--max-seq", "32", "--max-batch", "2", "--out", str(art), "--no-validate"])
    report = tmp_path / "r.json"
    assert cli.main(["parity", str(art), "--steps", "4", "--json", str(report)]) == 0, capsys.readouterr().out
    r = json.loads(report.read_text())
    from kvtrace.configs import TOLERANCES

    assert r["dtype"] == "float16" and r["tolerance"] == TOLERANCES["float16"]
    assert 0 < r["summary"]["max_abs"] <= TOLERANCES["float16"]["max_abs"]  # fp16 differs, but within its row


@pytest.mark.parametrize("variant, layout", [("neox_parallel_r025", "static"), ("llama_gqa_linear_tied", "static"),
                                             ("xglm_scaled", "dynamic")])
def test_against_hf_and_torch_on_a_transformers_checkpoint(variant, layout, exported, tmp_path, capsys):
    pytest.importorskip("transformers")
    from tests import tiny_hf

    # tests/conftest.py: the tiny checkpoint through the real loader and exporter
    art = exported(variant, layout=layout)
    for against in ("hf", "torch"):
        report = tmp_path / f"{against}.json"
        rc = cli.main(["parity", str(art), "--against", against, "--steps", STEPS, "--batch", "2",
                       "--json", str(report)])
        out = capsys.readouterr().out
        assert rc == 0, out
        r = json.loads(report.read_text())
        assert r["against"] == against and r["summary"]["max_abs"] < 1e-4 and r["summary"]["greedy_match"]
        if against == "hf":
            assert r["reference"]["kind"] == "transformers"
            assert os.path.samefile(r["reference"]["path"], tiny_hf.checkpoint(variant))
