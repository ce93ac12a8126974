"""A random Pythia-160M-shaped GPT-NeoX checkpoint, for export / load / bench numbers.

    python -m benchmarks.pythia160m DIR [--dtype float32|float16|bfloat16] [--seed N]

Same shapes as EleutherAI/pythia-160m (hidden 768, 12 layers, 12 heads, intermediate 3072,
rotary_pct 0.25, vocab 50304, 2048 positions, untied embed_out): 162M parameters, about 650 MB
in fp32. config.json in the older form (rotary_pct, rotary_emb_base) as the published
checkpoint has it; model.safetensors streamed one tensor at a time (no transformers, no second
copy in memory); the real GPT-NeoX tokenizer copied as tokenizer.json when the shared fixture
is beside the checkout. Weights: N(0, 0.02) from a seeded generator (norm weights 1 + N(0, 0.02)).
A directory already holding the same (seed, dtype) checkpoint is reused.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # importable as `benchmarks.pythia160m`, as a script, or beside another script
    sys.path.append(str(ROOT))

CONFIG = {
    "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox",
    "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu", "hidden_size": 768,
    "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048, "num_attention_heads": 12, "num_hidden_layers": 12,
    "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
    "use_cache": True, "use_parallel_residual": True, "vocab_size": 50304,
}
MARKER = "kvtrace_random.json"  # {"seed", "dtype"}: lets callers reuse an existing directory
TOKENIZER_FIXTURE = ROOT.parent / "shared" / "fixtures" / "gpt_neox_20b_tokenizer.json"
_ST_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def _tensor_specs(config: dict = CONFIG):
    """(HF name, shape) of every tensor, from the loader's own weight table (so they always agree)."""
    from kvtrace.models.hf import adapter_for, hf_shape, weight_table

    adapter = adapter_for(config)
    cfg = adapter.make_config(config)
    return [(name, hf_shape(cfg, canon)) for name, canon in weight_table(adapter, cfg).items()]


def make_checkpoint(out_dir, dtype: str = "float32", *, seed: int = 0, tokenizer: str | Path | None = "auto",
                    force: bool = False, config: dict = CONFIG) -> Path:
    """Write config.json + model.safetensors (+ tokenizer.json) to out_dir; returns out_dir.
    config: another Hugging Face config.json of a supported architecture (default Pythia-160M)."""
    import torch

    if dtype not in _ST_NAMES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(_ST_NAMES)}")
    out = Path(out_dir)
    marker = {"seed": seed, "dtype": dtype, **({} if config is CONFIG else {"config": config})}
    if not force and (out / "model.safetensors").is_file() and (out / MARKER).is_file():
        if json.loads((out / MARKER).read_text()) == marker:
            return out
    tdtype = getattr(torch, dtype)
    specs = _tensor_specs(config)

    # safetensors: u64 header length, JSON header (offsets relative to the data), data back to back
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in specs:
        n = tdtype.itemsize
        for s in shape:
            n *= s
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)  # keep the data 8-byte aligned

    with staged_checkpoint(out, marker) as tmp:
        gen = torch.Generator().manual_seed(seed)
        with open(tmp / "model.safetensors", "wb") as f:
            f.write(struct.pack("<Q", len(hbytes)))
            f.write(hbytes)
            for name, shape in specs:
                t = torch.randn(shape, generator=gen) * 0.02  # fp32 draw, so every dtype has the same weights
                if "layernorm" in name or "layer_norm" in name or "norm.weight" in name:
                    t = t + 1.0 if name.endswith(".weight") else t
                f.write(t.to(tdtype).reshape(-1).view(torch.uint8).numpy().data)
        (tmp / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}, indent=2) + "\n")
        tok = TOKENIZER_FIXTURE if tokenizer == "auto" else tokenizer
        if tok is not None and Path(tok).is_file():
            shutil.copyfile(tok, tmp / "tokenizer.json")
    return out


@contextlib.contextmanager
def staged_checkpoint(out: Path, marker: dict):
    """A temporary directory beside `out` to write a checkpoint into: when the block ends, the
    marker (what was written, for reuse) is added and the directory replaces `out`; when it
    fails, the directory is removed and `out` is left as it was."""
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.absolute().parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a checkpoint is an ordinary directory
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps(marker) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="checkpoint directory to write")
    ap.add_argument("--dtype", default="float32", choices=list(_ST_NAMES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rewrite even if an identical one exists")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = make_checkpoint(a.out, a.dtype, seed=a.seed, force=a.force)
    size = (out / "model.safetensors").stat().st_size
    print(f"{out}: model.safetensors {size / 1e6:.1f} MB ({a.dtype}), {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
