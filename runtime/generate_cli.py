"""`kvtrace generate`: the runtime's command line (the parser is in exporter/cli.py). No torch."""
from __future__ import annotations

import json
import sys

from kvtrace.errors import KvtraceError


def _parse_ids(items: list[str]) -> list[list[int]]:
    out = []
    for s in items:
        try:
            ids = [int(x) for x in s.replace(" ", "").split(",") if x != ""]
        except ValueError:
            raise KvtraceError(f"--input-ids {s!r}: expected comma-separated integers like 1,2,3") from None
        if not ids:
            raise KvtraceError(f"--input-ids {s!r}: empty token list")
        out.append(ids)
    return out


def add_arguments(p) -> None:
    """The command's options (kvtrace/cli.py builds the parser)."""
    p.add_argument("artifact")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", nargs="+", help="one or more text prompts (run as one batch)")
    src.add_argument("--input-ids", nargs="+", help="one or more comma-separated token id lists")
    p.add_argument("--max-new-tokens", type=int, default=32)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true")
    mode.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", nargs="+", default=[], help="stop strings")
    p.add_argument("--stream", action="store_true", help="print text as tokens are produced")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    p.add_argument("--backend", default="auto", help="auto, onnxruntime, onnxruntime-cuda, tensorrt")
    p.add_argument("--allow-cpu-nodes", action="store_true",
                   help="onnxruntime-cuda: run even if onnxruntime places some nodes on the CPU (refused by default)")
    p.add_argument("--no-cuda-graph", action="store_true", help="GPU backends: do not capture decode steps as CUDA graphs")


def gpu_options(args) -> dict:
    """Backend options from --allow-cpu-nodes / --no-cuda-graph (only those given: the CPU
    backend ignores them, and a backend without them is not passed them)."""
    opts = {}
    if getattr(args, "allow_cpu_nodes", False):
        opts["allow_cpu_nodes"] = True
    if getattr(args, "no_cuda_graph", False):
        opts["cuda_graph"] = False
    return opts


def main(args) -> int:
    from .model import Model

    model = Model.load(args.artifact, backend=args.backend, **gpu_options(args))
    for note in model.skipped_backends:  # e.g. an engine for another GPU: say why it was not used
        print(f"kvtrace: note: backend {note}; using {model.backend_name}", file=sys.stderr)
    for note in getattr(model.backend, "notes", []):  # e.g. CUDA graphs off, and why
        print(f"kvtrace: note: {model.backend_name}: {note}", file=sys.stderr)
    if args.prompt is not None:
        if model.tokenizer is None:
            raise KvtraceError(f"artifact {args.artifact} has no tokenizer: use --input-ids instead of --prompt")
        prompts = list(args.prompt)
    else:
        prompts = _parse_ids(args.input_ids)
    if (args.top_k is not None or args.top_p is not None) and args.greedy:
        raise KvtraceError("--top-k/--top-p only apply when sampling (give --temperature, not --greedy)")
    greedy = True if args.greedy else None  # None: greedy unless --temperature/--top-k/--top-p
    B = len(prompts)
    stream = args.stream and not args.json
    on_token = None
    if stream:
        def on_token(row, token_id, delta):
            if model.tokenizer is None:
                sys.stdout.write((f"[{row}] " if B > 1 else "") + f"{token_id}\n")
            elif delta:
                # one prompt: plain text as it comes; several: each chunk tagged with its row
                sys.stdout.write(delta if B == 1 else f"[{row}] {delta!r}\n")
            sys.stdout.flush()

    results = model.generate(prompts, max_new_tokens=args.max_new_tokens, greedy=greedy,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             repetition_penalty=args.repetition_penalty, seed=args.seed,
                             stop_strings=args.stop or (), on_token=on_token)
    if args.json:
        for r in results:
            print(json.dumps(r.to_json(), ensure_ascii=False))
    elif stream:
        if B == 1 and model.tokenizer is not None:
            print()
    else:
        for i, r in enumerate(results):
            if B > 1:
                print(f"--- [{i}] finish_reason={r.finish_reason}")
            if r.text is not None:
                print(r.text)
            else:
                print(",".join(str(t) for t in r.token_ids))
    return 0
