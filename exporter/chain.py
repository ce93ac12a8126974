"""The exported graph run as a chain of pieces, one block's weights in memory at a time.

Full validation (docs/validation.md) runs every node of model.onnx on its own weight bytes
against the reference. One onnxruntime session over the whole graph touches every weight page:
at Pythia-160M in fp32 that is the 649 MB of the checkpoint again, on top of what the process
already holds. So the graph is cut into pieces, and the trace is replayed piece by piece:

  split(model, n_layers) -> [Piece]
      every node of the graph in exactly one piece, in the graph's (topological) order: piece 0
      the context (embedding lookup, positions, masks, cache write indices), piece i + 1 the
      nodes of block i, the last piece the final norm and the head. A node goes to the piece of
      the block whose weights it reads (initializers named layers.{i}.*; norm_f.* and lm_head.*
      for the head), or to a later one when one of its inputs is made there; a node computed
      from weights alone (the standard spelling's Transpose of a weight) goes to the first piece that
      reads its output. A tensor made in
      one piece and read in a later one (the residual stream, the mask) is an output of the
      first and an input of the second. Each piece is a graph of its own with the artifact's
      opsets, whose external initializers keep their file, offset and length: onnxruntime maps
      the same bytes of model.onnx.data.
  replay(artifact_dir, trace, ...) -> the parity report of kvtrace.runtime.parity.replay
      for each piece in order, the runtime itself (kvtrace.runtime.Model: its batching, padding,
      cache bookkeeping) replays the whole trace (prompts, then the fixed continuation) on a
      backend that runs that piece only. The tensors a later piece reads are kept per call
      (a few KB: hidden states of the validation's ~20 positions); the cache of block i is made
      and read in the pass of piece i alone (other blocks' caches are bound, never touched:
      lazily zeroed pages cost no memory). The last pass, the head's, yields the logits that
      are judged. Every call of every pass must feed the same shapes as the first pass (the
      same Model on the same trace): checked, so a misaligned pass cannot go unnoticed.

Layer-major order computes what one whole-graph session computes: each node gets the same
inputs, and a block's output at a position depends only on earlier blocks' outputs at that and
earlier positions (the argument of exporter/references.py's layer-streamed reference). Memory is
one piece's weights (the largest: the head) plus the cache of one block.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvtrace import io_spec
from kvtrace.errors import KvtraceError


@dataclass
class Piece:
    index: int
    what: str  # "context" | "block i" | "head"
    nodes: list = field(default_factory=list)  # NodeProto, in graph order
    inputs: list[str] = field(default_factory=list)  # graph inputs and tensors of earlier pieces
    outputs: list[str] = field(default_factory=list)  # graph outputs and tensors later pieces read
    keep: list[str] = field(default_factory=list)  # outputs later pieces read (kept per call)
    initializers: list[str] = field(default_factory=list)
    weight_bytes: int = 0  # of its initializers (external: the lengths onnxruntime maps)
    graph_bytes: bytes = b""  # the piece as a serialized ModelProto


def _weight_piece(name: str, n_layers: int) -> int:
    """The piece whose weights an initializer is (0: not a block's or the head's)."""
    if name.startswith("layers."):
        return int(name.split(".")[1]) + 1
    if name.startswith(("norm_f.", "lm_head.")):
        return n_layers + 1
    return 0


def split(model, n_layers: int) -> list[Piece]:
    """Cut `model` (a ModelProto whose external data is not loaded) into pieces (module docstring)."""
    import onnx
    from onnx import helper

    from kvtrace.exporter.onnx_graph import standard_twin

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    made_in: dict[str, int] = {}  # tensor -> piece that makes it
    pieces = [Piece(i, "context" if i == 0 else "head" if i == n_layers + 1 else f"block {i - 1}")
              for i in range(n_layers + 2)]
    where: list[int] = []  # piece of each node, in graph order
    constant: list[bool] = []  # reads initializers (or such nodes' outputs) alone: the same every call
    constant_out: set[str] = set()
    for node in g.node:
        p = 0
        for x in node.input:
            if x in inits:
                p = max(p, _weight_piece(x, n_layers))
            elif x in made_in:
                p = max(p, made_in[x])
        where.append(p)
        c = all(not x or x in inits or x in constant_out for x in node.input)
        constant.append(c)
        if c:
            constant_out.update(node.output)
        for o in node.output:
            made_in[o] = p
    # a node computed from weights alone (MatMul(x, Transpose(w))'s Transpose) runs in the
    # first piece that reads it, not in the context: else its output, as big as the weight, would
    # be handed on and kept once per call
    outputs = {v.name for v in g.output}
    first_reader: dict[str, int] = {}
    for k in range(len(g.node) - 1, -1, -1):
        node = g.node[k]
        if constant[k] and not any(o in outputs for o in node.output):
            readers = [first_reader[o] for o in node.output if o in first_reader]
            if readers:
                where[k] = max(where[k], min(readers))
        for x in node.input:
            if x:
                first_reader[x] = min(first_reader.get(x, where[k]), where[k])
        for o in node.output:
            made_in[o] = where[k]
    for node, p in zip(g.node, where):
        pieces[p].nodes.append(node)
    read_by: dict[str, set[int]] = {}  # tensor -> pieces that read it
    for pc in pieces:
        for node in pc.nodes:
            for x in node.input:
                if x:
                    read_by.setdefault(x, set()).add(pc.index)
    graph_in = {v.name: v for v in g.input}
    graph_out = {v.name: v for v in g.output}
    inferred = onnx.shape_inference.infer_shapes(standard_twin(model), strict_mode=False)
    value_info = {v.name: v for v in inferred.graph.value_info}  # type and (symbolic) shape
    for pc in pieces:
        made = {o for n in pc.nodes for o in n.output}
        read = [x for n in pc.nodes for x in n.input if x]
        pc.initializers = list(dict.fromkeys(x for x in read if x in inits))
        pc.inputs = list(dict.fromkeys(x for x in read if x not in made and x not in inits))
        pc.outputs = [o for n in pc.nodes for o in n.output
                      if o and (o in graph_out or any(r > pc.index for r in read_by.get(o, ())))]
        pc.keep = [o for o in pc.outputs if o not in graph_out]
        if any(o in graph_out and any(r > pc.index for r in read_by.get(o, ())) for o in pc.outputs):
            raise KvtraceError(f"internal error: piece {pc.what} makes a graph output that a later piece reads")
        pc.weight_bytes = sum(_nbytes(inits[x]) for x in pc.initializers)
        for x in pc.inputs:
            if x not in graph_in and made_in.get(x, pc.index) >= pc.index:
                raise KvtraceError(f"internal error: piece {pc.what} reads {x!r}, made by no earlier piece")

        def info(name, table):
            if name in table:
                return table[name]
            if name not in value_info:
                raise KvtraceError(f"internal error: no type inferred for {name!r} (piece {pc.what})")
            return value_info[name]

        graph = helper.make_graph(pc.nodes, f"{g.name}_{pc.what.replace(' ', '_')}",
                                  [info(x, graph_in) for x in pc.inputs],
                                  [info(x, graph_out) for x in pc.outputs],
                                  initializer=[inits[x] for x in pc.initializers])
        m = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
        pc.graph_bytes = m.SerializeToString()
    out = [pc for pc in pieces if pc.nodes]
    if sum(len(pc.nodes) for pc in out) != len(g.node):
        raise KvtraceError("internal error: the pieces do not hold every node of the graph once")
    return out


def _nbytes(t) -> int:
    """Bytes of an initializer without reading its data (external: its recorded length)."""
    from onnx import TensorProto, helper

    for e in t.external_data:
        if e.key == "length":
            return int(e.value)
    if t.raw_data:
        return len(t.raw_data)
    n = int(np.prod(t.dims, dtype=np.int64))
    if t.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return (n + 1) // 2
    return n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


class _PieceBackend:
    """The runtime's backend protocol (runtime/backends.py) over one piece: binds and feeds what
    the piece reads, runs it, keeps what later pieces read, and stands in for the outputs the
    piece does not make (other blocks' caches: left as bound; dynamic presents: zeros of the
    contract's shape, never read by this piece)."""

    def __init__(self, inner, piece: Piece, store: dict, calls: list, n_layers: int):
        self.inner, self.piece, self.store, self.calls = inner, piece, store, calls
        self.name = inner.name
        self.device = "cpu"
        self._ins = set(piece.inputs)
        self._outs = set(piece.outputs)
        self._bound_in: dict = {}
        self._bound_out: dict = {}
        self._made: dict = {}  # stand-ins for outputs this piece does not make, per run
        self._call = 0
        self._cross_in = [x for x in piece.inputs if x in store]
        self._past_of = {present: past for past, present in io_spec.cache_pairs(n_layers)}

    def alloc(self, shape, dtype: str):
        """A zeroed buffer whose pages exist only once written: an anonymous mapping of its own
        (calloc may hand back heap memory it zeroes by writing: 300 MB of caches of blocks this
        piece never runs, at Pythia-160M)."""
        import mmap

        from kvtrace.runtime.backends import NUMPY_STORAGE

        shape = tuple(int(s) for s in shape)
        dt = np.dtype(NUMPY_STORAGE[dtype])
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        host = np.frombuffer(mmap.mmap(-1, n), dtype=dt).reshape(shape) if n else np.zeros(shape, dt)
        return self.inner._wrap(host, dtype)

    def bind_input(self, name: str, buf) -> None:
        self._bound_in[name] = buf
        if name in self._ins:
            self.inner.bind_input(name, buf)

    def bind_output(self, name: str, buf) -> None:
        self._bound_out[name] = buf
        if name in self._outs:
            self.inner.bind_output(name, buf)

    def run_graph(self, key, feeds) -> None:
        self.run(feeds)

    def run(self, feeds: dict) -> None:
        call = self._call
        self._call += 1
        shapes = {k: tuple(np.shape(v)) for k, v in feeds.items()}
        if call == len(self.calls):
            self.calls.append(shapes)
        elif call > len(self.calls) or self.calls[call] != shapes:
            raise KvtraceError(f"internal error: chained validation, piece {self.piece.what}: call {call} feeds "
                               f"{shapes}, the first pass fed {self.calls[call] if call < len(self.calls) else 'nothing'}")
        for x in self._cross_in:
            arr = self.store[x][call]
            self.inner.bind_input(x, self.inner._wrap(arr, _dtype_name(arr)))
        for x in self.piece.keep:  # a fresh output each run (shapes change between prefill and steps)
            self.inner.bind_output(x, None)
        self.inner.run({k: v for k, v in feeds.items() if k in self._ins})
        for x in self.piece.keep:
            self.store.setdefault(x, []).append(np.array(self.inner.to_host(self.inner.output(x))))
        self._made = {}
        T = int(np.shape(feeds[io_spec.INPUT_IDS])[1])
        for name, buf in self._bound_out.items():
            if buf is None and name not in self._outs:  # a dynamic present of another block
                past = self._bound_in[self._past_of[name]]
                B, H, P, D = past.shape
                self._made[name] = self.alloc((B, H, P + T, D), past.dtype)

    def output(self, name: str):
        if name in self._made:
            return self._made[name]
        if name in self._outs:
            return self.inner.output(name)
        return self._bound_out[name]

    def to_host(self, buf):
        return self.inner.to_host(buf)

    def release(self) -> None:
        self.inner.release()


def _dtype_name(arr: np.ndarray) -> str:
    from kvtrace.runtime.backends import NUMPY_STORAGE

    for k, v in NUMPY_STORAGE.items():
        if np.dtype(v) == arr.dtype and k != "bfloat16":
            return k
    raise KvtraceError(f"internal error: a piece's tensor of dtype {arr.dtype}")


def replay(artifact_dir: Path, trace, *, threads: int = 1, prepack: bool = False, accuracy_level=None) -> dict:
    """The trace replayed on the artifact's graph piece by piece (module docstring): the report
    of kvtrace.runtime.parity.replay for the whole graph, plus "chain" (pieces, nodes)."""
    import time

    from kvtrace.runtime import parity

    t0 = time.perf_counter()
    report, info = _run(artifact_dir, trace.prompts, trace.tokens, lambda m: parity.replay(m, trace),
                        threads=threads, prepack=prepack, accuracy_level=accuracy_level)
    report["chain"] = info
    report["seconds"]["artifact"] = round(time.perf_counter() - t0, 3)  # every pass, not the last one
    return report


def run(artifact_dir: Path, prompts, tokens, *, threads: int = 1, prepack: bool = False) -> tuple[list, dict]:
    """The artifact's logits for `prompts` (a prefill) then one step per entry of `tokens` (one
    token per row), piece by piece: ([prefill logits (B, T, V), step logits (B, V), ...], the
    chain's description)."""
    def final(m):
        out = [np.array(m.start(prompts))]
        out += [m.step(tok) for tok in tokens]
        return out
    return _run(artifact_dir, prompts, tokens, final, threads=threads, prepack=prepack)


def _run(artifact_dir: Path, prompts, tokens, final_pass, *, threads: int, prepack: bool, accuracy_level=None):
    """(final_pass(model) on the head's pass, chain description): every piece in order, each
    pass running `prompts` then `tokens` through the runtime's Model on that piece alone."""
    import onnx

    from kvtrace.manifest import load_manifest
    from kvtrace.runtime.backends import OrtBackend, _graph_file
    from kvtrace.runtime.model import Model

    artifact_dir = Path(artifact_dir)
    manifest = load_manifest(artifact_dir)
    onnx_file = _graph_file(artifact_dir, manifest, "cpu", "cpu")[0]
    graph = onnx.load(str(onnx_file), load_external_data=False)
    n_layers = int(manifest.data["config"]["n_layers"])
    pieces = split(graph, n_layers)
    n_nodes = len(graph.graph.node)
    del graph
    # the whole graph loads (its kernels resolve, its external data maps) in one session, which
    # is not run, so no weight page is touched: basic optimisation and no prepacking, because the
    # full level folds the Casts onnxruntime puts before fp16 MatMuls on the CPU into fp32 copies
    # of every weight at load (a 7B fp16 graph: 27 GB; measured at 160M fp16: 0.56 GB vs none)
    OrtBackend(artifact_dir, manifest, threads=threads, optimization="basic", prepack=False,
               accuracy_level=accuracy_level).release()
    store: dict[str, list] = {}
    calls: list = []
    result = None
    for k, pc in enumerate(pieces):
        inner = OrtBackend(artifact_dir, manifest, threads=threads, prepack=prepack, accuracy_level=accuracy_level,
                           graph_bytes=pc.graph_bytes)
        be = _PieceBackend(inner, pc, store, calls, n_layers)
        m = Model(artifact_dir, manifest, be, None)
        try:
            if k == len(pieces) - 1:
                result = final_pass(m)
            else:
                m.start(prompts)
                for tok in tokens:
                    m.step(tok)
            if be._call != len(calls):
                raise KvtraceError(f"internal error: chained run, piece {pc.what} ran {be._call} calls, "
                                   f"the first pass {len(calls)}")
        finally:
            m.close()
            del m, be, inner
        later = {x for p in pieces[k + 1:] for x in p.inputs}
        for x in [x for x in store if x not in later]:  # read by no later piece
            del store[x]
    return result, {"pieces": len(pieces), "nodes": n_nodes,
                    "largest_piece_bytes": max(pc.weight_bytes for pc in pieces)}
