"""config.json reading (both forms) and strict checkpoint loading: good and bad input."""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

from tests import tiny_hf  # noqa: E402
from kvtrace.models.checkpoint import load_checkpoint  # noqa: E402
from kvtrace.config import ConfigError  # noqa: E402
from kvtrace.models.hf import config_from_hf  # noqa: E402
from kvtrace.models.transformer import StaticCache  # noqa: E402
from kvtrace.errors import KvtraceError  # noqa: E402

# ----------------------------------------------------------------------------- config forms
# config.json as published checkpoints have it (the older form), trimmed to what matters
PYTHIA_160M = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "bos_token_id": 0,
               "eos_token_id": 0, "hidden_act": "gelu", "hidden_size": 768, "intermediate_size": 3072,
               "layer_norm_eps": 1e-05, "max_position_embeddings": 2048, "num_attention_heads": 12,
               "num_hidden_layers": 12, "rotary_emb_base": 10000, "rotary_pct": 0.25,
               "tie_word_embeddings": False, "use_parallel_residual": True, "vocab_size": 50304}
CODELLAMA_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": 1, "eos_token_id": 2,
                "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 11008,
                "max_position_embeddings": 16384, "num_attention_heads": 32, "num_hidden_layers": 32,
                "num_key_value_heads": 32, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 1000000,
                "tie_word_embeddings": False, "vocab_size": 32016}
LLAMA32_1B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "head_dim": 64,
              "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 8192,
              "max_position_embeddings": 131072, "mlp_bias": False, "num_attention_heads": 32,
              "num_hidden_layers": 16, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
              "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                               "original_max_position_embeddings": 8192, "rope_type": "llama3"},
              "rope_theta": 500000.0, "tie_word_embeddings": True, "vocab_size": 128256,
              "bos_token_id": 128000, "eos_token_id": [128001, 128008]}
STARCODER2_3B = {"architectures": ["Starcoder2ForCausalLM"], "model_type": "starcoder2", "bos_token_id": 0,
                 "eos_token_id": 0, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 3072,
                 "intermediate_size": 12288, "max_position_embeddings": 16384, "norm_epsilon": 1e-05,
                 "num_attention_heads": 24, "num_hidden_layers": 30, "num_key_value_heads": 2,
                 "rope_theta": 999999.4420358813, "sliding_window": 4096, "use_bias": True, "vocab_size": 49152}
XGLM_564M = {"architectures": ["XGLMForCausalLM"], "model_type": "xglm", "activation_function": "gelu",
             "attention_heads": 16, "d_model": 1024, "ffn_dim": 4096, "max_position_embeddings": 2048,
             "num_layers": 24, "pad_token_id": 1, "scale_embedding": True, "vocab_size": 256008,
             "bos_token_id": 0, "eos_token_id": 2}
LINEAR_OLD = {**CODELLAMA_7B, "rope_scaling": {"type": "linear", "factor": 4.0}}
DYNAMIC_OLD = {**CODELLAMA_7B, "rope_scaling": {"type": "dynamic", "factor": 2.0}}
YARN_OLD = {**CODELLAMA_7B, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                             "original_max_position_embeddings": 4096}}
NEOX_LINEAR_OLD = {**PYTHIA_160M, "rope_scaling": {"type": "linear", "factor": 2.0}}
OLD_FORMS = {"pythia": PYTHIA_160M, "codellama": CODELLAMA_7B, "llama3": LLAMA32_1B, "starcoder2": STARCODER2_3B,
             "xglm": XGLM_564M, "linear": LINEAR_OLD, "dynamic": DYNAMIC_OLD, "yarn": YARN_OLD,
             "neox_linear": NEOX_LINEAR_OLD}


def _new_form(old: dict) -> dict:
    """The config.json transformers 5 writes for the same model (it converts the old form itself)."""
    transformers = pytest.importorskip("transformers", reason="transformers writes the new config form")
    kw = {k: v for k, v in copy.deepcopy(old).items() if k != "model_type"}
    d = transformers.AutoConfig.for_model(old["model_type"], **kw).to_dict()
    return json.loads(json.dumps(d))  # what a config.json round trip gives


@pytest.mark.parametrize("name", list(OLD_FORMS))
def test_old_and_new_config_forms_agree(name):
    old = OLD_FORMS[name]
    new = _new_form(old)
    if old["model_type"] != "xglm":
        assert "rope_parameters" in new and "rotary_pct" not in new and "rope_scaling" not in new
    assert config_from_hf(old) == config_from_hf(new)


