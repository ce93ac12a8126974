"""Shared test helpers (import as `from tests import helpers`): build artifacts and compare them
with a reference through the product's own harness (kvtrace.runtime.parity + runtime.Model)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvtrace.runtime import parity

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def prompts(cfg, lengths=(11, 7), seed: int = 0) -> list[list[int]]:
    """Prompts of the given lengths, ids uniform over the whole vocabulary (specials included)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, cfg.vocab_size, size=n).tolist() for n in lengths]


@dataclass
class Result:
    """A replay report (unjudged) with the figures tests assert on."""
    report: dict

    def __getattr__(self, k):
        s = self.__dict__["report"]["summary"]
        if k in s:
            return s[k]
        raise AttributeError(k)

    def summary(self) -> str:
        return parity.one_line(self.report)


def replay_against(artifact: Path, model, *, prompts, steps: int, backend: str = "onnxruntime",
                   graph: str = "auto") -> Result:
    """The artifact (through kvtrace.runtime.Model) against `model` (our torch model, fp32, one
    row at a time) on a ragged batch of `prompts` and `steps` decode steps; graph: the form of
    the graph to run ("cpu" model.onnx, "gpu" model.gpu.onnx; auto: model.onnx on the CPU)."""
    from kvtrace.exporter.references import TorchReference
    from kvtrace.runtime.model import Model

    trace = parity.record(TorchReference(model, {"kind": "test"}), prompts, steps)
    m = Model.load(artifact, backend=backend, threads=1, graph=graph)
    try:
        return Result(parity.replay(m, trace))
    finally:
        m.close()


def export(model, out: Path, **options) -> Path:
    """export_model without validation or logging (tests compare themselves)."""
    from kvtrace.exporter.export import export_model

    return export_model(model, out, validate=False, log=lambda m: None, **options)


def export_and_compare(model, tmp_path: Path, *, prompts, steps: int, name: str = "art", **options) -> Result:
    art = export(model, Path(tmp_path) / name, **options)
    return replay_against(art, model, prompts=prompts, steps=steps)


# ------------------------------------------------------------------- quantised artifacts: damage
def perturb_scale(art: Path, tensor: str, row: int, col: int, factor: float) -> float:
    """Multiply element [row, col] of the (external) initializer `tensor` by `factor` in place and
    refresh the manifest's file digests (a wrong scale written by a faulty quantiser, not a
    corrupted file). Returns the old value."""
    import onnx
    from onnx import TensorProto

    from kvtrace import manifest as mf

    m = onnx.load(str(art / "model.onnx"), load_external_data=False)
    t = next(t for t in m.graph.initializer if t.name == tensor)
    info = {e.key: e.value for e in t.external_data}
    assert t.data_type == TensorProto.FLOAT and t.data_location == TensorProto.EXTERNAL, tensor
    cols = t.dims[1]
    off = int(info["offset"]) + 4 * (row * cols + col)
    with open(art / info["location"], "r+b") as f:
        f.seek(off)
        old = np.frombuffer(f.read(4), np.float32)[0]
        f.seek(off)
        f.write(np.float32(old * factor).tobytes())
    data = mf.load_manifest(art).data
    data["files"] = mf.file_digests(art, list(data["files"]))
    mf.write_manifest(art, {k: v for k, v in data.items() if k != "format_version"})
    return float(old)


def head_group_that_matters(model, spec, trace) -> tuple[int, int]:
    """(group, token) of the lm_head: the reference's most frequent greedy token, and the group of
    its head column whose scale x mean |final hidden state| over that group is largest."""
    import torch

    from kvtrace.exporter import quantize as qz

    toks = np.array(trace.tokens).reshape(-1)
    tok = int(np.bincount(toks).argmax()) if toks.size else 0
    E = model.lm_head.weight if model.lm_head is not None else model.embed.weight  # (V, D)
    w = E.detach().float().numpy()[tok:tok + 1]  # (1, D)
    _, s = qz.quantize(w, spec.bits, spec.group_size, spec.method)
    # mean |x| of the final normed hidden state per group, over the trace's prompts
    with torch.no_grad():
        from kvtrace.models.transformer import DynamicCache

        p = trace.prompts[0]
        cache = DynamicCache(model.cfg, 1, dtype=torch.float32)
        hidden = {}
        h = model.norm_f.register_forward_hook(lambda mod, i, o: hidden.setdefault("x", o))
        model(torch.tensor([p]), torch.arange(len(p))[None], cache)
        h.remove()
    x = hidden["x"][0].abs().mean(0).numpy()  # (D,)
    g = spec.group_size
    contrib = [s[0, b] * x[b * g:(b + 1) * g].mean() for b in range(s.shape[1])]
    return int(np.argmax(contrib)), tok
