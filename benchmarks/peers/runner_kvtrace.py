#!/usr/bin/env python3
"""kvtrace runner for run_peers.py (run with the Python of an environment where kvtrace is installed,
e.g. the repository's .venv). Protocol: see run_peers.py.

--model-dir: a kvtrace artifact directory (`kvtrace export ...`; benchmarks/cpu_peers.py makes them).

How it is timed: kvtrace.runtime.model.Model.load(artifact, backend="onnxruntime", threads=T)
(onnxruntime CPU, intra-op threads T, the artifact's own session settings: for a quantised artifact
the manifest's MatMulNBits accuracy level). Per run: the static cache is reset (untimed), t0;
Model.start(prompts, logits="last") (the B x 128 prompt tokens in one call, logits of each row's
last token) + numpy argmax -> t1 (token 1 of every row); 63 x [Model.step(tokens) + argmax] -> t2.
prefill = t1 - t0; decode = (t2 - t1) / 63. Greedy; EOS is never checked, so it cannot stop early.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_common as pc  # noqa: E402

import numpy as np  # noqa: E402


def main():
    ap = pc.common_args(__doc__)
    ap.add_argument("--accuracy-level", type=int, help="override the artifact's MatMulNBits accuracy level")
    args = ap.parse_args()
    rows = pc.load_prompt(args)
    N = args.new_tokens

    import onnxruntime

    import kvtrace
    from kvtrace.runtime.model import Model

    t0 = pc.now()
    opts = {"threads": args.threads}
    if args.accuracy_level is not None:
        opts["accuracy_level"] = args.accuracy_level
    model = Model.load(args.model_dir, backend="onnxruntime", **opts)
    load_s = pc.now() - t0
    rss_load = pc.rss_mb()

    def once():
        t0 = pc.now()
        nxt = model.start(rows, logits="last")[:, -1].argmax(-1)  # (B,)
        t1 = pc.now()
        out = [int(nxt[0])]
        for _ in range(N - 1):
            nxt = model.step(nxt.tolist()).argmax(-1)
            out.append(int(nxt[0]))
        t2 = pc.now()
        return t1 - t0, t2 - t1, N - 1, out

    raw, first_ids = pc.run_repeats(args, once)
    man = model.manifest.data
    timing = ("kvtrace Model.start(prompts, logits='last') + argmax = prefill; %d x [Model.step + argmax] / %d = "
              "decode; onnxruntime CPU, intra_op_num_threads=%d, static cache (max_seq %d), IO binding"
              % (N - 1, N - 1, args.threads, model.max_seq))
    model.close()
    pc.result(args, "kvtrace", raw, first_ids, {"kvtrace": kvtrace.__version__, "onnxruntime": onnxruntime.__version__,
                                                "numpy": np.__version__}, timing, load_s, rss_load,
              extra={"dtype": man.get("dtype"), "quant": man.get("quant")})


if __name__ == "__main__":
    main()
