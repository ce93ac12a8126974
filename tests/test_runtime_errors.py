"""Bad input to the runtime and `kvtrace generate`: a clear KvtraceError, exit status 2."""
from __future__ import annotations

import shutil

import pytest

from kvtrace.cli import main
from kvtrace import io_spec
from kvtrace.errors import KvtraceError
from kvtrace.runtime.model import Model
from tests.runtime_toy import build_toy


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return build_toy(tmp_path_factory.mktemp("err") / "static", layout="static", max_seq=32, max_batch=2)


def cli(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, err


def test_prompt_longer_than_cache(toy, capsys):
    rc, err = cli(["generate", str(toy), "--input-ids", ",".join(["5"] * 40)], capsys)
    assert rc == 2 and "kvtrace: error:" in err and "longer than the cache (32 positions)" in err
    # prompt + new tokens beyond the cache is refused before anything runs
    rc, err = cli(["generate", str(toy), "--input-ids", ",".join(["5"] * 20), "--max-new-tokens", "13"], capsys)
    assert rc == 2 and "20 tokens + 13 new tokens is longer than the cache (32 positions)" in err
    rc, err = cli(["generate", str(toy), "--input-ids", ",".join(["5"] * 20), "--max-new-tokens", "12"], capsys)
    assert rc == 0, err


def test_token_id_out_of_vocabulary(toy, capsys):
    rc, err = cli(["generate", str(toy), "--input-ids", "5,320,7"], capsys)
    assert rc == 2 and "token id 320" in err and "vocabulary of size 320" in err
    rc, err = cli(["generate", str(toy), "--input-ids", "5,-1"], capsys)
    assert rc == 2 and "token id -1" in err
    rc, err = cli(["generate", str(toy), "--input-ids", "5,x"], capsys)
    assert rc == 2 and "--input-ids" in err


def test_unknown_backend(toy, capsys):
    rc, err = cli(["generate", str(toy), "--input-ids", "5", "--backend", "vulkan"], capsys)
    assert rc == 2 and "unknown backend 'vulkan'" in err and "onnxruntime" in err


def test_cuda_backend_without_onnxruntime_gpu(toy):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(KvtraceError, match="onnxruntime-gpu"):
        Model.load(toy, backend="onnxruntime-cuda")


def test_newer_format_version(tmp_path, capsys):
    d = build_toy(tmp_path / "future", format_version=io_spec.FORMAT_VERSION + 1)
    rc, err = cli(["generate", str(d), "--input-ids", "5"], capsys)
    assert rc == 2 and "format_version 2" in err and "newer" in err and io_spec.MANIFEST_NAME in err


def test_missing_model_file(tmp_path, toy, capsys):
    d = tmp_path / "nomodel"
    shutil.copytree(toy, d)
    (d / io_spec.ONNX_NAME).unlink()
    rc, err = cli(["generate", str(d), "--input-ids", "5"], capsys)
    assert rc == 2 and str(d / io_spec.ONNX_NAME) in err and "missing" in err
    rc, err = cli(["generate", str(tmp_path / "nowhere"), "--input-ids", "5"], capsys)
    assert rc == 2 and "nowhere" in err


def test_batch_over_max_batch_and_text_without_tokenizer(tmp_path, toy, capsys):
    rc, err = cli(["generate", str(toy), "--input-ids", "5", "6", "7"], capsys)
    assert rc == 2 and "max_batch 2" in err
    d = build_toy(tmp_path / "notok", tokenizer=None)
    rc, err = cli(["generate", str(d), "--prompt", "hi"], capsys)
    assert rc == 2 and "no tokenizer" in err and "--input-ids" in err
    rc, err = cli(["generate", str(d), "--input-ids", "5", "--stop", "x"], capsys)
    assert rc == 2 and "stop strings need a tokenizer" in err


def test_bad_sampling_options(toy, capsys):
    rc, err = cli(["generate", str(toy), "--input-ids", "5", "--temperature", "-1"], capsys)
    assert rc == 2 and "temperature" in err
    rc, err = cli(["generate", str(toy), "--input-ids", "5", "--greedy", "--top-k", "3"], capsys)
    assert rc == 2 and "--top-k" in err
