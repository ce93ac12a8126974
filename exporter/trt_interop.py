"""TensorRT engines made outside kvtrace: the `trtexec` command line for an artifact
(`kvtrace build ART --print-trtexec`) and the import of an engine built elsewhere
(`kvtrace build ART --import ENGINE`). No torch, no onnx: both run on the deployment machine
(a Jetson, a Triton host) with the runtime install.

The graph is the artifact's TensorRT graph (model.gpu.onnx), parsed as it is; the profiles are
the ones `kvtrace build` uses (exporter/trt.py:plan_profiles), so an engine built with the
printed command passes the import's checks. What the import can check depends on the machine
(runtime/trt_engine.py): without a GPU, the engine file's header and the I/O tensor names; with
a GPU and the TensorRT that built it, every binding, the profiles and the in-place cache pairs.
What was checked is recorded in the manifest ("tensorrt"."imported"); whatever was not is
checked by the tensorrt backend when it loads the engine, before any run.
"""
from __future__ import annotations

import hashlib
import shlex
from pathlib import Path

from kvtrace import files
from kvtrace.errors import KvtraceError
from kvtrace.manifest import load_manifest, write_manifest
from kvtrace.runtime import trt_engine
from kvtrace.runtime.trt_backend import gpu_compute_capability, import_tensorrt, min_tensorrt, normalize_cc

TOOLS = ("trtexec", "tensorrt_rtx")  # the full TensorRT's tool, TensorRT-RTX's


def _shape(dims) -> str:
    return "x".join(str(int(d)) for d in dims)


def trtexec_command(manifest, profiles: list[dict], *, tool: str = "trtexec", compute_capabilities=None,
                    engine: str | None = None) -> list[str]:
    """The argv of `trtexec` (or TensorRT-RTX's `tensorrt_rtx`) building the engine that
    `kvtrace build` would, from the artifact's TensorRT graph, with the same profiles:
    --profile=N --minShapes/--optShapes/--maxShapes per profile (name:AxBxC,...), a strongly typed
    network, fp32 fused attention marked decomposable (--decomposableAttentions, TensorRT >= 10.15),
    no inference run after the build (random token ids would index outside the vocabulary)."""
    from kvtrace.exporter.trt import ENGINE_NAME, tensorrt_graph

    if tool not in TOOLS:
        raise KvtraceError(f"--print-trtexec {tool!r}: expected one of {', '.join(TOOLS)}")
    onnx_file, legacy = tensorrt_graph(manifest)
    if legacy:
        raise KvtraceError(f"{manifest.dir}: exported before artifacts carried a TensorRT graph (model.gpu.onnx); "
                           "its model.onnx has softmax_precision, which the TensorRT parser rejects: export it again")
    argv = [tool, f"--onnx={onnx_file}"]
    for i, prof in enumerate(profiles):
        argv.append(f"--profile={i}")
        for key, opt in (("min", "--minShapes"), ("opt", "--optShapes"), ("max", "--maxShapes")):
            argv.append(f"{opt}=" + ",".join(f"{name}:{_shape(r[key])}" for name, r in prof["inputs"].items()))
    if tool == "tensorrt_rtx":
        ccs = [normalize_cc(c) for c in (compute_capabilities or [])]
        if ccs:
            argv.append("--computeCapabilities=" + ",".join(c[2:] for c in ccs))
    else:
        argv.append("--stronglyTyped")
    fused = (manifest.graph_form("gpu") or manifest.data.get("graph") or {}).get("attention") == "fused"
    if fused and manifest.dtype == "float32":
        argv.append("--decomposableAttentions=*")
    argv += [f"--saveEngine={engine or manifest.dir / ENGINE_NAME}", "--skipInference"]
    return argv


def format_command(argv: list[str]) -> str:
    """One option per line, shell-quoted (the attention wildcard included)."""
    return " \\\n  ".join(shlex.quote(a) for a in argv)


# ------------------------------------------------------------------ import
def _gpu_check(blob: bytes, engine_file: Path, flavour: str, manifest, io: dict):
    """(trt module, problems, the engine's profiles) after deserializing on this machine's GPU, or
    (None, reason, None) when it cannot be done here."""
    if gpu_compute_capability() is None:
        return None, "no NVIDIA GPU on this machine", None
    try:
        trt, _ = import_tensorrt(flavour, min_tensorrt(manifest))
    except KvtraceError as e:
        return None, f"{flavour} is not usable here ({e})", None
    from kvtrace.runtime.trt_backend import TrtLogger

    logger = TrtLogger(trt, "INTERNAL_ERROR")
    runtime = trt.Runtime(logger)
    try:
        engine = runtime.deserialize_cuda_engine(blob)
    except Exception as e:  # noqa: BLE001 - bindings raise on some versions
        logger.errors.append(str(e))
        engine = None
    if engine is None:
        raise KvtraceError(f"--import {engine_file}: {flavour} {trt.__version__} cannot load this engine on this GPU "
                           f"({' | '.join(logger.errors[-2:]) or 'no reason given'}); an engine runs only with the "
                           "TensorRT version and on the GPU model that built it")
    problems, engine_profiles = trt_engine.check_bindings(trt, engine, io, None)
    return trt, problems, engine_profiles


