"""The `kvtrace` command. Each command's options and entry point live in its own module
(`add_arguments(parser)`, `main(args)`); this file only knows their names and imports the one
module the command line asks for, so `kvtrace generate` never imports the exporter (or torch),
and a command whose extra is not installed says which extra to install.

Exit statuses: 0 success; 1 a check failed (parity outside tolerance, non-finite logits);
2 bad input (a message naming the file, option or manifest key); 3 an unexpected internal error
(one line; `--debug` shows the traceback); 130 / 143 interrupted (SIGINT / SIGTERM).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass

from . import __version__
from .errors import KvtraceError, Terminated


@dataclass(frozen=True)
class Command:
    module: str  # defines add_arguments(parser) and main(args) -> int
    help: str
    extra: str | None  # the pip extra the module needs beyond the runtime, if any


COMMANDS: dict[str, Command] = {
    "export": Command("kvtrace.exporter.export", "export a checkpoint (or a built-in model) to an ONNX artifact",
                      "export"),
    "generate": Command("kvtrace.runtime.generate_cli", "generate text or tokens from an artifact (no torch needed)",
                        None),
    "parity": Command("kvtrace.exporter.parity", "compare an artifact's logits with a reference (or a golden file), "
                      "step by step", None),
    "bench": Command("kvtrace.runtime.bench", "prefill and decode latency, throughput and memory", None),
    "serve": Command("kvtrace.runtime.serve", "serve an artifact over an OpenAI-compatible HTTP API with continuous "
                     "batching", "serve"),
    "build": Command("kvtrace.exporter.trt", "build a TensorRT engine from an artifact; or print the trtexec command "
                     "(--print-trtexec), or check and record an engine built elsewhere (--import)", "trt"),
    "gpu-check": Command("kvtrace.runtime.gpu_check", "on an NVIDIA GPU: check device, versions, node placement, "
                         "parity with the CPU path, in-place cache, CUDA graphs and timings; one report", None),
    "convert-llama2c": Command("kvtrace.models.llama2c", "convert a llama2.c .bin checkpoint to a Hugging Face "
                               "directory", "export"),
}

DESCRIPTION = ("Export decoder-only language models (gpt_neox, llama, starcoder2, xglm) to ONNX and TensorRT with "
               "an explicit KV cache, run and serve them, and check their logits against a reference.")
EPILOG = ("exit status: 0 ok; 1 a check failed (parity, non-finite logits); 2 bad input; 3 internal error "
          "(--debug prints the traceback); 130/143 interrupted.\n`kvtrace COMMAND --help` lists a command's options.")

# third-party modules -> the extra that installs them (for the one-line message when one is missing)
EXTRA_OF = {"torch": "export", "onnx": "export", "safetensors": "export", "ml_dtypes": "export",
            "transformers": "test", "tensorrt": "trt", "tensorrt_rtx": "trt",
            "starlette": "serve", "uvicorn": "serve", "jinja2": "serve"}


def _debug_requested(argv) -> bool:
    return "--debug" in argv or os.environ.get("KVTRACE_DEBUG", "") not in ("", "0")


def _load(name: str, cmd: Command):
    try:
        return importlib.import_module(cmd.module)
    except ImportError as e:
        top = (e.name or "").split(".")[0]
        extra = EXTRA_OF.get(top) or cmd.extra
        if top.startswith("kvtrace") or extra is None:
            raise
        raise KvtraceError(f"`kvtrace {name}` needs the '{extra}' extra ({top} is not installed): "
                           f"pip install 'kvtrace[{extra}]'") from e


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error printed as ONE line (the option and what is wrong, plus
    where to look), exit status 2 -- like every other bad input."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def parser(command: str | None = None) -> tuple[argparse.ArgumentParser, object]:
    """The parser, with the options of `command` only (the others are listed by name and help)."""
    ap = _Parser(prog="kvtrace", description=DESCRIPTION, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"kvtrace {__version__}")
    ap.add_argument("--debug", action="store_true", help="print Python tracebacks of errors")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    module = None
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        if name == command:
            module = _load(name, cmd)
            module.add_arguments(p)
    return ap, module


def _one_line(e: BaseException) -> str:
    """The message on one line (a wrapped third-party message may span several)."""
    return " ".join(str(e).split())


def _command_word(argv) -> str | None:
    for a in argv:
        if not a.startswith("-"):
            return a
    return None


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    import signal
    import threading

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    try:  # a path given as non-UTF-8 bytes is printed back as the same bytes, not a crash
        sys.stdout.reconfigure(errors="surrogateescape")
    except (AttributeError, ValueError, OSError):
        pass
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)  # cleans up like Ctrl-C (exit 143)
    try:
        word = _command_word(argv)
        ap, module = parser(word if word in COMMANDS else None)
        try:
            args = ap.parse_args(argv)
        except SystemExit as e:  # --help, --version, or a usage error (already printed in one line)
            return e.code if isinstance(e.code, int) else 2
        return int(module.main(args) or 0)
    except KvtraceError as e:
        if debug:
            raise
        print(f"kvtrace: {e.label}: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:  # SIGINT, or SIGTERM (Terminated); e.args: what the command undid
        term = isinstance(e, Terminated)
        what = "terminated (SIGTERM)" if term else "interrupted"
        print(f"kvtrace: {what}{': ' + str(e.args[0]) if e.args else ''}", file=sys.stderr)
        return 143 if term else 130
    except BrokenPipeError:  # `kvtrace generate ... | head`: the reader left; not an error of ours
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except MemoryError:
        if debug:
            raise
        print("kvtrace: error: out of memory (the model, batch or --max-seq does not fit in this machine's memory)",
              file=sys.stderr)
        return 2
    except OSError as e:  # a file problem that no check caught: name the file
        if debug:
            raise
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"kvtrace: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if debug:
            raise
        print(f"kvtrace: internal error: {type(e).__name__}: {_one_line(e)} (run again with --debug for the traceback)",
              file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
