"""The `kvtrace` command line. Subcommands import their modules lazily, so `generate` and
`bench` run where torch is not installed."""
from __future__ import annotations

import argparse
import sys


def _add_export(sub):
    p = sub.add_parser("export", help="export a checkpoint (or a built-in model) to an ONNX artifact")
    p.add_argument("--arch", choices=["gpt_neox", "llama", "starcoder2", "xglm"],
                   help="architecture; read from config.json when --checkpoint is given")
    p.add_argument("--checkpoint", help="Hugging Face checkpoint directory (config.json + *.safetensors)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fp16", action="store_true", help="store weights and compute in float16")
    g.add_argument("--bf16", action="store_true", help="store weights and compute in bfloat16")
    p.add_argument("--cache", choices=["static", "dynamic"], default="static", help="KV cache layout")
    p.add_argument("--max-seq", type=int, help="static cache length / longest sequence (default min(2048, model max))")
    p.add_argument("--max-batch", type=int, help="largest batch the artifact is profiled for (default 8)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset: 24 (fused, default) or 17 (portable)")
    p.add_argument("--out", help="artifact directory (default ./kvtrace-ARCH-DTYPE-CACHE)")
    p.add_argument("--external-data", action="store_true", help="store weights in model.onnx.data")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading pytorch_model.bin (pickle can execute arbitrary code)")
    p.add_argument("--no-validate", action="store_true", help="skip the onnxruntime check against the reference")
    p.add_argument("--force", action="store_true", help="replace an existing artifact directory")
    p.set_defaults(func=lambda a: __import__("exporter.export", fromlist=["main"]).main(a))


def _add_generate(sub):
    p = sub.add_parser("generate", help="generate text or tokens from an artifact (no torch needed)")
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
    p.set_defaults(func=lambda a: __import__("runtime.cli", fromlist=["generate_main"]).generate_main(a))


def _add_parity(sub):
    p = sub.add_parser("parity", help="compare an artifact's logits with the reference, step by step")
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
    p.add_argument("--min-top1", type=float, help="override the dtype's minimum top-1 agreement")
    p.set_defaults(func=lambda a: __import__("exporter.parity", fromlist=["main"]).main(a))


def _add_bench(sub):
    p = sub.add_parser("bench", help="prefill and decode latency, throughput and memory")
    p.add_argument("artifact")
    p.add_argument("--backend", default="auto")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compare", choices=["hf"], help="also time transformers' generate in the same run")
    p.add_argument("--checkpoint", help="checkpoint for --compare hf (default: the manifest's source)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=lambda a: __import__("runtime.bench", fromlist=["main"]).main(a))


def _add_build(sub):
    p = sub.add_parser("build", help="build a TensorRT engine from an artifact's model.onnx")
    p.add_argument("artifact")
    p.add_argument("--max-batch", type=int)
    p.add_argument("--max-seq", type=int)
    p.add_argument("--opt-batch", type=int)
    p.add_argument("--opt-seq", type=int)
    p.add_argument("--compute-capability", nargs="+", default=None,
                   help="target GPU(s), e.g. sm89 (needed to build on a machine without a GPU)")
    p.add_argument("--timing-cache", help="timing cache file to read and update")
    p.add_argument("--workspace", type=float, help="builder workspace limit in GB")
    p.add_argument("--optimization-level", type=int, choices=range(6), metavar="0-5",
                   help="TensorRT builder optimization level (default: TensorRT's, 3); 0 builds fastest")
    p.add_argument("--flavour", choices=["tensorrt", "tensorrt_rtx"],
                   help="TensorRT Python module to use (default: tensorrt if installed, else tensorrt_rtx)")
    p.add_argument("--verbose", action="store_true", help="print TensorRT's warnings")
    p.add_argument("--inspect", action="store_true", help="list the network's layer types and counts")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=lambda a: __import__("exporter.trt", fromlist=["main"]).main(a))


def _add_convert(sub):
    p = sub.add_parser("convert-llama2c", help="convert a llama2.c .bin checkpoint to a Hugging Face directory")
    p.add_argument("bin", help="llama2.c checkpoint (legacy version 0 format)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=lambda a: __import__("models.llama2c", fromlist=["main"]).main(a))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvtrace", description=__doc__)
    ap.add_argument("--version", action="version", version=f"kvtrace {_version()}")
    sub = ap.add_subparsers(dest="command", required=True)
    for add in (_add_export, _add_generate, _add_parity, _add_bench, _add_build, _add_convert):
        add(sub)
    return ap


def _version() -> str:
    from runtime import __version__
    return __version__


def main(argv=None) -> int:
    from runtime.errors import KvtraceError, ParityFailure

    args = parser().parse_args(argv)
    try:
        rc = args.func(args)
    except ParityFailure as e:
        print(f"kvtrace: parity failed: {e}", file=sys.stderr)
        return 1
    except KvtraceError as e:
        print(f"kvtrace: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
