"""`kvtrace parity`: an artifact's logits against a reference, step by step.

Both sides see the same prompts (a ragged batch, deterministic from a seed) and the same
tokens: a prefill, then N single-token decode steps in which every row is fed the
*reference's* greedy token, so a difference at step s never leaks into the inputs of step
s + 1. The artifact runs through its own cache path (`Model.start` then `Model.step`: the
preallocated, IO-bound cache of the runtime), the reference runs one row at a time in fp32
with its own cache, so a batching or padding bug in the artifact shows up as a difference.

References:
  torch   our PyTorch model (models/transformer.py) from the checkpoint recorded in the
          manifest (or --checkpoint), or the built-in configuration's seeded random weights.
  hf      transformers' AutoModelForCausalLM on the checkpoint (fp32, eager attention).
  golden  --golden FILE: a reference run recorded earlier (--save-golden FILE, where torch is
          installed), replayed through the runtime alone: this path imports no torch and
          nothing from kvtrace.models (kvtrace.runtime.golden).

The comparison is kvtrace.runtime.parity (record the reference, replay the artifact), the same
harness as the export's validation, with its metric definitions and configs.TOLERANCES[dtype].
This module only picks the reference (kvtrace.exporter.references) and handles the command line
and its outputs (--json, --junit-xml, --summary, --plot: kvtrace.runtime.reports).
Exit 0 (pass) or 1 (ParityFailure); 2 for bad input (a golden for another model included).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from kvtrace import options
from kvtrace.config import ModelConfig
from kvtrace.errors import KvtraceError, ParityFailure
from kvtrace.options import SEED_MAX, check_int, check_number
from kvtrace.runtime import parity as harness

DEFAULT_STEPS, DEFAULT_BATCH, DEFAULT_SEED = 16, 2, 0


def read_manifest(artifact, *, verify: bool = True) -> dict:
    """The raw manifest dict, checked by the shared loader (schema, files present) and, with
    verify, every file's recorded size and sha256 (a corrupted weight file is named before the
    comparison starts: parity over a few prompts cannot see every weight row)."""
    from kvtrace.manifest import load_manifest, verify_files

    m = load_manifest(artifact)
    if verify:
        verify_files(m, full=True)
    return m.data


def parity(artifact: str, *, against: str = "torch", checkpoint: str | None = None, steps: int = DEFAULT_STEPS,
           batch: int = DEFAULT_BATCH, backend: str = "auto", prompt_len: int | None = None, seed: int = DEFAULT_SEED,
           tolerance: dict | None = None, save_golden: str | None = None, golden_top: int | None = None,
           golden_sample: int | None = None, log=print, verify: bool = True, unquantized: bool = False,
           accuracy_level: int | None = None, exact_check: bool = True, streamed: bool | None = None) -> dict:
    """Run the comparison against a reference model and return the report dict
    (report["passed"] is the verdict). save_golden: also write the reference's run to this
    golden file (kvtrace.runtime.golden), before the artifact runs. verify: check every artifact
    file's sha256 against the manifest first (~1 s per GB).

    Quantised artifacts (manifest "quant"): the reference is the model with the artifact's
    quantised weights (references.for_artifact), judged by the scheme's row; `unquantized`
    compares with the original weights instead (the scheme's ":unquantized" row: the accuracy
    the quantisation costs). accuracy_level: run onnxruntime's fused low-bit MatMul at this level
    instead of the manifest's; 1 computes in fp32, so the artifact must then match the quantised
    reference to fp32 rounding (judged by the compute dtype's row).

    streamed (--against torch with a checkpoint): the reference runs one block at a time from the
    memory-mapped checkpoint (exporter/references.py LayerStreamedReference) over the prompts and
    a fixed continuation (teacher forcing), and on the CPU the artifact runs piece by piece
    (exporter/chain.py): memory is one block's, whatever the model's size. None: streamed when
    the fp32 model would need more than half the available memory (said in a log line)."""
    from kvtrace import configs
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
    quant = manifest.get("quant")
    if (unquantized or accuracy_level is not None) and not quant:
        raise KvtraceError(f"{'--unquantized' if unquantized else '--accuracy-level'}: only for a quantised artifact "
                           f"(kvtrace export --quant); {artifact} is not quantised")
    if accuracy_level is not None and accuracy_level not in (1, 2, 3, 4):
        raise KvtraceError(f"--accuracy-level {accuracy_level}: expected 1 (fp32), 2, 3 or 4 (int8)")
    tol_key, tol_row = configs.tolerance_for(manifest, unquantized=unquantized)
    if accuracy_level == 1 and not unquantized:  # exact arithmetic: the compute dtype's own row
        tol_key, tol_row = manifest["dtype"], configs.TOLERANCES[manifest["dtype"]]
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
    avoid = (cfg.get("bos_token_id"), cfg.get("eos_token_id"), cfg.get("pad_token_id"))
    prompts = harness.make_prompts(batch, prompt_len, cfg["vocab_size"], seed, avoid=avoid)
    try:
        import torch  # noqa: F401  (the reference side; the artifact side needs none)
    except ImportError as e:
        raise KvtraceError(f"kvtrace parity --against {against} needs PyTorch for the reference model ({e}); "
                           "pip install 'kvtrace[export]', or replay a golden file: --golden FILE") from e
    from kvtrace.exporter import references

    streamed = _streamed(manifest, against, checkpoint, streamed, log)
    if streamed:
        ref = _streamed_reference(manifest, checkpoint, quant=quant and not unquantized)
    else:
        ref = references.torch_reference(manifest, checkpoint) if against == "torch" else \
            references.hf_reference(manifest, checkpoint)
    if quant and not unquantized and not streamed:
        if against != "torch":
            raise KvtraceError("--against hf on a quantised artifact: transformers runs the original weights; add "
                               "--unquantized (judged by the scheme's accuracy row) or use --against torch")
        ref = references.for_artifact(ref, manifest)
    if save_golden and ref.description.get("digest_mismatch"):
        raise KvtraceError(f"--save-golden {save_golden}: the reference checkpoint is not the one the artifact was "
                           "exported from (digests differ), so the golden would be labelled with the wrong model; "
                           "pass the artifact's own checkpoint")
    if streamed:
        trace = ref.record(prompts, steps, seed)
    else:
        trace = harness.record(ref, prompts, steps)
    ref.close()  # its weights go before the artifact's session loads
    tol = {**tol_row, **{k: v for k, v in (tolerance or {}).items() if v is not None}}
    if save_golden:
        from kvtrace.runtime import golden

        recorded = {**ref.description, "torch_version": torch.__version__}
        g = golden.from_trace(trace, manifest=manifest, artifact=artifact, reference=recorded,
                              prompt_spec={"seed": seed, "batch": batch, "prompt_len": prompt_len,
                                           "avoid": [a for a in avoid if a is not None]},
                              top=golden.DEFAULT_TOP if golden_top is None else golden_top,
                              sample=golden.DEFAULT_SAMPLE if golden_sample is None else golden_sample,
                              tolerance=tol_row)
        path = golden.save(g, save_golden)
        lg = g.header["logits"]
        log(f"golden: wrote {path} ({golden.size_summary(path)}; {batch} prompts, {steps} steps, "
            + ("every logit" if lg["top"] == lg["vocab"] else f"top-{lg['top']} + {lg['sample']} sampled of "
               f"{lg['vocab']} logits") + " per position)")
    opts = {} if accuracy_level is None else {"accuracy_level": accuracy_level}
    run = _runner(artifact, manifest, backend, streamed)
    result, backend_name = run(trace, opts)
    result = harness.judge(result, tol)
    result["tolerance_row"] = tol_key
    if exact_check and not unquantized and accuracy_level is None and \
            harness.wants_exact_check(manifest, backend_name):
        row = {**configs.TOLERANCES[manifest["dtype"]],
               **{k: v for k, v in (tolerance or {}).items() if v is not None}}
        exact, _ = run(trace, {"accuracy_level": harness.EXACT_ACCURACY_LEVEL}, backend_name)
        harness.add_exact_check(result, harness.judge(exact, row))
    return harness.make_report(manifest, artifact=artifact, backend=backend_name,
                               against=against, reference=ref.description, prompts=prompts, steps=steps,
                               seed=seed, result=result)


def _streamed(manifest: dict, against: str, checkpoint, streamed: bool | None, log) -> bool:
    """Whether the reference is streamed (parity's docstring); explicit choices are checked."""
    from kvtrace import files

    src = manifest.get("source") or {}
    from_checkpoint = checkpoint is not None or src.get("kind") == "checkpoint"
    if streamed:
        if against != "torch":
            raise KvtraceError("--streamed: only with --against torch (transformers holds its whole model)")
        if not from_checkpoint:
            raise KvtraceError("--streamed: the artifact was exported from a built-in configuration, which has no "
                               "checkpoint to stream; pass --checkpoint DIR")
        return True
    if streamed is not None or against != "torch" or not from_checkpoint:
        return False
    need = 4 * ModelConfig.from_dict(manifest["config"]).n_params()  # the fp32 reference model
    avail, where = files.available_memory()
    if avail is None or need <= avail // 2:
        return False
    log(f"the fp32 reference model needs about {need / 1e9:.1f} GB, more than half of the {avail / 1e9:.1f} GB "
        f"available ({where}): streaming it one block at a time (--streamed; its tokens after the prompts are a "
        "fixed continuation)")
    return True


class _StreamedReference:
    """The layer-streamed reference over the artifact's checkpoint, with parity's description."""

    def __init__(self, weights, cfg, description: dict, fake_quant=None):
        self.weights, self.cfg, self.description = weights, cfg, description
        self._ref_weights = fake_quant or weights

    def record(self, prompts, steps: int, seed: int):
        """The trace: prompts, then `steps` tokens per row drawn like the prompts (seed + 1)."""
        import time

        from kvtrace.exporter.references import LayerStreamedReference

        cfg = self.cfg
        avoid = (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id)
        cont = harness.make_prompts(len(prompts), steps, cfg.vocab_size, seed + 1, ragged=False, avoid=avoid) \
            if steps else [[] for _ in prompts]
        t0 = time.perf_counter()
        trace = LayerStreamedReference(cfg, self._ref_weights, self.description).run(
            prompts, cont, [cfg.n_layers])[cfg.n_layers]
        trace.seconds = time.perf_counter() - t0
        return trace

    def close(self) -> None:
        self.weights.close()


def _streamed_reference(manifest: dict, checkpoint, quant: bool) -> _StreamedReference:
    from kvtrace.exporter import references
    from kvtrace.models.checkpoint import open_checkpoint
    from kvtrace.models.stream import CheckpointWeights

    path = references._checkpoint_path(manifest, checkpoint)
    ck = open_checkpoint(path)
    weights = CheckpointWeights(ck)
    try:
        digest = weights.digest()
    except BaseException:
        weights.close()
        raise
    desc = {"kind": "checkpoint", "path": str(path), "sha256": digest, "dtype": "float32",
            "streamed": "one block at a time; tokens after the prompts: a fixed continuation (teacher forcing)"}
    src = manifest.get("source") or {}
    if src.get("sha256") and src["sha256"] != digest:
        desc["digest_mismatch"] = src["sha256"]
        print(f"warning: checkpoint {path} (sha256 {digest[:12]}…) is not the one the artifact was exported from "
              f"(sha256 {src['sha256'][:12]}…)", file=sys.stderr)
    fake = None
    if quant:
        from kvtrace.exporter.quantize import FakeQuantized, QuantSpec

        fake = FakeQuantized(ck.config, weights, QuantSpec.from_manifest(manifest["quant"]), manifest["dtype"])
        desc["weights"] = "quantised as the artifact, dequantised to fp32"
    return _StreamedReference(weights, ck.config, desc, fake)


def _runner(artifact, manifest: dict, backend: str, streamed: bool):
    """run(trace, options, backend=None) -> (unjudged replay result, backend name): the whole
    graph on the chosen backend, or, streamed on the CPU, the graph piece by piece."""
    from kvtrace.runtime.backends import choose_backend
    from kvtrace.runtime.model import Model

    on_cpu = backend == "onnxruntime" or (backend == "auto" and choose_backend(manifest) == ["onnxruntime"])

    def run(trace, opts, name=None):
        if streamed and on_cpu:
            from kvtrace.exporter import chain

            return chain.replay(artifact, trace, threads=None, prepack=bool(manifest.get("quant")),
                                **opts), "onnxruntime (piece by piece)"
        m = Model.load(artifact, backend=name or backend, **opts)  # digests were checked above
        try:
            return harness.replay(m, trace), m.backend_name
        finally:
            m.close()
    return run


def replay_golden(artifact: str, golden_file: str, *, backend: str = "auto", tolerance: dict | None = None,
                  expect: dict | None = None, verify: bool = True) -> dict:
    """--golden: the runtime alone (no torch, nothing from kvtrace.models). expect: prompt options
    given on the command line, which must agree with the golden's (it replays its own)."""
    from kvtrace.runtime import golden

    read_manifest(artifact, verify=verify)  # a damaged artifact file is named first
    g = golden.load(golden_file)
    have = {"steps": g.steps, "batch": len(g.prompts), "prompt_len": max(len(p) for p in g.prompts),
            "seed": g.header["prompts"].get("seed")}
    for k, v in (expect or {}).items():
        if v is not None and v != have[k]:
            raise KvtraceError(f"--{k.replace('_', '-')} {v}: golden {golden_file} holds {have[k]} "
                               f"({k.replace('_', ' ')}); a golden replays its own prompts and steps: drop the option")
    return golden.replay(artifact, g, backend=backend, tolerance=tolerance)


def add_arguments(p) -> None:
    """The command's options (kvtrace/cli.py builds the parser; kvtrace/options.py checks values)."""
    p.add_argument("artifact", type=options.artifact_path)
    src = p.add_argument_group("reference (one of)")
    src.add_argument("--against", choices=["torch", "hf"], default=None,
                     help="a reference model: ours in PyTorch (default) or transformers; needs torch")
    src.add_argument("--golden", metavar="FILE",
                     help="a golden file recorded with --save-golden: replayed through the runtime only (no torch)")
    p.add_argument("--checkpoint", type=options.existing_path,
                   help="reference checkpoint (default: the one recorded in the manifest)")
    p.add_argument("--save-golden", metavar="FILE",
                   help="also record the reference's run to this golden file (.npz) for later --golden replays")
    p.add_argument("--golden-top", type=options.integer(1), metavar="K",
                   help="golden files: the largest logits kept per position (default 64)")
    p.add_argument("--golden-sample", type=options.integer(0), metavar="M",
                   help="golden files: further logits kept per position, sampled uniformly from the rest (default 64)")
    p.add_argument("--steps", type=options.integer(0), help=f"decode steps after the prefill (default {DEFAULT_STEPS})")
    p.add_argument("--batch", type=options.integer(1), help=f"prompt rows (default {DEFAULT_BATCH})")
    p.add_argument("--backend", default="auto", help="auto, onnxruntime, onnxruntime-cuda, tensorrt")
    p.add_argument("--prompt-len", type=options.integer(1), help="longest prompt; the others are shorter (default 16)")
    p.add_argument("--seed", type=options.seed, help=f"seed of the random prompts (default {DEFAULT_SEED})")
    out = p.add_argument_group("outputs (written atomically; their directories are checked before running)")
    out.add_argument("--json", dest="json_report", metavar="REPORT", help="write the JSON report here")
    out.add_argument("--junit-xml", metavar="FILE", help="JUnit XML: one test case per prompt row")
    out.add_argument("--summary", metavar="FILE", help="a short Markdown summary (for CI job pages)")
    out.add_argument("--plot", metavar="FILE.png", help="max |Δlogit| per step (needs matplotlib; skipped otherwise)")
    q = p.add_argument_group("quantised artifacts")
    q.add_argument("--unquantized", action="store_true",
                   help="compare with the original (unquantised) weights, judged by the scheme's accuracy row; by "
                        "default a quantised artifact is compared with the model holding its quantised weights")
    q.add_argument("--accuracy-level", type=options.integer(1, 4),
                   help="run onnxruntime's fused low-bit MatMul at this accuracy level instead of the manifest's "
                        "(1: fp32 arithmetic, judged by the compute dtype's row: an exact check of the stored weights)")
    q.add_argument("--no-exact-check", action="store_true",
                   help="skip the second run at accuracy level 1 (fp32 arithmetic), which checks the stored "
                        "weights exactly; onnxruntime has no fast fp32 path for 8-bit weights (~20x slower)")
    p.add_argument("--max-abs", type=options.number(0.0), help="override the dtype's max |Δlogit| tolerance (configs.TOLERANCES)")
    p.add_argument("--max-rel", type=options.number(0.0),
                   help="override the dtype's relative tolerance (fraction of the std of the reference's logits)")
    p.add_argument("--min-top1", type=options.number(0.0, 1.0), help="override the dtype's minimum top-1 agreement")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of the artifact's files (sizes are still checked)")
    p.add_argument("--streamed", action="store_true", default=None,
                   help="--against torch: run the reference one block at a time from the checkpoint and, on the "
                        "CPU, the artifact piece by piece (bounded memory at any size; the tokens after the prompts "
                        "are then a fixed continuation). Default: when the fp32 model needs more than half the "
                        "available memory")


OUTPUTS = (("json_report", "--json"), ("junit_xml", "--junit-xml"), ("summary", "--summary"), ("plot", "--plot"),
           ("save_golden", "--save-golden"))


def _check_outputs(args) -> None:
    """Before anything runs: each output's directory exists, no two outputs share a path, and
    no output overwrites the golden being replayed or a file of the artifact."""
    seen = {}
    if getattr(args, "golden", None):
        seen[Path(os.path.realpath(args.golden))] = "--golden"
    for attr, opt in OUTPUTS:
        v = getattr(args, attr, None)
        if not v:
            continue
        path = options.check_report_file(opt, v, args.artifact)  # symlinks resolved
        if path in seen:
            raise KvtraceError(f"{opt} {v}: the same file as {seen[path]}")
        seen[path] = opt


def main(args) -> int:
    golden_file = getattr(args, "golden", None)
    against = getattr(args, "against", None)
    if golden_file:
        for opt, v in (("--against", against), ("--checkpoint", getattr(args, "checkpoint", None)),
                       ("--streamed", getattr(args, "streamed", None)),
                       ("--save-golden", getattr(args, "save_golden", None)),
                       ("--golden-top", getattr(args, "golden_top", None)),
                       ("--golden-sample", getattr(args, "golden_sample", None))):
            if v is not None:
                raise KvtraceError(f"{opt}: not with --golden (the golden file is the reference)")
    elif getattr(args, "save_golden", None) is None and (getattr(args, "golden_top", None) is not None
                                                        or getattr(args, "golden_sample", None) is not None):
        raise KvtraceError("--golden-top / --golden-sample: only with --save-golden")
    _check_outputs(args)
    plot_skip = None
    if getattr(args, "plot", None):
        from kvtrace.runtime import reports

        plot_skip = reports.plot_available()
    tolerance = {"max_abs": args.max_abs, "max_rel": args.max_rel, "top1": args.min_top1}
    if golden_file:
        report = replay_golden(args.artifact, golden_file, backend=args.backend, tolerance=tolerance,
                               expect={"steps": args.steps, "batch": args.batch,
                                       "prompt_len": getattr(args, "prompt_len", None), "seed": args.seed},
                               verify=not args.no_verify)
    else:
        steps = DEFAULT_STEPS if args.steps is None else args.steps
        report = parity(args.artifact, against=against or "torch", checkpoint=args.checkpoint, steps=steps,
                        batch=DEFAULT_BATCH if args.batch is None else args.batch, backend=args.backend,
                        prompt_len=getattr(args, "prompt_len", None),
                        seed=DEFAULT_SEED if args.seed is None else args.seed, tolerance=tolerance,
                        save_golden=getattr(args, "save_golden", None), golden_top=getattr(args, "golden_top", None),
                        golden_sample=getattr(args, "golden_sample", None), verify=not args.no_verify,
                        unquantized=args.unquantized, accuracy_level=args.accuracy_level,
                        exact_check=not args.no_exact_check, streamed=getattr(args, "streamed", None))
    table = harness.format_table(report)
    print(table)
    write_outputs(args, report, table, plot_skip)
    if not report["passed"]:
        raise ParityFailure("; ".join(report["failures"]))
    return 0


def write_outputs(args, report: dict, table: str, plot_skip: str | None) -> None:
    from kvtrace.runtime import reports

    if getattr(args, "json_report", None):
        harness.write_report(args.json_report, report)
    if getattr(args, "junit_xml", None):
        reports.write(args.junit_xml, reports.junit_xml(report, table), what="--junit-xml")
    if getattr(args, "summary", None):
        reports.write(args.summary, reports.markdown(report), what="--summary")
    if getattr(args, "plot", None):
        if plot_skip:
            print(f"note: --plot {args.plot} skipped: {plot_skip}")
        else:
            reports.write(args.plot, reports.plot_png(report), what="--plot")
