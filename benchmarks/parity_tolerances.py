"""Evidence for the parity tolerances (configs.TOLERANCES): how far honest artifacts are from the
fp32 reference, and how far damaged ones are, in absolute and relative terms.

    python3 benchmarks/parity_tolerances.py [--work DIR] [--json OUT] [--batch 4 --prompt-len 16 --steps 32]

For each model (the four built-in random configurations, the built-in gpt_neox with its lm_head
scaled x20 so its logits span tens of units, and the trained stories260K when
../shared/fixtures/stories260K.bin is present) it measures, through the one parity harness
(kvtrace.runtime.parity: ragged prompts, prefill + decode steps, teacher forced), against our
torch model in fp32:
  fp32            the fp32 ONNX artifact on onnxruntime CPU
  fp16            the fp16 ONNX artifact on onnxruntime CPU
  bf16-weights    an fp32 artifact of the bf16-rounded weights (what export validation runs for
                  bf16 on CPU, which has no bf16 MatMul)
  torch-fp16/bf16 our torch model computing in fp16 / bf16 (a stand-in for GPU fp16/bf16
                  arithmetic, which this CPU machine cannot run through onnxruntime/TensorRT)
  fp32 x F / fp16 x F   the artifact exported after one output row of the last layer's MLP down
                  projection was scaled by F (the damage a botched conversion of one tensor does)
and prints max |Δlogit|, max relative (max |Δ| / std of the reference's logits, per position) and
top-1 agreement. The tolerance rows are chosen between the honest and the damaged figures.
Nothing here is timed.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIXTURE = ROOT.parent / "shared" / "fixtures" / "stories260K.bin"


class LowPrecisionReference:
    """Our torch model computing in its own dtype (fp16/bf16), logits widened to fp32."""

    def __init__(self, model):
        self.model = model
        self.description = {"kind": "torch", "dtype": str(model.dtype)}
        self._rows = []

    def start(self, prompts):
        import torch
        from kvtrace.models.transformer import DynamicCache

        self._rows, out = [], []
        with torch.no_grad():
            for p in prompts:
                cache = DynamicCache(self.model.cfg, 1, dtype=self.model.dtype)
                logits = self.model(torch.tensor([p]), torch.arange(len(p))[None], cache)  # (1, T, V)
                self._rows.append([cache, len(p)])
                out.append(logits[0].float().numpy())
        return out

    def step(self, tokens):
        import torch

        out = []
        with torch.no_grad():
            for row, tok in zip(self._rows, tokens):
                cache, pos = row
                logits = self.model(torch.tensor([[tok]]), torch.tensor([[pos]]), cache)
                row[1] = pos + 1
                out.append(logits[0, -1].float().numpy())
        return np.stack(out)


def models():
    import torch
    from kvtrace.configs import BUILTIN, BUILTIN_SEED
    from kvtrace.models.transformer import random_model

    for arch in BUILTIN:
        yield f"builtin-{arch}", random_model(BUILTIN[arch], BUILTIN_SEED)
    big = random_model(BUILTIN["gpt_neox"], BUILTIN_SEED)
    with torch.no_grad():
        big.lm_head.weight.mul_(20.0)
    yield "gpt_neox-head-x20", big
    if FIXTURE.is_file():
        from kvtrace.models.checkpoint import load_checkpoint
        from kvtrace.models.llama2c import convert

        d = Path(tempfile.mkdtemp()) / "stories260K"
        convert(FIXTURE, d)
        yield "stories260K", load_checkpoint(d).model
    else:
        print(f"note: {FIXTURE} absent: stories260K skipped", file=sys.stderr)


def perturbed(model, factor: float):
    import torch

    m = copy.deepcopy(model)
    w = m.layers[-1].mlp.down.weight  # (D, F)
    with torch.no_grad():
        w[w.shape[0] // 2] *= factor
    return m


def bf16_rounded(model):
    import torch

    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return m


def measure(trace, artifact_dir=None, reference=None) -> dict:
    from kvtrace.runtime import parity
    from kvtrace.runtime.model import Model

    if artifact_dir is not None:
        m = Model.load(artifact_dir, backend="onnxruntime", threads=1)
        try:
            r = parity.replay(m, trace)
        finally:
            m.close()
    else:
        r = parity.replay(_Dense(reference), trace)
    s = r["summary"]
    scales = np.concatenate([st["_scale"] for st in r["per_step"]])
    return {"max_abs": s["max_abs"], "max_rel": s["max_rel"], "top1": s["top1"], "top1_strict": s["top1_strict"],
            "std_min": float(scales.min()), "std_median": float(np.median(scales))}


class _Dense:
    """A reference adapted to the artifact protocol (start -> (B, T_max, V))."""

    def __init__(self, ref):
        self.ref = ref

    def start(self, prompts):
        rows = self.ref.start(prompts)
        T = max(len(p) for p in prompts)
        out = np.zeros((len(rows), T, rows[0].shape[-1]), np.float32)
        for b, r in enumerate(rows):
            out[b, : r.shape[0]] = r
        return out

    def step(self, tokens):
        return self.ref.step(tokens)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", help="directory for the artifacts (default: a temporary one)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--factors", type=float, nargs="+", default=[1.01, 1.05])
    args = ap.parse_args(argv)

    import torch
    from kvtrace.exporter.export import export_model
    from kvtrace.exporter.references import TorchReference
    from kvtrace.runtime import parity

    work = Path(args.work or tempfile.mkdtemp(prefix="kvtrace-tol-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    hdr = f"{'model':<20} {'case':<14} {'max|Δ|':>9} {'max rel':>9} {'top-1':>7} {'std min':>8} {'std med':>8}"
    print(hdr)
    for name, model in models():
        cfg = model.cfg
        prompts = parity.make_prompts(args.batch, args.prompt_len, cfg.vocab_size, 0,
                                      avoid=(cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id))
        trace = parity.record(TorchReference(model, {"kind": "torch"}), prompts, args.steps)
        max_seq = args.prompt_len + args.steps + 8

        def art(m, dtype, tag):
            out = work / f"{name}-{tag}"
            if not out.exists():
                export_model(m, out, dtype=dtype, max_seq=max_seq, max_batch=args.batch, validate=False,
                             log=lambda _: None)
            return out

        cases = [("fp32", lambda: measure(trace, art(model, "float32", "fp32"))),
                 ("fp16", lambda: measure(trace, art(model, "float16", "fp16"))),
                 ("bf16-weights", lambda: measure(trace, art(bf16_rounded(model), "float32", "bf16w"))),
                 ("torch-fp16", lambda: measure(trace, reference=LowPrecisionReference(
                     copy.deepcopy(model).to(torch.float16)))),
                 ("torch-bf16", lambda: measure(trace, reference=LowPrecisionReference(
                     copy.deepcopy(model).to(torch.bfloat16))))]
        for f in args.factors:
            cases.append((f"fp32 x{f:g}", lambda f=f: measure(trace, art(perturbed(model, f), "float32", f"p{f:g}"))))
            cases.append((f"fp16 x{f:g}", lambda f=f: measure(trace, art(perturbed(model, f), "float16",
                                                                          f"p{f:g}-fp16"))))
        for case, fn in cases:
            r = fn()
            rows.append({"model": name, "case": case, **r})
            t1 = "n/a" if r["top1"] is None else f"{r['top1']:.3f}"
            print(f"{name:<20} {case:<14} {r['max_abs']:>9.2e} {r['max_rel']:>9.2e} {t1:>7} {r['std_min']:>8.3f} "
                  f"{r['std_median']:>8.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
