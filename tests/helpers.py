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
