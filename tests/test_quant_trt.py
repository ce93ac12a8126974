"""`kvtrace build` on quantised artifacts (TensorRT-RTX, sm89, no GPU): the parsed network holds one
DEQUANTIZE per MATRIX_MULTIPLY, and the builder's own layer list shows how each quantised matrix is
computed: INT4 as weight-only GEMMs (the DequantizeLinear fused into the GEMM, INT4 constants), INT8
blocked as a dequantisation to a float temporary followed by a GEMM (TensorRT fuses only per-channel
INT8). Artifacts from the tiny transformers variant of every architecture; fused attention, rotary
and in-place cache layers as for unquantised artifacts."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

if importlib.util.find_spec("tensorrt_rtx") is None:
    print("test_quant_trt: skipped, tensorrt_rtx is not importable (pip install tensorrt-rtx-cu13)")
    pytest.skip("tensorrt_rtx is not importable (pip install tensorrt-rtx-cu13)", allow_module_level=True)

from kvtrace import cli  # noqa: E402
from tests.conftest import checkpoint_dir  # noqa: E402

VARIANTS = ["neox_parallel_r025", "llama_gqa_linear_tied", "starcoder2_gqa_window_bias", "xglm_scaled"]


def _export(variant, out: Path, tmp_path_factory, scheme, dtype="float32", group=16) -> Path:
    from kvtrace.exporter.export import export_model
    from kvtrace.models.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint_dir(variant, tmp_path_factory)).model
    return export_model(model, out, dtype=dtype, max_seq=64, max_batch=4, validate=False, quant=scheme,
                        group_size=group, log=lambda m: None)


def _build(capsys, art: Path) -> dict:
    rc = cli.main(["build", str(art), "--compute-capability", "sm89", "--optimization-level", "0", "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("scheme", ["int4", "int8"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_quantized_engine(tmp_path, tmp_path_factory, capsys, variant, scheme):
    from kvtrace.manifest import load_manifest

    dtype = "float16" if variant.startswith("llama") else "float32"  # fp16 scales for one of them
    art = _export(variant, tmp_path / "art", tmp_path_factory, scheme, dtype)
    cfg = load_manifest(art).config()
    L = cfg.n_layers
    n_mat = L * (5 if cfg.mlp == "gated" else 4) + 1  # qkv, o, (gate), up, down per layer + lm_head
    res = _build(capsys, art)
    layers, q = res["layers"], res["quantized_gemms"]
    assert layers.get("DEQUANTIZE") == n_mat and layers.get("MATRIX_MULTIPLY") == n_mat, layers
    assert layers.get("ATTENTION") == L and layers.get("KV_CACHE_UPDATE") == 2 * L, layers
    if scheme == "int4":
        assert q == {"fused": n_mat, "dequantized": 0}, q
    else:
        assert q == {"fused": 0, "dequantized": n_mat}, q
    sec = load_manifest(art).data["tensorrt"]
    assert sec["quantized_gemms"] == q


def test_ragged_groups_refused_in_one_line(tmp_path, capsys):
    """The built-in llama's intermediate size 172 is not a multiple of 16: exit 2, the tensor, K and
    the group named, no engine written."""
    out = tmp_path / "art"
    assert cli.main(["export", "--arch", "llama", "--max-seq", "32", "--out", str(out), "--quant", "int4",
                     "--group-size", "16", "--no-validate"]) == 0
    capsys.readouterr()
    rc = cli.main(["build", str(out), "--compute-capability", "sm89"])
    err = capsys.readouterr().err
    assert rc == 2 and "K=172" in err and "--group-size 16" in err and len(err.strip().splitlines()) == 1, err
    assert not (out / "model.engine").exists() and "tensorrt" not in json.loads((out / "kvtrace.json").read_text())
