#!/usr/bin/env python3
"""onnxruntime-genai peer runner (run with /work/peers/venv-ortgenai/bin/python). Protocol: see
run_peers.py.

--model-dir: an onnxruntime_genai.models.builder output dir (-e cpu, -p fp32 or int4).

How it is timed: og.Config(model_dir) with the decoder session options overlaid to
intra_op_num_threads=T, inter_op_num_threads=1 (the converted genai_config.json is left as
built), og.Model(config). Each run builds a fresh GeneratorParams(search: do_sample=False
(greedy), batch_size=B, max_length=min_length=128+64 so EOS cannot stop it) and a Generator
(untimed: it allocates the KV cache), then t0; append_tokens(ids[B,128]) (runs the prompt
forward pass); generate_next_token() (greedy pick of token 1 from the prompt logits) -> t1;
then 63 x generate_next_token() (each runs the one-token forward pass for all rows and picks
the next token) -> t2. prefill = t1 - t0; decode = (t2 - t1) / 63.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_common as pc  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime_genai as og  # noqa: E402


def main():
    ap = pc.common_args(__doc__)
    args = ap.parse_args()
    rows = pc.load_prompt(args)
    ids = np.asarray(rows, dtype=np.int32)
    B, P, N = args.batch, args.prompt_len, args.new_tokens

    t0 = pc.now()
    cfg = og.Config(args.model_dir)
    overlay = {"model": {"decoder": {"session_options": {
        "intra_op_num_threads": args.threads, "inter_op_num_threads": 1}}}}
    cfg.overlay(json.dumps(overlay))
    model = og.Model(cfg)
    load_s = pc.now() - t0
    rss_load = pc.rss_mb()

    def once():
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, batch_size=B, max_length=P + N, min_length=P + N)
        gen = og.Generator(model, params)
        t0 = pc.now()
        gen.append_tokens(ids)
        gen.generate_next_token()
        t1 = pc.now()
        steps = 0
        while steps < N - 1:
            gen.generate_next_token()
            steps += 1
        t2 = pc.now()
        assert not gen.is_done() or steps == N - 1
        seq = list(gen.get_sequence(0))
        assert len(seq) == P + N, len(seq)
        new = [int(x) for x in seq[P:]]
        del gen
        return t1 - t0, t2 - t1, steps, new

    raw, first_ids = pc.run_repeats(args, once)
    timing = ("og.Generator(search do_sample=False, batch_size=B, max_length=min_length=%d); "
              "prefill = append_tokens(ids[B,%d]) + first generate_next_token(); "
              "decode = next %d generate_next_token() / %d; session intra_op_num_threads=%d"
              % (P + N, P, N - 1, N - 1, args.threads))
    try:
        import onnxruntime
        ort_v = onnxruntime.__version__
    except Exception:  # noqa: BLE001
        ort_v = None
    pc.result(args, "onnxruntime-genai", raw, first_ids,
              {"onnxruntime-genai": og.__version__, "onnxruntime (python pkg)": ort_v},
              timing, load_s, rss_load)


if __name__ == "__main__":
    main()