def test_config_fields():
    p = config_from_hf(PYTHIA_160M)
    assert (p.arch, p.rotary_dim, p.head_dim, p.parallel_residual, p.qkv_bias, p.tie_word_embeddings) == \
        ("gpt_neox", 16, 64, True, True, False)
    c = config_from_hf(CODELLAMA_7B)
    assert (c.rope_theta, c.n_kv_heads, c.rope_type, c.norm, c.mlp) == (1e6, 32, "default", "rmsnorm", "gated")
    l3 = config_from_hf(LLAMA32_1B)
    assert (l3.rope_type, l3.rope_params["original_max_position_embeddings"], l3.n_kv_heads,
            l3.tie_word_embeddings, l3.eos_token_id) == ("llama3", 8192, 8, True, 128001)
    s = config_from_hf(STARCODER2_3B)
    assert (s.sliding_window, s.activation, s.qkv_bias, s.tie_word_embeddings) == (4096, "gelu_tanh", True, True)
    x = config_from_hf(XGLM_564M)
    assert (x.positions, x.embed_scale, x.head_dim, x.sinusoidal_offset, x.pad_token_id) == \
        ("sinusoidal", 32.0, 64, 2, 1)
    assert config_from_hf({**XGLM_564M, "scale_embedding": False}).embed_scale == 1.0
    assert config_from_hf(LINEAR_OLD).rope_params == {"factor": 4.0}
    # architectures absent: model_type decides
    assert config_from_hf({k: v for k, v in PYTHIA_160M.items() if k != "architectures"}).arch == "gpt_neox"


def test_unsupported_rope_type_names_the_field():
    bad = {**CODELLAMA_7B, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}}
    with pytest.raises(ConfigError, match=r"rope_scaling\.rope_type.*longrope"):
        config_from_hf(bad)
    bad_new = {**CODELLAMA_7B, "rope_parameters": {"rope_type": "su", "rope_theta": 1e4}}
    with pytest.raises(ConfigError, match=r"rope_parameters\.rope_type.*'su'"):
        config_from_hf(bad_new)


@pytest.mark.parametrize("cfg, field", [(PYTHIA_160M, "hidden_size"), (CODELLAMA_7B, "num_hidden_layers"),
                                         (STARCODER2_3B, "vocab_size"), (XGLM_564M, "d_model"),
                                         (XGLM_564M, "ffn_dim")])
def test_missing_required_field_is_named(cfg, field):
    d = {k: v for k, v in cfg.items() if k != field}
    with pytest.raises(ConfigError, match=f"'{field}'"):
        config_from_hf(d)


def test_unknown_architecture_lists_the_supported_ones():
    with pytest.raises(ConfigError, match="MambaForCausalLM.*GPTNeoXForCausalLM.*LlamaForCausalLM"):
        config_from_hf({**PYTHIA_160M, "architectures": ["MambaForCausalLM"]})


