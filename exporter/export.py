"""`kvtrace export`: a checkpoint (or a reference model) -> an artifact directory
(model.onnx [+ model.onnx.data] + kvtrace.json).

The ONNX graph is built directly from the ModelConfig (exporter/onnx_graph.py); weights are
streamed into the file one tensor at a time (protobuf wire format written by hand, or external
data above 2 GB, so no model is ever held twice in memory). A checkpoint is never loaded as a
PyTorch model: its tensors come from the memory-mapped shards (models/stream.py), are checked
against the documented transform as they are written (exporter/verify.py) and released. The
artifact is assembled in a staging directory next to --out (one export per --out at a time;
what dead exports left there is removed), validated (onnx.checker, shape inference,
onnxruntime against the reference, docs/validation.md) and only then renamed into place.
"""
from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvtrace import configs, files
from kvtrace import manifest as manifest_mod
from kvtrace import io_spec
from kvtrace.exporter import onnx_graph
# the writer lives in exporter/writer.py; these names are part of this module's interface
from kvtrace.exporter.writer import DATA_NAME, TWO_GB, Written, external_data_bytes, write_onnx  # noqa: F401
from kvtrace.config import ARCHITECTURES
from kvtrace.errors import KvtraceError
from kvtrace.manifest import write_manifest

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


VALIDATIONS = ("auto", "full", "bounded")


@dataclass(frozen=True)
class ExportSpec:
    """What one export writes, with every default filled and every option checked once
    (the CLI and the Python API both go through `make`)."""
    dtype: str = "float32"
    layout: str = "static"
    max_seq: int = configs.DEFAULT_MAX_SEQ
    max_batch: int = configs.DEFAULT_MAX_BATCH
    opset: int = configs.DEFAULT_OPSET
    attend: str = "used"  # static cache: "used" (CPU: slots in use) or "full" (GPU: value-independent shapes)
    external_data: bool = False
    validate: bool = True
    validation: str = "auto"  # streamed exports: "full", "bounded" or "auto" (docs/validation.md)

    @classmethod
    def make(cls, cfg, *, dtype="float32", layout="static", max_seq=None, max_batch=None, opset=None,
             attend="used", external_data=False, validate=True, validation="auto") -> "ExportSpec":
        spec = cls(dtype=dtype, layout=layout,
                   max_seq=configs.default_max_seq(cfg) if max_seq is None else max_seq,
                   max_batch=configs.DEFAULT_MAX_BATCH if max_batch is None else max_batch,
                   opset=configs.DEFAULT_OPSET if opset is None else opset,
                   attend=attend, external_data=bool(external_data), validate=bool(validate),
                   validation=validation)
        onnx_graph.check_options(cfg, dtype=spec.dtype, layout=spec.layout, max_seq=spec.max_seq, opset=spec.opset)
        if not isinstance(spec.max_batch, int) or spec.max_batch < 1:
            raise KvtraceError(f"--max-batch {spec.max_batch!r}: must be a positive integer")
        if spec.validation not in VALIDATIONS:
            raise KvtraceError(f"--validation {spec.validation!r}: expected one of {', '.join(VALIDATIONS)}")
        return spec


def export_model(model, out_dir, *, tokenizer=None, source: dict | None = None, force: bool = False,
                 release_weights: bool = False, log=None, **options) -> Path:
    """Export `model` (a kvtrace.models.transformer.Transformer) to the artifact directory
    `out_dir`; `options` are ExportSpec.make's (dtype, layout, max_seq, max_batch, opset, attend,
    external_data, validate). The model itself is the validation reference (in fp32).

    release_weights: free the model's parameters once they are written and the reference has
    run (the model is unusable afterwards), so onnxruntime's validation does not sit beside them.
    """
    spec = ExportSpec.make(model.cfg, **options)
    reference = None
    if spec.validate:
        from kvtrace.exporter.references import TorchReference

        reference = TorchReference(model, {"kind": "export", "dtype": "float32"})
    return export_artifact(model.cfg, TorchWeights(model), out_dir, spec, reference=reference, tokenizer=tokenizer,
                           source=source, force=force, log=log,
                           release=(lambda: _release(model)) if release_weights else None)


