"""models/transformer.py on_meta(): modules built on the meta device with nn.init's functions
skipped, in the calling thread only, and nn.init restored whatever the threads' interleaving."""
from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from kvtrace.models.transformer import on_meta  # noqa: E402


def test_on_meta_builds_on_meta_without_initialisers():
    normal = nn.init.normal_
    with on_meta():
        lin = nn.Linear(4, 4)
        t = torch.zeros(3, device="cpu")
        assert nn.init.normal_(t) is t and not t.any()  # skipped
    assert lin.weight.is_meta
    assert nn.init.normal_ is normal


def test_overlapping_threads_restore_nn_init_and_leave_other_threads_alone():
    """A enters, B enters, A leaves, B leaves: each used to restore what it saw on entry, so B put
    the no-op initialisers back for good; and a thread outside on_meta() got no-op initialisers
    while another was inside."""
    saved = {n: getattr(nn.init, n) for n in ("normal_", "kaiming_uniform_", "zeros_")}
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with on_meta():
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def b():
        a_in.wait(10)
        with on_meta():
            b_in.set()
            a_out.wait(10)

    def outside():
        a_in.wait(10)
        t = torch.zeros(1000)
        nn.init.normal_(t)
        seen["initialised"] = bool(t.any())
        seen["cpu"] = not nn.Linear(2, 2).weight.is_meta

    threads = [threading.Thread(target=f) for f in (a, b, outside)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert seen == {"initialised": True, "cpu": True}
    assert {n: getattr(nn.init, n) for n in saved} == saved
    t = torch.zeros(100)
    nn.init.normal_(t)
    assert t.any()
