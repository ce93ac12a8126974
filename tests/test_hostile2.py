"""A second hostile pass (after tests/test_hostile.py): each test is a defect a new user hit,
reproduced through the whole command (kvtrace.cli.main) where it can be. Each case: the
documented answer, the user's files as they were, no "Traceback" (docs/errors.md)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kvtrace import cli  # noqa: E402
from tests.test_hostile import run, state  # noqa: E402


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """The built-in gpt_neox model, 32 positions, no validation (the tests judge themselves)."""
    out = tmp_path_factory.mktemp("hostile2") / "art"
    assert cli.main(["export", "--arch", "gpt_neox", "--max-seq", "32", "--no-validate", "--out", str(out)]) == 0
    return out


# ------------------------------------------------ reports never overwrite the artifact's files
def test_parity_report_through_a_symlinked_artifact_dir_is_refused(art, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(art, target_is_directory=True)
    before = state(art)
    for opt in ("--json", "--junit-xml", "--summary", "--save-golden"):
        rc, _, err = run(capsys, "parity", art, "--steps", "1", opt, link / "kvtrace.json")
        assert rc == 2 and f"{opt} {link / 'kvtrace.json'}: inside the artifact directory" in err, err
    # a symlinked file naming the manifest
    (tmp_path / "r.json").symlink_to(art / "kvtrace.json")
    rc, _, err = run(capsys, "parity", art, "--steps", "1", "--json", tmp_path / "r.json")
    assert rc == 2 and "inside the artifact directory" in err
    assert state(art) == before


def test_gpu_check_json_never_overwrites_the_manifest(art, tmp_path, capsys):
    before = state(art)
    for target in (art / "kvtrace.json", art / "model.onnx"):
        rc, _, err = run(capsys, "gpu-check", art, "--json", target)
        assert rc == 2 and f"--json {target}: inside the artifact directory" in err, err
    assert state(art) == before
    out = tmp_path / "gc.json"  # elsewhere: written (no GPU here: the report says why), an ordinary file
    rc, _, err = run(capsys, "gpu-check", art, "--json", out)
    assert rc == 2 and json.loads(out.read_text())["gpu_available"] in (False, True)
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_gpu_check_counts_are_range_checked(art, capsys):
    for opt in ("--batch", "--prompt-len", "--steps", "--repeats"):
        rc, _, err = run(capsys, "gpu-check", art, opt, "-3")
        assert rc == 2 and f"argument {opt}: -3 is out of range" in err, err


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_build_timing_cache_never_overwrites_an_artifact_file(art, tmp_path, capsys):
    pytest.importorskip("onnx", reason="kvtrace build needs the export extra")
    before = state(art)
    link = tmp_path / "link"
    link.symlink_to(art, target_is_directory=True)
    for target in (art / "model.onnx", art / "kvtrace.json", link / "model.onnx.data"):
        rc, _, err = run(capsys, "build", art, "--compute-capability", "sm89", "--timing-cache", target)
        assert rc == 2 and f"--timing-cache {target}: inside the artifact directory" in err, err
    assert state(art) == before


def test_build_import_refuses_what_is_not_an_engine_without_reading_it(art, tmp_path, capsys):
    """`--import /dev/zero` read the whole "file" into memory (the machine's OOM killer ended it);
    a 13 GB weight file named by mistake was read whole before its first 4 bytes were judged."""
    pytest.importorskip("onnx", reason="kvtrace build needs the export extra")
    before = state(art)
    rc, _, err = run(capsys, "build", art, "--import", "/dev/zero")
    assert rc == 2 and "--import /dev/zero: not a regular file" in err, err
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it for reading would block forever
    rc, _, err = run(capsys, "build", art, "--import", fifo)
    assert rc == 2 and "not a regular file" in err, err
    big = tmp_path / "big.bin"  # sparse: 64 GiB of holes, a few bytes of disk
    with open(big, "wb") as f:
        f.write(b"\x08\x01")
        f.truncate(64 << 30)
    rc, _, err = run(capsys, "build", art, "--import", big)
    assert rc == 2 and "not a TensorRT engine (an ONNX model" in err, err
    assert state(art) == before


# ------------------------------------------------ export: what the checkpoint holds
@pytest.fixture(scope="module")
def ckpt():
    pytest.importorskip("transformers", reason="transformers builds the tiny checkpoints")
    from tests import tiny_hf

    return tiny_hf.checkpoint("llama_mha")


@pytest.mark.parametrize("via", ["build", "trace"])
def test_export_refuses_a_tokenizer_json_it_cannot_read(ckpt, tmp_path, capsys, via):
    """A dangling tokenizer.json symlink (a copied Hugging Face cache snapshot) was skipped in
    silence: the artifact came out without a tokenizer, exit 0."""
    if via == "trace":
        pytest.importorskip("onnxscript", reason="--via trace needs onnxscript")
    import shutil

    ck = Path(shutil.copytree(ckpt, tmp_path / "ck"))
    (ck / "tokenizer.json").symlink_to("../blobs/0123abcd")
    out = tmp_path / "art"
    rc, _, err = run(capsys, "export", "--checkpoint", ck, "--via", via, "--no-validate", "--out", out)
    assert rc == 2 and f"{ck / 'tokenizer.json'}: a symlink to ../blobs/0123abcd, which does not exist" in err, err
    assert not out.exists()
    (ck / "tokenizer.json").unlink()
    (ck / "tokenizer.json").mkdir()
    rc, _, err = run(capsys, "export", "--checkpoint", ck, "--via", via, "--no-validate", "--out", out)
    assert rc == 2 and "tokenizer.json: not a regular file" in err, err
    # --no-tokenizer: the user's way out
    rc, _, err = run(capsys, "export", "--checkpoint", ck, "--via", via, "--no-validate", "--no-tokenizer",
                     "--out", out)
    assert rc == 0 and json.loads((out / "kvtrace.json").read_text())["tokenizer"] is None


# ------------------------------------------------ kvtrace serve: requests that are not a server error
def test_serve_bodies_that_are_the_clients_fault(art):
    pytest.importorskip("uvicorn", reason="the 'serve' extra is not installed")
    import socket
    import time

    from tests import serve_util as su

    with su.Server(art, "--max-slots", "2", "--max-queue", "2") as s:
        # more prompts in one request than slots + queue: it can never be admitted, so "429, retry
        # later" would have the client retry forever
        st, h, b = s.request("POST", "/v1/completions", {"model": "art", "prompt": [[5]] * 5, "max_tokens": 1})
        err = json.loads(b)["error"]
        assert st == 400 and err["param"] == "prompt" and "at most 4" in err["message"], (st, b)
        st, _, b = s.request("POST", "/v1/completions", {"model": "art", "prompt": [[5]] * 4, "max_tokens": 1})
        assert st == 200 and len(json.loads(b)["choices"]) == 4, b
        # JSON nested past the parser's recursion: a bad body (it was a 500 with a traceback in the log)
        st, _, b = s.request("POST", "/v1/completions", b"[" * 100000 + b"]" * 100000,
                             {"Content-Type": "application/json"})
        assert st == 400 and json.loads(b)["error"]["code"] == "invalid_json", (st, b)
        # a client that leaves half-way through its body: counted as cancelled, not an internal error
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"model\": ")
        sock.shutdown(socket.SHUT_WR)
        sock.recv(100)
        sock.close()
        s.wait_metric('kvtrace_requests_total{status="cancelled"}', lambda v: v == 1)
        time.sleep(0.2)
        assert 'kvtrace_requests_total{status="500"}' not in s.metrics()
        rc, log = s.stop()
    assert rc == 0 and "Traceback" not in log and "internal error" not in log, log


# ------------------------------------------------ Python API: wrong types are named, never cast
def test_generate_api_stop_token_ids_and_greedy_are_checked(art):
    from kvtrace.errors import KvtraceError
    from kvtrace.runtime.model import Model

    m = Model.load(art, backend="onnxruntime")
    bad = {"[-1]": [-1], "['x']": ["x"], "[1.5]": [1.5], "[True]": [True], "'5'": "5", "5": 5, "[V]": [m.vocab_size]}
    for shown, stops in bad.items():  # "5" was read as the characters of a string; ['x'] a raw ValueError
        with pytest.raises(KvtraceError, match="stop_token_ids"):
            m.generate([[1, 2]], max_new_tokens=2, stop_token_ids=stops)
    with pytest.raises(KvtraceError, match="greedy 'no'"):  # a truthy string was greedy decoding
        m.generate([[1, 2]], max_new_tokens=2, greedy="no")
    first = m.generate([[1, 2]], max_new_tokens=3)[0].token_ids
    r = m.generate([[1, 2]], max_new_tokens=3, stop_token_ids=[first[1]])[0]
    assert r.token_ids == first[:2] and r.finish_reason == "stop_token"


def test_export_refuses_a_tokenizer_whose_post_processor_adds_an_id_beyond_the_vocabulary(ckpt, tmp_path, capsys):
    """The vocabulary fits, but the post-processor prepends a BOS id the model does not have:
    the artifact was written (exit 0) and then refused every text prompt."""
    import shutil

    from tests import serve_util as su

    ck = Path(shutil.copytree(ckpt, tmp_path / "ck"))
    su.write_tokenizer(ck)  # 128 tokens, as the model; the post-processor prepends <s> = 0
    j = json.loads((ck / "tokenizer.json").read_text())
    j["post_processor"]["special_tokens"]["<s>"]["ids"] = [5000]
    (ck / "tokenizer.json").write_text(json.dumps(j))
    out = tmp_path / "art"
    rc, _, err = run(capsys, "export", "--checkpoint", ck, "--no-validate", "--out", out)
    assert rc == 2 and "adds token id 5000" in err and "post_processor" in err, err
    assert not out.exists()


def test_threads_with_backend_auto_on_an_artifact_with_an_engine(art, tmp_path, capsys):
    """`kvtrace serve ART --threads 2` (and Model.load(ART, threads=2)) on an artifact holding a
    TensorRT engine stopped with "TypeError: TrtBackend.__init__() got an unexpected keyword
    argument 'threads'" instead of trying TensorRT and falling back to onnxruntime."""
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX builds the engine without a GPU")
    import shutil

    from kvtrace.runtime.model import Model

    a = Path(shutil.copytree(art, tmp_path / "art"))
    rc, _, err = run(capsys, "build", a, "--compute-capability", "sm89")
    assert rc == 0, err
    m = Model.load(a, threads=1)  # no GPU here: tensorrt is passed over with its reason
    assert m.backend_name == "onnxruntime"
    assert all("TypeError" not in s for s in m.skipped_backends), m.skipped_backends
    rc, _, err = run(capsys, "serve", a, "--threads", "0")
    assert rc == 2 and "argument --threads: 0 is out of range" in err, err


@pytest.mark.parametrize("via", ["build", "trace"])
def test_export_keeps_every_eos_id_of_the_checkpoint(ckpt, tmp_path, capsys, via):
    """Llama 3.x instruct checkpoints list several end ids (config.json / generation_config.json
    "eos_token_id": [128001, 128008, 128009]); export kept the first only, so `kvtrace generate`
    ran past the end-of-turn token 128009 to --max-new-tokens."""
    if via == "trace":
        pytest.importorskip("onnxscript", reason="--via trace needs onnxscript")
    import shutil

    from kvtrace.runtime.model import Model

    ck = Path(shutil.copytree(ckpt, tmp_path / "ck"))
    out = tmp_path / "plain"
    assert run(capsys, "export", "--checkpoint", ck, "--no-validate", "--via", via, "--out", out)[0] == 0
    free = Model.load(out, backend="onnxruntime").generate([[3, 4, 5]], max_new_tokens=8, stop_token_ids=[])[0]
    toks = free.token_ids
    later = toks[0]  # the first token the model produces
    if later in (2, 127):
        pytest.skip(f"the tiny model's first token {later} is already an end id")
    c = json.loads((ck / "config.json").read_text())
    c["eos_token_id"] = [c["eos_token_id"], 127]
    (ck / "config.json").write_text(json.dumps(c))
    g = json.loads((ck / "generation_config.json").read_text())
    g["eos_token_id"] = [c["eos_token_id"][0], later]
    (ck / "generation_config.json").write_text(json.dumps(g))
    out = tmp_path / "multi"
    assert run(capsys, "export", "--checkpoint", ck, "--no-validate", "--via", via, "--out", out)[0] == 0
    gen = json.loads((out / "kvtrace.json").read_text())["generation"]
    assert gen["eos_token_id"] == [c["eos_token_id"][0], 127, later]
    r = Model.load(out, backend="onnxruntime").generate([[3, 4, 5]], max_new_tokens=8)[0]
    assert r.finish_reason == "stop_token" and r.token_ids == [later], (r, free)


def test_a_bf16_artifact_on_the_cpu_says_why_it_cannot_run(tmp_path, capsys):
    """`kvtrace export --bf16` then `kvtrace generate`: the answer was onnxruntime's "NOT_IMPLEMENTED :
    Could not find an implementation for MatMul(13) node with name 'n_MatMul_37'"."""
    out = tmp_path / "bf16"
    assert run(capsys, "export", "--arch", "llama", "--bf16", "--max-seq", "16", "--no-validate", "--out", out)[0] == 0
    for cmd in (["generate", out, "--input-ids", "1,2", "--max-new-tokens", "1"], ["bench", out, "--batch", "1", "--prompt-len", "4", "--new-tokens", "2"]):
        rc, _, err = run(capsys, *cmd)
        assert rc == 2 and "is a bfloat16 artifact" in err and "--backend tensorrt" in err, err


def test_export_validation_mode_that_would_be_ignored_is_refused(ckpt, tmp_path, capsys):
    """`--validation bounded` on a built-in model or with --via trace, `--validation full
    --no-validate`: accepted and ignored (the manifest recorded no mode)."""
    for argv, why in ((["--arch", "llama", "--validation", "bounded"], "built-in model is validated in full"),
                      (["--checkpoint", ckpt, "--validation", "full", "--no-validate"], "nothing is validated"),
                      (["--checkpoint", ckpt, "--via", "trace", "--validation", "bounded"], "--via trace")):
        out = tmp_path / "art"
        rc, _, err = run(capsys, "export", *argv, "--out", out)
        assert rc == 2 and f"--validation {argv[argv.index('--validation') + 1]}: " in err and why in err, err
        assert not out.exists()
    out = tmp_path / "ok"
    rc, _, err = run(capsys, "export", "--checkpoint", ckpt, "--validation", "bounded", "--out", out)
    assert rc == 0 and json.loads((out / "kvtrace.json").read_text())["validation"]["mode"] == "bounded", err


# ------------------------------------------------ golden files edited by hand
def test_golden_header_and_arrays_of_the_wrong_type_are_named(art, tmp_path, capsys):
    """A golden whose header holds a string where an object or an integer belongs, or whose
    logits array holds text, ended in "internal error: AttributeError: 'str' object has no
    attribute 'get'" (exit 3)."""
    import numpy as np

    g = tmp_path / "g.npz"
    rc, _, err = run(capsys, "parity", art, "--steps", "2", "--save-golden", g)
    assert rc == 0, err
    z = dict(np.load(g, allow_pickle=False))
    header = json.loads(bytes(z["header"]).decode())

    def variant(name, header_edit=None, arrays_edit=None):
        h = json.loads(json.dumps(header))
        if header_edit:
            header_edit(h)
        d = {**z, "header": np.frombuffer(json.dumps(h).encode(), dtype=np.uint8)}
        if arrays_edit:
            arrays_edit(d)
        path = tmp_path / f"{name}.npz"
        np.savez(path, **d)
        return path

    cases = [(variant(k, lambda h, k=k: h.__setitem__(k, "x")), f"header '{k}' must be a JSON object")
             for k in ("model", "artifact", "reference", "prompts", "logits")]
    cases += [(variant("steps", lambda h: h.__setitem__("steps", "x")), "header 'steps' must be an integer"),
              (variant("cfg", lambda h: h["model"].__setitem__("config", [1])), "header 'model.config' must be"),
              (variant("vocab", lambda h: h["logits"].__setitem__("vocab", "128")), "header 'logits.vocab' must be"),
              (variant("values", arrays_edit=lambda d: d.__setitem__("values", d["values"].astype("U8"))),
               "array 'values' has dtype <U8"),
              (variant("ids", arrays_edit=lambda d: d.__setitem__("tokens", d["tokens"].astype(np.float32))),
               "array 'tokens' has dtype float32")]
    for path, msg in cases:
        rc, _, err = run(capsys, "parity", art, "--golden", path)
        assert rc == 2 and msg in err and "internal error" not in err, (path.name, err)
    rc, _, err = run(capsys, "parity", art, "--golden", variant("same"))  # the unedited content still passes
    assert rc == 0, err


# ------------------------------------------------ kvtrace build --import after a build
def test_import_after_a_build_keeps_the_artifact_loadable(art, tmp_path, capsys):
    """`kvtrace build ART` then `kvtrace build ART --import OTHER.engine` (or trtexec writing
    ART/model.engine, then `--import ART/model.engine`, README's deploy flow): the manifest kept
    the first engine's size and sha256 under 'files', so every later load failed with
    "model.engine: N bytes, but manifest key 'files.model.engine.bytes' records M ... export the
    artifact again"."""
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX builds the engines without a GPU")
    import hashlib
    import shutil

    from kvtrace.manifest import load_manifest, verify_files

    a = Path(shutil.copytree(art, tmp_path / "art"))
    assert run(capsys, "build", a, "--compute-capability", "sm89", "--max-batch", "2")[0] == 0
    other = tmp_path / "other.engine"
    shutil.copyfile(a / "model.engine", other)
    assert run(capsys, "build", a, "--compute-capability", "sm89", "--max-batch", "3")[0] == 0
    assert other.read_bytes() != (a / "model.engine").read_bytes()
    for src in (other, a / "model.engine"):
        if src != other:  # trtexec --saveEngine=ART/model.engine over the recorded engine
            assert run(capsys, "build", a, "--compute-capability", "sm89", "--max-batch", "3")[0] == 0
            shutil.copyfile(other, a / "model.engine")
        rc, _, err = run(capsys, "build", a, "--import", src)
        assert rc == 0, err
        m = load_manifest(a)
        verify_files(m, full=True)  # raised before the fix
        want = hashlib.sha256(other.read_bytes()).hexdigest()
        assert m.data["files"]["model.engine"]["sha256"] == want == m.data["tensorrt"]["engine_sha256"]
        rc, _, err = run(capsys, "generate", a, "--input-ids", "1,2", "--max-new-tokens", "1")
        assert rc == 0, err  # no GPU: tensorrt passed over, onnxruntime runs; the manifest is consistent


def test_a_damaged_engine_points_to_kvtrace_build_not_to_a_new_export(art, tmp_path, capsys):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX builds the engine without a GPU")
    import shutil

    a = Path(shutil.copytree(art, tmp_path / "art"))
    assert run(capsys, "build", a, "--compute-capability", "sm89")[0] == 0
    with open(a / "model.engine", "ab") as f:
        f.write(b"x")
    rc, _, err = run(capsys, "generate", a, "--input-ids", "1", "--max-new-tokens", "1")
    assert rc == 2 and "model.engine" in err and "build the engine again" in err and "export" not in err, err
    (a / "model.engine").unlink()
    rc, _, err = run(capsys, "generate", a, "--input-ids", "1", "--max-new-tokens", "1")
    assert rc == 2 and "missing" in err and "build the engine again" in err, err


def test_serve_refuses_an_api_key_no_client_can_send(art, capsys, monkeypatch):
    """`--api-key sécret` started a server that answered 401 to every request (HTTP headers are
    not UTF-8; the openai client cannot even send it); `--api-key ""` (an unset shell variable)
    served with no key at all."""
    pytest.importorskip("uvicorn", reason="the 'serve' extra is not installed")
    monkeypatch.delenv("KVTRACE_API_KEY", raising=False)
    for key, msg in (("sécret", "--api-key: the key must be printable ASCII"), ("two words", "without spaces"),
                     ("", "--api-key '': empty")):
        rc, _, err = run(capsys, "serve", art, "--port", "0", "--api-key", key)
        assert rc == 2 and msg in err, err
    monkeypatch.setenv("KVTRACE_API_KEY", "tab\\there".replace("\\t", "\t"))
    rc, _, err = run(capsys, "serve", art, "--port", "0")
    assert rc == 2 and "$KVTRACE_API_KEY: the key must be printable ASCII" in err, err


def test_serve_an_artifact_with_one_position_says_why_it_cannot_serve(tmp_path, capsys):
    """`--max-seq 1` (or max_position_embeddings 1): the server stopped with "empty prompt (give
    at least one token, e.g. BOS)", a message about a prompt nobody sent."""
    pytest.importorskip("uvicorn", reason="the 'serve' extra is not installed")
    out = tmp_path / "one"
    assert run(capsys, "export", "--arch", "llama", "--max-seq", "1", "--no-validate", "--out", out)[0] == 0
    rc, _, err = run(capsys, "serve", out, "--port", "0", "--backend", "onnxruntime")
    assert rc == 2 and "holds 1 position(s)" in err and "--max-seq" in err and "empty prompt" not in err, err
