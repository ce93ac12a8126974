"""`kvtrace export`: a reference model -> an artifact directory (model.onnx, model.gpu.onnx,
model.onnx.data, kvtrace.json, tokenizer).

The ONNX graph is built directly from the ModelConfig (exporter/onnx_graph.py), or traced from
the reference with --via trace; weights are streamed into model.onnx.data one tensor at a time
(so a 650 MB model is never held twice in memory) and shared by the two graph forms
(exporter/gpu_form.py). A checkpoint is never loaded as a PyTorch model: its tensors come from
the memory-mapped shards (models/stream.py), are checked against the documented transform as
they are written (exporter/verify.py) and released. The artifact is assembled in a staging
directory next to --out (one export per --out at a time; what dead exports left there is
removed), validated (onnx.checker, shape inference, onnxruntime against the reference,
docs/validation.md) and only then renamed into place.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
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
# the writer lives in exporter/writer.py; these names are part of this module's interface
from kvtrace.exporter.writer import DATA_NAME, TWO_GB, Written, external_data_bytes, write_onnx  # noqa: F401
from kvtrace import io_spec
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
def default_out(arch: str, dtype: str, layout: str, quant: str | None = None) -> Path:
    return Path(f"kvtrace-{arch}-{quant + '-' if quant else ''}{SHORT_DTYPE[dtype]}-{layout}")


VALIDATIONS = ("auto", "full", "bounded")  # docs/validation.md
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
    validation: str = "auto"  # checkpoint exports: "full", "bounded" or "auto" (docs/validation.md)
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
             attend="used", via="build", validate=True, validation="auto", quant=None, group_size=None,
             quant_method=None, accuracy_level=None) -> "ExportSpec":
        if quant is None:
            for opt, v in (("--group-size", group_size), ("--quant-method", quant_method),
                           ("--accuracy-level", accuracy_level)):
                if v is not None:
                    raise KvtraceError(f"{opt} {v}: only with --quant int8|int4")
        if via not in VIAS:
            raise KvtraceError(f"--via {via!r}: expected one of {', '.join(VIAS)}")
        if via == "trace":
            from kvtrace.exporter import trace_export

            trace_export.check_options(opset=configs.DEFAULT_OPSET if opset is None else opset)
        spec = cls(dtype=dtype, layout=layout,
                   max_seq=configs.default_max_seq(cfg) if max_seq is None else max_seq,
                   max_batch=configs.DEFAULT_MAX_BATCH if max_batch is None else max_batch,
                   opset=configs.DEFAULT_OPSET if opset is None else opset, attend=attend, via=via,
                   validate=bool(validate), validation=validation)
        onnx_graph.check_options(cfg, dtype=spec.dtype, layout=spec.layout, max_seq=spec.max_seq, opset=spec.opset)
        if not isinstance(spec.max_batch, int) or spec.max_batch < 1:
            raise KvtraceError(f"--max-batch {spec.max_batch!r}: must be a positive integer")
        if spec.validation not in VALIDATIONS:
            raise KvtraceError(f"--validation {spec.validation!r}: expected one of {', '.join(VALIDATIONS)}")
        if quant is not None:
            from kvtrace.exporter.quantize import QuantSpec

            if via == "trace":
                raise KvtraceError("--quant with --via trace: quantised graphs are built, not traced; use --via build")
            q = QuantSpec.make(cfg, quant, group_size=group_size, method=quant_method, accuracy_level=accuracy_level,
                               dtype=spec.dtype, opset=spec.opset)
            spec = dataclasses.replace(spec, quant=q.scheme, group_size=q.group_size, quant_method=q.method,
                                       accuracy_level=q.accuracy_level)
        return spec

    def graph_options(self) -> dict:
        """onnx_graph.build's options for model.onnx; the GPU form derives its own from these
        (gpu_form.graph_options), so an option added here reaches both graphs."""
        return dict(dtype=self.dtype, layout=self.layout, max_seq=self.max_seq, opset=self.opset, attend=self.attend,
                    quant=self.quant_spec)


def export_model(model, out_dir, *, tokenizer=None, source: dict | None = None, force: bool = False,
                 release_weights: bool = False, log=None, where=None, eos_token_ids=None, **options) -> Path:
    """Export `model` (a kvtrace.models.transformer.Transformer) to the artifact directory
    `out_dir`; `options` are ExportSpec.make's (dtype, layout, max_seq, max_batch, opset, attend,
    via, validate). The model itself is the validation reference (in fp32).

    release_weights: free the model's parameters once they are written and the reference has
    run (the model is unusable afterwards), so onnxruntime's validation does not sit beside them.
    where(name): the checkpoint tensor a canonical weight came from, for messages (NaN/Inf).
    """
    spec = ExportSpec.make(model.cfg, **options)
    reference = accuracy_reference = None
    if spec.validate:
        from kvtrace.exporter.references import TorchReference, quantized_reference

        reference = TorchReference(model, {"kind": "export", "dtype": "float32"})
        if spec.quant is not None:  # judged against the same weights quantised; accuracy against the original
            reference, accuracy_reference = quantized_reference(reference, spec.quant_spec, spec.dtype), reference
    return export_artifact(model.cfg, TorchWeights(model), out_dir, spec, reference=reference, tokenizer=tokenizer,
                           source=source, force=force, log=log, where=where, eos_token_ids=eos_token_ids,
                           model=model if spec.via == "trace" else None,
                           release=(lambda: _release(model)) if release_weights else None,
                           accuracy_reference=accuracy_reference)


def export_checkpoint(checkpoint, out_dir, *, allow_pickle: bool = False, arch: str | None = None,
                      force: bool = False, log=None, progress: bool | None = None, no_tokenizer: bool = False,
                      **options) -> Path:
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

        return export_artifact(cfg, weights, out_dir, spec, tokenizer=None if no_tokenizer else _tokenizer_of(ck.root),
                               source=source, force=force, log=log, progress=progress, where=weights.where,
                               eos_token_ids=checkpoint_eos_ids(ck.root, cfg))
    finally:
        weights.close()


def _tokenizer_of(root: Path) -> Path | None:
    """The checkpoint's tokenizer.json to copy, or None when it has none. A tokenizer.json that is
    there but cannot be read as a file (a dangling symlink -- a copied Hugging Face cache snapshot
    --, a directory) is an error, not an artifact silently exported without its tokenizer."""
    tok = Path(root) / "tokenizer.json"
    if tok.is_file():
        return tok
    if tok.is_symlink() or tok.exists():
        what = "not a regular file" if tok.exists() else f"a symlink to {os.readlink(tok)}, which does not exist"
        raise KvtraceError(f"{tok}: {what}; fix or remove it, or export with --no-tokenizer")
    return None


def checkpoint_eos_ids(root: Path, cfg) -> list[int] | None:
    """Every end-of-sequence id the checkpoint declares, when it declares several: config.json's
    and generation_config.json's `eos_token_id` (an int or a list; Llama 3.x instruct models end a
    turn with <|eot_id|> 128009, listed after <|end_of_text|> 128001), in order, within the
    vocabulary. None when there is at most one (the manifest then keeps the config's single id)."""
    import json

    ids: list[int] = []
    for name in ("config.json", "generation_config.json"):
        try:
            v = json.loads((Path(root) / name).read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            continue  # config.json was read strictly already; generation_config.json is optional
        for t in v if isinstance(v, list) else [v]:
            if isinstance(t, int) and not isinstance(t, bool) and 0 <= t < cfg.vocab_size and t not in ids:
                ids.append(t)
    return ids if len(ids) > 1 else None


def export_artifact(cfg, weights: Mapping, out_dir, spec: ExportSpec, *, reference=None, tokenizer=None,
                    source=None, force: bool = False, log=None, release=None, model=None, where=None,
                    progress: bool | None = None, accuracy_reference=None, eos_token_ids=None) -> Path:
    """Write the artifact for (cfg, weights) to `out_dir`: graphs, tokenizer, manifest, validation.

    weights: canonical names (cfg.param_shapes()) -> arrays, read one at a time while writing;
    a mapping with `release()` (models/stream.py) has its pages released after each tensor.
    reference: start/step logits in fp32 (kvtrace.runtime.parity's protocol), run over the whole
    model in memory; None with spec.validate: the streamed validation (the layer-streamed
    reference over `weights`, every initializer checked as it is written; docs/validation.md).
    For a quantised export the reference holds the artifact's quantised weights
    (references.quantized_reference), and accuracy_reference (optional) the unquantised model,
    whose agreement with the artifact is reported (not judged) in the manifest.
    release(): called once the reference has run and the weights are written.
    tokenizer: None, a path to a tokenizer.json to copy (it must load and its ids fit the
    vocabulary), or "builtin-bytes".
    source: the manifest's "source" dict, or a function returning it (called after writing).
    model: the torch model to trace (spec.via == "trace" only).
    where(name): the checkpoint tensor a canonical weight came from, for messages. Every weight is
    checked for NaN/Inf when read for writing (exporter/checks.py `checked`); with validation and
    an in-memory reference, every written weight is also read back and compared with its source
    (checks.check_initializers; the streamed path checks each as it is written).
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
        from kvtrace.runtime.tokenizer import check_tokenizer_file

        check_tokenizer_file(tok_path, cfg.vocab_size)  # before any graph is built
    if spec.via == "trace" and model is None:
        raise KvtraceError("--via trace needs the reference model to trace")
    if out.exists() or out.is_symlink():
        files.check_replaceable(out, force=force, is_ours=manifest_mod.not_an_artifact)
    streamed = spec.validate and reference is None
    weights = checks.checked(weights, where, spec.dtype)  # NaN/Inf (or beyond the dtype) refused, naming the tensor

    made_parents = files.make_parents(out)
    try:
        lock = files.OutputLock(out).__enter__()
    except BaseException:
        files.remove_dirs(made_parents)
        raise
    tmp = streamed_ref = None
    need = {}
    try:
        for msg in files.remove_stale(out):
            log(msg)
        if out.exists() or out.is_symlink():  # a restored directory is checked like any other
            files.check_replaceable(out, force=force, is_ours=manifest_mod.not_an_artifact)
        tmp, _ = files.staging_dir(out)
        check = None
        if streamed and spec.quant is None:  # quantised bytes: read back below instead
            from kvtrace.exporter.verify import InitializerCheck

            check = InitializerCheck(cfg, weights, spec.dtype, spec.max_seq)
        if streamed:  # the reference reads the checkpoint alone: it runs while the weights are written
            from kvtrace.exporter import validate

            def before_writing(inits):
                nonlocal streamed_ref
                streamed_ref = validate.StreamedReference(cfg, weights, spec, sum(t.nbytes for t in inits))
                streamed_ref.start()
        graph, inits, graph_info, written = _write_graph(cfg, weights, tmp, spec, log, need, check, progress, model,
                                                         before_writing=before_writing if streamed else None)
        readback = checks.check_initializers(tmp / io_spec.ONNX_NAME, inits, lambda m: log("validate: " + m)) \
            if spec.validate and check is None else None
        built = gpu_form.from_traced(graph, inits, graph_info) if spec.via == "trace" else None
        gpu_info, gpu_sk = gpu_form.write(cfg, weights, tmp, built=built, **spec.graph_options())
        log(f"wrote {gpu_form.GPU_ONNX_NAME} (the TensorRT / onnxruntime-cuda form; weights shared)")
        tok = _copy_tokenizer(tok_path, tokenizer, tmp, log)
        src = source() if callable(source) else source
        manifest = _manifest(cfg, spec, graph_info, tok, src)
        if eos_token_ids:  # several stop ids (the runtime stops on any of them)
            manifest["generation"]["eos_token_id"] = [int(t) for t in eos_token_ids]
        manifest["graphs"] = {gpu_form.FORM: gpu_info}  # other graph forms beside model.onnx
        manifest["files"] = {**written.files, **manifest_mod.file_digests(
            tmp, [p.name for p in sorted(tmp.iterdir()) if p.name not in written.files])}
        write_manifest(tmp, manifest)
        if spec.validate:
            from kvtrace.exporter import validate

            vlog = lambda m: log("validate: " + m)  # noqa: E731
            if streamed:
                manifest["validation"] = validate.validate_streamed(
                    tmp, graph, inits, cfg, weights, spec=spec, written=written, check=check,
                    release=release, log=vlog, reference=streamed_ref)
                if readback is not None:
                    manifest["validation"]["written_weights"] = {**readback, "equal_to_source": True}
            else:
                manifest["validation"] = validate.validate_artifact(
                    tmp, graph, inits, cfg, weights, reference, spec=spec, release=release, model=model, log=vlog,
                    accuracy_reference=accuracy_reference)
                manifest["validation"]["written_weights"] = {**readback, "equal_to_source": True}
            manifest["validation"]["gpu"] = gpu_form.check(gpu_sk, tmp / gpu_form.GPU_ONNX_NAME, layout=spec.layout, cpu=graph,
                                                            traced=spec.via == "trace")
            log(f"validate: {gpu_form.GPU_ONNX_NAME}: {manifest['validation']['gpu']['method']}")
            write_manifest(tmp, manifest)
        elif release is not None:
            release()
        del inits, gpu_sk
        files.replace_dir(tmp, out, force=force, is_ours=manifest_mod.not_an_artifact)
    except BaseException as e:
        with _signals_ignored():  # a second Ctrl-C must not cut the cleanup short
            if streamed_ref is not None:
                streamed_ref.cancel()
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            else:  # interrupted inside staging_dir(): its directory exists, its name was not returned yet
                for d in files.own_staging_dirs(out):
                    shutil.rmtree(d, ignore_errors=True)
            lock.__exit__(None, None, None)  # its file lives in the parent: before removing that
            files.remove_dirs(made_parents)
        if isinstance(e, KeyboardInterrupt):  # SIGINT or SIGTERM (kvtrace/cli.py): say what was undone
            e.args = (f"removed the unfinished export; {out} was not written" if not out.exists()
                      else f"removed the unfinished export; {out} is unchanged",)
        elif isinstance(e, OSError):  # disk full, permissions, ...: name where it happened
            where_ = f"writing {e.filename}" if getattr(e, "filename", None) else "writing the artifact"
            needed = (f"; the artifact needs {need['bytes']} bytes ({need['bytes'] / 1e9:.2f} GB), "
                      f"{need['free']} were free when the export started") if need else ""
            raise KvtraceError(f"--out {out}: {where_} failed ({e.strerror or e}){needed}; "
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


def _write_graph(cfg, weights, tmp: Path, spec: ExportSpec, log, need: dict, check=None, progress=None, model=None,
                 before_writing=None):
    """Build (or trace) the graph and stream the weights into tmp/model.onnx.data, the graph to
    tmp/model.onnx: each tensor is checked (check), its source pages released (weights.release)
    and progress reported. before_writing(inits): called once the graph is built and the disk
    space checked, before the first byte is written.

    Weights are always external: the GPU form shares the file, and onnxruntime memory-maps
    external data (an embedded fp32 model peaked 150-300 MB higher at 160M parameters)."""
    from kvtrace.exporter.progress import Progress

    t0 = time.perf_counter()
    graph, inits, graph_info = make_graph(cfg, weights, spec, model, log=log)
    if spec.quant is not None:
        for name, k in spec.quant_spec.ragged(cfg).items():
            log(f"note: {name}: K={k} is not a multiple of --group-size {spec.group_size}, its last group is "
                f"{k % spec.group_size} wide; onnxruntime runs this, TensorRT does not (`kvtrace build` refuses it)")
    n_bytes = sum(t.nbytes for t in inits)
    external = True
    log(f"{'traced' if spec.via == 'trace' else 'built'} graph: {len(graph.graph.node)} nodes, {len(inits)} weights, {n_bytes / 1e6:.1f} MB "
        f"({time.perf_counter() - t0:.2f}s)")
    size = (external_data_bytes(inits) if external else n_bytes) + graph.ByteSize() + (1 << 20)
    free = shutil.disk_usage(tmp).free
    need.update(bytes=size, free=free)
    if size > free:
        raise KvtraceError(f"--out {tmp.parent / tmp.name.split(files.STAGING_TAG)[0][1:]}: not enough disk space in "
                           f"{tmp.parent}: the artifact needs {size} bytes ({size / 1e9:.2f} GB), {free} are free; "
                           "nothing was written")
    if before_writing is not None:
        before_writing(inits)
    release = getattr(weights, "release", None)
    mark = getattr(weights, "mark", None)
    marks: dict[str, int] = {}  # initializer -> the weights' mark right after its bytes were made
    to_write = inits
    if mark is not None:
        def marked(t):
            def made():
                arr = t.data()
                marks[t.name] = mark()
                return arr
            return dataclasses.replace(t, data=made)
        to_write = [marked(t) for t in inits]
    bar = Progress(n_bytes, "writing", tty=progress)

    def on_tensor(t, path, offset):  # in the writer's job thread, in order
        if check is not None:
            check(t, path, offset)
        if release is not None and t.name in marks:  # this tensor's pages and older ones, not the next ones
            release(marks.pop(t.name))
        elif release is not None:  # a mapping without marks
            release()
        bar.update(t.nbytes, t.name)

    t0 = time.perf_counter()
    from kvtrace.exporter.writer import Jobs

    try:  # the digests, then the check and the page release, beside the writing (in order, in one worker:
        # a tensor written straight from the mapped checkpoint is hashed from its pages, which must
        # not be released before; the check compares at ~7 GB/s, so one worker keeps up)
        written = write_onnx(graph, to_write, tmp / io_spec.ONNX_NAME, external=external, on_tensor=on_tensor,
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
    q = p.add_argument_group("weight-only quantisation (docs/quantization.md)")
    q.add_argument("--quant", choices=("int8", "int4"),
                   help="store the linear layers' weights as int8/int4 with group-wise scales (the embedding as "
                        "uint8); activations and the KV cache stay in the compute dtype")
    q.add_argument("--group-size", type=options.integer(1),
                   help="input channels sharing one scale: a power of two >= 16 (default 32 for int4, 128 for int8)")
    q.add_argument("--quant-method", choices=("rtn", "search"),
                   help="rounding: rtn (max|w| scale) or search (per-group scale search minimising the squared "
                        "error; default for int4)")
    q.add_argument("--accuracy-level", type=options.integer(1, 4),
                   help="onnxruntime MatMulNBits compute type recorded in the manifest: 4 int8 (default, fast), "
                        "1 fp32 (exact, slower)")
    p.add_argument("--validation", choices=VALIDATIONS, default="auto",
                   help="--checkpoint exports: 'full' runs the whole exported graph against the reference; "
                        "'bounded' a truncated graph of the real weights plus a byte check of every weight, "
                        "never the whole model at once; 'auto' (default): full when the graph fits in half "
                        "the available memory (docs/validation.md)")
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
    t0 = time.perf_counter()
    if args.validation != "auto":  # a mode that would not be used is a mistake, not a silent no-op
        why = ("with --no-validate nothing is validated" if args.no_validate else
               "it chooses how a --checkpoint export is validated; the built-in model is validated in full"
               if not args.checkpoint else
               "--via trace validates in full against the loaded model" if args.via == "trace" else None)
        if why:
            raise KvtraceError(f"--validation {args.validation}: {why}; drop --validation")
    if args.out and args.checkpoint:  # --force must never replace (or hold) the input
        options.check_apart(args.out, "--out", Path(args.checkpoint), "--checkpoint")
    if args.out and (args.out.exists() or args.out.is_symlink()):  # refuse before spending time on weights
        files.check_replaceable(args.out, force=args.force, is_ours=manifest_mod.not_an_artifact)
    opts = dict(dtype=dtype, layout=args.cache, max_seq=args.max_seq, max_batch=args.max_batch, opset=args.opset,
                via=args.via, validate=not args.no_validate, validation=args.validation, quant=args.quant,
                group_size=args.group_size, quant_method=args.quant_method, accuracy_level=args.accuracy_level)
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
        if not ckpt.is_dir():
            raise KvtraceError(f"--checkpoint {ckpt}: not a directory (expected config.json + *.safetensors)")
        from kvtrace.models.checkpoint import open_checkpoint

        cfg = open_checkpoint(ckpt, allow_pickle=args.allow_pickle).config  # headers only; checked again below
        if args.arch and args.arch != cfg.arch:
            raise KvtraceError(f"--arch {args.arch} disagrees with {ckpt / 'config.json'}, which describes a "
                               f"{cfg.arch} model; drop --arch or pass --arch {cfg.arch}")
        out = Path(args.out) if args.out else default_out(cfg.arch, dtype, args.cache, args.quant)
        options.check_apart(out, "--out", ckpt, "--checkpoint")
        if args.via == "trace":  # tracing needs the PyTorch model itself (small and mid-size models)
            out = _export_traced_checkpoint(ckpt, out, args, opts)
        else:  # streamed: the PyTorch model is never built
            export_checkpoint(ckpt, out, allow_pickle=args.allow_pickle, force=args.force,
                              no_tokenizer=args.no_tokenizer, **opts)
    else:
        if not args.arch:
            raise KvtraceError("--arch is required without --checkpoint (built-in models: "
                               f"{', '.join(configs.BUILTIN)})")
        from kvtrace.models.transformer import random_model

        cfg = configs.BUILTIN[args.arch]
        _log(f"building the built-in {args.arch} model (random weights, seed {configs.BUILTIN_SEED}) ...")
        spec = ExportSpec.make(cfg, **opts)  # the options are checked: now spend the time on weights
        model = random_model(cfg, configs.BUILTIN_SEED)
        _log(f"model ready: {cfg.arch}, {cfg.n_params() / 1e6:.1f}M parameters ({time.perf_counter() - t0:.2f}s)")
        out = Path(args.out) if args.out else default_out(cfg.arch, dtype, args.cache, args.quant)
        source = {"kind": "builtin", "path": None, "sha256": None, "seed": configs.BUILTIN_SEED}
        export_model(model, out, tokenizer=None if args.no_tokenizer else "builtin-bytes", source=source,
                     force=args.force, release_weights=True, **dataclasses.asdict(spec))
    _log(f"done in {time.perf_counter() - t0:.1f}s (peak RSS {files.peak_rss_mb():.0f} MB)")
    print(out)
    return 0


def _export_traced_checkpoint(ckpt: Path, out: Path, args, opts: dict) -> Path:
    """--via trace --checkpoint: the PyTorch model is loaded (strictly) and traced."""
    from kvtrace.models.checkpoint import load_checkpoint

    _log(f"loading {ckpt} (--via trace traces the PyTorch model) ...")
    loaded = load_checkpoint(ckpt, allow_pickle=args.allow_pickle)
    spec = ExportSpec.make(loaded.config, **opts)
    source = {"kind": "checkpoint", "path": str(ckpt.absolute()), "sha256": loaded.digest, "seed": None}
    tokenizer = None if args.no_tokenizer else _tokenizer_of(ckpt)
    where = _tensor_names(loaded, ckpt)
    spec_cfg = loaded.config
    model = loaded.model
    del loaded
    return export_model(model, out, tokenizer=tokenizer, source=source, force=args.force, release_weights=True,
                        where=where, eos_token_ids=checkpoint_eos_ids(ckpt, spec_cfg), **dataclasses.asdict(spec))
