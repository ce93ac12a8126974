"""`kvtrace build`: a TensorRT engine from an artifact's TensorRT graph. No torch.

Works with the full TensorRT (module `tensorrt`, >= 10.15 for the fused layers, >= 10.0 for the
portable --opset 17 graphs) and with TensorRT-RTX (module `tensorrt_rtx`), whichever is
installed. TensorRT-RTX builds for named compute capabilities without a GPU
(`--compute-capability sm89`); the full TensorRT builds for the GPU it runs on.

The graph is the artifact's GPU form, model.gpu.onnx (manifest graphs.gpu; exporter/gpu_form.py),
parsed from the file as it is, exactly as `trtexec --onnx=...` would (`--print-trtexec` prints
that command). What the parser makes of it (measured with TensorRT-RTX 1.7, docs/tensorrt.md):
- `Attention` becomes IAttention (layer types ATTENTION_INPUT + ATTENTION_OUTPUT),
  `RotaryEmbedding` ROTARY_EMBEDDING, `TensorScatter` on a static cache input KV_CACHE_UPDATE
  (the output aliases the input: bind both to one buffer);
- fp32 attention has no dedicated kernel for prefill: the build fails unless the attention is
  marked decomposable, which is done here for fp32 networks (the layers stay fused in the network).
Artifacts exported before the GPU form existed are built from model.onnx, with the
`softmax_precision` attribute the parser rejects removed in memory.

Steps of `build_engine`: parse -> configure -> profiles -> build -> record. Profiles come from
the manifest's I/O spec: "decode" (one token per row) first, then "prefill" (1..max_seq tokens);
batch 1..max_batch; a static cache's length is fixed.

Engines built elsewhere (`trtexec`, the TensorRT API, Triton's model repository) are checked
and recorded by `kvtrace build ART --import ENGINE` (exporter/trt_interop.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

from kvtrace import files, options
from kvtrace.errors import KvtraceError
from kvtrace.manifest import load_manifest, verify_files, write_manifest
from kvtrace.runtime.trt_backend import (FLAVOURS, TrtLogger, gpu_compute_capability, import_tensorrt,
                                         min_tensorrt, normalize_cc)

ENGINE_NAME = "model.engine"
# the largest prefill length the "opt" point of the prefill profile is tuned for by default
DEFAULT_OPT_SEQ = 128


# ------------------------------------------------------------------ profiles
def plan_profiles(io: dict, *, max_batch: int | None = None, max_seq: int | None = None,
                  opt_batch: int | None = None, opt_seq: int | None = None) -> tuple[list[dict], dict]:
    """Optimization profiles [{"name", "inputs": {name: {"min", "opt", "max"}}}] from the I/O spec.

    Symbolic dims: batch, seq (new tokens), past_seq / total_seq (dynamic cache), n_logits (positions
    whose logits are returned); integers are fixed.
    Returns (profiles, limits) with limits = {"max_batch", "max_seq"}.
    """
    layout, cache_len = io["layout"], int(io["max_seq"])
    mb = int(max_batch if max_batch is not None else io["max_batch"])
    ms = int(max_seq if max_seq is not None else cache_len)
    if mb < 1:
        raise KvtraceError(f"--max-batch {mb}: must be at least 1")
    if ms < 1:
        raise KvtraceError(f"--max-seq {ms}: must be at least 1")
    if ms > cache_len:
        what = "static cache length" if layout == "static" else "longest sequence"
        raise KvtraceError(f"--max-seq {ms} exceeds the artifact's {what} {cache_len} (export with a larger "
                           f"--max-seq to go further)")
    ob = int(opt_batch if opt_batch is not None else 1)
    os_ = int(opt_seq if opt_seq is not None else min(DEFAULT_OPT_SEQ, ms))
    if not 1 <= ob <= mb:
        raise KvtraceError(f"--opt-batch {ob}: must be between 1 and the max batch {mb}")
    if not 1 <= os_ <= ms:
        raise KvtraceError(f"--opt-seq {os_}: must be between 1 and the max seq {ms}")

    def ranges(kind: str) -> dict[str, tuple[int, int, int]]:
        seq = (1, 1, 1) if kind == "decode" else (1, os_, ms)
        # dynamic cache: P cached tokens before this call, P + T <= ms
        past = (0, min(os_, ms - 1), ms - 1) if kind == "decode" else (0, 0, ms - 1)
        total = (1, past[1] + seq[1], ms)
        # logits_index: a decode step asks for 1 row; a prefill for 1 (generation: each row's
        # last token, the common case, hence opt 1) up to all T (scoring/parity)
        n_logits = (1, 1, 1) if kind == "decode" else (1, 1, ms)
        return {"batch": (1, ob, mb), "seq": seq, "past_seq": past, "total_seq": total, "n_logits": n_logits}

    profiles = []
    for kind in ("decode", "prefill"):
        dims = ranges(kind)
        inputs = {}
        for t in io["inputs"]:
            lo, opt, hi = [], [], []
            for d in t["shape"]:
                if isinstance(d, int):
                    lo.append(d), opt.append(d), hi.append(d)
                elif d in dims:
                    a, b, c = dims[d]
                    lo.append(a), opt.append(b), hi.append(c)
                else:
                    raise KvtraceError(f"manifest io: input {t['name']!r} has dimension {d!r}; "
                                       f"`kvtrace build` knows {', '.join(dims)}")
            inputs[t["name"]] = {"min": lo, "opt": opt, "max": hi}
        profiles.append({"name": kind, "inputs": inputs})
    if ms == 1:  # both profiles would be the same
        profiles = profiles[:1]
    return profiles, {"max_batch": mb, "max_seq": ms}


# ------------------------------------------------------------------ 1. parse
def tensorrt_graph(manifest) -> tuple[Path, bool]:
    """(the graph file TensorRT builds from, whether it is a pre-GPU-form model.onnx whose
    softmax_precision must be removed before parsing)."""
    from kvtrace.exporter.gpu_form import FORM

    entry = manifest.graph_form(FORM)
    if entry:
        return manifest.dir / entry["onnx"], False
    return manifest.onnx_path, manifest.data.get("opset", 24) >= 24 and manifest.dtype != "float32"


def parse_network(trt, builder, logger, onnx_file: Path, *, legacy: bool = False):
    """(strongly typed network, parser, [Attention nodes stripped]) from `onnx_file`, external
    data read beside it. `legacy`: an old model.onnx, parsed from memory without softmax_precision."""
    flag = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flag)
    parser = trt.OnnxParser(network, logger)
    stripped: list[str] = []
    if legacy:
        import onnx

        from kvtrace.exporter.gpu_form import drop_attention_attribute

        model = onnx.load(str(onnx_file), load_external_data=False)
        stripped = drop_attention_attribute(model, "softmax_precision")
        ok = parser.parse(model.SerializeToString(), str(onnx_file))
    else:
        ok = parser.parse_from_file(str(onnx_file))
    if not ok:
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors[-3:]
        raise KvtraceError(f"TensorRT cannot parse {onnx_file}: " + " | ".join(errs[:3]))
    return network, parser, stripped


def layer_counts(trt, network) -> dict[str, int]:
    """Layer type -> count; "ATTENTION" counts fused attentions (one ATTENTION_OUTPUT each)."""
    counts = Counter(network.get_layer(i).type.name for i in range(network.num_layers))
    out = dict(sorted(counts.items()))
    out["ATTENTION"] = counts.get("ATTENTION_OUTPUT", 0)
    return out


def weight_only_gemms(layers_text: str) -> dict[str, int]:
    """From the builder's engine layer list (logged at VERBOSE with DETAILED profiling verbosity):
    how the quantised matrices were built. "fused": kernels that run the GEMM on INT4/INT8 weights
    directly (a runtime fusion ending in "Fc" whose constants are INT4/INT8: weight-only GEMM);
    "dequantized": kernels that first expand INT4/INT8 constants to a float temporary (a
    CastMulCast kernel), after which a plain GEMM runs. Counted in the first profile only."""
    fused = dequantized = 0
    seen = set()
    for line in layers_text.splitlines():
        if not line.startswith("Name: "):
            continue
        name = line[6:line.find(",")]
        if "[profile" in name and "[profile 0]" not in name:
            continue
        consts = line.split("Constants:", 1)[1].split("Outputs:", 1)[0] if "Constants:" in line else ""
        if "Datatype: Int4" not in consts and "Datatype: Int8" not in consts:
            continue
        base = re.sub(r"_myl\d+_\d+$", "", name)  # __myl_ReplCastMulCastFc_myl4_2 -> __myl_ReplCastMulCastFc
        key = (base, line.split("Metadata:", 1)[-1])
        if key in seen:
            continue
        seen.add(key)
        if "Fc" in base:
            fused += 1
        elif "CastMulCast" in base:
            dequantized += 1
    return {"fused": fused, "dequantized": dequantized}


def _attention_layers(trt, network):
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.ATTENTION_OUTPUT:
            layer.__class__ = trt.IAttentionBoundaryLayer  # the typed view exposes .attention
            yield layer.attention


def mark_decomposable(trt, network, dtype: str) -> bool:
    """fp32: every IAttention may be decomposed (no fused fp32 prefill kernel; the build fails
    otherwise: "Attention operation was not supported by a dedicated kernel")."""
    if dtype != "float32":
        return False
    for attn in _attention_layers(trt, network):
        attn.decomposable = True
    return True


# ------------------------------------------------------------------ 2. configure
def check_targets(flavour: str, compute_capabilities) -> tuple[list[str], str | None]:
    """(compute capabilities to build for, the local GPU's or None), or a KvtraceError."""
    ccs = [normalize_cc(c) for c in (compute_capabilities or [])]
    built_on = gpu_compute_capability()
    if ccs and flavour == "tensorrt" and ccs != [built_on]:
        raise KvtraceError(f"--compute-capability {' '.join(ccs)} needs TensorRT-RTX (module tensorrt_rtx): the "
                           f"full TensorRT builds for the GPU it runs on ({built_on or 'none here'})")
    if not ccs and built_on is None:
        # TensorRT-RTX would still build, for a target nobody can name afterwards
        raise KvtraceError("this machine has no NVIDIA GPU: name the GPU(s) the engine is for with "
                           "--compute-capability (e.g. --compute-capability sm89 sm120; needs TensorRT-RTX)")
    return ccs, built_on


def configure(trt, builder, flavour: str, *, ccs, workspace_gb=None, optimization_level=None, timing_cache=None):
    """The builder config: targets, workspace, optimization level, timing cache, and DETAILED
    profiling verbosity (the engine keeps per-layer names for the inspector on the device, and the
    builder logs each layer's kernel at the end of the build: `--inspect` reports them)."""
    config = builder.create_builder_config()
    if ccs and flavour == "tensorrt_rtx":
        config.num_compute_capabilities = len(ccs)
        for i, cc in enumerate(ccs):
            config.set_compute_capability(getattr(trt.ComputeCapability, cc.upper()), i)
    if workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if optimization_level is not None:
        config.builder_optimization_level = int(optimization_level)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if timing_cache:
        try:
            blob = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
        except OSError as e:
            raise KvtraceError(f"--timing-cache {timing_cache}: cannot be read ({e.strerror or e})") from None
        cache = config.create_timing_cache(blob)
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            raise KvtraceError(f"--timing-cache {timing_cache}: TensorRT cannot use this timing cache")
    return config


# ------------------------------------------------------------------ 3. profiles
def add_profiles(builder, config, network, profiles: list[dict], onnx_file: Path) -> None:
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    for prof in profiles:
        if set(prof["inputs"]) != names:
            raise KvtraceError(f"{onnx_file}: graph inputs {sorted(names)} do not match the manifest's I/O spec "
                               f"{sorted(prof['inputs'])}")
        p = builder.create_optimization_profile()
        for name, r in prof["inputs"].items():
            p.set_shape(name, r["min"], r["opt"], r["max"])
        config.add_optimization_profile(p)


# ------------------------------------------------------------------ 4. build
def build_serialized(builder, network, config, logger, onnx_file: Path):
    """(serialized engine, seconds); KvtraceError with TensorRT's last errors if it fails."""
    t0 = time.perf_counter()
    try:
        blob = builder.build_serialized_network(network, config)
    except Exception as e:  # the Python binding raises on some internal errors
        logger.errors.append(str(e))
        blob = None
    seconds = time.perf_counter() - t0
    if blob is None:
        raise KvtraceError(f"TensorRT could not build an engine from {onnx_file}: " + " | ".join(logger.errors[-3:]))
    return blob, seconds


_KERNEL = re.compile(r"TacticName: ([^,]*)")
# the report lists the layers profile by profile; tensors of profile k >= 1 are tagged "[profile k]"
_PROFILE = re.compile(r"\[profile (\d+)\]")


def attention_kernels(layer_info: str | None, n_profiles: int) -> list[dict[str, int]] | None:
    """Per profile, the fused multi-head-attention kernels (name -> count, hash dropped) in the
    builder's per-layer report (DETAILED verbosity, logged at the end of a build); one per
    transformer layer means every attention ran as one kernel; none, that it was split into
    GEMMs and a softmax. None when the builder logged no report. TensorRT-RTX 1.7 names them
    `_gemv_mha_v1` (decode) and `_gemm_mha_v2` (prefill)."""
    if not layer_info:
        return None
    out = [Counter() for _ in range(max(n_profiles, 1))]
    idx = 0
    for line in layer_info.splitlines():
        if not line.startswith("Name: "):
            continue
        idx = max([idx] + [int(t) for t in _PROFILE.findall(line)])
        m = _KERNEL.search(line)
        if m and "_mha" in m.group(1) and idx < len(out):
            out[idx][m.group(1).rsplit("_0x", 1)[0]] += 1
    return [dict(c) for c in out]


# ------------------------------------------------------------------ 5. record
def record_engine(d: Path, data: dict, section: dict, blob, *, timing_cache=None, config=None) -> None:
    """The timing cache if asked (the user's file first: a failure there leaves the artifact as it
    was), then the engine and the manifest naming it, together (commit_engine)."""
    blob = memoryview(blob)
    if timing_cache:
        files.atomic_write_bytes(Path(timing_cache), config.get_timing_cache().serialize(), what="--timing-cache")
    data["tensorrt"] = section
    data["files"] = {**(data.get("files") or {}), section["engine"]: {"bytes": len(blob),
                                                                     "sha256": section["engine_sha256"]}}
    commit_engine(d, blob, data)


def build_engine(artifact_dir, *, max_batch=None, max_seq=None, opt_batch=None, opt_seq=None,
                 compute_capabilities=None, timing_cache=None, workspace_gb=None, optimization_level=None,
                 flavour=None, log_level="ERROR") -> dict:
    """Build and write the engine, update the manifest; returns the manifest's "tensorrt" entry
    plus "layers" and "engine_path"."""
    d = Path(artifact_dir)
    manifest = load_manifest(d)
    # the engine is made from these bytes: every recorded digest is checked (a truncated or
    # corrupted graph / weight file is refused before a long build); ~1 s per GB
    verify_files(manifest, full=True)
    data = dict(manifest.data)
    _check_writable(d, timing_cache)
    quant = data.get("quant")
    if quant and quant.get("ragged"):
        name, k = next(iter(quant["ragged"].items()))
        raise KvtraceError(f"{d}: TensorRT cannot build this quantised artifact: {name} has K={k}, not a multiple of "
                           f"its --group-size {quant['group_size']} (TensorRT's DequantizeLinear needs whole blocks); "
                           f"re-export with a --group-size that divides {k}, or run it with onnxruntime")
    trt, flv = import_tensorrt(flavour, min_tensorrt(data))
    profiles, limits = plan_profiles(data["io"], max_batch=max_batch, max_seq=max_seq, opt_batch=opt_batch,
                                     opt_seq=opt_seq)
    ccs, built_on = check_targets(flv, compute_capabilities)
    if optimization_level is not None and not 0 <= optimization_level <= 5:
        raise KvtraceError(f"--optimization-level {optimization_level}: expected 0..5")
    if workspace_gb is not None and workspace_gb <= 0:
        raise KvtraceError(f"--workspace {workspace_gb}: must be > 0 (GB)")

    logger = TrtLogger(trt, log_level)
    builder = trt.Builder(logger)
    onnx_file, legacy = tensorrt_graph(manifest)
    network, _parser, stripped = parse_network(trt, builder, logger, onnx_file, legacy=legacy)  # 1. parse
    layers = layer_counts(trt, network)
    decomposable = mark_decomposable(trt, network, data["dtype"])
    config = configure(trt, builder, flv, ccs=ccs, workspace_gb=workspace_gb,  # 2. configure
                       optimization_level=optimization_level, timing_cache=timing_cache)
    add_profiles(builder, config, network, profiles, onnx_file)  # 3. profiles
    blob, seconds = build_serialized(builder, network, config, logger, onnx_file)  # 4. build

    section = {  # 5. record
        "flavour": flv,
        "version": trt.__version__,
        "engine": ENGINE_NAME,
        "engine_sha256": hashlib.sha256(memoryview(blob)).hexdigest(),
        "onnx": onnx_file.name,
        "onnx_sha256": files.sha256_file(onnx_file),
        "compute_capabilities": ccs or ["current"],
        "built_on_cc": built_on,
        "profiles": profiles,
        "limits": limits,
        "attention_decomposable": decomposable,
        "stripped_attributes": {"softmax_precision": len(stripped)} if stripped else {},
        "optimization_level": optimization_level,
        "build_seconds": round(seconds, 3),
        "layers": layers,
        "attention_kernels": attention_kernels(logger.layer_info, len(profiles)),
    }
    if quant:  # the engine's layer list (logged by the builder) tells which GEMMs are weight-only
        section["quantized_gemms"] = weight_only_gemms(logger.layer_info or "")
    record_engine(d, data, section, blob, timing_cache=timing_cache, config=config)
    return {**section, "engine_path": str(d / ENGINE_NAME)}


def _check_writable(d: Path, timing_cache) -> None:
    """Before a build that may take minutes: the artifact directory is writable, and the
    --timing-cache path can be read (if it exists) and written."""
    if not os.access(d, os.W_OK | os.X_OK):
        raise KvtraceError(f"{d}: the artifact directory is not writable; the engine cannot be added")
    if timing_cache:
        tc = Path(timing_cache)
        if tc.is_dir():
            raise KvtraceError(f"--timing-cache {tc}: is a directory; name a file (e.g. {tc / 'timing.cache'})")
        if not tc.parent.is_dir():
            raise KvtraceError(f"--timing-cache {tc}: directory {tc.parent} does not exist")
        options.check_report_file("--timing-cache", tc, d)  # never over a file of the artifact
        if not os.access(tc.parent, os.W_OK | os.X_OK) or (tc.exists() and not os.access(tc, os.R_OK)):
            raise KvtraceError(f"--timing-cache {tc}: cannot be read or written there")


def commit_engine(d: Path, blob, data: dict) -> None:
    """Put the new engine and the manifest that describes it in place together, or neither.

    Both are written completely under temporary names first (fsynced); then the old engine is
    kept under a hard link, the new engine is renamed onto model.engine and the new manifest onto
    kvtrace.json. Any failure before the manifest's rename restores the old engine (or removes
    the new one), so the directory is as it was. The one window left is a kill between the two
    renames: the manifest's "files" digest of model.engine then no longer matches, and loading
    says so instead of running a stale description.
    """
    from kvtrace import io_spec
    from kvtrace.manifest import manifest_bytes

    engine, mpath = d / ENGINE_NAME, d / io_spec.MANIFEST_NAME
    staged: list[Path] = []
    backup = None
    swapped = False
    try:
        tmp_engine = files.stage_file(engine, blob)
        staged.append(tmp_engine)
        tmp_manifest = files.stage_file(mpath, manifest_bytes(data))
        staged.append(tmp_manifest)
        if engine.exists():
            backup = d / f".{ENGINE_NAME}.old-{os.getpid()}"
            backup.unlink(missing_ok=True)
            os.link(engine, backup)
        os.replace(tmp_engine, engine)
        swapped = True
        os.replace(tmp_manifest, mpath)
        swapped = False
    except BaseException as e:
        if swapped:  # the new engine is in place but the manifest is not: undo
            if backup is not None:
                os.replace(backup, engine)
                backup = None
            else:
                engine.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise KvtraceError(f"{d}: writing the engine failed ({e.strerror or e}); the artifact is unchanged") \
                from None
        raise
    finally:
        for t in staged:
            t.unlink(missing_ok=True)
        if backup is not None:
            backup.unlink(missing_ok=True)


def add_arguments(p) -> None:
    """The command's options (kvtrace/cli.py builds the parser; kvtrace/options.py checks values)."""
    p.add_argument("artifact", type=options.artifact_path)
    p.add_argument("--max-batch", type=options.integer(1))
    p.add_argument("--max-seq", type=options.integer(1))
    p.add_argument("--opt-batch", type=options.integer(1))
    p.add_argument("--opt-seq", type=options.integer(1))
    p.add_argument("--compute-capability", nargs="+", default=None,
                   help="target GPU(s), e.g. sm89 (needed to build on a machine without a GPU)")
    p.add_argument("--timing-cache", type=options.existing_path, help="timing cache file to read and update")
    p.add_argument("--workspace", type=options.number(0.0, 1 << 20, lo_open=True), help="builder workspace limit in GB")
    p.add_argument("--optimization-level", type=int, choices=range(6), metavar="0-5",
                   help="TensorRT builder optimization level (default: TensorRT's, 3); 0 builds fastest")
    p.add_argument("--flavour", choices=FLAVOURS,
                   help="TensorRT Python module to use (default: tensorrt if installed, else tensorrt_rtx)")
    p.add_argument("--verbose", action="store_true", help="print TensorRT's warnings")
    p.add_argument("--inspect", action="store_true",
                   help="list the network's layer types and counts, and the attention kernels per profile")
    p.add_argument("--json", action="store_true")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--print-trtexec", nargs="?", const="trtexec", choices=("trtexec", "tensorrt_rtx"), metavar="TOOL",
                   help="print the trtexec (or tensorrt_rtx) command line that builds this engine, profiles "
                        "included, and exit; builds nothing, needs no TensorRT")
    g.add_argument("--import", dest="import_engine", metavar="ENGINE",
                   help="check an engine built outside kvtrace (trtexec, the TensorRT API) against the artifact's "
                        "I/O contract and record it as the artifact's engine; the profile options say how it was "
                        "built (those of --print-trtexec)")


