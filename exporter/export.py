"""`kvtrace export`: a reference model -> an artifact directory (model.onnx + kvtrace.json).

The ONNX graph is built directly from the ModelConfig (exporter/onnx_graph.py); weights are
streamed into the file one tensor at a time (protobuf wire format written by hand, so a
650 MB model is never held twice in memory), the artifact is assembled in a temporary
directory next to --out, validated (onnx.checker, shape inference, onnxruntime against the
reference model) and only then renamed into place.
"""
from __future__ import annotations

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
from kvtrace.exporter import gpu_form, onnx_graph
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
def default_out(arch: str, dtype: str, layout: str, quant: str | None = None) -> Path:
    return Path(f"kvtrace-{arch}-{quant + '-' if quant else ''}{SHORT_DTYPE[dtype]}-{layout}")


TARGETS = ("cpu", "gpu")


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
    target: str = "cpu"  # "gpu": also model.gpu.onnx (exporter/gpu_form.py), sharing the weight file
    external_data: bool = False
    validate: bool = True
    # weight-only quantisation (exporter/quantize.py): "int8" | "int4" | None, with its group size,
    # rounding method and onnxruntime accuracy level (defaults filled in by make())
    quant: str | None = None
    group_size: int | None = None
    quant_method: str | None = None
    accuracy_level: int | None = None

    @property
    def quant_spec(self):
        """The checked quantisation scheme (exporter/quantize.py QuantSpec), or None."""
        if self.quant is None:
            return None
        from kvtrace.exporter.quantize import QuantSpec

        return QuantSpec(self.quant, self.group_size, self.quant_method, self.accuracy_level)

    @classmethod
    def make(cls, cfg, *, dtype="float32", layout="static", max_seq=None, max_batch=None, opset=None,
             attend="used", target="cpu", external_data=False, validate=True, quant=None, group_size=None,
             quant_method=None, accuracy_level=None) -> "ExportSpec":
        if quant is None:
            for opt, v in (("--group-size", group_size), ("--quant-method", quant_method),
                           ("--accuracy-level", accuracy_level)):
                if v is not None:
                    raise KvtraceError(f"{opt} {v}: only with --quant int8|int4")
        if target not in TARGETS:
            raise KvtraceError(f"--target {target!r}: expected one of {', '.join(TARGETS)}")
        if target == "gpu" and layout != "static":
            raise KvtraceError("--target gpu needs --cache static (the GPU form attends over the whole static cache)")
        spec = cls(dtype=dtype, layout=layout,
                   max_seq=configs.default_max_seq(cfg) if max_seq is None else max_seq,
                   max_batch=configs.DEFAULT_MAX_BATCH if max_batch is None else max_batch,
                   opset=configs.DEFAULT_OPSET if opset is None else opset, attend=attend, target=target,
                   # the GPU form shares the weight file: a second graph costs kilobytes, not a second copy
                   external_data=bool(external_data) or target == "gpu", validate=bool(validate))
        onnx_graph.check_options(cfg, dtype=spec.dtype, layout=spec.layout, max_seq=spec.max_seq, opset=spec.opset)
        if not isinstance(spec.max_batch, int) or spec.max_batch < 1:
            raise KvtraceError(f"--max-batch {spec.max_batch!r}: must be a positive integer")
        if quant is not None:
            from kvtrace.exporter.quantize import QuantSpec

            q = QuantSpec.make(cfg, quant, group_size=group_size, method=quant_method, accuracy_level=accuracy_level,
                               dtype=spec.dtype, opset=spec.opset)
            spec = dataclasses.replace(spec, quant=q.scheme, group_size=q.group_size, quant_method=q.method,
                                       accuracy_level=q.accuracy_level)
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
    reference = accuracy_reference = None
    if spec.validate:
        from kvtrace.exporter.references import TorchReference, quantized_reference

        reference = TorchReference(model, {"kind": "export", "dtype": "float32"})
        if spec.quant is not None:  # judged against the same weights quantised; accuracy against the original
            reference, accuracy_reference = quantized_reference(reference, spec.quant_spec, spec.dtype), reference
    return export_artifact(model.cfg, TorchWeights(model), out_dir, spec, reference=reference, tokenizer=tokenizer,
                           source=source, force=force, log=log,
                           release=(lambda: _release(model)) if release_weights else None,
                           accuracy_reference=accuracy_reference)


