#!/usr/bin/env python3
"""optimum (ONNX Runtime) peer runner (run with /work/peers/venv-optimum/bin/python). Protocol: see
run_peers.py.

--model-dir: an `optimum-cli export onnx --task text-generation-with-past` output dir.

How it is timed: ORTModelForCausalLM.from_pretrained(dir, CPUExecutionProvider, session options
intra_op_num_threads=T, inter_op_num_threads=1, use_cache=True). Each run is one
model.generate(ids[B,128], attention_mask=1, do_sample=False, max_new_tokens=min_new_tokens=64)
with a LogitsProcessor that stamps the time each step's logits arrive (step k's stamp comes right
after the forward pass that yields token k+1's logits; greedy argmax follows). t0 just before
generate; prefill = stamp[0] - t0; decode = (stamp[63] - stamp[0]) / 63.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_common as pc  # noqa: E402

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from optimum.onnxruntime import ORTModelForCausalLM  # noqa: E402
from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402


class Stamp(LogitsProcessor):
    def __init__(self):
        self.t = []

    def __call__(self, input_ids, scores):
        self.t.append(pc.now())
        return scores


def main():
    ap = pc.common_args(__doc__)
    args = ap.parse_args()
    rows = pc.load_prompt(args)
    B, P, N = args.batch, args.prompt_len, args.new_tokens
    torch.set_num_threads(args.threads)
    ids = torch.tensor(rows, dtype=torch.long)
    mask = torch.ones_like(ids)

    t0 = pc.now()
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    model = ORTModelForCausalLM.from_pretrained(args.model_dir, provider="CPUExecutionProvider",
                                                session_options=so, use_cache=True)
    load_s = pc.now() - t0
    rss_load = pc.rss_mb()

    def once():
        st = Stamp()
        t0 = pc.now()
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                             max_new_tokens=N, min_new_tokens=N, logits_processor=LogitsProcessorList([st]),
                             pad_token_id=1)
        assert out.shape == (B, P + N), out.shape
        assert len(st.t) == N, len(st.t)
        return st.t[0] - t0, st.t[N - 1] - st.t[0], N - 1, out[0, P:].tolist()

    raw, first_ids = pc.run_repeats(args, once)
    import optimum.version as ov
    import transformers
    timing = ("ORTModelForCausalLM.generate(do_sample=False, max_new_tokens=min_new_tokens=%d, "
              "LogitsProcessor time stamps); prefill = stamp[0] - t(call); decode = (stamp[%d] - "
              "stamp[0]) / %d; ORT intra_op_num_threads=%d" % (N, N - 1, N - 1, args.threads))
    pc.result(args, "optimum-onnxruntime", raw, first_ids,
              {"optimum": ov.__version__, "onnxruntime": ort.__version__,
               "transformers": transformers.__version__, "torch": torch.__version__},
              timing, load_s, rss_load)


if __name__ == "__main__":
    main()