# ----------------------------------------------------------------------------- loading: bad input
def _copy(variant: str, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(tiny_hf.checkpoint(variant), dst)
    return dst


def _rewrite(path, edit):
    f = path / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def _listing(path):
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*"))


def test_loader_unknown_architecture(tmp_path):
    ck = _copy("llama_mha", tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KvtraceError, match=r"config\.json.*FalconForCausalLM.*supported: GPTNeoXForCausalLM"):
        load_checkpoint(ck)


def test_loader_missing_required_field(tmp_path):
    ck = _copy("starcoder2_nobias", tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    del cfg["num_attention_heads"]
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KvtraceError, match=r"config\.json.*missing required field 'num_attention_heads'"):
        load_checkpoint(ck)


def test_loader_config_missing_or_invalid(tmp_path):
    ck = _copy("llama_mha", tmp_path)
    (ck / "config.json").write_text("{not json")
    with pytest.raises(KvtraceError, match=r"config\.json is not valid JSON"):
        load_checkpoint(ck)
    (ck / "config.json").unlink()
    with pytest.raises(KvtraceError, match=r"config\.json not found"):
        load_checkpoint(ck)


def test_wrong_shape_names_tensor_canonical_and_file(tmp_path):
    ck = _copy("llama_mha", tmp_path)
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite(ck, lambda t: t.__setitem__(name, t[name][:-1].clone()))
    with pytest.raises(KvtraceError) as e:
        load_checkpoint(ck)
    msg = str(e.value)
    assert name in msg and "layers.1.mlp.up.weight" in msg and "model.safetensors" in msg
    assert "[127, 64]" in msg and "[128, 64]" in msg


def test_wrong_shape_fused_qkv(tmp_path):
    ck = _copy("neox_parallel_r025", tmp_path)
    name = "gpt_neox.layers.0.attention.query_key_value.bias"
    _rewrite(ck, lambda t: t.__setitem__(name, t[name][:-3].clone()))
    with pytest.raises(KvtraceError, match=rf"{name}.*layers\.0\.attn\.q\.bias.*\[189\].*\[192\]"):
        load_checkpoint(ck)


def test_missing_tensor(tmp_path):
    ck = _copy("xglm_scaled", tmp_path)
    _rewrite(ck, lambda t: t.pop("model.layers.0.self_attn.k_proj.bias"))
    with pytest.raises(KvtraceError, match=r"missing tensor 'model\.layers\.0\.self_attn\.k_proj\.bias' "
                                           r"\(parameter layers\.0\.attn\.k\.bias\)"):
        load_checkpoint(ck)


def test_untied_head_missing(tmp_path):
    ck = _copy("llama_mha", tmp_path)
    _rewrite(ck, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(KvtraceError, match=r"missing tensor 'lm_head\.weight' \(parameter lm_head\.weight\)"):
        load_checkpoint(ck)


def test_unexpected_tensor(tmp_path):
    ck = _copy("starcoder2_gqa_window_bias", tmp_path)
    _rewrite(ck, lambda t: t.__setitem__("model.layers.0.mlp.gate_proj.weight", torch.zeros(128, 64)))
    with pytest.raises(KvtraceError, match=r"model\.safetensors: unexpected tensor "
                                           r"'model\.layers\.0\.mlp\.gate_proj\.weight'"):
        load_checkpoint(ck)


def test_truncated_safetensors(tmp_path):
    ck = _copy("llama_mha", tmp_path)
    f = ck / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(KvtraceError, match=rf"{f}: file is truncated"):
        load_checkpoint(ck)
    f.write_bytes(data[:100])  # cut inside the header
    with pytest.raises(KvtraceError, match=rf"{f}: corrupt or truncated"):
        load_checkpoint(ck)
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + data[24:])
    with pytest.raises(KvtraceError, match=rf"{f}: corrupt safetensors file"):
        load_checkpoint(ck)


def _shard(ck):
    """Split model.safetensors into two shards + index, as save_pretrained does for big models."""
    tensors = load_file(ck / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    wmap = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, ck / fname, metadata={"format": "pt"})
        wmap.update({n: fname for n in part})
    (ck / "model.safetensors").unlink()
    (ck / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))