def import_engine(artifact_dir, engine, *, max_batch=None, max_seq=None, opt_batch=None, opt_seq=None,
                  compute_capabilities=None) -> dict:
    """Check `engine` (a file built outside kvtrace) against the artifact and record it in the
    manifest as its TensorRT engine (copied to ARTIFACT/model.engine). Returns the manifest's
    "tensorrt" entry plus "engine_path". A mismatch raises KvtraceError naming it; the artifact
    is then left as it was.

    The profile options describe how the engine was built (the `--print-trtexec` command with the
    same options). With a GPU the engine's own profiles are read and recorded instead."""
    from kvtrace.exporter.trt import ENGINE_NAME, commit_engine, plan_profiles

    d = Path(artifact_dir)
    manifest = load_manifest(d)
    data = dict(manifest.data)
    io = data["io"]
    src = Path(engine)
    try:  # the magic first: a wrong file (a device, a FIFO, a 13 GB weight file) is refused unread
        if src.exists() and not src.is_file():
            raise KvtraceError(f"--import {src}: not a regular file; name the engine file")
        with open(src, "rb") as f:
            head = f.read(4)
            if head not in trt_engine.MAGIC:
                try:
                    trt_engine.read_header(head, f"--import {src}")
                except ValueError as e:
                    raise KvtraceError(str(e)) from None
            blob = head + f.read()
    except OSError as e:
        raise KvtraceError(f"--import {src}: cannot read the engine ({e.strerror or e})") from None
    try:
        header = trt_engine.read_header(blob, f"--import {src}")
    except ValueError as e:
        raise KvtraceError(str(e)) from None
    checked = [f"header ({', '.join(header['checked'])})"]
    names = [t["name"] for t in io["inputs"] + io["outputs"]]
    missing = trt_engine.missing_names(blob, names)
    if missing:
        graph = (manifest.graph_form("gpu") or {}).get("onnx", manifest.data["onnx"])
        raise KvtraceError(f"--import {src}: the engine does not have the artifact's tensor(s) "
                           f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} (built from another graph? "
                           f"build it from {graph} with the command of `kvtrace build {d} --print-trtexec`)")
    checked.append(f"the {len(names)} I/O tensor names occur in the engine")
    profiles, limits = plan_profiles(io, max_batch=max_batch, max_seq=max_seq, opt_batch=opt_batch, opt_seq=opt_seq)
    ccs = [normalize_cc(c) for c in (compute_capabilities or [])]

    trt, problems, engine_profiles = _gpu_check(blob, src, header["flavour"], data, io)
    version = header["version"]
    if trt is None:  # nothing deserialized: problems holds the reason
        unchecked = (f"bindings (directions, dtypes, dimensions), optimization profiles and in-place cache pairs: "
                     f"{problems}; the tensorrt backend checks them when it loads the engine")
        profile_source = "as documented for these options (--print-trtexec); not read from the engine"
    else:
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise KvtraceError(f"--import {src}: the engine does not match the artifact's I/O contract: "
                               f"{problems[0]}{more}")
        checked.append("bindings, optimization profiles and in-place cache pairs (deserialized on "
                       f"{gpu_compute_capability()})")
        unchecked = None
        profiles = engine_profiles
        limits = _limits(engine_profiles)
        version = trt.__version__
        profile_source = "read from the engine"
        ccs = ccs or [gpu_compute_capability()]

    engine_path = d / ENGINE_NAME
    section = {
        "flavour": header["flavour"],
        "version": version,
        "engine": ENGINE_NAME,
        "engine_sha256": hashlib.sha256(blob).hexdigest(),
        "onnx": None,
        "onnx_sha256": None,
        "compute_capabilities": ccs,  # [] = not known: TensorRT itself refuses another GPU model
        "built_on_cc": None,
        "profiles": profiles,
        "limits": limits,
        "attention_decomposable": None,
        "stripped_attributes": {},
        "optimization_level": None,
        "build_seconds": None,
        "layers": None,
        "imported": {"from": str(src), "checked": checked, "not_checked": unchecked, "profiles": profile_source},
    }
    data["tensorrt"] = section
    # the manifest's file record follows the engine (a stale size/sha256 of an earlier engine made
    # the artifact unloadable: "model.engine: N bytes, but manifest key 'files.model.engine.bytes' ...")
    data["files"] = {**(data.get("files") or {}), ENGINE_NAME: {"bytes": len(blob),
                                                                "sha256": section["engine_sha256"]}}
    if src.resolve() != engine_path.resolve():
        commit_engine(d, blob, data)  # the engine and the manifest naming it together, or neither
    else:
        write_manifest(d, data)
    return {**section, "engine_path": str(engine_path)}


def _limits(profiles: list[dict]) -> dict:
    """{"max_batch", "max_seq"} of an engine's profiles (the largest batch and token count)."""
    from kvtrace import io_spec

    ids = [p["inputs"][io_spec.INPUT_IDS]["max"] for p in profiles if io_spec.INPUT_IDS in p["inputs"]]
    return {"max_batch": max(i[0] for i in ids), "max_seq": max(i[1] for i in ids)} if ids else {}