def export_checkpoint(checkpoint, out_dir, *, allow_pickle: bool = False, arch: str | None = None,
                      force: bool = False, log=None, progress: bool | None = None, **options) -> Path:
    """Export a Hugging Face checkpoint directory without building the PyTorch model: tensors go
    from the memory-mapped shards (models/stream.py) through the graph builder into the file one
    at a time, each checked against the documented transform as it is written and then released;
    validation is the layer-streamed reference (docs/validation.md). `options` are
    ExportSpec.make's; validation="auto" | "full" | "bounded"."""
    from kvtrace.models.checkpoint import open_checkpoint
    from kvtrace.models.stream import CheckpointWeights

    log = log or _log
    ck = open_checkpoint(checkpoint, allow_pickle=allow_pickle)
    cfg = ck.config
    if arch and arch != cfg.arch:
        raise KvtraceError(f"--arch {arch} disagrees with {ck.root / 'config.json'}, which describes a "
                           f"{cfg.arch} model; drop --arch or pass --arch {cfg.arch}")
    spec = ExportSpec.make(cfg, **options)
    weights = CheckpointWeights(ck)
    try:
        weights.start_digest()
        weights.check_tied_head()
        log(f"checkpoint {ck.root}: {cfg.arch}, {cfg.n_params() / 1e6:.1f}M parameters, {len(ck.files)} weight "
            f"file(s), {weights.nbytes / 1e9:.2f} GB {ck.dtype}; read tensor by tensor (memory-mapped)")

        def source():
            return {"kind": "checkpoint", "path": str(ck.root.absolute()), "sha256": weights.digest(), "seed": None}

        return export_artifact(cfg, weights, out_dir, spec, tokenizer=ck.tokenizer_file, source=source,
                               force=force, log=log, progress=progress)
    finally:
        weights.close()


def export_artifact(cfg, weights: Mapping, out_dir, spec: ExportSpec, *, reference=None, tokenizer=None,
                    source=None, force: bool = False, log=None, release=None, progress: bool | None = None) -> Path:
    """Write the artifact for (cfg, weights) to `out_dir`: graph, tokenizer, manifest, validation.

    weights: canonical names (cfg.param_shapes()) -> arrays, read one at a time while writing;
    a mapping with `release()` (models/stream.py) has its pages released after each tensor.
    reference: start/step logits in fp32 (kvtrace.runtime.parity's protocol), run over the whole
    model in memory; None with spec.validate: the streamed validation (the layer-streamed
    reference over `weights`, every initializer checked as it is written; docs/validation.md).
    release(): called once the reference has run and the weights are written.
    tokenizer: None, a path to a tokenizer.json to copy, or "builtin-bytes".
    source: the manifest's "source" dict, or a function returning it (called after writing).
    progress: per-tensor progress on stderr (None: when stderr is a terminal).
    Only one export writes to `out_dir` at a time (a second fails naming the first's PID);
    leftovers of dead exports beside it are removed first. Raises KvtraceError (bad options,
    unwritable output) or ParityFailure (validation); in both cases, and when interrupted
    (KeyboardInterrupt, SIGTERM), nothing is left at `out_dir` or beside it.
    """
    log = log or _log
    out = Path(out_dir)
    tok_path = None
    if tokenizer not in (None, "builtin-bytes"):
        tok_path = Path(tokenizer)
        if not tok_path.is_file():
            raise KvtraceError(f"tokenizer file {tok_path} not found")
    if out.exists() or out.is_symlink():
        files.check_replaceable(out, force=force, is_ours=manifest_mod.not_an_artifact)
    streamed = spec.validate and reference is None

    made_parents = files.make_parents(out)
    try:
        lock = files.OutputLock(out).__enter__()
    except BaseException:
        files.remove_dirs(made_parents)
        raise
    tmp = None
    need = {}
    try:
        for msg in files.remove_stale(out):
            log(msg)
        if out.exists() or out.is_symlink():  # a restored directory is checked like any other
            files.check_replaceable(out, force=force, is_ours=manifest_mod.not_an_artifact)
        tmp, _ = files.staging_dir(out)
        check = None
        if streamed:
            from kvtrace.exporter.verify import InitializerCheck

            check = InitializerCheck(cfg, weights, spec.dtype, spec.max_seq)
        graph, inits, graph_info, written = _write_graph(cfg, weights, tmp, spec, log, need, check, progress)
        tok = _copy_tokenizer(tok_path, tokenizer, tmp)
        src = source() if callable(source) else source
        manifest = _manifest(cfg, spec, graph_info, written.external, tok, src)
        manifest["files"] = {**written.files, **manifest_mod.file_digests(
            tmp, [p.name for p in sorted(tmp.iterdir()) if p.name not in written.files])}
        write_manifest(tmp, manifest)
        if spec.validate:
            from kvtrace.exporter import validate

            vlog = lambda m: log("validate: " + m)  # noqa: E731
            if streamed:
                manifest["validation"] = validate.validate_streamed(
                    tmp, graph, inits, cfg, weights, spec=spec, written=written, check=check,
                    release=release, log=vlog)
            else:
                manifest["validation"] = validate.validate_artifact(
                    tmp, graph, inits, cfg, weights, reference, spec=spec, release=release, log=vlog)
            write_manifest(tmp, manifest)
        elif release is not None:
            release()
        del inits
        files.replace_dir(tmp, out, force=force, is_ours=manifest_mod.not_an_artifact)
    except BaseException as e:
        with _signals_ignored():  # a second Ctrl-C must not cut the cleanup short
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            lock.__exit__(None, None, None)  # its file lives in the parent: before removing that
            files.remove_dirs(made_parents)
        if isinstance(e, KeyboardInterrupt):  # SIGINT or SIGTERM (kvtrace/cli.py): say what was undone
            e.args = (f"removed the unfinished export; {out} was not written" if not out.exists()
                      else f"removed the unfinished export; {out} is unchanged",)
        elif isinstance(e, OSError):  # disk full, permissions, ...: name where it happened
            where = f"writing {e.filename}" if getattr(e, "filename", None) else "writing the artifact"
            needed = (f"; the artifact needs {need['bytes']} bytes ({need['bytes'] / 1e9:.2f} GB), "
                      f"{need['free']} were free when the export started") if need else ""
            raise KvtraceError(f"--out {out}: {where} failed ({e.strerror or e}){needed}; "
                               "nothing was left behind") from e
        raise
    finally:
        lock.__exit__(None, None, None)
    log(f"artifact ready: {out}")
    return out


