#!/usr/bin/env python3
"""llama.cpp peer runner via llama-cpp-python's low-level C bindings (run with
/work/peers/venv-llamacpp/bin/python). Protocol: see run_peers.py.

--model-dir: a GGUF file (convert_hf_to_gguf.py --outtype f32, then llama_model_quantize).

How it is timed: llama_model_load_from_file (default params: mmap), llama_init_from_model with
n_ctx = B*(128+64) rounded up to 256, n_seq_max = B, n_batch = max(B*128, 512) (the whole prompt
batch goes to ONE llama_decode call; llama.cpp splits it in n_ubatch=512 micro-batches, its
default), n_threads = n_threads_batch = T, other context parameters at llama.cpp's defaults
(flash_attn_type auto, f16 KV cache, kv_unified false). Batch B uses the multi-sequence batch
API: one llama_batch holding B sequences (seq_id b for row b, positions 0..127) with logits
requested only for each row's last prompt token; each decode step is one llama_batch of B
tokens (one per seq_id, position 128+k). Greedy pick = numpy argmax over the B logits rows
(llama_get_logits). Per run: llama_memory_clear (untimed), t0; llama_decode(prompt batch) +
argmax -> t1 (token 1 of every row); 63 x [fill batch; llama_decode; argmax] -> t2.
prefill = t1 - t0; decode = (t2 - t1) / 63. EOS is never checked, so it cannot stop early.
"""
import ctypes
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_common as pc  # noqa: E402

import numpy as np  # noqa: E402
import llama_cpp as L  # noqa: E402


@L.llama_log_callback
def _quiet_log(level, text, user_data):  # keep stderr readable; errors still raise below
    return None


def main():
    ap = pc.common_args(__doc__)
    ap.add_argument("--flash-attn", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--no-extra-bufts", action="store_true",
                    help="model param use_extra_bufts=False (no AMX/repacked weight buffers)")
    args = ap.parse_args()
    rows = pc.load_prompt(args)
    B, P, N = args.batch, args.prompt_len, args.new_tokens
    if not args.verbose:
        L.llama_log_set(_quiet_log, ctypes.c_void_p(0))

    t0 = pc.now()
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    if args.no_extra_bufts:
        mp.use_extra_bufts = False
    model = L.llama_model_load_from_file(args.model_dir.encode(), mp)
    if not model:
        sys.exit("model load failed")
    cp = L.llama_context_default_params()
    cp.n_ctx = ((B * (P + N) + 255) // 256) * 256
    cp.n_seq_max = B
    cp.n_batch = max(B * P, 512)
    cp.n_threads = args.threads
    cp.n_threads_batch = args.threads
    cp.flash_attn_type = {"auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                          "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED}[args.flash_attn]
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        sys.exit("context init failed")
    load_s = pc.now() - t0
    rss_load = pc.rss_mb()
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    mem = L.llama_get_memory(ctx)

    pbatch = L.llama_batch_init(B * P, 0, 1)
    for b in range(B):
        for j in range(P):
            i = b * P + j
            pbatch.token[i] = rows[b][j]
            pbatch.pos[i] = j
            pbatch.n_seq_id[i] = 1
            pbatch.seq_id[i][0] = b
            pbatch.logits[i] = 1 if j == P - 1 else 0
    pbatch.n_tokens = B * P
    dbatch = L.llama_batch_init(B, 0, 1)
    for b in range(B):
        dbatch.n_seq_id[b] = 1
        dbatch.seq_id[b][0] = b
        dbatch.logits[b] = 1
    dbatch.n_tokens = B

    def argmax_rows():
        ptr = L.llama_get_logits(ctx)
        return np.ctypeslib.as_array(ptr, shape=(B, n_vocab)).argmax(axis=1)

    def once():
        L.llama_memory_clear(mem, True)
        t0 = pc.now()
        rc = L.llama_decode(ctx, pbatch)
        if rc != 0:
            raise RuntimeError(f"llama_decode(prompt) = {rc}")
        nxt = argmax_rows()
        t1 = pc.now()
        out = [int(nxt[0])]
        for k in range(N - 1):
            for b in range(B):
                dbatch.token[b] = int(nxt[b])
                dbatch.pos[b] = P + k
            rc = L.llama_decode(ctx, dbatch)
            if rc != 0:
                raise RuntimeError(f"llama_decode(step {k}) = {rc}")
            nxt = argmax_rows()
            out.append(int(nxt[0]))
        t2 = pc.now()
        return t1 - t0, t2 - t1, N - 1, out

    raw, first_ids = pc.run_repeats(args, once)
    L.llama_batch_free(pbatch)
    L.llama_batch_free(dbatch)
    timing = ("llama_decode on a multi-sequence llama_batch (B seq_ids); prefill = llama_decode(B*%d "
              "prompt tokens, logits only at each row's last token) + argmax; decode = %d x "
              "[llama_decode(B tokens) + argmax] / %d; n_threads=n_threads_batch=%d, n_batch=%d, "
              "n_ubatch=%d, flash_attn=%s, KV cache type_k/type_v=%d/%d (1=f16)"
              % (P, N - 1, N - 1, args.threads, cp.n_batch, cp.n_ubatch, args.flash_attn,
                 cp.type_k, cp.type_v))
    sysinfo = L.llama_print_system_info().decode().strip()
    L.llama_free(ctx)
    L.llama_model_free(model)
    pc.result(args, "llama.cpp", raw, first_ids,
              {"llama-cpp-python": L.__version__}, timing, load_s, rss_load,
              extra={"system_info": sysinfo, "n_ctx": cp.n_ctx})


if __name__ == "__main__":
    main()
