"""llama2.c checkpoints (legacy version-0 `.bin`) -> Hugging Face Llama checkpoint directories.

    kvtrace convert-llama2c model.bin --out DIR [--force]

The legacy format (see ../shared/fixtures/README.md): a header of 7 little-endian int32
(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len; a negative vocab_size
means the output head is stored separately), then float32 arrays in a fixed order. llama2.c
rotates interleaved pairs (i, i+1) of each head; Hugging Face Llama (and our model) rotates
halves (i, i + hd/2), so the rows of wq and wk are permuted per head on the way.

The output directory (config.json for LlamaForCausalLM, old form, + model.safetensors, and the
marker kvtrace-convert.json naming them) is written to a temporary directory beside it and
renamed into place when complete; --force replaces only a directory this command wrote.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import struct
from pathlib import Path

import numpy as np

from kvtrace import options
from kvtrace.errors import KvtraceError

HEADER = struct.Struct("<7i")
_V1_MAGIC = 0x616B3432  # "ak42": the newer llama2.c export versions, which this reader does not handle
_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len")


def read_header(path: Path) -> dict:
    """The 7 header fields, checked (a KvtraceError names the file and the field)."""
    path = Path(path)
    if not path.is_file():
        raise KvtraceError(f"{path}: llama2.c checkpoint not found")
    with open(path, "rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise KvtraceError(f"{path}: file is truncated ({len(raw)} bytes; the header alone is {HEADER.size})")
    if struct.unpack("<I", raw[:4])[0] == _V1_MAGIC:
        raise KvtraceError(f"{path}: this is a llama2.c version-1/2 export (magic 'ak42'); only the legacy "
                           "version-0 format is supported (export with --version 0)")
    h = dict(zip(_FIELDS, HEADER.unpack(raw)))
    h["shared_classifier"] = h["vocab_size"] > 0
    h["vocab_size"] = abs(h["vocab_size"])
    for k in _FIELDS:
        if not 0 < h[k] < 1 << 24:
            raise KvtraceError(f"{path}: header field {k} = {h[k]} is not a plausible size "
                               "(not a llama2.c legacy checkpoint?)")
    if h["dim"] % h["n_heads"] or h["n_heads"] % h["n_kv_heads"] or (h["dim"] // h["n_heads"]) % 2:
        raise KvtraceError(f"{path}: header dim={h['dim']}, n_heads={h['n_heads']}, n_kv_heads={h['n_kv_heads']} "
                           "do not describe whole, even-sized attention heads")
    return h


def _layout(h: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(array name, shape) in file order."""
    D, Fh, L, H, KV, V, S = (h[k] for k in _FIELDS)
    hd = D // H
    arrays = [("token_embedding", (V, D)), ("attention_norm", (L, D)), ("wq", (L, D, D)),
              ("wk", (L, KV * hd, D)), ("wv", (L, KV * hd, D)), ("wo", (L, D, D)), ("ffn_norm", (L, D)),
              ("w1", (L, Fh, D)), ("w2", (L, D, Fh)), ("w3", (L, Fh, D)), ("final_norm", (D,)),
              ("freq_cis_real", (S, hd // 2)), ("freq_cis_imag", (S, hd // 2))]
    if not h["shared_classifier"]:
        arrays.append(("wcls", (V, D)))
    return arrays


def read_llama2c(path) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json dict for LlamaForCausalLM, HF tensor name -> float32 array)."""
    path = Path(path)
    h = read_header(path)
    layout = _layout(h)
    n_floats = sum(int(np.prod(s)) for _, s in layout)
    want, size = HEADER.size + 4 * n_floats, path.stat().st_size
    if size < want:
        raise KvtraceError(f"{path}: file is truncated: {size} bytes, the header describes {want}")
    if size > want:
        raise KvtraceError(f"{path}: {size - want} unexpected bytes after the weights the header describes "
                           f"({want} bytes); not a llama2.c legacy version-0 checkpoint?")
    flat = np.fromfile(path, dtype="<f4", offset=HEADER.size)
    arrays, off = {}, 0
    for name, shape in layout:
        n = int(np.prod(shape))
        arrays[name] = flat[off:off + n].reshape(shape)
        off += n

    D, L, H, KV = h["dim"], h["n_layers"], h["n_heads"], h["n_kv_heads"]

    def to_rotate_half(w: np.ndarray, heads: int) -> np.ndarray:
        # rows of each head go from interleaved pairs (x0, x1), (x2, x3)... to halves (x0, x2, ..| x1, x3, ..)
        rows, cols = w.shape
        return w.reshape(heads, rows // heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)

    t = {"model.embed_tokens.weight": arrays["token_embedding"], "model.norm.weight": arrays["final_norm"]}
    for i in range(L):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = arrays["attention_norm"][i]
        t[p + "self_attn.q_proj.weight"] = to_rotate_half(arrays["wq"][i], H)
        t[p + "self_attn.k_proj.weight"] = to_rotate_half(arrays["wk"][i], KV)
        t[p + "self_attn.v_proj.weight"] = arrays["wv"][i]
        t[p + "self_attn.o_proj.weight"] = arrays["wo"][i]
        t[p + "post_attention_layernorm.weight"] = arrays["ffn_norm"][i]
        t[p + "mlp.gate_proj.weight"] = arrays["w1"][i]
        t[p + "mlp.down_proj.weight"] = arrays["w2"][i]
        t[p + "mlp.up_proj.weight"] = arrays["w3"][i]
    if not h["shared_classifier"]:
        t["lm_head.weight"] = arrays["wcls"]
    t = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in t.items()}

    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": D, "intermediate_size": h["hidden_dim"], "num_hidden_layers": L,
        "num_attention_heads": H, "num_key_value_heads": KV, "head_dim": D // H,
        "vocab_size": h["vocab_size"], "max_position_embeddings": h["max_seq_len"],
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,  # fixed in llama2.c
        "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": h["shared_classifier"],
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
    }
    return config, t


MARKER = "kvtrace-convert.json"  # marks a directory this converter wrote (see not_a_conversion)


def not_a_conversion(d: Path) -> str | None:
    """None when `d` is a checkpoint directory written by `kvtrace convert-llama2c`: it holds
    the marker file kvtrace-convert.json (written last, naming the files written with it) and
    nothing else than the files it names. Otherwise why not, for the message refusing --force:
    --force only ever replaces a directory this command wrote, never a user's directory or a
    checkpoint from elsewhere (a tokenizer.json added to a converted directory also stops it)."""
    d = Path(d)
    try:
        marker = json.loads((d / MARKER).read_text(encoding="utf-8"))
    except FileNotFoundError:
        entries = sorted(p.name for p in d.iterdir())[:3]
        return f"it has no {MARKER}, so `kvtrace convert-llama2c` did not write it" + \
            (f" (it holds {', '.join(entries)}...)" if entries else "")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"its {MARKER} is not readable"
    names = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(names, dict):
        return f"its {MARKER} is not a kvtrace marker"
    foreign = sorted(p.name for p in d.iterdir() if p.name != MARKER and p.name not in names)
    if foreign:
        return f"it holds files the converter did not write ({', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''})"
    return None


def convert(bin_path, out_dir, *, force: bool = False) -> Path:
    """Write the HF checkpoint for `bin_path` to `out_dir` atomically; returns out_dir.

    The directory is assembled beside `out_dir` (kvtrace.files.staging_dir) and renamed into place
    when complete, with kvtrace-convert.json (source, digests) written last. An existing `out_dir`
    is replaced only with force=True and only when this command wrote it (not_a_conversion); the
    input is never inside the output. On any failure nothing is left: not the temporary directory,
    not the parent directories this call created."""
    from safetensors.numpy import save_file

    from kvtrace import __version__, files
    from kvtrace.manifest import file_digests
    from kvtrace.options import check_apart

    bin_path, out = Path(bin_path), Path(out_dir)
    if out.name in ("", ".", ".."):
        out = Path(os.path.abspath(out))
    if bin_path.exists():
        check_apart(out, "--out", bin_path, "the llama2.c checkpoint")
    if out.exists() or out.is_symlink():
        files.check_replaceable(out, force=force, is_ours=not_a_conversion)
    config, tensors = read_llama2c(bin_path)  # all validation before anything is written
    for msg in files.remove_stale(out):  # what a killed conversion to the same --out left beside it
        print(f"kvtrace convert-llama2c: {msg.replace('an export', 'a run')}", file=sys.stderr)
    tmp, made_parents = files.staging_dir(out)
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        try:
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        except Exception as e:  # noqa: BLE001 - safetensors reports I/O errors (a full disk) as its own type
            if isinstance(e, (OSError, KvtraceError)):
                raise
            raise KvtraceError(f"--out {out}: writing model.safetensors failed ({e}); nothing was left behind") \
                from None
        marker = {"kvtrace_version": __version__, "written_by": "kvtrace convert-llama2c",
                  "source": str(bin_path.absolute()), "source_sha256": files.sha256_file(bin_path),
                  "files": file_digests(tmp, ["config.json", "model.safetensors"])}
        files.atomic_write_bytes(tmp / MARKER, (json.dumps(marker, indent=2) + "\n").encode())
        files.replace_dir(tmp, out, force=force, is_ours=not_a_conversion)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        files.remove_dirs(made_parents)
        if isinstance(e, OSError):  # disk full, read-only, ...: one line naming where
            raise KvtraceError(f"--out {out}: writing the checkpoint failed ({e.strerror or e}); "
                               "nothing was left behind") from None
        raise
    return out


def add_arguments(p) -> None:
    """The command's options (kvtrace/cli.py builds the parser)."""
    p.add_argument("bin", type=options.existing_path, help="llama2.c checkpoint (legacy version 0 format)")
    p.add_argument("--out", required=True, type=options.out_dir, help="output checkpoint directory")
    p.add_argument("--force", action="store_true",
                   help=f"replace --out if this command wrote it (it holds {MARKER} and only the files that names)")


def main(args) -> int:
    out = convert(args.bin, args.out, force=args.force)
    print(f"wrote {out} (config.json + model.safetensors, LlamaForCausalLM; {MARKER} marks it as ours)")
    return 0
