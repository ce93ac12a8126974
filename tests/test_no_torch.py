"""The runtime imports and runs (load an artifact, generate, the CLI) where `import torch` fails."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = textwrap.dedent('''
    # put first on PYTHONPATH: every import of torch (or a torch submodule) raises ImportError
    import sys

    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"torch is blocked in this test (import {name!r})")
            return None

    sys.meta_path.insert(0, _NoTorch())
''')


@pytest.fixture(scope="module")
def builtin_artifact(tmp_path_factory):
    """The built-in gpt_neox config (random weights) with the built-in byte tokenizer."""
    from kvtrace.configs import BUILTIN, BUILTIN_SEED
    from kvtrace.exporter.export import export_model
    from kvtrace.models.transformer import random_model

    out = tmp_path_factory.mktemp("notorch") / "gpt_neox"
    export_model(random_model(BUILTIN["gpt_neox"], BUILTIN_SEED), out, max_seq=128, max_batch=2,
                 tokenizer="builtin-bytes", validate=False, log=lambda m: None, source={"kind": "builtin"})
    return out


def _run_blocked(tmp_path, code: str, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    return subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)


def test_blocker_blocks(tmp_path):
    p = _run_blocked(tmp_path, "import torch")
    assert p.returncode != 0 and "torch is blocked" in p.stderr


def test_runtime_without_torch(tmp_path, builtin_artifact):
    from kvtrace.runtime.model import Model

    prompts = ["Hello", "a longer prompt"]
    m = Model.load(builtin_artifact)
    want = [r.token_ids for r in m.generate(prompts, max_new_tokens=8, greedy=True, stop_token_ids=[])]
    want_cli = m.generate(["Hello"], max_new_tokens=8, greedy=True)[0].token_ids  # stops at EOS, like the CLI
    assert all(len(w) == 8 for w in want) and want_cli
    code = textwrap.dedent('''
        import json, sys
        from kvtrace.runtime.model import Model
        m = Model.load(sys.argv[1])
        res = m.generate(["Hello", "a longer prompt"], max_new_tokens=8, greedy=True, stop_token_ids=[])
        from kvtrace.cli import main
        rc = main(["generate", sys.argv[1], "--prompt", "Hello", "--max-new-tokens", "8", "--json"])
        assert rc == 0, rc
        bad = sorted(n for n in sys.modules if n == "torch" or n.startswith("torch."))
        print(json.dumps({"ids": [r.token_ids for r in res], "torch_modules": bad}))
    ''')
    p = _run_blocked(tmp_path, code, str(builtin_artifact))
    assert p.returncode == 0, p.stderr
    cli_line, result_line = p.stdout.strip().splitlines()[-2:]
    result = json.loads(result_line)
    assert result["torch_modules"] == []
    assert result["ids"] == want
    assert json.loads(cli_line)["token_ids"] == want_cli


def test_gpu_check_without_torch(tmp_path, builtin_artifact):
    """`kvtrace gpu-check` and the GPU modules import and answer without torch (here: no GPU)."""
    code = textwrap.dedent('''
        import json, sys
        from kvtrace.runtime import cuda_driver, gpu_check, trt_backend  # noqa: F401
        cuda_driver.LIBCUDA_NAMES = ("/nonexistent/libcuda.so",)
        from kvtrace.cli import main
        rc = main(["gpu-check", sys.argv[1]])
        bad = sorted(n for n in sys.modules if n == "torch" or n.startswith("torch."))
        print(json.dumps({"rc": rc, "torch_modules": bad}))
    ''')
    p = _run_blocked(tmp_path, code, str(builtin_artifact))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {"rc": 2, "torch_modules": []}
    assert "no usable GPU here" in p.stderr