def test_sharded_checkpoint_loads_identically(tmp_path):
    ref = load_checkpoint(tiny_hf.checkpoint("neox_sequential_r100"))
    ck = _copy("neox_sequential_r100", tmp_path)
    _shard(ck)
    ld = load_checkpoint(ck)
    assert [f.name for f in ld.files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    expect = hashlib.sha256(b"".join(f.read_bytes() for f in ld.files)).hexdigest()
    assert ld.digest == expect
    ours, theirs = dict(ld.model.named_parameters()), dict(ref.model.named_parameters())
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_sharded_checkpoint_missing_shard(tmp_path):
    ck = _copy("neox_sequential_r100", tmp_path)
    _shard(ck)
    (ck / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(KvtraceError, match=r"model-00002-of-00002\.safetensors: shard listed in "
                                           r"model\.safetensors\.index\.json is missing"):
        load_checkpoint(ck)


def test_pickle_refused_unless_allowed(tmp_path):
    ck = _copy("llama_gqa_linear_tied", tmp_path)
    tensors = load_file(ck / "model.safetensors")
    (ck / "model.safetensors").unlink()
    torch.save(tensors, ck / "pytorch_model.bin")
    before = _listing(ck)
    with pytest.raises(KvtraceError, match=r"pytorch_model\.bin.*arbitrary code.*--allow-pickle"):
        load_checkpoint(ck)
    assert _listing(ck) == before  # nothing written
    ld = load_checkpoint(ck, allow_pickle=True)
    ref = load_checkpoint(tiny_hf.checkpoint("llama_gqa_linear_tied"))
    ids = torch.tensor([[3, 9, 27, 81]])
    with torch.no_grad():
        a = ld.model(ids, torch.arange(4)[None], StaticCache(ld.config, 1, 8))
        b = ref.model(ids, torch.arange(4)[None], StaticCache(ref.config, 1, 8))
    assert torch.equal(a, b)
    assert ld.digest == hashlib.sha256((ck / "pytorch_model.bin").read_bytes()).hexdigest()


def test_known_buffers_ignored_and_tied_head_checked(tmp_path):
    ck = _copy("neox_parallel_r025", tmp_path)

    def add_buffers(t):
        t["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool).float()
        t["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
        t["gpt_neox.layers.1.attention.rotary_emb.inv_freq"] = torch.ones(2)
    _rewrite(ck, add_buffers)
    # accepted, and the buffers change nothing: every parameter as in the checkpoint without them
    ours = dict(load_checkpoint(ck).model.named_parameters())
    ref = dict(load_checkpoint(tiny_hf.checkpoint("neox_parallel_r025")).model.named_parameters())
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ours)

    tied = _copy("starcoder2_nobias", tmp_path, "tied")
    _rewrite(tied, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()))
    ld = load_checkpoint(tied)  # a stored head equal to the embedding is fine: it stays tied
    plain = load_checkpoint(tiny_hf.checkpoint("starcoder2_nobias")).model
    assert ld.config.tie_word_embeddings and ld.model.lm_head is None
    assert torch.equal(ld.model.embed.weight, plain.embed.weight)
    _rewrite(tied, lambda t: t.__setitem__("lm_head.weight", t["lm_head.weight"] + 1))
    with pytest.raises(KvtraceError, match=r"'lm_head\.weight' differs from the embedding.*tie_word_embeddings"):
        load_checkpoint(tied)


@pytest.mark.parametrize("dtype, expect", [("float16", torch.float16), ("bf16", torch.bfloat16),
                                           (torch.float32, torch.float32)])
def test_dtype_conversion(dtype, expect):
    ld = load_checkpoint(tiny_hf.checkpoint("xglm_scaled"), dtype=dtype)
    assert {p.dtype for p in ld.model.parameters()} == {expect}
    ref = load_checkpoint(tiny_hf.checkpoint("xglm_scaled"))
    w = dict(ld.model.named_parameters())["layers.0.attn.q.weight"]
    assert torch.equal(w, ref.model.layers[0].attn.q.weight.to(expect))
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        logits = ld.model(ids, torch.arange(3)[None], StaticCache(ld.config, 1, 4, dtype=expect))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
def test_checkpoint_dtype_kept(tmp_path, stored):
    ck = _copy("neox_parallel_r025", tmp_path)
    _rewrite(ck, lambda t: t.update({k: v.to(stored) for k, v in t.items()}))
    ld = load_checkpoint(ck)
    assert {p.dtype for p in ld.model.parameters()} == {stored}
    assert load_checkpoint(ck, dtype="float32").model.dtype == torch.float32


def test_bad_dtype_and_path(tmp_path):
    with pytest.raises(KvtraceError, match="dtype 'int8'"):
        load_checkpoint(tiny_hf.checkpoint("llama_mha"), dtype="int8")
    with pytest.raises(KvtraceError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(PYTHIA_160M))
    with pytest.raises(KvtraceError, match="no weights found"):
        load_checkpoint(tmp_path / "empty")


def test_loaded_fields(tmp_path):
    ck = _copy("llama_mha", tmp_path)
    assert load_checkpoint(ck).tokenizer_file is None
    shutil.copy(tiny_hf.checkpoint("llama_mha") / "config.json", ck / "tokenizer.json")  # any file will do
    ld = load_checkpoint(ck)
    assert ld.tokenizer_file == ck / "tokenizer.json"
    assert ld.hf_config["architectures"] == ["LlamaForCausalLM"]
    assert ld.files == [ck / "model.safetensors"]
    assert ld.digest == hashlib.sha256((ck / "model.safetensors").read_bytes()).hexdigest()
    assert not ld.model.training and not any(p.requires_grad for p in ld.model.parameters())


def test_pythia160m_benchmark_shapes():
    """The benchmark checkpoint's tensor list (not written here: 650 MB) is Pythia-160M's."""
    from benchmarks.pythia160m import CONFIG, _tensor_specs

    specs = dict(_tensor_specs())
    assert sum(math.prod(s) for s in specs.values()) == 162_322_944  # 162M parameters, 649 MB in fp32
    assert specs["gpt_neox.layers.11.attention.query_key_value.weight"] == (3 * 768, 768)
    assert specs["embed_out.weight"] == (50304, 768)
    assert config_from_hf(CONFIG).rotary_dim == 16
