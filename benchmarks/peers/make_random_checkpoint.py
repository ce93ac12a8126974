#!/usr/bin/env python3
"""Write a random Llama-shaped Hugging Face checkpoint, streamed (one tensor chunk at a time).

Only numpy is needed (the safetensors file is written directly from its format spec: 8-byte
little-endian header length, JSON header with dtype/shape/data_offsets, raw row-major data), so
the whole model is never held in memory; peak RSS is one chunk (default 16 M elements).

Weights: every matrix ~ N(0, std) (std 0.02 by default) from a generator seeded by
(seed, tensor index), so a tensor's values do not depend on sharding or dtype choice.
Norm weights: 1.0 (+ N(0, norm_noise) if --norm-noise > 0).

Presets:
  small153m    hidden 768, 12 layers, 12 heads, 4 kv heads, ffn 2048, vocab 50304,
               max_pos 2048, rope_theta 1e4, eps 1e-5, untied head, float32, one file
               (~153 M params, ~611 MB)
  codellama7b  hidden 4096, 32 layers, 32 heads, 32 kv heads, ffn 11008, vocab 32016,
               max_pos 16384, rope_theta 1e6, eps 1e-5, untied, float16, 5 GB shards + index
Any preset field can be overridden on the command line (--hidden, --layers, ...).

Tokenizer side files (--tokenizer PATH to a tokenizers-format tokenizer.json): tokenizer.json is
copied, and tokenizer_config.json / special_tokens_map.json / generation_config.json are written
(the special-token names are looked up in the tokenizer's added_tokens; --bos/--eos name them).

Usage:
  python make_random_checkpoint.py --out /work/peers/ckpt/llama153m --preset small153m \
      --tokenizer /work/shared/fixtures/gpt_neox_20b_tokenizer.json
  python make_random_checkpoint.py --out /work/peers/ckpt/codellama7b-shape --preset codellama7b
"""
import argparse
import json
import math
import os
import shutil
import sys
import time

import numpy as np

PRESETS = {
    "small153m": dict(hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048,
                      vocab=50304, max_pos=2048, rope_theta=10000.0, eps=1e-5, tie=False,
                      dtype="float32", shard_size=0),
    "codellama7b": dict(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008,
                        vocab=32016, max_pos=16384, rope_theta=1000000.0, eps=1e-5, tie=False,
                        dtype="float16", shard_size=5 * 10**9),
}

ST_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
NBYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def tensor_specs(c):
    """[(name, shape, kind)] in Hugging Face LlamaForCausalLM naming and order."""
    H, I, V = c["hidden"], c["intermediate"], c["vocab"]
    hd = c.get("head_dim") or H // c["heads"]
    q_out, kv_out = c["heads"] * hd, c["kv_heads"] * hd
    specs = [("model.embed_tokens.weight", (V, H), "w")]
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (H,), "norm"),
            (p + "self_attn.q_proj.weight", (q_out, H), "w"),
            (p + "self_attn.k_proj.weight", (kv_out, H), "w"),
            (p + "self_attn.v_proj.weight", (kv_out, H), "w"),
            (p + "self_attn.o_proj.weight", (H, q_out), "w"),
            (p + "post_attention_layernorm.weight", (H,), "norm"),
            (p + "mlp.gate_proj.weight", (I, H), "w"),
            (p + "mlp.up_proj.weight", (I, H), "w"),
            (p + "mlp.down_proj.weight", (H, I), "w"),
        ]
    specs.append(("model.norm.weight", (H,), "norm"))
    if not c["tie"]:
        specs.append(("lm_head.weight", (V, H), "w"))
    return specs


def to_dtype(x32, dtype):
    if dtype == "float32":
        return x32
    if dtype == "float16":
        return x32.astype(np.float16)
    # bfloat16: round-to-nearest-even on the upper 16 bits
    u = x32.view(np.uint32)
    u = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    return u.astype(np.uint16)


