"""`kvtrace parity`: an artifact's logits against a reference, step by step.

Both sides see the same prompts (a ragged batch, deterministic from a seed) and the same
tokens: a prefill, then N single-token decode steps in which every row is fed the
*reference's* greedy token, so a difference at step s never leaks into the inputs of step
s + 1. The artifact runs through its own cache path (`Model.start` then `Model.step`: the
preallocated, IO-bound cache of the runtime), the reference runs one row at a time in fp32
with its own cache, so a batching or padding bug in the artifact shows up as a difference.

References:
  torch  our PyTorch model (models/transformer.py) from the checkpoint recorded in the
         manifest (or --checkpoint), or the built-in configuration's seeded random weights.
  hf     transformers' AutoModelForCausalLM on the checkpoint (fp32, eager attention).

The comparison is kvtrace.runtime.parity (record the reference, replay the artifact), the same
harness as the export's validation, with its metric definitions and configs.TOLERANCES[dtype].
This module only picks the reference (kvtrace.exporter.references) and handles the command line.
Exit 0 (pass) or 1 (ParityFailure).
"""
from __future__ import annotations

from kvtrace.errors import KvtraceError, ParityFailure
from kvtrace.runtime import parity as harness


def read_manifest(artifact) -> dict:
    """The raw manifest dict, checked by the shared loader (format version, files present)."""
    from kvtrace.manifest import load_manifest

    return load_manifest(artifact).data


def parity(artifact: str, *, against: str = "torch", checkpoint: str | None = None, steps: int = 16,
           batch: int = 2, backend: str = "auto", prompt_len: int | None = None, seed: int = 0,
           tolerance: dict | None = None) -> dict:
    """Run the comparison and return the report dict (report["passed"] is the verdict)."""
    from kvtrace.configs import TOLERANCES
    from kvtrace.runtime.model import Model

    if steps < 0:
        raise KvtraceError(f"--steps {steps}: must be >= 0")
    if batch < 1:
        raise KvtraceError(f"--batch {batch}: must be >= 1")
    manifest = read_manifest(artifact)
    dtype = manifest["dtype"]
    if dtype not in TOLERANCES:
        raise KvtraceError(f"manifest dtype {dtype!r}: no tolerance in configs.TOLERANCES")
    cfg = manifest["config"]
    io = manifest.get("io") or {}
    max_batch = io.get("max_batch")
    if max_batch and batch > max_batch:
        raise KvtraceError(f"--batch {batch}: the artifact takes at most {max_batch} rows (max_batch)")
    # cache room: the longest row needs prompt + steps slots
    room = min(x for x in (io.get("max_seq"), cfg.get("max_position")) if x)
    if prompt_len is None:
        prompt_len = min(16, room - steps)
    if prompt_len < 1 or prompt_len + steps > room:
        raise KvtraceError(f"--prompt-len {prompt_len} + --steps {steps} exceed the artifact's {room} positions")
    prompts = harness.make_prompts(batch, prompt_len, cfg["vocab_size"], seed,
                                   avoid=(cfg.get("bos_token_id"), cfg.get("eos_token_id"), cfg.get("pad_token_id")))
    try:
        import torch  # noqa: F401  (the reference side; the artifact side needs none)
    except ImportError as e:
        raise KvtraceError(f"kvtrace parity --against {against} needs PyTorch for the reference model ({e}); "
                           "pip install 'kvtrace[export]'") from e
    from kvtrace.exporter import references

    ref = references.torch_reference(manifest, checkpoint) if against == "torch" else \
        references.hf_reference(manifest, checkpoint)
    trace = harness.record(ref, prompts, steps)
    ref.close()  # its weights go before the artifact's session loads
    m = Model.load(artifact, backend=backend)
    tol = {**TOLERANCES[dtype], **{k: v for k, v in (tolerance or {}).items() if v is not None}}
    result = harness.judge(harness.replay(m, trace), tol)
    return {
        "report_version": harness.REPORT_VERSION,
        "artifact": str(artifact),
        "architecture": manifest.get("architecture"),
        "dtype": dtype,
        "layout": io.get("layout"),
        "backend": getattr(m, "backend_name", backend),
        "against": against,
        "reference": ref.description,
        "batch": batch,
        "steps": steps,
        "seed": seed,
        "prompt_lengths": [len(p) for p in prompts],
        **result,
    }


def add_arguments(p) -> None:
    """The command's options (kvtrace/cli.py builds the parser)."""
    p.add_argument("artifact")
    p.add_argument("--against", choices=["torch", "hf"], default="torch")
    p.add_argument("--checkpoint", help="reference checkpoint (default: the one recorded in the manifest)")
    p.add_argument("--steps", type=int, default=16, help="decode steps after the prefill")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--backend", default="auto")
    p.add_argument("--prompt-len", type=int, help="longest prompt; the others are shorter (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--json", dest="json_report", metavar="REPORT", help="write the JSON report here")
    p.add_argument("--max-abs", type=float, help="override the dtype's max |Δlogit| tolerance (configs.TOLERANCES)")
    p.add_argument("--max-rel", type=float,
                   help="override the dtype's relative tolerance (fraction of the std of the reference's logits)")
    p.add_argument("--min-top1", type=float, help="override the dtype's minimum top-1 agreement")


def main(args) -> int:
    if getattr(args, "json_report", None):  # fail before the comparison, not after it
        from pathlib import Path

        d = Path(args.json_report).absolute().parent
        if not d.is_dir():
            raise KvtraceError(f"--json {args.json_report}: directory {d} does not exist")
    report = parity(args.artifact, against=args.against, checkpoint=args.checkpoint, steps=args.steps,
                    batch=args.batch, backend=args.backend, prompt_len=getattr(args, "prompt_len", None),
                    seed=getattr(args, "seed", 0),
                    tolerance={"max_abs": args.max_abs, "max_rel": args.max_rel, "top1": args.min_top1})
    print(harness.format_table(report))
    if getattr(args, "json_report", None):
        harness.write_report(args.json_report, report)
    if not report["passed"]:
        raise ParityFailure("; ".join(report["failures"]))
    return 0