# options that only a build uses
_BUILD_ONLY = {"timing_cache": "--timing-cache", "workspace": "--workspace",
               "optimization_level": "--optimization-level", "inspect": "--inspect"}


def main(args) -> int:
    opts = dict(max_batch=args.max_batch, max_seq=args.max_seq, opt_batch=args.opt_batch, opt_seq=args.opt_seq)
    other = getattr(args, "print_trtexec", None) and "--print-trtexec" or \
        getattr(args, "import_engine", None) and "--import"
    if other:
        given = [flag for key, flag in _BUILD_ONLY.items() if getattr(args, key, None) not in (None, False)]
        if given:
            raise KvtraceError(f"{other} builds nothing: {', '.join(given)} only apply to a build")
    if getattr(args, "print_trtexec", None):
        from kvtrace.exporter.trt_interop import format_command, trtexec_command

        manifest = load_manifest(args.artifact)
        profiles, _ = plan_profiles(manifest.io, **opts)
        print(format_command(trtexec_command(manifest, profiles, tool=args.print_trtexec,
                                            compute_capabilities=args.compute_capability)))
        return 0
    if getattr(args, "import_engine", None):
        from kvtrace.exporter.trt_interop import import_engine

        res = import_engine(args.artifact, args.import_engine, compute_capabilities=args.compute_capability, **opts)
        imp = res["imported"]
        if args.json:
            print(json.dumps({"engine": res["engine_path"], "flavour": res["flavour"], "version": res["version"],
                              "checked": imp["checked"], "not_checked": imp["not_checked"]}))
            return 0
        print(f"kvtrace: imported {args.import_engine} as {res['engine_path']} ({res['flavour']} "
              f"{res['version'] or 'version not in the header'}); checked: {'; '.join(imp['checked'])}")
        if imp["not_checked"]:
            print(f"kvtrace build: note: not checked here: {imp['not_checked']}", file=sys.stderr)
        return 0
    res = build_engine(args.artifact, compute_capabilities=args.compute_capability,
                       timing_cache=args.timing_cache, workspace_gb=args.workspace,
                       optimization_level=getattr(args, "optimization_level", None),
                       flavour=getattr(args, "flavour", None),
                       log_level="WARNING" if getattr(args, "verbose", False) else "ERROR", **opts)
    layers = res["layers"]
    if not layers.get("ATTENTION") and layers.get("SOFTMAX"):
        print("kvtrace build: note: attention is a MatMul/Softmax chain in this graph (a portable --opset 17 "
              "export); --inspect shows whether TensorRT fused it into one kernel", file=sys.stderr)
    if args.json:
        print(json.dumps({"layers": layers, "engine": res["engine_path"], "build_seconds": res["build_seconds"],
                          "flavour": res["flavour"], "version": res["version"],
                          "compute_capabilities": res["compute_capabilities"],
                          "attention_kernels": res["attention_kernels"],
                          **({"quantized_gemms": res["quantized_gemms"]} if "quantized_gemms" in res else {})}))
        return 0
    print(f"kvtrace: built {res['engine_path']} with {res['flavour']} {res['version']} for "
          f"{', '.join(res['compute_capabilities'])} in {res['build_seconds']:.1f} s "
          f"(batch <= {res['limits']['max_batch']}, <= {res['limits']['max_seq']} tokens per call)")
    if "quantized_gemms" in res:
        qg = res["quantized_gemms"]
        print(f"  quantised matrices: {qg['fused']} weight-only GEMM(s) on INT4/INT8 weights, {qg['dequantized']} "
              "dequantised to a float temporary per call")
    if args.inspect:
        width = max(len(k) for k in layers)
        for name, n in layers.items():
            print(f"  {name:<{width}}  {n}")
        kernels = res["attention_kernels"]
        for prof, k in zip(res["profiles"], kernels or []):
            found = ", ".join(f"{n} x{c}" for n, c in sorted(k.items())) or "none (GEMMs and a separate softmax)"
            print(f"  attention kernels, {prof['name']} profile: {found}")
    return 0