def write_tensor(f, idx, shape, kind, c, chunk_elems):
    rng = np.random.default_rng([c["seed"], idx])
    n = math.prod(shape)
    done = 0
    while done < n:
        m = min(chunk_elems, n - done)
        if kind == "norm":
            x = np.ones(m, dtype=np.float32)
            if c["norm_noise"] > 0:
                x += rng.standard_normal(m, dtype=np.float32) * np.float32(c["norm_noise"])
        else:
            x = rng.standard_normal(m, dtype=np.float32)
            x *= np.float32(c["std"])
        f.write(to_dtype(x, c["dtype"]).tobytes())
        done += m


def header_bytes(entries):
    hdr = {"__metadata__": {"format": "pt"}}
    for name, shape, off0, off1, dt in entries:
        hdr[name] = {"dtype": ST_DTYPE[dt], "shape": list(shape), "data_offsets": [off0, off1]}
    raw = json.dumps(hdr, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    return len(raw).to_bytes(8, "little") + raw


def hf_config(c):
    hd = c.get("head_dim") or c["hidden"] // c["heads"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c["hidden"],
        "intermediate_size": c["intermediate"],
        "num_hidden_layers": c["layers"],
        "num_attention_heads": c["heads"],
        "num_key_value_heads": c["kv_heads"],
        "head_dim": hd,
        "hidden_act": "silu",
        "max_position_embeddings": c["max_pos"],
        "rms_norm_eps": c["eps"],
        "rope_theta": c["rope_theta"],
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": c["std"],
        "pretraining_tp": 1,
        "tie_word_embeddings": c["tie"],
        "torch_dtype": c["dtype"],
        "use_cache": True,
        "vocab_size": c["vocab"],
        "bos_token_id": c["bos_id"],
        "eos_token_id": c["eos_id"],
    }


