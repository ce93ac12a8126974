"""`kvtrace export`: a reference model -> an artifact directory (model.onnx + kvtrace.json).

The ONNX graph is built directly from the ModelConfig (exporter/onnx_graph.py); weights are
streamed into the file one tensor at a time (protobuf wire format written by hand, so a
650 MB model is never held twice in memory), the artifact is assembled in a temporary
directory next to --out, validated (onnx.checker, shape inference, onnxruntime against the
reference model) and only then renamed into place.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from kvtrace import configs
from kvtrace.exporter import onnx_graph
from kvtrace import io_spec
from kvtrace.config import ARCHITECTURES
from kvtrace.errors import KvtraceError
from kvtrace.manifest import write_manifest

TWO_GB = 2 * 1024**3
DATA_NAME = io_spec.ONNX_NAME + ".data"
SHORT_DTYPE = {v: k for k, v in configs.DTYPE_NAMES.items()}  # float16 -> fp16


def _log(msg: str) -> None:
    print(f"kvtrace export: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- weights
class TorchWeights(Mapping):
    """Canonical name -> numpy array sharing memory with the model's parameter (no copy).

    bf16 parameters become ml_dtypes.bfloat16 arrays (numpy has no bfloat16 of its own).
    """

    def __init__(self, model):
        self._params = {k: v for k, v in model.state_dict().items()}

    def __getitem__(self, name):
        import torch

        t = self._params[name].detach().cpu()
        if t.dtype == torch.bfloat16:
            import ml_dtypes  # a dependency of onnx

            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    def __iter__(self):
        return iter(self._params)

    def __len__(self):
        return len(self._params)


# ------------------------------------------------------------------------------ writing
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


# protobuf tags (field number << 3 | wire type 2 = length-delimited)
_TAG_MODEL_GRAPH = _varint(7 << 3 | 2)  # ModelProto.graph
_TAG_GRAPH_INITIALIZER = _varint(5 << 3 | 2)  # GraphProto.initializer
_TAG_TENSOR_RAW = _varint(9 << 3 | 2)  # TensorProto.raw_data


def _write_bytes(f, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    f.write(memoryview(arr.view(np.uint8).reshape(-1)))  # raw bytes (bf16 has no buffer format)


def write_onnx(model, inits, path: Path, *, external: bool) -> int:
    """Write `model` (graph without weights) plus `inits` to `path`, one tensor at a time.

    Embedded: the protobuf wire format written by hand (field tags and lengths computed
    from the tensor sizes, then the raw bytes), so the weights never sit in a protobuf
    object; it parses to the same ModelProto as the model with the initializers appended
    (protobuf fields may come in any order: the graph field is written last). External: each weight goes to
    model.onnx.data at a 64-byte aligned offset and the graph refers to it. Returns the
    number of bytes written.
    """
    from onnx import TensorProto

    if external:
        data_path = path.with_name(DATA_NAME)
        offset = 0
        metas = []
        with open(data_path, "wb") as f:
            for t in inits:
                pad = (-offset) % 64
                f.write(b"\0" * pad)
                offset += pad
                arr = t.data()
                assert arr.nbytes == t.nbytes, t.name
                _write_bytes(f, arr)
                del arr
                m = t.meta()
                m.data_location = TensorProto.EXTERNAL
                for k, v in (("location", DATA_NAME), ("offset", str(offset)), ("length", str(t.nbytes))):
                    e = m.external_data.add()
                    e.key, e.value = k, v
                metas.append(m)
                offset += t.nbytes
        model.graph.initializer.extend(metas)
        try:
            blob = model.SerializeToString()
        finally:
            del model.graph.initializer[len(model.graph.initializer) - len(metas):]
        path.write_bytes(blob)
        return len(blob) + offset

    graph_bytes = model.graph.SerializeToString()  # nodes, I/O, small constants
    entries = []
    graph_len = len(graph_bytes)
    for t in inits:
        meta = t.meta().SerializeToString()
        entry_len = len(meta) + len(_TAG_TENSOR_RAW) + len(_varint(t.nbytes)) + t.nbytes
        entries.append((t, meta, entry_len))
        graph_len += len(_TAG_GRAPH_INITIALIZER) + len(_varint(entry_len)) + entry_len
    # ModelProto: fields in any order; the graph field is written last
    head_wo_graph = _without_graph(model)
    total = len(head_wo_graph) + len(_TAG_MODEL_GRAPH) + len(_varint(graph_len)) + graph_len
    if total >= TWO_GB:
        raise KvtraceError("model.onnx would exceed protobuf's 2 GB limit; use --external-data")
    with open(path, "wb") as f:
        f.write(head_wo_graph)
        f.write(_TAG_MODEL_GRAPH + _varint(graph_len))
        f.write(graph_bytes)
        for t, meta, entry_len in entries:
            f.write(_TAG_GRAPH_INITIALIZER + _varint(entry_len) + meta + _TAG_TENSOR_RAW + _varint(t.nbytes))
            arr = t.data()
            assert arr.nbytes == t.nbytes, t.name
            _write_bytes(f, arr)
            del arr
    return total


def _without_graph(model) -> bytes:
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.ClearField("graph")
    return m.SerializeToString()


def skeleton(model, inits):
    """The graph with every weight declared as a typed graph input instead of an initializer:
    enough for onnx.checker and strict shape inference (only dims and types matter), without
    reading the weights back. The file itself is then loaded and run by onnxruntime."""
    import onnx
    from onnx import helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in inits)
    return m


# ----------------------------------------------------------------------------- export
def default_out(arch: str, dtype: str, layout: str) -> Path:
    return Path(f"kvtrace-{arch}-{SHORT_DTYPE[dtype]}-{layout}")


def export_model(model, out_dir, *, dtype: str = "float32", layout: str = "static", max_seq: int | None = None,
                 max_batch: int | None = None, opset: int = configs.DEFAULT_OPSET, tokenizer=None,
                 source: dict | None = None, validate: bool = True, external_data: bool = False,
                 force: bool = False, release_weights: bool = False, log=None) -> Path:
    """Export `model` (a models.transformer.Transformer) to the artifact directory `out_dir`.

    tokenizer: None, a path to a tokenizer.json to copy, or "builtin-bytes".
    release_weights: free the model's parameters once they are written (the model is unusable
    afterwards): the onnxruntime validation then does not hold a second copy of the weights.
    Raises KvtraceError (bad options, unwritable output) or ParityFailure (validation);
    in both cases nothing is left at `out_dir` or beside it.
    """
    log = log or _log
    cfg = model.cfg
    out = Path(out_dir)
    max_seq = int(max_seq) if max_seq is not None else min(configs.DEFAULT_MAX_SEQ, cfg.max_position)
    max_batch = int(max_batch) if max_batch is not None else configs.DEFAULT_MAX_BATCH
    opset = int(opset) if opset is not None else configs.DEFAULT_OPSET
    onnx_graph.check_options(cfg, dtype=dtype, layout=layout, max_seq=max_seq, opset=opset)
    if max_batch < 1:
        raise KvtraceError(f"--max-batch {max_batch}: must be a positive integer")
    tok_path = None
    if tokenizer not in (None, "builtin-bytes"):
        tok_path = Path(tokenizer)
        if not tok_path.is_file():
            raise KvtraceError(f"tokenizer file {tok_path} not found")
    if out.exists() and not force:
        raise KvtraceError(f"--out {out}: already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise KvtraceError(f"--out {out}: exists and is not a directory")

    tmp, made_parents = _make_temp_dir(out)
    try:
        t0 = time.perf_counter()
        graph, inits, graph_info = onnx_graph.build(cfg, TorchWeights(model), dtype=dtype, layout=layout,
                                                   max_seq=max_seq, opset=opset)
        n_bytes = sum(t.nbytes for t in inits)
        external = bool(external_data) or n_bytes + (1 << 20) >= TWO_GB
        log(f"built graph: {len(graph.graph.node)} nodes, {len(inits)} weights, {n_bytes / 1e6:.1f} MB "
            f"({time.perf_counter() - t0:.2f}s)")
        t0 = time.perf_counter()
        size = write_onnx(graph, inits, tmp / io_spec.ONNX_NAME, external=external)
        log(f"wrote {io_spec.ONNX_NAME}{' + ' + DATA_NAME if external else ''}: {size / 1e6:.1f} MB "
            f"({time.perf_counter() - t0:.2f}s)")

        if tok_path is not None:
            shutil.copyfile(tok_path, tmp / "tokenizer.json")
            tok = {"type": "file", "file": "tokenizer.json", **_copy_chat_template(tok_path.parent, tmp, log)}
        elif tokenizer == "builtin-bytes":
            tok = {"type": "builtin-bytes"}
        else:
            tok = None

        sk = skeleton(graph, inits) if validate else None
        del inits  # the last references to the weights held here
        validation = None
        if validate:
            validation = _validate(graph, sk, tmp / io_spec.ONNX_NAME, model, dtype=dtype, layout=layout,
                                   max_seq=max_seq, log=log, release_weights=release_weights)
        elif release_weights:
            _release(model)
        from kvtrace import __version__

        manifest = {
            "kvtrace_version": __version__,
            "architecture": cfg.arch,
            "config": cfg.to_dict(),
            "dtype": dtype,
            "opset": opset,
            "onnx": io_spec.ONNX_NAME,
            "external_data": DATA_NAME if external else None,
            "io": io_spec.build(n_layers=cfg.n_layers, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                                vocab_size=cfg.vocab_size, dtype=dtype, layout=layout, max_seq=max_seq,
                                max_batch=max_batch),
            "tokenizer": tok,
            "generation": {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
                           "pad_token_id": cfg.pad_token_id},
            "source": dict(source or {}),
            "graph": graph_info,
            "validation": validation,
        }
        write_manifest(tmp, manifest)
        _move_into_place(tmp, out, force)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in made_parents:  # only directories this call created, deepest first
            try:
                d.rmdir()
            except OSError:
                break
        if isinstance(e, OSError):  # disk full, permissions, ...: name where it happened
            raise KvtraceError(f"--out {out}: writing the artifact failed ({e}); nothing was left behind") from e
        raise
    log(f"artifact ready: {out}")
    return out


def _copy_chat_template(src: Path, dst: Path, log) -> dict:
    """Carry the checkpoint's chat template beside tokenizer.json into the artifact (what `kvtrace
    serve` renders /v1/chat/completions with, runtime/chat.py): tokenizer_config.json when it has a
    "chat_template" (its bos/eos token strings come along), and/or chat_template.jinja. Returns the
    manifest "tokenizer" keys naming the copies; a config that is not a JSON object is left out."""
    import json

    keys = {}
    jinja = src / "chat_template.jinja"
    if jinja.is_file():
        shutil.copyfile(jinja, dst / jinja.name)
        keys["chat_template"] = jinja.name
    cfg = src / "tokenizer_config.json"
    if cfg.is_file():
        try:
            data = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            log(f"note: {cfg} is not readable JSON ({e}); its chat template is not carried")
            data = None
        if isinstance(data, dict) and ("chat_template" in data or keys):
            shutil.copyfile(cfg, dst / cfg.name)
            keys["config"] = cfg.name
    return keys


def _make_temp_dir(out: Path):
    """A temporary directory beside `out` (same file system, so the final rename is atomic)."""
    parent = out.absolute().parent
    made = []
    p = parent
    while not p.exists():
        made.append(p)
        p = p.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the artifact is an ordinary directory
    except OSError as e:
        for d in made:
            try:
                d.rmdir()
            except OSError:
                break
        raise KvtraceError(f"--out {out}: cannot create the artifact directory there ({e.strerror or e})") from e
    return tmp, made


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    old = None
    if out.exists():
        if not force:
            raise KvtraceError(f"--out {out}: appeared while exporting; pass --force to replace it")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError as e:
        if old is not None:
            os.replace(old, out)
        raise KvtraceError(f"--out {out}: cannot move the finished artifact into place ({e})") from e
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _validate(graph, sk, path: Path, model, *, dtype, layout, max_seq, log, release_weights) -> dict:
    """checker + shape inference on the skeleton, then onnxruntime on the written file
    against the reference trace (computed first, so the weights can be freed before
    onnxruntime loads its own copy)."""
    from kvtrace.exporter import validate as v

    vlog = lambda m: log("validate: " + m)  # noqa: E731
    t0 = time.perf_counter()
    try:
        v.check_graph(sk)
    except KvtraceError as e:
        raise KvtraceError(f"{path.name}: {e}") from e
    if graph_external(path):
        # by path as well: checks the external references (file, offsets) without loading the weights
        import onnx

        try:
            onnx.checker.check_model(str(path))
        except Exception as e:  # noqa: BLE001 - onnx raises several types
            raise KvtraceError(f"{path.name}: ONNX check failed: {e}") from e
    vlog(f"onnx.checker + shape inference ok ({time.perf_counter() - t0:.2f}s)")

    t0 = time.perf_counter()
    ref = model if model.dtype == _torch_f32() else _fp32_copy(model)
    trace = v.validation_trace(ref, layout=layout, max_seq=max_seq)
    del ref
    vlog(f"reference model run ({time.perf_counter() - t0:.1f}s)")
    method = "onnxruntime-cpu"
    run_path, run_dtype = path, dtype
    if dtype == "bfloat16":
        # onnxruntime's CPU provider has no bfloat16 MatMul: check the same graph built in fp32 from
        # the bf16-rounded weights (identical topology and builder) against the bf16 tolerance.
        # bf16 arithmetic itself is left to the GPU backends (TensorRT, onnxruntime-cuda).
        run_path, run_dtype = path.with_name(".bf16-twin.onnx"), "float32"
        twin, twin_inits, _ = onnx_graph.build(model.cfg, _Bf16Rounded(TorchWeights(model)), dtype="float32",
                                               layout=layout, max_seq=max_seq, opset=graph.opset_import[0].version)
        write_onnx(twin, twin_inits, run_path, external=False)
        del twin, twin_inits
        method = "onnxruntime-cpu, fp32 twin graph of the bf16-rounded weights"
    if release_weights:
        _release(model)
    try:
        res = v.check_parity(run_path, trace, model.cfg, layout=layout, dtype=dtype, sess_dtype=run_dtype,
                             max_seq=max_seq, tolerances=configs.TOLERANCES[dtype], log=vlog)
    finally:
        if run_path != path:
            run_path.unlink(missing_ok=True)
    return {"method": method, "reference": "kvtrace torch model (fp32)", "max_abs": res.max_abs,
            "top1": res.top1, "top1_strict": res.top1_strict, "positions": res.positions}


def graph_external(path: Path) -> bool:
    return path.with_name(DATA_NAME).exists()


def _release(model) -> None:
    """Drop the storage of every parameter and buffer (export_model(release_weights=True))."""
    import gc

    import torch

    for t in list(model.parameters()) + list(model.buffers()):
        t.data = torch.empty(0, dtype=t.dtype)
    gc.collect()
    try:  # hand freed heap pages back to the OS before onnxruntime loads its copy (glibc only)
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _torch_f32():
    import torch

    return torch.float32


def _fp32_copy(model):
    import copy

    return copy.deepcopy(model).float().eval()


class _Bf16Rounded(Mapping):
    """Weights rounded to bfloat16 and widened back to fp32 (for the bf16 validation twin)."""

    def __init__(self, inner: Mapping):
        self._inner = inner

    def __getitem__(self, name):
        return onnx_graph.to_dtype(self._inner[name], "bfloat16").astype(np.float32)

    def __iter__(self):
        return iter(self._inner)

    def __len__(self):
        return len(self._inner)


# --------------------------------------------------------------------------------- CLI
def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def add_arguments(p) -> None:
    """The command's options (kvtrace/cli.py builds the parser)."""
    p.add_argument("--arch", choices=ARCHITECTURES,
                   help="architecture; read from config.json when --checkpoint is given")
    p.add_argument("--checkpoint", help="Hugging Face checkpoint directory (config.json + *.safetensors)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fp16", action="store_true", help="store weights and compute in float16")
    g.add_argument("--bf16", action="store_true", help="store weights and compute in bfloat16")
    p.add_argument("--cache", choices=io_spec.LAYOUTS, default="static", help="KV cache layout")
    p.add_argument("--max-seq", type=int, help="static cache length / longest sequence (default min(2048, model max))")
    p.add_argument("--max-batch", type=int, help="largest batch the artifact is profiled for (default 8)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset: 24 (fused, default) or 17 (portable)")
    p.add_argument("--out", help="artifact directory (default ./kvtrace-ARCH-DTYPE-CACHE)")
    p.add_argument("--external-data", action="store_true", help="store weights in model.onnx.data")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading pytorch_model.bin (pickle can execute arbitrary code)")
    p.add_argument("--no-validate", action="store_true", help="skip the onnxruntime check against the reference")
    p.add_argument("--force", action="store_true", help="replace an existing artifact directory")


def main(args) -> int:
    dtype = "float16" if args.fp16 else "bfloat16" if args.bf16 else "float32"
    layout = args.cache
    t0 = time.perf_counter()
    if args.checkpoint:
        try:
            from kvtrace.models.checkpoint import load_checkpoint
        except ImportError as e:
            raise KvtraceError(f"--checkpoint: checkpoint loading is not available ({e})") from e
        ckpt = Path(args.checkpoint)
        if not ckpt.is_dir():
            raise KvtraceError(f"--checkpoint {ckpt}: not a directory (expected config.json + *.safetensors)")
        _log(f"loading {ckpt} ...")
        loaded = load_checkpoint(ckpt, allow_pickle=args.allow_pickle)
        model, cfg = loaded.model, loaded.config
        if args.arch and args.arch != cfg.arch:
            raise KvtraceError(f"--arch {args.arch} disagrees with {ckpt / 'config.json'}, which describes a "
                               f"{cfg.arch} model; drop --arch or pass --arch {cfg.arch}")
        tokenizer = loaded.tokenizer_file
        source = {"kind": "checkpoint", "path": str(ckpt.absolute()), "sha256": loaded.digest, "seed": None}
        del loaded
    else:
        if not args.arch:
            raise KvtraceError("--arch is required without --checkpoint (built-in models: "
                               f"{', '.join(configs.BUILTIN)})")
        from kvtrace.models.transformer import random_model

        cfg = configs.BUILTIN[args.arch]
        _log(f"building the built-in {args.arch} model (random weights, seed {configs.BUILTIN_SEED}) ...")
        # check the options before spending time on weights
        model = None
        tokenizer = "builtin-bytes"
        source = {"kind": "builtin", "path": None, "sha256": None, "seed": configs.BUILTIN_SEED}
    max_seq = args.max_seq if args.max_seq is not None else min(configs.DEFAULT_MAX_SEQ, cfg.max_position)
    opset = args.opset if args.opset is not None else configs.DEFAULT_OPSET
    onnx_graph.check_options(cfg, dtype=dtype, layout=layout, max_seq=max_seq, opset=opset)
    if model is None:
        model = random_model(cfg, configs.BUILTIN_SEED)
    _log(f"model ready: {cfg.arch}, {cfg.n_params() / 1e6:.1f}M parameters ({time.perf_counter() - t0:.2f}s)")
    out = Path(args.out) if args.out else default_out(cfg.arch, dtype, layout)
    export_model(model, out, dtype=dtype, layout=layout, max_seq=max_seq, max_batch=args.max_batch,
                 opset=opset, tokenizer=tokenizer, source=source, validate=not args.no_validate,
                 external_data=args.external_data, force=args.force, release_weights=True)
    _log(f"done in {time.perf_counter() - t0:.1f}s (peak RSS {_peak_rss_mb():.0f} MB)")
    print(out)
    return 0
