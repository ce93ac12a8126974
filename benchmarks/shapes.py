"""Random checkpoints of the seed models' real shapes, written as Hugging Face does: sharded
safetensors (`model-0000k-of-0000n.safetensors`, tensors of a shard sorted by name as the
safetensors writer sorts them, shards filled in state-dict order so they split mid-layer) with
`model.safetensors.index.json`.

    python -m benchmarks.shapes DIR --shape codellama-7b [--dtype float16] [--shard-gb 4]

Streamed: each tensor's bytes are cut from a 64 MiB pool of N(0, 0.02) values (norm weights
1 + N(0, 0.02)) at a pseudo-random offset and written straight to the file, so a 26 GB
checkpoint is written at disk speed and never held in memory (the values repeat across
tensors; the export's checks and its numerical validation do not depend on them being distinct).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from benchmarks.pythia160m import MARKER, staged_checkpoint  # noqa: E402

_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
          "rms_norm_eps": 1e-05, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
          "attention_bias": False, "mlp_bias": False}
SHAPES = {
    # codellama/CodeLlama-7b-hf
    "codellama-7b": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
                     "num_key_value_heads": 32, "num_hidden_layers": 32, "vocab_size": 32016,
                     "max_position_embeddings": 16384, "rope_theta": 1000000.0},
    # codellama/CodeLlama-13b-hf
    "codellama-13b": {**_LLAMA, "hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40,
                      "num_key_value_heads": 40, "num_hidden_layers": 40, "vocab_size": 32016,
                      "max_position_embeddings": 16384, "rope_theta": 1000000.0},
    # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T
    "tinyllama-1.1b": {**_LLAMA, "hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32,
                       "num_key_value_heads": 4, "num_hidden_layers": 22, "vocab_size": 32000,
                       "max_position_embeddings": 2048, "rope_theta": 10000.0},
}
_ST = {"float32": ("F32", np.float32), "float16": ("F16", np.float16)}
POOL_BYTES = 64 << 20


def tensor_specs(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) in state-dict order, from the loader's own weight table."""
    from kvtrace.models.hf import adapter_for, hf_shape, weight_table

    adapter = adapter_for(config)
    cfg = adapter.make_config(config)
    return [(name, hf_shape(cfg, canon)) for name, canon in weight_table(adapter, cfg).items()]


def make_checkpoint(out_dir, shape: str, dtype: str = "float16", *, shard_bytes: int = 4 << 30, seed: int = 0,
                    sparse: bool = False, log=print) -> Path:
    """Write the checkpoint (reused when DIR already holds the same one); returns DIR.

    sparse: only the tensors the bounded validation computes with (the embedding, the first two
    blocks, the final norm, the head) hold values; every other block is a hole in the file
    (zeros, no disk space): a 26 GB checkpoint in ~2 GB of disk, for memory measurements on a
    short disk. Its reads cost no disk I/O, so it is no good for timing."""
    config = {**SHAPES[shape], "torch_dtype": dtype}
    out = Path(out_dir)
    marker = {"shape": shape, "dtype": dtype, "shard_bytes": shard_bytes, "seed": seed, "sparse": sparse}
    if (out / MARKER).is_file() and json.loads((out / MARKER).read_text()) == marker:
        return out
    code, np_dtype = _ST[dtype]
    item = np.dtype(np_dtype).itemsize
    specs = tensor_specs(config)
    shards, cur, size = [], [], 0  # state-dict order, split when a shard is full (mid-layer)
    for name, shp in specs:
        n = math.prod(shp) * item
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shp))
        size += n
    shards.append(cur)
    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal(POOL_BYTES // item, dtype=np.float32) * 0.02).astype(np_dtype).view(np.uint8)
    ones = (1.0 + rng.standard_normal(1 << 16, dtype=np.float32) * 0.02).astype(np_dtype).view(np.uint8)

    with staged_checkpoint(out, marker) as tmp:
        wmap, total, t0 = {}, 0, time.perf_counter()
        for k, shard in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            shard = sorted(shard)  # the safetensors writer's order
            header, off = {"__metadata__": {"format": "pt"}}, 0
            for name, shp in shard:
                n = math.prod(shp) * item
                header[name] = {"dtype": code, "shape": list(shp), "data_offsets": [off, off + n]}
                off += n
                wmap[name] = fname
            hb = json.dumps(header, separators=(",", ":")).encode()
            hb += b" " * (-len(hb) % 8)
            with open(tmp / fname, "wb") as f:
                f.write(struct.pack("<Q", len(hb)) + hb)
                end = f.tell() + off
                for name, shp in shard:
                    n = math.prod(shp) * item
                    if sparse and ".layers." in name and int(name.split(".layers.")[1].split(".")[0]) >= 2:
                        f.seek(n, os.SEEK_CUR)  # a hole: reads back as zeros
                        continue
                    src = ones if "norm" in name else pool
                    pos = int(rng.integers(0, len(src) // item)) * item
                    while n:
                        chunk = min(n, len(src) - pos)
                        f.write(memoryview(src[pos:pos + chunk]))
                        n -= chunk
                        pos = 0
                f.truncate(end)  # a trailing hole still makes the file its full size
            total += (tmp / fname).stat().st_size
            log(f"  {fname}: {(tmp / fname).stat().st_size / 1e9:.2f} GB ({time.perf_counter() - t0:.0f}s)")
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": wmap}, indent=1) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def checkpoint_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--shape", choices=list(SHAPES), required=True)
    ap.add_argument("--dtype", choices=list(_ST), default="float16")
    ap.add_argument("--shard-gb", type=float, default=4.0)
    ap.add_argument("--sparse", action="store_true", help="blocks beyond the second are holes (see make_checkpoint)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = make_checkpoint(a.out, a.shape, a.dtype, shard_bytes=int(a.shard_gb * 2**30), sparse=a.sparse)
    print(f"{out}: {checkpoint_bytes(out) / 1e9:.2f} GB, {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