def write_tokenizer_files(out, tok_path, c, bos_name, eos_name, pad_name):
    with open(tok_path, "rb") as f:
        tok = json.load(f)
    added = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    n_ids = max(len(tok["model"]["vocab"]), max(added.values(), default=-1) + 1)
    if n_ids > c["vocab"]:
        sys.exit(f"tokenizer has {n_ids} ids but vocab is {c['vocab']}")
    for nm in (bos_name, eos_name):
        if nm not in added and nm not in tok["model"]["vocab"]:
            sys.exit(f"special token {nm!r} not in tokenizer")
    idof = lambda nm: added.get(nm, tok["model"]["vocab"].get(nm))
    c["bos_id"], c["eos_id"] = idof(bos_name), idof(eos_name)
    shutil.copyfile(tok_path, os.path.join(out, "tokenizer.json"))
    tc = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos_name, "eos_token": eos_name, "unk_token": eos_name,
        "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": c["max_pos"],
    }
    if pad_name:
        tc["pad_token"] = pad_name
    json.dump(tc, open(os.path.join(out, "tokenizer_config.json"), "w"), indent=2)
    stm = {"bos_token": bos_name, "eos_token": eos_name, "unk_token": eos_name}
    if pad_name:
        stm["pad_token"] = pad_name
    json.dump(stm, open(os.path.join(out, "special_tokens_map.json"), "w"), indent=2)
    return n_ids


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small153m")
    for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "max_pos", "head_dim"):
        ap.add_argument("--" + k.replace("_", "-"), dest=k, type=int)
    ap.add_argument("--rope-theta", type=float)
    ap.add_argument("--eps", type=float)
    ap.add_argument("--tie", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--dtype", choices=sorted(ST_DTYPE))
    ap.add_argument("--shard-size", type=float, help="bytes per shard (0 = one file); e.g. 5e9")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--std", type=float, default=0.02)
    ap.add_argument("--norm-noise", type=float, default=0.0)
    ap.add_argument("--chunk-elems", type=int, default=16 * 2**20)
    ap.add_argument("--tokenizer", help="tokenizers-format tokenizer.json to ship with the checkpoint")
    ap.add_argument("--bos", default="<|endoftext|>")
    ap.add_argument("--eos", default="<|endoftext|>")
    ap.add_argument("--pad", default="<|padding|>")
    ap.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")
    ap.add_argument("--dry-run", action="store_true", help="print the plan (params, bytes, shards) only")
    a = ap.parse_args()

    c = dict(PRESETS[a.preset])
    for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "max_pos",
              "head_dim", "rope_theta", "eps", "tie", "dtype", "shard_size"):
        v = getattr(a, k, None)
        if v is not None:
            c[k] = v
    c.update(seed=a.seed, std=a.std, norm_noise=a.norm_noise, bos_id=1, eos_id=2)
    c["shard_size"] = int(c["shard_size"] or 0)
    if c["hidden"] % c["heads"] or c["heads"] % c["kv_heads"]:
        sys.exit("hidden must divide by heads and heads by kv_heads")

    if a.dry_run:
        specs = tensor_specs(c)
        total = sum(math.prod(sh) for _, sh, _ in specs)
        print(json.dumps({"config": hf_config(c), "n_params": total, "bytes": total * NBYTES[c["dtype"]],
                          "n_tensors": len(specs), "shard_size": c["shard_size"]}, indent=1))
        return
    os.makedirs(a.out, exist_ok=True)
    if os.path.exists(os.path.join(a.out, "config.json")) and not a.force:
        sys.exit(f"{a.out} already holds a checkpoint (use --force)")
    n_tok_ids = None
    if a.tokenizer:
        n_tok_ids = write_tokenizer_files(a.out, a.tokenizer, c, a.bos, a.eos, a.pad)

    specs = tensor_specs(c)
    nb = NBYTES[c["dtype"]]
    sizes = [math.prod(s) * nb for _, s, _ in specs]
    # pack tensors into shards (in order)
    shards, cur, cur_size = [], [], 0
    for i, sz in enumerate(sizes):
        if c["shard_size"] and cur and cur_size + sz > c["shard_size"]:
            shards.append(cur)
            cur, cur_size = [], 0
        cur.append(i)
        cur_size += sz
    shards.append(cur)
    nsh = len(shards)
    names = (["model.safetensors"] if nsh == 1 else
             [f"model-{k + 1:05d}-of-{nsh:05d}.safetensors" for k in range(nsh)])

    t0 = time.time()
    weight_map = {}
    for fname, idxs in zip(names, shards):
        entries, off = [], 0
        for i in idxs:
            entries.append((specs[i][0], specs[i][1], off, off + sizes[i], c["dtype"]))
            off += sizes[i]
            weight_map[specs[i][0]] = fname
        tmp = os.path.join(a.out, fname + ".partial")
        with open(tmp, "wb") as f:
            f.write(header_bytes(entries))
            for i in idxs:
                write_tensor(f, i, specs[i][1], specs[i][2], c, a.chunk_elems)
        os.replace(tmp, os.path.join(a.out, fname))
        print(f"wrote {fname} ({off / 1e6:.1f} MB data, {len(idxs)} tensors) t={time.time() - t0:.1f}s",
              flush=True)
    total = sum(sizes)
    if nsh > 1:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
                  open(os.path.join(a.out, "model.safetensors.index.json"), "w"), indent=2)
    json.dump(hf_config(c), open(os.path.join(a.out, "config.json"), "w"), indent=2)
    json.dump({"bos_token_id": c["bos_id"], "eos_token_id": c["eos_id"], "do_sample": False},
              open(os.path.join(a.out, "generation_config.json"), "w"), indent=2)
    n_params = total // nb
    meta = dict(c, n_params=n_params, total_bytes=total, files=names, tokenizer_ids=n_tok_ids,
                generator="numpy default_rng([seed, tensor_index]).standard_normal(float32)*std")
    json.dump(meta, open(os.path.join(a.out, "random_checkpoint.json"), "w"), indent=2)
    print(f"done: {n_params / 1e6:.1f} M params, {total / 1e6:.1f} MB, {nsh} file(s), {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
