"""Streamed export of checkpoints (models/stream.py, exporter/verify.py, validate_streamed):
sharded checkpoints of every architecture, split mid-layer, export to the same bytes as the
in-memory path and pass validation (full and bounded); each check can fail; the strict checks
are the loader's."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers", reason="transformers builds the tiny reference checkpoints")

from kvtrace import cli  # noqa: E402
from kvtrace.errors import KvtraceError, ParityFailure  # noqa: E402
from kvtrace.exporter import onnx_graph  # noqa: E402
from kvtrace.exporter.export import export_checkpoint, export_model  # noqa: E402
from kvtrace.manifest import load_manifest  # noqa: E402
from kvtrace.models.checkpoint import load_checkpoint  # noqa: E402
from tests import tiny_hf  # noqa: E402

QUIET = dict(log=lambda m: None)
# one variant per architecture, with each one's fixup: GPT-NeoX's fused per-head qkv (and
# parallel residual), Llama's GQA with a tied head, StarCoder2's biases and window, XGLM's
# scaled embeddings and sinusoidal positions
VARIANTS = ["neox_parallel_r025", "llama_gqa_linear_tied", "starcoder2_gqa_window_bias", "xglm_scaled"]


def shard(src: Path, dst: Path, n: int = 3) -> Path:
    """Copy checkpoint `src` to `dst` as n shards + index, in state-dict order (layer by layer),
    cut by bytes so that the cuts fall inside layers."""
    import re

    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()

    def order(name):  # embedding, layers in order, then the rest (what save_pretrained shards by)
        m = re.search(r"layers\.(\d+)\.", name)
        return (1, int(m.group(1)), name) if m else ((0, 0, name) if "embed" in name else (2, 0, name))

    names = sorted(tensors, key=order)
    total = sum(tensors[k].nbytes for k in names)
    groups, cur, size = [], [], 0
    for k in names:
        cur.append(k)
        size += tensors[k].nbytes
        if size >= total * (len(groups) + 1) / n and len(groups) < n - 1:
            groups.append(cur)
            cur = []
    groups.append(cur)
    wmap = {}
    for i, g in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: tensors[k] for k in g}, dst / fname, metadata={"format": "pt"})
        wmap.update({k: fname for k in g})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    layers_of = [{m.group(1) for k in g if (m := re.search(r"layers\.(\d+)\.", k))} for g in groups]
    assert any(a & b for a, b in zip(layers_of, layers_of[1:])), "no cut inside a layer"
    return dst


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    return {v: shard(tiny_hf.checkpoint(v), root / v) for v in VARIANTS}


def _files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name.startswith("model.onnx")}


@pytest.mark.parametrize("variant", VARIANTS)
def test_sharded_streamed_export_matches_in_memory_path(variant, sharded, tmp_path):
    """Same bytes as exporting the model loaded by the torch loader from the unsharded
    checkpoint; full validation passes; the manifest's digest is the loader's."""
    ck = sharded[variant]
    out = export_checkpoint(ck, tmp_path / "streamed", max_seq=32, **QUIET)
    loaded = load_checkpoint(tiny_hf.checkpoint(variant))
    ref = export_model(loaded.model, tmp_path / "loaded", max_seq=32, validate=False, **QUIET)
    assert _files(out) == _files(ref)
    man = load_manifest(out)
    v = man["validation"]
    assert v["mode"] == "full" and v["layers"] == loaded.config.n_layers
    assert v["max_abs"] <= 1e-4 and v["initializers"]["checked"] == len(onnx_graph.build(
        loaded.config, dict(loaded.model.state_dict()), max_seq=32)[1])
    assert man["source"]["sha256"] == load_checkpoint(ck).digest
    assert man["files"]["model.onnx"]["bytes"] == (out / "model.onnx").stat().st_size


def test_written_behind_same_bytes_and_dropped_from_the_page_cache(sharded, tmp_path, monkeypatch):
    """Large files are written behind (exporter/writer.py: sync_file_range, then
    posix_fadvise DONTNEED once checked): the same bytes and digests as written plainly, the byte
    check and validation still pass, and every tensor's range is dropped exactly once."""
    from kvtrace.exporter import writer

    ck = sharded["llama_gqa_linear_tied"]
    plain = export_checkpoint(ck, tmp_path / "plain", max_seq=32, **QUIET)
    dropped = []
    orig = writer._WriteBehind.drop
    monkeypatch.setattr(writer._WriteBehind, "drop", lambda self, fd, off, n: (dropped.append((off, n)),
                                                                              orig(self, fd, off, n)))
    monkeypatch.setattr(writer, "WRITE_BEHIND_FROM", 0)
    behind = export_checkpoint(ck, tmp_path / "behind", max_seq=32, **QUIET)
    assert _files(behind) == _files(plain)
    assert load_manifest(behind)["files"] == load_manifest(plain)["files"]
    m = load_manifest(behind)
    assert m["validation"]["initializers"]["checked"] == len(dropped) > 0
    assert sorted(dropped) == sorted(set(dropped))


