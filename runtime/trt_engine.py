"""What kvtrace checks of a TensorRT engine against an artifact's I/O contract. No torch, no numpy.

Two levels, because deserializing an engine needs a GPU (TensorRT-RTX 1.7 without one:
"IRuntime::deserializeCudaEngine: Error Code 1: Cuda Runtime (... cudaError 35: CUDA driver
version is insufficient for CUDA runtime version)"; docs/tensorrt.md):

* from the file alone (`read_header`, `missing_names`): the 4-byte magic ("ftrt" TensorRT,
  "vtrt" TensorRT-RTX); for TensorRT-RTX plans the size recorded at offset 16 (u64, = the file
  size) and the library version at bytes 24..26 (major, minor, patch); and whether every I/O
  tensor name of the contract occurs in the plan (the names are stored as plain strings).
  This layout is observed (TensorRT-RTX 1.7), not documented: a sanity check, not an interface.
* on a deserialized engine (`check_bindings`): every I/O tensor's name, direction, dtype and
  dimensions, the optimization profiles' min/opt/max of every input, and the in-place cache
  pairs (`get_aliased_input_tensor`), against the manifest's I/O spec and profiles.

`kvtrace build --import` (exporter/trt.py) runs what the machine allows; the tensorrt backend
(runtime/trt_backend.py) runs `check_bindings` on every engine it loads, before any run.
"""
from __future__ import annotations

import struct

MAGIC = {b"ftrt": "tensorrt", b"vtrt": "tensorrt_rtx"}
RTX_HEADER_SIZE = 64  # tensorrt_rtx.Runtime.engine_header_size (1.7)


def read_header(blob: bytes, where: str) -> dict:
    """{"flavour", "version" (TensorRT-RTX: "M.m.p" from the header; TensorRT: None), "checked"}
    of an engine file's bytes; ValueError naming `where` when they are not an engine."""
    head = bytes(blob[:4])
    flavour = MAGIC.get(head)
    if flavour is None:
        what = "an ONNX model" if head[:1] == b"\x08" else f"it starts with {head!r}"
        raise ValueError(f"{where}: not a TensorRT engine ({what}; TensorRT engines start with 'ftrt', "
                         f"TensorRT-RTX engines with 'vtrt')")
    out = {"flavour": flavour, "version": None, "checked": ["magic"]}
    if flavour == "tensorrt_rtx":
        if len(blob) < RTX_HEADER_SIZE:
            raise ValueError(f"{where}: truncated TensorRT-RTX engine ({len(blob)} bytes, shorter than its "
                             f"{RTX_HEADER_SIZE}-byte header)")
        (size,) = struct.unpack_from("<Q", blob, 16)
        if size != len(blob):
            raise ValueError(f"{where}: the engine header records {size} bytes but the file has {len(blob)} "
                             f"(truncated or damaged; copy or build it again)")
        out["version"] = ".".join(str(b) for b in bytes(blob[24:27]))
        out["checked"] += ["size", "version"]
    return out


def missing_names(blob: bytes, names) -> list[str]:
    """The names in `names` that do not occur in the engine's bytes."""
    data = bytes(blob)
    return [n for n in names if n.encode() not in data]


def dtype_name(trt, dt) -> str | None:
    """TensorRT DataType -> the I/O contract's dtype name (None for types the contract lacks)."""
    table = {trt.DataType.FLOAT: "float32", trt.DataType.HALF: "float16", trt.DataType.BF16: "bfloat16",
             trt.DataType.INT64: "int64", trt.DataType.INT32: "int32", trt.DataType.BOOL: "bool"}
    return table.get(dt)


def _dims_ok(got: list[int], want: list) -> bool:
    """Engine dims against a contract shape: an integer must be equal; a symbolic dim may be
    dynamic (-1) or fixed by the engine's build (a static-shape engine: its profiles say)."""
    return len(got) == len(want) and all(g == w for g, w in zip(got, want) if isinstance(w, int))


def check_bindings(trt, engine, io: dict, profiles: list[dict] | None) -> tuple[list[str], list[dict]]:
    """Compare a deserialized engine with the I/O contract `io` (the manifest's) and, if given,
    the optimization `profiles` the manifest records ([{"name", "inputs": {name: {min,opt,max}}}]).

    Returns (problems, the engine's own profiles in the manifest's form); problems are short
    phrases naming the tensor ([] when everything matches)."""
    problems: list[str] = []
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    want = {t["name"]: ("input", t) for t in io["inputs"]}
    want.update({t["name"]: ("output", t) for t in io["outputs"]})
    missing = [n for n in want if n not in names]
    extra = [n for n in names if n not in want]
    if missing:
        problems.append(f"tensor(s) {', '.join(missing)} missing from the engine")
    if extra:
        problems.append(f"the engine has tensor(s) {', '.join(extra)} that the I/O contract lacks")
    for name in names:
        if name not in want:
            continue
        mode, t = want[name]
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        if is_input != (mode == "input"):
            problems.append(f"{name} is an {'input' if is_input else 'output'} of the engine, "
                            f"an {mode} of the contract")
            continue
        dt = dtype_name(trt, engine.get_tensor_dtype(name))
        if dt != t["dtype"]:
            problems.append(f"{name} is {dt or engine.get_tensor_dtype(name)} in the engine, "
                            f"{t['dtype']} in the contract")
        dims = list(engine.get_tensor_shape(name))
        # an output's engine-level shape follows profile 0 (the decode profile fixes n_logits to 1):
        # only its rank and fixed dims are checked
        shape = t["shape"] if is_input else [d if isinstance(d, int) else "any" for d in t["shape"]]
        if not _dims_ok(dims, shape):
            problems.append(f"{name} has dims {dims} in the engine, {t['shape']} in the contract")
    n_prof = engine.num_optimization_profiles
    got_profiles = []
    for p in range(n_prof):
        inputs = {}
        for t in io["inputs"]:
            if t["name"] in names:
                lo, opt, hi = (list(s) for s in engine.get_tensor_profile_shape(t["name"], p))
                inputs[t["name"]] = {"min": lo, "opt": opt, "max": hi}
        seq = inputs.get("input_ids", {}).get("max", [0, 0])
        kind = "decode" if len(seq) == 2 and seq[1] == 1 else "prefill"
        got_profiles.append({"name": kind, "inputs": inputs})
    if profiles is not None:
        if n_prof != len(profiles):
            problems.append(f"the engine has {n_prof} optimization profile(s), the manifest records {len(profiles)}")
        else:
            for p, (got, rec) in enumerate(zip(got_profiles, profiles)):
                for name, r in rec["inputs"].items():
                    g = got["inputs"].get(name)
                    if g is not None and g != r:
                        problems.append(f"profile {p} ({rec.get('name', p)}) of {name}: engine min/opt/max "
                                        f"{g['min']}/{g['opt']}/{g['max']}, manifest {r['min']}/{r['opt']}/{r['max']}")
                        break
    aliases = io.get("cache_aliases") or {}
    if aliases and hasattr(engine, "get_aliased_input_tensor"):
        for out, src in aliases.items():
            if out in names and src in names:
                got = engine.get_aliased_input_tensor(out)
                if got != src:
                    problems.append(f"{out} should update {src} in place (KV_CACHE_UPDATE), the engine "
                                    f"{'aliases it to ' + repr(got) if got else 'does not alias it'}")
    return problems, got_profiles
