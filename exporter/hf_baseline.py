"""transformers' `generate`, timed the way `kvtrace bench --compare hf` times kvtrace.

Kept outside the runtime because it needs torch; the runtime finds it through the
"kvtrace.baselines" entry point `hf` (pyproject.toml) when asked for --compare hf.
"""
from __future__ import annotations

import time

from kvtrace.errors import KvtraceError


def load(checkpoint: str, threads: int, device: str = "cpu", dtype: str = "float32"):
    """transformers' model of `checkpoint` in eval mode on `device` ("cpu", or "cuda" for
    `kvtrace gpu-check --compare hf`), weights in `dtype`."""
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise KvtraceError(f"--compare hf needs torch and transformers installed ({e})") from e
    torch.set_num_threads(threads)
    try:
        # transformers' default attention implementation (sdpa): what a user of generate gets
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as e:
        raise KvtraceError(f"--compare hf: transformers cannot load checkpoint {checkpoint}: {e}") from e
    if device != "cpu":
        if not torch.cuda.is_available():
            raise KvtraceError(f"--compare hf: torch {torch.__version__} cannot use the GPU (a CPU-only build?)")
        model = model.to(device)
    return model.eval(), {"transformers": transformers.__version__, "torch": torch.__version__,
                          "attention": getattr(model.config, "_attn_implementation", None),
                          "torch_threads": torch.get_num_threads()}


def runner(model, prompts: list[list[int]], new_tokens: int):
    """One run: generate 1 token, then generate new_tokens -> (t(1) ms, t(N) ms)."""
    import torch

    ids = torch.tensor(prompts, dtype=torch.long, device=model.device)  # (B, L): same length, no padding
    mask = torch.ones_like(ids)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def gen(n: int) -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n, use_cache=True, pad_token_id=pad)
            if ids.is_cuda:
                torch.cuda.synchronize()  # the GPU work is done when the clock stops
            dt = time.perf_counter() - t0
        if out.shape[1] != ids.shape[1] + n:
            raise KvtraceError(f"transformers generated {out.shape[1] - ids.shape[1]} tokens, asked for {n}")
        return dt * 1e3

    return lambda: (gen(1), gen(new_tokens))