@pytest.mark.parametrize("variant", ["neox_parallel_r025", "xglm_scaled"])
def test_sharded_external_fp16_bounded(variant, sharded, tmp_path):
    """fp16 with external data and the bounded validation: the truncated graph reads the
    artifact's own data file (hard link) and the data file equals the in-memory path's."""
    ck = sharded[variant]
    out = export_checkpoint(ck, tmp_path / "a", dtype="float16", max_seq=32,
                            validation="bounded", **QUIET)
    loaded = load_checkpoint(tiny_hf.checkpoint(variant))
    ref = export_model(loaded.model, tmp_path / "b", dtype="float16", max_seq=32,
                       validate=False, **QUIET)
    assert _files(out) == _files(ref)
    v = load_manifest(out)["validation"]
    assert v["mode"] == "bounded" and v["layers"] == 2 and "own weight bytes" in v["method"]
    assert v["whole_graph"]["finite"] is True
    assert sorted(p.name for p in out.iterdir()) == ["kvtrace.json", "model.gpu.onnx", "model.onnx", "model.onnx.data"]
    # every data offset of a large tensor is aligned for memory mapping
    import onnx

    inits = onnx.load(str(out / "model.onnx"), load_external_data=False).graph.initializer
    external = [i for i in inits if i.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) > 10
    for init in external:
        ext = {e.key: e.value for e in init.external_data}
        assert int(ext["offset"]) % (1 << 16 if int(ext["length"]) >= 1 << 20 else 64) == 0


def test_bf16_bounded(sharded, tmp_path):
    out = export_checkpoint(sharded["llama_gqa_linear_tied"], tmp_path / "a", dtype="bfloat16", max_seq=32,
                            validation="bounded", **QUIET)
    v = load_manifest(out)["validation"]
    assert "fp32 twin" in v["method"] and "bfloat16" in v["whole_graph"]["skipped"]


