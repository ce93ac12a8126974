"""`kvtrace bench`: the JSON it promises, bad options, no torch unless --compare hf, and the
transformers comparison on a tiny checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from kvtrace import cli

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--prompt-len", "8", "--new-tokens", "4", "--repeats", "2"]


@pytest.fixture(scope="module")
def builtin_art(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "neox-fp32"
    assert cli.main(["export", "--arch", "gpt_neox", "--max-seq", "32", "--max-batch", "4", "--out", str(out),
                     "--no-validate"]) == 0
    return out


def run_cli(*args, block_torch: bool = False):
    """`python -m kvtrace.cli ARGS` in a subprocess; block_torch makes `import torch` fail."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    code = "import sys\n"
    if block_torch:
        code += ("class _NoTorch:\n"
                 "    def find_spec(self, name, path=None, target=None):\n"
                 "        if name == 'torch' or name.startswith('torch.'):\n"
                 "            raise ImportError('torch is blocked in this test')\n"
                 "sys.meta_path.insert(0, _NoTorch())\n")
    code += "from kvtrace.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def test_json_per_batch_size_without_torch(builtin_art):
    p = run_cli("bench", str(builtin_art), "--batch", "1", "3", *FAST, "--json", block_torch=True)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    for key in ("prefill_ms", "decode_ms_per_token", "tokens_per_s"):
        assert set(r[key]) == {"1", "3"}, key
        assert all(v > 0 for v in r[key].values())
    b3 = r["batches"]["3"]
    assert b3["tokens_per_s"] == pytest.approx(3 * 1000 / b3["decode_ms_per_token"])
    assert b3["peak_rss_mb"] > 0 and len(b3["prefill_ms_runs"]) == 2
    assert r["cores"] >= 1 and r["threads"]["onnxruntime_intra_op"] == r["cores"]
    assert "hf" not in r


def test_table_output(builtin_art, capsys):
    assert cli.main(["bench", str(builtin_art), *FAST]) == 0
    out = capsys.readouterr().out
    assert "decode ms/tok" in out and "kvtrace" in out and "threads" in out


@pytest.mark.parametrize("args, needle", [
    (["--batch", "5"], "--batch"),  # beyond the artifact's max_batch 4
    (["--prompt-len", "30", "--new-tokens", "8"], "--max-seq"),  # 38 > 32 positions
    (["--compare", "hf", *FAST], "built-in"),  # a built-in has no transformers checkpoint
    (["--new-tokens", "1"], "--new-tokens"),
])
def test_bad_options(builtin_art, capsys, args, needle):
    assert cli.main(["bench", str(builtin_art), *args]) == 2
    assert needle in capsys.readouterr().err


def test_compare_hf_on_a_tiny_checkpoint(exported):
    pytest.importorskip("transformers")
    from tests import tiny_hf

    art = exported("neox_parallel_r025")  # tests/conftest.py: max_seq 64, max_batch 4
    # decode ms/token of transformers is a difference, t(N) - t(1): enough new tokens that it is
    # not lost in the noise of a shared machine
    p = run_cli("bench", str(art), "--batch", "1", "2", "--prompt-len", "8", "--new-tokens", "24",
                "--repeats", "3", "--compare", "hf", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    hf = r["hf"]
    assert os.path.samefile(hf["checkpoint"], tiny_hf.checkpoint("neox_parallel_r025"))
    assert hf["torch_threads"] == r["cores"]
    for b in ("1", "2"):
        assert hf["decode_ms_per_token"][b] > 0 and hf["prefill_ms"][b] > 0
        q = r["ratio_vs_hf"][b]
        assert q["decode_ms_per_token"] == pytest.approx(r["decode_ms_per_token"][b] / hf["decode_ms_per_token"][b])
