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

from kvtrace import options
from kvtrace.errors import KvtraceError, ParityFailure
from kvtrace.options import SEED_MAX, check_int, check_number
from kvtrace.runtime import parity as harness


def read_manifest(artifact, *, verify: bool = True) -> dict:
    """The raw manifest dict, checked by the shared loader (schema, files present) and, with
    verify, every file's recorded size and sha256 (a corrupted weight file is named before the
    comparison starts: parity over a few prompts cannot see every weight row)."""
    from kvtrace.manifest import load_manifest, verify_files

    m = load_manifest(artifact)
    if verify:
        verify_files(m, full=True)
    return m.data


def parity(artifact: str, *, against: str = "torch", checkpoint: str | None = None, steps: int = 16,
           batch: int = 2, backend: str = "auto", prompt_len: int | None = None, seed: int = 0,
           tolerance: dict | None = None, verify: bool = True) -> dict:
    """Run the comparison and return the report dict (report["passed"] is the verdict).
    verify: check every artifact file's sha256 against the manifest first (~1 s per GB)."""
    from kvtrace.configs import TOLERANCES
    from kvtrace.runtime.model import Model

    check_int("--steps", steps, 0)
    check_int("--batch", batch, 1)
    check_int("--seed", seed, 0, SEED_MAX)
    if prompt_len is not None:
        check_int("--prompt-len", prompt_len, 1)
    for k, v in (tolerance or {}).items():
        if v is not None:
            check_number(f"tolerance {k}", v, 0.0, 1.0 if k == "top1" else None)
    manifest = read_manifest(artifact, verify=verify)
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
        if steps + 1 > room:  # blame the option the user gave: not a --prompt-len they never passed
            raise KvtraceError(f"--steps {steps}: the artifact holds {room} positions, so at most {room - 1} decode "
                               "steps fit after a prompt of one token")
        prompt_len = min(16, room - steps)
    if prompt_len + steps > room:
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
    m = Model.load(artifact, backend=backend)  # digests were checked above
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
    """The command's options (kvtrace/cli.py builds the parser; kvtrace/options.py checks values)."""
    p.add_argument("artifact", type=options.artifact_path)
    p.add_argument("--against", choices=["torch", "hf"], default="torch")
    p.add_argument("--checkpoint", type=options.existing_path,
                   help="reference checkpoint (default: the one recorded in the manifest)")
    p.add_argument("--steps", type=options.integer(0), default=16, help="decode steps after the prefill")
    p.add_argument("--batch", type=options.integer(1), default=2)
    p.add_argument("--backend", default="auto")
    p.add_argument("--prompt-len", type=options.integer(1),
                   help="longest prompt; the others are shorter (default 16)")
    p.add_argument("--seed", type=options.seed, default=0, help="seed of the random prompts")
    p.add_argument("--json", dest="json_report", metavar="REPORT", type=options.existing_path,
                   help="write the JSON report here")
    p.add_argument("--max-abs", type=options.number(0.0),
                   help="override the dtype's max |Δlogit| tolerance (configs.TOLERANCES)")
    p.add_argument("--max-rel", type=options.number(0.0),
                   help="override the dtype's relative tolerance (fraction of the std of the reference's logits)")
    p.add_argument("--min-top1", type=options.number(0.0, 1.0), help="override the dtype's minimum top-1 agreement")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of the artifact's files (sizes are still checked)")


def main(args) -> int:
    if getattr(args, "json_report", None):  # fail before the comparison, not after it
        from pathlib import Path

        d = Path(args.json_report).absolute().parent
        if not d.is_dir():
            raise KvtraceError(f"--json {args.json_report}: directory {d} does not exist")
        if Path(args.json_report).is_dir():
            raise KvtraceError(f"--json {args.json_report}: is a directory; name a file")
    report = parity(args.artifact, against=args.against, checkpoint=args.checkpoint, steps=args.steps,
                    batch=args.batch, backend=args.backend, prompt_len=getattr(args, "prompt_len", None),
                    seed=getattr(args, "seed", 0), verify=not getattr(args, "no_verify", False),
                    tolerance={"max_abs": args.max_abs, "max_rel": args.max_rel, "top1": args.min_top1})
    print(harness.format_table(report))
    if getattr(args, "json_report", None):
        harness.write_report(args.json_report, report)
    if not report["passed"]:
        raise ParityFailure("; ".join(report["failures"]))
    return 0
