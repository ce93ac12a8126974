#!/usr/bin/env python3
"""CTranslate2 peer runner (run with /work/peers/venv-ct2/bin/python). Protocol: see run_peers.py.

--model-dir: a ct2-transformers-converter output dir (float32 or int8 weights); the compute type
is --variant (float32 / int8 / int8_float32 / int16 / auto).

How it is timed: one ctranslate2.Generator(model, cpu, intra_threads=T, inter_threads=1,
compute_type=variant). Each run is one generate_batch() call on the B prompts (as vocabulary
token strings) with include_prompt_in_result=False (prompt forwarded in one pass = prefill),
sampling_topk=1 (greedy), beam_size=1, max_length=min_length=64 (EOS cannot stop it early),
and a step callback. t0 is taken just before generate_batch; the callback stamps the time of
the first step-0 call (token 1 chosen for row 0, all rows chosen together) and of the last
step-63 call. prefill = t(step 0) - t0; decode = (t(step 63) - t(step 0)) / 63.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_common as pc  # noqa: E402

import ctranslate2  # noqa: E402


def main():
    ap = pc.common_args(__doc__)
    args = ap.parse_args()
    rows = pc.load_prompt(args)
    with open(os.path.join(args.model_dir, "vocabulary.json")) as f:
        vocab = json.load(f)
    tok = {i: s for i, s in enumerate(vocab)}
    prompts = [[vocab[i] for i in r] for r in rows]

    t0 = pc.now()
    gen = ctranslate2.Generator(args.model_dir, device="cpu", compute_type=args.variant,
                                intra_threads=args.threads, inter_threads=1)
    load_s = pc.now() - t0
    rss_load = pc.rss_mb()
    N = args.new_tokens

    def once():
        stamps = {}
        ids = []

        def cb(step):
            if step.step == 0 and 0 not in stamps:
                stamps[0] = pc.now()
            if step.step == N - 1:
                stamps[N - 1] = pc.now()
            if step.batch_id == 0:
                ids.append(step.token_id)
            return False

        t0 = pc.now()
        res = gen.generate_batch(prompts, max_batch_size=0, beam_size=1, sampling_topk=1,
                                 max_length=N, min_length=N, include_prompt_in_result=False,
                                 callback=cb)
        t_end = pc.now()
        for r in res:
            assert len(r.sequences_ids[0]) == N, len(r.sequences_ids[0])
        assert ids == list(res[0].sequences_ids[0])
        steps = N - 1
        return stamps[0] - t0, stamps[N - 1] - stamps[0], steps, ids

    raw, first_ids = pc.run_repeats(args, once)
    timing = ("ctranslate2.Generator.generate_batch(include_prompt_in_result=False, sampling_topk=1, "
              "max_length=min_length=%d, callback); prefill = t(first step-0 callback) - t(call); "
              "decode = (t(last step-%d callback) - t(first step-0 callback))/%d" % (N, N - 1, N - 1))
    pc.result(args, "ctranslate2", raw, first_ids,
              {"ctranslate2": ctranslate2.__version__}, timing, load_s, rss_load,
              extra={"compute_type": args.variant, "intra_threads": args.threads})


if __name__ == "__main__":
    main()