@contextlib.contextmanager
def _signals_ignored():
    """SIGINT and SIGTERM ignored for the block (main thread only), then restored."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _write_graph(cfg, weights, tmp: Path, spec: ExportSpec, log, need: dict, check=None, progress=None):
    """Build the graph and stream the weights into tmp/model.onnx (+ .data): each tensor is
    checked (check), its source pages released (weights.release) and progress reported."""
    from kvtrace.exporter.progress import Progress

    t0 = time.perf_counter()
    graph, inits, graph_info = onnx_graph.build(cfg, weights, dtype=spec.dtype, layout=spec.layout,
                                                max_seq=spec.max_seq, opset=spec.opset, attend=spec.attend)
    n_bytes = sum(t.nbytes for t in inits)
    external = spec.external_data or n_bytes + (1 << 20) >= TWO_GB
    log(f"built graph: {len(graph.graph.node)} nodes, {len(inits)} weights, {n_bytes / 1e6:.1f} MB "
        f"({time.perf_counter() - t0:.2f}s)")
    size = (external_data_bytes(inits) if external else n_bytes) + graph.ByteSize() + (1 << 20)
    free = shutil.disk_usage(tmp).free
    need.update(bytes=size, free=free)
    if size > free:
        raise KvtraceError(f"--out {tmp.parent / tmp.name.split(files.STAGING_TAG)[0][1:]}: not enough disk space in "
                           f"{tmp.parent}: the artifact needs {size} bytes ({size / 1e9:.2f} GB), {free} are free; "
                           "nothing was written")
    release = getattr(weights, "release", None)
    bar = Progress(n_bytes, "writing", tty=progress)

    def on_tensor(t, path, offset):
        if check is not None:
            check(t, path, offset)
        if release is not None:
            release()
        bar.update(t.nbytes, t.name)

    t0 = time.perf_counter()
    from kvtrace.exporter.writer import Jobs

    try:  # the check, the page release and the digests run beside the writing, in order
        written = write_onnx(graph, inits, tmp / io_spec.ONNX_NAME, external=external, on_tensor=on_tensor,
                             jobs=Jobs(depth=4))
    finally:
        bar.close()
        if check is not None:
            check.close()
    dt = time.perf_counter() - t0
    log(f"wrote {io_spec.ONNX_NAME}{' + ' + DATA_NAME if external else ''}: {written.size / 1e6:.1f} MB "
        f"({dt:.2f}s, {written.size / 1e6 / max(dt, 1e-9):.0f} MB/s)"
        + (f"; every weight checked against its checkpoint tensor, byte-exact" if check is not None else ""))
    return graph, inits, graph_info, written


def _copy_tokenizer(tok_path: Path | None, tokenizer, tmp: Path) -> dict | None:
    if tok_path is not None:
        shutil.copyfile(tok_path, tmp / "tokenizer.json")
        return {"type": "file", "file": "tokenizer.json"}
    if tokenizer == "builtin-bytes":
        return {"type": "builtin-bytes"}
    return None


def _manifest(cfg, spec: ExportSpec, graph_info: dict, external: bool, tok, source) -> dict:
    from kvtrace import __version__

    return {
        "kvtrace_version": __version__,
        "architecture": cfg.arch,
        "config": cfg.to_dict(),
        "dtype": spec.dtype,
        "opset": spec.opset,
        "onnx": io_spec.ONNX_NAME,
        "external_data": DATA_NAME if external else None,
        "io": io_spec.build(n_layers=cfg.n_layers, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                            vocab_size=cfg.vocab_size, dtype=spec.dtype, layout=spec.layout, max_seq=spec.max_seq,
                            max_batch=spec.max_batch),
        "tokenizer": tok,
        "generation": {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
                       "pad_token_id": cfg.pad_token_id},
        "source": dict(source or {}),
        "graph": graph_info,
        "validation": None,
    }


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


# --------------------------------------------------------------------------------- CLI
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
    p.add_argument("--external-data", action="store_true",
                   help="store weights in model.onnx.data (always, above 2 GB)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading pytorch_model.bin (pickle can execute arbitrary code)")
    p.add_argument("--validation", choices=VALIDATIONS, default="auto",
                   help="--checkpoint exports: 'full' runs the whole exported graph against the reference; "
                        "'bounded' a truncated graph of the real weights plus a byte check of every weight, "
                        "never the whole model at once; 'auto' (default): full when the graph fits in half "
                        "the available memory (docs/validation.md)")
    p.add_argument("--no-validate", action="store_true", help="skip the onnxruntime check against the reference")
    p.add_argument("--force", action="store_true", help="replace an existing artifact directory")


def main(args) -> int:
    dtype = "float16" if args.fp16 else "bfloat16" if args.bf16 else "float32"
    layout = args.cache
    t0 = time.perf_counter()
    options = dict(dtype=dtype, layout=layout, max_seq=args.max_seq, max_batch=args.max_batch, opset=args.opset,
                   external_data=args.external_data, validate=not args.no_validate)
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
        if not ckpt.is_dir():
            raise KvtraceError(f"--checkpoint {ckpt}: not a directory (expected config.json + *.safetensors)")
        from kvtrace.models.checkpoint import open_checkpoint

        cfg = open_checkpoint(ckpt, allow_pickle=args.allow_pickle).config  # headers only; checked again below
        out = Path(args.out) if args.out else default_out(cfg.arch, dtype, layout)
        export_checkpoint(ckpt, out, allow_pickle=args.allow_pickle, arch=args.arch, force=args.force,
                          validation=args.validation, **options)
    else:
        if not args.arch:
            raise KvtraceError("--arch is required without --checkpoint (built-in models: "
                               f"{', '.join(configs.BUILTIN)})")
        from kvtrace.models.transformer import random_model

        cfg = configs.BUILTIN[args.arch]
        _log(f"building the built-in {args.arch} model (random weights, seed {configs.BUILTIN_SEED}) ...")
        source = {"kind": "builtin", "path": None, "sha256": None, "seed": configs.BUILTIN_SEED}
        spec = ExportSpec.make(cfg, **options)  # the options are checked: now spend the time on weights
        model = random_model(cfg, configs.BUILTIN_SEED)
        _log(f"model ready: {cfg.arch}, {cfg.n_params() / 1e6:.1f}M parameters ({time.perf_counter() - t0:.2f}s)")
        out = Path(args.out) if args.out else default_out(cfg.arch, dtype, layout)
        export_model(model, out, tokenizer="builtin-bytes", source=source, force=args.force, release_weights=True,
                     **dataclasses.asdict(spec))
    _log(f"done in {time.perf_counter() - t0:.1f}s (peak RSS {files.peak_rss_mb():.0f} MB)")
    print(out)
    return 0