def test_auto_picks_bounded_when_memory_is_short(sharded, tmp_path, monkeypatch, capsys):
    from kvtrace import files

    monkeypatch.setattr(files, "available_memory", lambda: (1000, "test"))
    rc = cli.main(["export", "--checkpoint", str(sharded["starcoder2_gqa_window_bias"]), "--max-seq", "32",
                   "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "bounded validation (auto" in err and "whole graph not run" in err
    v = load_manifest(tmp_path / "a")["validation"]
    assert v["mode"] == "bounded" and v["layers"] == 1 and "skipped" in v["whole_graph"]


# ------------------------------------------------------------------------------ checks fail
def _entries(d):
    return sorted(p.name for p in d.iterdir())


def test_weight_written_wrong_fails_the_byte_check(sharded, tmp_path, capsys, monkeypatch):
    """One weight stacked wrong by the builder: the byte check names it (exit 1), nothing left."""
    real = onnx_graph.stacked

    def wrong(parts):
        r = real(parts).copy()
        r[0, 0] += 1
        return r

    monkeypatch.setattr(onnx_graph, "stacked", wrong)
    out = tmp_path / "out"
    rc = cli.main(["export", "--checkpoint", str(sharded["llama_gqa_linear_tied"]), "--max-seq", "32",
                   "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "check failed: model.onnx.data: initializer 'layers.0.attn.qkv.weight'" in err and "differs from what its checkpoint tensor becomes" in err
    assert _entries(tmp_path) == []


@pytest.mark.parametrize("validation", ["full", "bounded"])
def test_wrong_graph_fails_numerically(sharded, tmp_path, monkeypatch, validation):
    """The weights are right (the byte check passes) but the graph computes the wrong activation:
    the layer-streamed reference catches it in both modes."""
    monkeypatch.setattr(onnx_graph.ModelGraph, "act", lambda self, x: self.g.op("Relu", [x]))
    with pytest.raises(ParityFailure, match="differs from the reference"):
        export_checkpoint(sharded["neox_parallel_r025"], tmp_path / "out", max_seq=32, validation=validation,
                          **QUIET)
    assert _entries(tmp_path) == []


def test_streamed_checks_are_the_loaders(tmp_path, capsys):
    """A tensor of the wrong shape in a shard: the same message as load_checkpoint's."""
    from safetensors.numpy import load_file, save_file

    ck = shard(tiny_hf.checkpoint("llama_mha"), tmp_path / "ck")
    shard2 = ck / "model-00002-of-00003.safetensors"
    t = load_file(shard2)
    name = next(k for k in t if k.endswith("up_proj.weight"))
    t[name] = t[name][:-1]
    save_file(t, shard2, metadata={"format": "pt"})
    with pytest.raises(KvtraceError) as e:
        load_checkpoint(ck)
    rc = cli.main(["export", "--checkpoint", str(ck), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and str(e.value) in err and name in err
    assert _entries(tmp_path) == ["ck"]


def test_stored_tied_head_must_equal_embedding(tmp_path):
    from safetensors.numpy import load_file, save_file

    ck = tmp_path / "ck"
    shutil.copytree(tiny_hf.checkpoint("starcoder2_nobias"), ck)
    t = load_file(ck / "model.safetensors")
    t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()
    save_file(t, ck / "model.safetensors", metadata={"format": "pt"})
    export_checkpoint(ck, tmp_path / "ok", max_seq=32, validate=False, **QUIET)
    t["lm_head.weight"][5, 3] += 1
    save_file(t, ck / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KvtraceError, match=r"'lm_head\.weight' differs from the embedding"):
        export_checkpoint(ck, tmp_path / "bad", max_seq=32, validate=False, **QUIET)
    assert not (tmp_path / "bad").exists()


def test_release_drops_mapped_pages(tmp_path):
    """After release(), the pages of the tensors read are no longer resident in this process."""
    from kvtrace.files import rss_mb
    from kvtrace.models.checkpoint import open_checkpoint
    from kvtrace.models.stream import CheckpointWeights

    ck = tiny_hf.with_vocab(tmp_path / "ck", 131072)  # a 32 MiB embedding: large enough to see in RSS
    w = CheckpointWeights(open_checkpoint(ck))
    before = rss_mb()["file"]
    a = w["embed.weight"]
    float(a.sum())  # touch every page
    touched = rss_mb()["file"]
    del a
    w.release()
    after = rss_mb()["file"]
    w.close()
    assert touched - before > 25 and touched - after > 25, (before, touched, after)


def test_release_view_drops_a_mapped_range_and_nothing_else(tmp_path):
    """files.release_view: the pages under a view of a read-only mapping leave RSS (its bytes
    read back the same, from the page cache); an anonymous array and a writable mapping are left
    alone (MADV_DONTNEED would zero them)."""
    import mmap

    from kvtrace.files import release_view, rss_mb

    data = np.random.default_rng(0).standard_normal(8 << 20).astype(np.float32)  # 32 MiB
    (tmp_path / "w.bin").write_bytes(data.tobytes())
    with open(tmp_path / "w.bin", "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = np.frombuffer(mm, dtype=np.float32, offset=4096 * 3).reshape(-1, 1024)  # at an offset
    before = rss_mb()["file"]
    total = float(view.astype(np.float64).sum())
    touched = rss_mb()["file"]
    release_view(view[: len(view) // 2])
    half = rss_mb()["file"]
    release_view(view)
    after = rss_mb()["file"]
    assert touched - before > 25 and 10 < touched - half < 20 and touched - after > 25, (before, touched, half, after)
    assert float(view.astype(np.float64).sum()) == total
    anon = data.copy()
    release_view(anon)
    assert np.array_equal(anon, data)
    del view
    mm.close()


def test_big_tensors_are_checked_in_bands(sharded, tmp_path, monkeypatch, capsys):
    """Every tensor counted big (files.RELEASE_WHILE_READING) and bands of 256 bytes: the export
    is the same bytes and passes; the NaN scan and the band check release what they read; a wrong
    element in the last band of a weight is named at its index."""
    from kvtrace import files
    from kvtrace.exporter import verify

    ck = sharded["llama_gqa_linear_tied"]
    plain = export_checkpoint(ck, tmp_path / "plain", max_seq=32, **QUIET)
    released = []
    real_release = files.release_view
    monkeypatch.setattr(files, "RELEASE_WHILE_READING", 1)
    monkeypatch.setattr(verify, "BAND_BYTES", 256)
    monkeypatch.setattr(files, "release_view", lambda a: (released.append(a.nbytes), real_release(a)))
    banded = export_checkpoint(ck, tmp_path / "banded", max_seq=32, **QUIET)
    assert _files(banded) == _files(plain) and len(released) > 100
    shutil.rmtree(banded)

    real = onnx_graph.stacked

    def wrong(parts):
        r = real(parts).copy()
        r[-1, -1] += 1  # layer 0's fused projection: the last row of V, in the last band
        return r

    monkeypatch.setattr(onnx_graph, "stacked", wrong)
    rc = cli.main(["export", "--checkpoint", str(ck), "--max-seq", "32", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    cfg = load_checkpoint(ck).config
    last = [cfg.n_heads * cfg.head_dim + 2 * cfg.n_kv_heads * cfg.head_dim - 1, cfg.hidden_size - 1]
    assert rc == 1 and f"initializer 'layers.0.attn.qkv.weight'" in err and f"first at index {last}" in err, err


def test_release_upto_a_mark_leaves_later_tensors_alone(tmp_path):
    """The writer's job thread releases a checked tensor while the main thread reads the next:
    release(upto=mark) drops the tensors handed out up to the mark and not the one handed out
    after it (dropping pages under a reader made them fault in again: the 7B transposes ran at
    half speed); a plain release() drops the rest."""
    from kvtrace.files import rss_mb
    from kvtrace.models.checkpoint import open_checkpoint
    from kvtrace.models.stream import CheckpointWeights

    w = CheckpointWeights(open_checkpoint(tiny_hf.with_vocab(tmp_path / "ck", 131072)))  # 32 MiB embed and head
    base = rss_mb()["file"]
    a = w["embed.weight"]
    float(a.sum())
    m = w.mark()
    b = w["lm_head.weight"]  # handed out after the mark, being read by "the main thread"
    float(b.sum())
    both = rss_mb()["file"]
    w.release(upto=m)
    one = rss_mb()["file"]
    float(b.sum())  # still mapped: no fault, no growth
    again = rss_mb()["file"]
    w.release()
    none = rss_mb()["file"]
    w.close()
    assert both - base > 55, (base, both)
    assert 25 < both - one < 40 and abs(again - one) < 5, (both, one, again)
    assert one - none > 25, (one, none)


def test_a_fork_releases_its_own_pages_only(tmp_path):
    """weights.fork() (the background reference's view): the fork's release() leaves the pages the
    writer's mapping holds, and the writer's release() leaves the fork's (each its own mapping)."""
    from kvtrace.files import rss_mb
    from kvtrace.models.checkpoint import open_checkpoint
    from kvtrace.models.stream import CheckpointWeights

    w = CheckpointWeights(open_checkpoint(tiny_hf.with_vocab(tmp_path / "ck", 131072)))  # 32 MiB embed
    f = w.fork()
    base = rss_mb()["file"]
    a, b = w["embed.weight"], f["embed.weight"]
    float(a.sum()), float(b.sum())
    both = rss_mb()["file"]  # the same file pages, mapped twice: counted twice
    f.release()
    writer_only = rss_mb()["file"]
    float(a.sum())  # still mapped in the writer's mapping: no fault, no growth
    again = rss_mb()["file"]
    float(b.sum())
    w.release()
    fork_only = rss_mb()["file"]
    f.close()
    w.close()
    assert both - base > 55, (base, both)
    assert 25 < both - writer_only < 40 and abs(again - writer_only) < 5, (both, writer_only, again)
    assert abs(fork_only - writer_only) < 5, (writer_only, fork_only)


def test_a_failed_export_stops_its_background_reference(sharded, tmp_path, monkeypatch):
    """The validation's reference runs in a thread while the weights are written; an export that
    fails while writing (a weight the byte check refuses) stops it between blocks: no thread
    left running, nothing left on disk."""
    import threading
    import time

    from kvtrace.exporter import references, verify

    started, stopped = threading.Event(), threading.Event()
    real_run = references.LayerStreamedReference._run

    def slow_run(self, *a, **k):
        stop = self._stop

        def watched():  # asked before each block: slow, so that only a stop ends the run early
            if stop():
                stopped.set()
                return True
            time.sleep(0.3)
            return False
        self._stop = watched
        started.set()
        return real_run(self, *a, **k)

    def refuse(self, t, path, offset):
        started.wait(10)  # the reference is running when the write fails
        raise verify.WeightMismatch(f"{path.name}: initializer '{t.name}' refused by the test")

    monkeypatch.setattr(references.LayerStreamedReference, "_run", slow_run)
    monkeypatch.setattr(verify.InitializerCheck, "_check", refuse)
    with pytest.raises(ParityFailure, match="refused by the test"):
        export_checkpoint(sharded["neox_parallel_r025"], tmp_path / "out", max_seq=32, **QUIET)
    assert started.is_set() and stopped.is_set()
    assert not [t.name for t in threading.enumerate() if t.name == "kvtrace-validation-reference"]
    assert _entries(tmp_path) == []


def test_aborted_jobs_wait_for_the_running_one_and_skip_the_rest():
    """writer.Jobs.abort() returns once the function running on the worker has returned (the
    caller then closes what it uses; a worker left inside torch at interpreter exit aborted the
    process with SIGABRT instead of exit 130), and what was queued never runs."""
    import threading
    import time

    from kvtrace.exporter.writer import Jobs

    ran, started = [], threading.Event()

    def slow():
        started.set()
        time.sleep(0.5)
        ran.append("slow")

    jobs = Jobs(depth=4)
    jobs.submit(slow)
    jobs.submit(lambda: ran.append("queued"))
    started.wait(5)
    jobs.abort()
    assert ran == ["slow"] and not jobs._thread.is_alive()


def test_same_bytes_finds_a_difference_anywhere():
    """verify.same_bytes compares 8-byte words and the tail: equal arrays pass, one flipped bit
    anywhere (a word, the last byte of an odd-sized tail) fails, sizes must agree."""
    from kvtrace.exporter.verify import same_bytes

    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 8, 9, (1 << 17) * 8 + 3, 3 * (1 << 20) + 5):
        a = rng.integers(0, 256, n, dtype=np.uint8)
        assert same_bytes(a, a.copy())
        for at in {0, n // 2, n - 1} if n else set():
            b = a.copy()
            b[at] ^= 1
            assert not same_bytes(a, b), (n, at)
    x = rng.integers(0, 1 << 16, (64, 48), dtype=np.uint16)
    assert same_bytes(x, x.copy()) and not same_bytes(x, x[:63].copy())


def test_membership_reads_no_tensor(tmp_path):
    """`name in weights` (the builder's completeness check) neither reads nor checks a tensor:
    through Mapping's default it read and NaN-checked the whole checkpoint before writing began
    (13 s and the checkpoint's size in RSS at 7B)."""
    from kvtrace.exporter.checks import checked
    from kvtrace.models.checkpoint import open_checkpoint
    from kvtrace.models.stream import CheckpointWeights

    w = CheckpointWeights(open_checkpoint(tiny_hf.checkpoint("llama_mha")))
    reads = []
    orig = w.hf_tensor
    w.hf_tensor = lambda name: reads.append(name) or orig(name)
    c = checked(w)
    assert all(n in c for n in w) and "no.such.weight" not in c and "no.such.weight" not in w
    assert reads == []
    c["embed.weight"]
    assert len(reads) == 1
    w.close()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_first_non_finite_finds_the_first_nan_or_inf(dtype):
    """The exponent-bit test of exporter/checks.py finds the first NaN/Inf in any piece, at
    piece edges too, and nothing in finite data (largest finite values included)."""
    import ml_dtypes

    from kvtrace.exporter.checks import _BITS_PIECE, first_non_finite

    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    n = 2 * _BITS_PIECE + 7
    a = np.random.default_rng(0).standard_normal((1, n)).astype(dt)
    fi = ml_dtypes.finfo(dt) if dtype == "bfloat16" else np.finfo(dt)
    a[0, 3], a[0, 4] = fi.max, fi.min
    assert first_non_finite(a) is None
    for at in (0, _BITS_PIECE - 1, _BITS_PIECE, n - 1):
        for v in (np.nan, np.inf, -np.inf):
            b = a.copy()
            b[0, at] = v
            b[0, min(at + 1, n - 1)] = np.nan
            assert first_non_finite(b) == (0, at), (at, v)


def test_pickle_checkpoint_streams_like_safetensors(tmp_path):
    """--allow-pickle checkpoints go through the same streamed path (torch.load(mmap=True))."""
    import torch
    from safetensors.torch import load_file

    ck = tmp_path / "ck"
    shutil.copytree(tiny_hf.checkpoint("neox_parallel_r025"), ck)
    torch.save(load_file(ck / "model.safetensors"), ck / "pytorch_model.bin")
    (ck / "model.safetensors").unlink()
    with pytest.raises(KvtraceError, match="--allow-pickle"):
        export_checkpoint(ck, tmp_path / "refused", max_seq=32, **QUIET)
    out = export_checkpoint(ck, tmp_path / "a", max_seq=32, allow_pickle=True, **QUIET)
    ref = export_checkpoint(tiny_hf.checkpoint("neox_parallel_r025"), tmp_path / "b", max_seq=32, validate=False,
                            **QUIET)
    assert _files(out) == _files(ref)
    assert load_manifest(out)["source"]["sha256"] == load_checkpoint(ck, allow_pickle=True).digest
