"""`kvtrace export`: a reference model -> an artifact directory (model.onnx, model.gpu.onnx,
model.onnx.data, kvtrace.json, tokenizer).

The ONNX graph is built directly from the ModelConfig (exporter/onnx_graph.py), or traced from
the reference with --via trace; weights are streamed into model.onnx.data one tensor at a time
(so a 650 MB model is never held twice in memory) and shared by the two graph forms
(exporter/gpu_form.py), the artifact is assembled in a temporary
directory next to --out, validated (onnx.checker, shape inference, onnxruntime against the
reference model) and only then renamed into place.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvtrace import configs, files, options
from kvtrace import manifest as manifest_mod
from kvtrace.exporter import checks, gpu_form, onnx_graph
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


VIAS = ("build", "trace")  # build: exporter/onnx_graph.py from the config; trace: exporter/trace_export.py


@dataclass(frozen=True)
class ExportSpec:
    """What one export writes, with every default filled and every option checked once
    (the CLI and the Python API both go through `make`).

    Every artifact holds two forms of the graph built from the same options (graph_options()),
    sharing one weight file, model.onnx.data: model.onnx (onnxruntime on the CPU) and
    model.gpu.onnx (TensorRT and onnxruntime-cuda; exporter/gpu_form.py)."""
    dtype: str = "float32"
    layout: str = "static"
    max_seq: int = configs.DEFAULT_MAX_SEQ
    max_batch: int = configs.DEFAULT_MAX_BATCH
    opset: int = configs.DEFAULT_OPSET
    attend: str = "used"  # model.onnx, static cache: "used" (slots in use) or "full" (the GPU form's)
    via: str = "build"
    validate: bool = True

    @classmethod
    def make(cls, cfg, *, dtype="float32", layout="static", max_seq=None, max_batch=None, opset=None,
             attend="used", via="build", validate=True) -> "ExportSpec":
        if via not in VIAS:
            raise KvtraceError(f"--via {via!r}: expected one of {', '.join(VIAS)}")
        if via == "trace":
            from kvtrace.exporter import trace_export

            trace_export.check_options(opset=configs.DEFAULT_OPSET if opset is None else opset)
        spec = cls(dtype=dtype, layout=layout,
                   max_seq=configs.default_max_seq(cfg) if max_seq is None else max_seq,
                   max_batch=configs.DEFAULT_MAX_BATCH if max_batch is None else max_batch,
                   opset=configs.DEFAULT_OPSET if opset is None else opset, attend=attend, via=via,
                   validate=bool(validate))
        onnx_graph.check_options(cfg, dtype=spec.dtype, layout=spec.layout, max_seq=spec.max_seq, opset=spec.opset)
        if not isinstance(spec.max_batch, int) or spec.max_batch < 1:
            raise KvtraceError(f"--max-batch {spec.max_batch!r}: must be a positive integer")
        return spec

    def graph_options(self) -> dict:
        """onnx_graph.build's options for model.onnx; the GPU form derives its own from these
        (gpu_form.graph_options), so an option added here reaches both graphs."""
        return dict(dtype=self.dtype, layout=self.layout, max_seq=self.max_seq, opset=self.opset, attend=self.attend)


def export_model(model, out_dir, *, tokenizer=None, source: dict | None = None, force: bool = False,
                 release_weights: bool = False, log=None, where=None, **options) -> Path:
    """Export `model` (a kvtrace.models.transformer.Transformer) to the artifact directory
    `out_dir`; `options` are ExportSpec.make's (dtype, layout, max_seq, max_batch, opset, attend,
    via, validate). The model itself is the validation reference (in fp32).

    release_weights: free the model's parameters once they are written and the reference has
    run (the model is unusable afterwards), so onnxruntime's validation does not sit beside them.
    where(name): the checkpoint tensor a canonical weight came from, for messages (NaN/Inf).
    """
    spec = ExportSpec.make(model.cfg, **options)
    reference = None
    if spec.validate:
        from kvtrace.exporter.references import TorchReference

        reference = TorchReference(model, {"kind": "export", "dtype": "float32"})
    return export_artifact(model.cfg, TorchWeights(model), out_dir, spec, reference=reference, tokenizer=tokenizer,
                           source=source, force=force, log=log, where=where,
                           model=model if spec.via == "trace" else None,
                           release=(lambda: _release(model)) if release_weights else None)


def export_artifact(cfg, weights: Mapping, out_dir, spec: ExportSpec, *, reference=None, tokenizer=None,
                    source: dict | None = None, force: bool = False, log=None, release=None, model=None,
                    where=None) -> Path:
    """Write the artifact for (cfg, weights) to `out_dir`: graph, tokenizer, manifest, validation.

    weights: canonical names (cfg.param_shapes()) -> arrays, read one at a time while writing.
    reference: start/step logits in fp32 (kvtrace.runtime.parity's protocol), required when
    spec.validate. release(): called once the reference has run and the weights are written.
    tokenizer: None, a path to a tokenizer.json to copy (it must load and its ids fit the
    vocabulary), or "builtin-bytes".
    Every weight is checked for NaN/Inf when first read (exporter/checks.py `checked`; where(name)
    names its checkpoint tensor), and with validation every written weight is read back and
    compared with its source (checks.check_initializers).
    model: the torch model to trace (spec.via == "trace" only).
    Raises KvtraceError (bad options, unwritable output) or ParityFailure (validation); in both
    cases nothing is left at `out_dir` or beside it.
    """
    log = log or _log
    out = Path(out_dir)
    tok_path = None
    if tokenizer not in (None, "builtin-bytes"):
        tok_path = Path(tokenizer)
        if not tok_path.is_file():
            raise KvtraceError(f"tokenizer file {tok_path} not found")
        from kvtrace.runtime.tokenizer import check_tokenizer_file

        check_tokenizer_file(tok_path, cfg.vocab_size)  # before any graph is built
    if spec.validate and reference is None:
        raise KvtraceError("export validation needs a reference model")
    if spec.via == "trace" and model is None:
        raise KvtraceError("--via trace needs the reference model to trace")
    if out.exists() or out.is_symlink():
        files.check_replaceable(out, force=force, is_ours=manifest_mod.not_an_artifact)

    weights = checks.checked(weights, where, spec.dtype)  # NaN/Inf (or beyond the dtype) refused, naming the tensor
    tmp, made_parents = files.staging_dir(out)
    try:
        graph, inits, graph_info = _write_graph(cfg, weights, tmp, spec, log, model)
        readback = checks.check_initializers(tmp / io_spec.ONNX_NAME, inits, lambda m: log("validate: " + m)) \
            if spec.validate else None
        built = gpu_form.from_traced(graph, inits, graph_info) if spec.via == "trace" else None
        gpu_info, gpu_sk = gpu_form.write(cfg, weights, tmp, built=built, **spec.graph_options())
        log(f"wrote {gpu_form.GPU_ONNX_NAME} (the TensorRT / onnxruntime-cuda form; weights shared)")
        tok = _copy_tokenizer(tok_path, tokenizer, tmp, log)
        manifest = _manifest(cfg, spec, graph_info, tok, source)
        manifest["graphs"] = {gpu_form.FORM: gpu_info}  # other graph forms beside model.onnx
        manifest["files"] = manifest_mod.file_digests(tmp, [p.name for p in sorted(tmp.iterdir())])
        write_manifest(tmp, manifest)
        if spec.validate:
            from kvtrace.exporter import validate

            manifest["validation"] = validate.validate_artifact(
                tmp, graph, inits, cfg, weights, reference, spec=spec, release=release, model=model,
                log=lambda m: log("validate: " + m))
            manifest["validation"]["written_weights"] = {**readback, "equal_to_source": True}
            manifest["validation"]["gpu"] = gpu_form.check(gpu_sk, tmp / gpu_form.GPU_ONNX_NAME, layout=spec.layout,
                                                            traced=spec.via == "trace")
            log(f"validate: {gpu_form.GPU_ONNX_NAME}: {manifest['validation']['gpu']['method']}")
            write_manifest(tmp, manifest)
        elif release is not None:
            release()
        del inits, gpu_sk
        files.replace_dir(tmp, out, force=force, is_ours=manifest_mod.not_an_artifact)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        files.remove_dirs(made_parents)
        if isinstance(e, OSError):  # disk full, permissions, ...: name where it happened
            raise KvtraceError(f"--out {out}: writing the artifact failed ({e.strerror or e}); "
                               "nothing was left behind") from e
        raise
    log(f"artifact ready: {out}")
    return out


def make_graph(cfg, weights, spec: ExportSpec, model=None, *, dtype: str | None = None, log=lambda m: None):
    """-> (ModelProto without weights, [onnx_graph.Initializer], graph description), built from
    the config (spec.via "build") or traced from `model` ("trace"); `dtype` overrides spec.dtype
    (the bf16 validation twin is the same graph in fp32)."""
    dtype = dtype or spec.dtype
    if spec.via == "trace":
        from kvtrace.exporter import trace_export

        return trace_export.trace(model, dtype=dtype, layout=spec.layout, max_seq=spec.max_seq, opset=spec.opset,
                                  log=log)
    return onnx_graph.build(cfg, weights, **{**spec.graph_options(), "dtype": dtype})


def _write_graph(cfg, weights, tmp: Path, spec: ExportSpec, log, model=None):
    """Build (or trace) the graph and stream the weights into tmp/model.onnx.data, the graph to
    tmp/model.onnx.

    Weights are always external: the GPU form shares the file, and onnxruntime memory-maps
    external data (an embedded fp32 model peaked 150-300 MB higher at 160M parameters)."""
    t0 = time.perf_counter()
    graph, inits, graph_info = make_graph(cfg, weights, spec, model, log=log)
    n_bytes = sum(t.nbytes for t in inits)
    log(f"{'traced' if spec.via == 'trace' else 'built'} graph: {len(graph.graph.node)} nodes, {len(inits)} "
        f"weights, {n_bytes / 1e6:.1f} MB ({time.perf_counter() - t0:.2f}s)")
    t0 = time.perf_counter()
    size = write_onnx(graph, inits, tmp / io_spec.ONNX_NAME, external=True)
    log(f"wrote {io_spec.ONNX_NAME} + {DATA_NAME}: {size / 1e6:.1f} MB ({time.perf_counter() - t0:.2f}s)")
    return graph, inits, graph_info


def _copy_tokenizer(tok_path: Path | None, tokenizer, tmp: Path, log) -> dict | None:
    if tok_path is not None:
        shutil.copyfile(tok_path, tmp / "tokenizer.json")
        return {"type": "file", "file": "tokenizer.json", **_copy_chat_template(tok_path.parent, tmp, log)}
    if tokenizer == "builtin-bytes":
        return {"type": "builtin-bytes"}
    return None


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


def _manifest(cfg, spec: ExportSpec, graph_info: dict, tok, source) -> dict:
    from kvtrace import __version__

    return {
        "kvtrace_version": __version__,
        "architecture": cfg.arch,
        "config": cfg.to_dict(),
        "dtype": spec.dtype,
        "opset": spec.opset,
        "onnx": io_spec.ONNX_NAME,
        "external_data": DATA_NAME,
        "io": io_spec.build(n_layers=cfg.n_layers, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                            vocab_size=cfg.vocab_size, dtype=spec.dtype, layout=spec.layout, max_seq=spec.max_seq,
                            max_batch=spec.max_batch),
        "tokenizer": tok,
        "generation": {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
                       "pad_token_id": cfg.pad_token_id},
        "source": dict(source or {}),
        "via": spec.via,
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
    """The command's options (kvtrace/cli.py builds the parser; kvtrace/options.py checks values)."""
    p.add_argument("--arch", choices=ARCHITECTURES,
                   help="architecture; read from config.json when --checkpoint is given")
    p.add_argument("--checkpoint", type=options.existing_path,
                   help="Hugging Face checkpoint directory (config.json + *.safetensors)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fp16", action="store_true", help="store weights and compute in float16")
    g.add_argument("--bf16", action="store_true", help="store weights and compute in bfloat16")
    p.add_argument("--cache", choices=io_spec.LAYOUTS, default="static", help="KV cache layout")
    p.add_argument("--max-seq", type=options.integer(1),
                   help="static cache length / longest sequence (default min(2048, model max))")
    p.add_argument("--max-batch", type=options.integer(1, 1 << 16),
                   help="largest batch the artifact is profiled for (default 8)")
    p.add_argument("--opset", type=options.integer(1, 1000), default=None,
                   help="ONNX opset: 24 (fused, default) or 17 (portable)")
    p.add_argument("--via", choices=VIAS, default="build",
                   help="build: the graph built from the config (default; fast, low memory); trace: traced "
                        "from the reference PyTorch model by torch.onnx (opset 24 only; needs kvtrace[trace])")
    p.add_argument("--out", type=options.artifact_out, help="artifact directory (default ./kvtrace-ARCH-DTYPE-CACHE)")
    # weights are always in model.onnx.data now (shared by model.onnx and model.gpu.onnx); the
    # options that chose it, and the GPU form, are still accepted so that older scripts keep working
    p.add_argument("--external-data", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading pytorch_model.bin (pickle can execute arbitrary code)")
    p.add_argument("--no-validate", action="store_true", help="skip the onnxruntime check against the reference")
    p.add_argument("--target", choices=("cpu", "gpu"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-tokenizer", action="store_true",
                   help="do not copy the checkpoint's tokenizer.json (the artifact then takes token ids only)")
    p.add_argument("--force", action="store_true",
                   help="replace --out if it is an artifact kvtrace wrote (never any other directory)")


def _tensor_names(loaded, ckpt: Path):
    """where(canonical name) -> the checkpoint tensor it came from, for messages."""
    from kvtrace.models.hf import adapter_for, weight_table

    hf_of = {}
    try:
        for hf, canon in weight_table(adapter_for(loaded.hf_config), loaded.config).items():
            for c in canon:
                hf_of[c] = hf
    except KvtraceError:
        pass
    return lambda n: (f"checkpoint {ckpt}: tensor '{hf_of[n]}' (parameter {n})" if n in hf_of
                      else f"checkpoint {ckpt}: parameter {n}")


def main(args) -> int:
    dtype = "float16" if args.fp16 else "bfloat16" if args.bf16 else "float32"
    layout = args.cache
    t0 = time.perf_counter()
    if args.out and args.checkpoint:  # --force must never replace (or hold) the input
        options.check_apart(args.out, "--out", Path(args.checkpoint), "--checkpoint")
    if args.out and (args.out.exists() or args.out.is_symlink()):  # refuse before spending time on weights
        files.check_replaceable(args.out, force=args.force, is_ours=manifest_mod.not_an_artifact)
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
        tokenizer = None if args.no_tokenizer else loaded.tokenizer_file
        where = _tensor_names(loaded, ckpt)
        source = {"kind": "checkpoint", "path": str(ckpt.absolute()), "sha256": loaded.digest, "seed": None}
        del loaded
    else:
        if not args.arch:
            raise KvtraceError("--arch is required without --checkpoint (built-in models: "
                               f"{', '.join(configs.BUILTIN)})")
        from kvtrace.models.transformer import random_model

        cfg = configs.BUILTIN[args.arch]
        _log(f"building the built-in {args.arch} model (random weights, seed {configs.BUILTIN_SEED}) ...")
        model = None
        where = None
        tokenizer = None if args.no_tokenizer else "builtin-bytes"
        source = {"kind": "builtin", "path": None, "sha256": None, "seed": configs.BUILTIN_SEED}
    spec = ExportSpec.make(cfg, dtype=dtype, layout=layout, max_seq=args.max_seq, max_batch=args.max_batch,
                           opset=args.opset, via=args.via, validate=not args.no_validate)
    if model is None:  # the options are checked: now spend the time on weights
        model = random_model(cfg, configs.BUILTIN_SEED)
    _log(f"model ready: {cfg.arch}, {cfg.n_params() / 1e6:.1f}M parameters ({time.perf_counter() - t0:.2f}s)")
    out = Path(args.out) if args.out else default_out(cfg.arch, dtype, layout)
    if args.checkpoint:
        options.check_apart(out, "--out", Path(args.checkpoint), "--checkpoint")
    export_model(model, out, tokenizer=tokenizer, source=source, force=args.force, release_weights=True,
                 where=where, **dataclasses.asdict(spec))
    _log(f"done in {time.perf_counter() - t0:.1f}s (peak RSS {files.peak_rss_mb():.0f} MB)")
    print(out)
    return 0
