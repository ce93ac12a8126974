"""llama2.c checkpoints (legacy version-0 `.bin`) -> Hugging Face Llama checkpoint directories.

    kvtrace convert-llama2c model.bin --out DIR [--force]

The legacy format (see ../shared/fixtures/README.md): a header of 7 little-endian int32
(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len; a negative vocab_size
means the output head is stored separately), then float32 arrays in a fixed order. llama2.c
rotates interleaved pairs (i, i+1) of each head; Hugging Face Llama (and our model) rotates
halves (i, i + hd/2), so the rows of wq and wk are permuted per head on the way.

The output directory (config.json for LlamaForCausalLM, old form, + model.safetensors) is
written to a temporary directory beside it and renamed into place when complete.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

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


def convert(bin_path, out_dir, *, force: bool = False) -> Path:
    """Write the HF checkpoint for `bin_path` to `out_dir` atomically; returns out_dir."""
    from safetensors.numpy import save_file

    bin_path, out = Path(bin_path), Path(out_dir)
    if out.exists() and not force:
        raise KvtraceError(f"{out}: already exists (pass --force to replace it)")
    if out.exists() and not out.is_dir():
        raise KvtraceError(f"{out}: exists and is not a directory")
    config, tensors = read_llama2c(bin_path)  # all validation before anything is written
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
        _umask = os.umask(0)
        os.umask(_umask)
        os.chmod(tmp, 0o777 & ~_umask)  # mkdtemp makes it private; the result is a normal directory
    except OSError as e:
        raise KvtraceError(f"{out}: cannot write the output directory ({e.strerror})") from None
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if out.exists():  # --force: move the old one aside, put the new one in place, then delete
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def add_arguments(p) -> None:
    """The command's options (kvtrace/cli.py builds the parser)."""
    p.add_argument("bin", help="llama2.c checkpoint (legacy version 0 format)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--force", action="store_true")


def main(args) -> int:
    out = convert(args.bin, args.out, force=args.force)
    print(f"wrote {out} (config.json + model.safetensors, LlamaForCausalLM)")
    return 0