def export_artifact(cfg, weights: Mapping, out_dir, spec: ExportSpec, *, reference=None, tokenizer=None,
                    source: dict | None = None, force: bool = False, log=None, release=None,
                    accuracy_reference=None) -> Path:
    """Write the artifact for (cfg, weights) to `out_dir`: graph, tokenizer, manifest, validation.

    weights: canonical names (cfg.param_shapes()) -> arrays, read one at a time while writing.
    reference: start/step logits in fp32 (kvtrace.runtime.parity's protocol), required when
    spec.validate; for a quantised export, the model with the artifact's quantised weights
    (references.quantized_reference), and accuracy_reference (optional) the unquantised model,
    whose agreement with the artifact is reported (not judged) in the manifest.
    release(): called once the reference has run and the weights are written.
    tokenizer: None, a path to a tokenizer.json to copy, or "builtin-bytes".
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
    if spec.validate and reference is None:
        raise KvtraceError("export validation needs a reference model")
    if out.exists() or out.is_symlink():
        files.check_replaceable(out, force=force, is_ours=manifest_mod.not_an_artifact)

    tmp, made_parents = files.staging_dir(out)
    try:
        graph, inits, graph_info, external = _write_graph(cfg, weights, tmp, spec, log)
        gpu_sk = None
        if spec.target == "gpu":
            gpu_info, gpu_sk = gpu_form.write(cfg, weights, tmp, dtype=spec.dtype, max_seq=spec.max_seq,
                                              opset=spec.opset, quant=spec.quant_spec)
            log(f"wrote {gpu_form.GPU_ONNX_NAME} (attention over the whole cache, weights shared)")
        tok = _copy_tokenizer(tok_path, tokenizer, tmp)
        manifest = _manifest(cfg, spec, graph_info, external, tok, source)
        if gpu_sk is not None:
            manifest["graphs"] = {gpu_form.FORM: gpu_info}  # other graph forms beside model.onnx
        manifest["files"] = manifest_mod.file_digests(tmp, [p.name for p in sorted(tmp.iterdir())])
        write_manifest(tmp, manifest)
        if spec.validate:
            from kvtrace.exporter import validate

            manifest["validation"] = validate.validate_artifact(
                tmp, graph, inits, cfg, weights, reference, spec=spec, release=release,
                log=lambda m: log("validate: " + m), accuracy_reference=accuracy_reference)
            if gpu_sk is not None:
                manifest["validation"]["gpu"] = gpu_form.check(gpu_sk, tmp / gpu_form.GPU_ONNX_NAME)
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


def _write_graph(cfg, weights, tmp: Path, spec: ExportSpec, log):
    """Build the graph and stream the weights into tmp/model.onnx (+ .data)."""
    t0 = time.perf_counter()
    graph, inits, graph_info = onnx_graph.build(cfg, weights, dtype=spec.dtype, layout=spec.layout,
                                                max_seq=spec.max_seq, opset=spec.opset, attend=spec.attend,
                                                quant=spec.quant_spec)
    if spec.quant is not None:
        for name, k in spec.quant_spec.ragged(cfg).items():
            log(f"note: {name}: K={k} is not a multiple of --group-size {spec.group_size}, its last group is "
                f"{k % spec.group_size} wide; onnxruntime runs this, TensorRT does not (`kvtrace build` refuses it)")
    n_bytes = sum(t.nbytes for t in inits)
    external = spec.external_data or n_bytes + (1 << 20) >= TWO_GB
    log(f"built graph: {len(graph.graph.node)} nodes, {len(inits)} weights, {n_bytes / 1e6:.1f} MB "
        f"({time.perf_counter() - t0:.2f}s)")
    t0 = time.perf_counter()
    size = write_onnx(graph, inits, tmp / io_spec.ONNX_NAME, external=external)
    log(f"wrote {io_spec.ONNX_NAME}{' + ' + DATA_NAME if external else ''}: {size / 1e6:.1f} MB "
        f"({time.perf_counter() - t0:.2f}s)")
    return graph, inits, graph_info, external


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
        **({"quant": spec.quant_spec.manifest(cfg)} if spec.quant is not None else {}),
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
    p.add_argument("--external-data", action="store_true", help="store weights in model.onnx.data")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading pytorch_model.bin (pickle can execute arbitrary code)")
    p.add_argument("--no-validate", action="store_true", help="skip the onnxruntime check against the reference")
    q = p.add_argument_group("weight-only quantisation (docs/quantization.md)")
    q.add_argument("--quant", choices=("int8", "int4"),
                   help="store the linear layers' weights as int8/int4 with group-wise scales (the embedding as "
                        "uint8); activations and the KV cache stay in the compute dtype")
    q.add_argument("--group-size", type=int,
                   help="input channels sharing one scale: a power of two >= 16 (default 32 for int4, 128 for int8)")
    q.add_argument("--quant-method", choices=("rtn", "search"),
                   help="rounding: rtn (max|w| scale) or search (per-group scale search minimising the squared "
                        "error; default for int4)")
    q.add_argument("--accuracy-level", type=int,
                   help="onnxruntime MatMulNBits compute type recorded in the manifest: 4 int8 (default, fast), "
                        "1 fp32 (exact, slower)")
    p.add_argument("--target", choices=TARGETS, default="cpu",
                   help="gpu: also write model.gpu.onnx, the form with value-independent shapes that "
                        "onnxruntime-cuda and TensorRT use (CUDA graphs); implies --external-data")
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
        model = None
        tokenizer = "builtin-bytes"
        source = {"kind": "builtin", "path": None, "sha256": None, "seed": configs.BUILTIN_SEED}
    spec = ExportSpec.make(cfg, dtype=dtype, layout=layout, max_seq=args.max_seq, max_batch=args.max_batch,
                           opset=args.opset, target=args.target, external_data=args.external_data,
                           validate=not args.no_validate, quant=getattr(args, "quant", None),
                           group_size=getattr(args, "group_size", None),
                           quant_method=getattr(args, "quant_method", None),
                           accuracy_level=getattr(args, "accuracy_level", None))
    if model is None:  # the options are checked: now spend the time on weights
        model = random_model(cfg, configs.BUILTIN_SEED)
    _log(f"model ready: {cfg.arch}, {cfg.n_params() / 1e6:.1f}M parameters ({time.perf_counter() - t0:.2f}s)")
    out = Path(args.out) if args.out else default_out(cfg.arch, dtype, layout, spec.quant)
    export_model(model, out, tokenizer=tokenizer, source=source, force=args.force, release_weights=True,
                 **dataclasses.asdict(spec))
    _log(f"done in {time.perf_counter() - t0:.1f}s (peak RSS {files.peak_rss_mb():.0f} MB)")
    print(out)
    return 0
