"""Hugging Face adapters: config.json -> ModelConfig, and HF tensor names -> canonical names.

One adapter per architecture string (GPTNeoXForCausalLM, LlamaForCausalLM, Starcoder2ForCausalLM,
XGLMForCausalLM). Each knows
  - how to read its config.json, in both the older form (`rotary_pct`, `rotary_emb_base`,
    `rope_theta`, `rope_scaling`) and the transformers-5 form (`rope_parameters`);
  - the name of every checkpoint tensor, derived from the canonical names of
    `ModelConfig.param_shapes()` so the table can never miss a parameter;
  - the fixups: GPT-NeoX's fused, per-head interleaved query_key_value; buffers some
    checkpoints carry that are not weights; the name of a tied head some checkpoints still store.

Pure Python except `split_tensor`, which only needs the `reshape` and indexing that torch tensors
and numpy arrays share (the torch loader and the streamed export split with the same code).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from kvtrace.config import ROPE_TYPES, ConfigError, ModelConfig

# HF activation names -> ModelConfig.activation. gelu_new / gelu_fast / gelu_pytorch_tanh are all
# the tanh approximation (same formula, different implementations).
_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "gelu_fast": "gelu_tanh", "silu": "silu", "swish": "silu", "relu": "relu"}

# rope scaling numbers we carry (everything else in rope_parameters is bookkeeping)
_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
              "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate")
_NOT_SCALING = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


# --------------------------------------------------------------------------- field readers
_MISSING = object()


def _get(d: dict, key: str, arch_name: str, default: Any = _MISSING, kind: type | tuple = None) -> Any:
    """config.json field `key`; a missing required field or a wrongly typed one is a ConfigError."""
    if key not in d or d[key] is None:
        if default is _MISSING:
            raise ConfigError(f"config.json: missing required field '{key}' (needed for {arch_name})")
        return default
    v = d[key]
    if kind is int and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
        raise ConfigError(f"config.json field '{key}': expected a positive integer, got {v!r}")
    if kind is bool and not isinstance(v, bool):
        raise ConfigError(f"config.json field '{key}': expected true or false, got {v!r}")
    if kind is float and (not isinstance(v, (int, float)) or isinstance(v, bool)):
        raise ConfigError(f"config.json field '{key}': expected a number, got {v!r}")
    return v


def _activation(d: dict, key: str, default: str) -> str:
    name = d.get(key) or default
    if not isinstance(name, str) or name not in _ACTIVATIONS:
        raise ConfigError(f"config.json field '{key}': unsupported activation {name!r}; "
                          f"supported: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _token_id(d: dict, key: str, default=None) -> int | None:
    v = d.get(key, default)
    if isinstance(v, list):  # several eos ids: the first one is the model's own
        v = v[0] if v else None
    if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
        raise ConfigError(f"config.json field '{key}': expected an integer token id, got {v!r}")
    if v is not None and v < 0:  # some configs write -1 for "no such token" (e.g. pad_token_id)
        return None
    return v


def _rope(d: dict, head_dim: int, max_position: int, *, theta_key: str = "rope_theta",
          pct_key: str = "partial_rotary_factor", default_pct: float = 1.0) -> dict:
    """ModelConfig rope fields from either config.json form.

    transformers 5: {"rope_parameters": {"rope_type", "rope_theta", "partial_rotary_factor", <scaling>}}
    older:          top-level theta / fraction (`rope_theta`, or GPT-NeoX's `rotary_emb_base`,
                    `rotary_pct`) and an optional {"rope_scaling": {"type" | "rope_type", <scaling>}}.
    Both give the same ModelConfig.
    """
    if isinstance(d.get("rope_parameters"), dict) and d.get("rope_scaling"):
        # transformers 5 would take rope_scaling and drop rope_parameters' values: ambiguous
        raise ConfigError("config.json has both 'rope_parameters' and 'rope_scaling'; keep one (transformers 5 "
                          "writes rope_parameters, older versions rope_scaling with a top-level rope_theta)")
    if isinstance(d.get("rope_parameters"), dict):
        src, p = "rope_parameters", dict(d["rope_parameters"])
    else:
        if "rope_scaling" in d and d["rope_scaling"] is not None and not isinstance(d["rope_scaling"], dict):
            raise ConfigError(f"config.json field 'rope_scaling': expected an object, got {d['rope_scaling']!r}")
        src, p = "rope_scaling", dict(d.get("rope_scaling") or {})
    type_key = "type" if ("type" in p and "rope_type" not in p) else "rope_type"
    rope_type = p.get(type_key) or "default"
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"config.json field '{src}.{type_key}': unsupported rope scaling type {rope_type!r}; "
                          f"supported: {', '.join(ROPE_TYPES)}")
    theta = p.get("rope_theta", d.get(theta_key, d.get("rope_theta", 10000.0)))
    pct = p.get("partial_rotary_factor", d.get(pct_key, d.get("partial_rotary_factor", default_pct)))
    def where(name: str, top: str) -> str:  # the key the value came from
        if name in p:
            return f"{src}.{name}"
        return top if top in d else name

    theta_at, pct_at = where("rope_theta", theta_key), where("partial_rotary_factor", pct_key)
    for at, v in ((theta_at, theta), (pct_at, pct)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"config.json field '{at}': expected a positive number, got {v!r}")
    if pct > 1:
        raise ConfigError(f"config.json field '{pct_at}': the rotated fraction of each head must be in (0, 1], "
                          f"got {pct!r}")
    unknown = sorted(set(p) - _NOT_SCALING - set(_ROPE_KEYS))
    if unknown and rope_type != "default":
        raise ConfigError(f"config.json field '{src}': unknown rope scaling parameter(s) {unknown} "
                          f"for rope type {rope_type!r}")
    params = {k: p[k] for k in _ROPE_KEYS if p.get(k) is not None} if rope_type != "default" else {}
    for k, v in params.items():  # numbers (ModelConfig.validate checks ranges); name the key here
        want_bool = k == "truncate"
        if (isinstance(v, bool) != want_bool) or not (want_bool or isinstance(v, (int, float))):
            raise ConfigError(f"config.json field '{src}.{k}': expected {'true or false' if want_bool else 'a number'}, "
                              f"got {v!r}")
        if not want_bool and not math.isfinite(v) or (k in ("factor", "low_freq_factor", "high_freq_factor",
                                                              "original_max_position_embeddings") and v <= 0):
            raise ConfigError(f"config.json field '{src}.{k}': expected a finite number > 0, got {v!r}")
    if rope_type in ("llama3", "yarn"):
        # as transformers does: a top-level original_max_position_embeddings wins, else max_position
        if d.get("original_max_position_embeddings") is not None:
            params["original_max_position_embeddings"] = _get(d, "original_max_position_embeddings", "", kind=int)
        params.setdefault("original_max_position_embeddings", max_position)
        if rope_type == "yarn" and "factor" not in params:
            params["factor"] = max_position / params["original_max_position_embeddings"]
    if rope_type != "default" and "factor" not in params:
        raise ConfigError(f"config.json field '{src}.factor': required by rope type {rope_type!r}")
    return dict(rope_theta=float(theta), rotary_dim=int(head_dim * pct), rope_type=rope_type, rope_params=params)


def _head_dim(d: dict, hidden: int, heads: int, hidden_key: str, heads_key: str) -> int:
    hd = d.get("head_dim")
    if hd is None:
        if hidden % heads:
            raise ConfigError(f"config.json fields '{hidden_key}'={hidden} and '{heads_key}'={heads}: "
                              "hidden size is not a multiple of the head count (and no 'head_dim' given)")
        return hidden // heads
    return _get(d, "head_dim", "", kind=int)


# --------------------------------------------------------------------------- per architecture configs
def _rope_decoder_fields(d: dict, a: str, kv_heads: bool) -> dict:
    """The fields GPT-NeoX, Llama and StarCoder2 name alike in config.json (shapes, token ids)."""
    D, H = _get(d, "hidden_size", a, kind=int), _get(d, "num_attention_heads", a, kind=int)
    return dict(
        vocab_size=_get(d, "vocab_size", a, kind=int), hidden_size=D,
        n_layers=_get(d, "num_hidden_layers", a, kind=int), n_heads=H,
        n_kv_heads=_get(d, "num_key_value_heads", a, H, int) if kv_heads else H,
        head_dim=_head_dim(d, D, H, "hidden_size", "num_attention_heads"),
        intermediate_size=_get(d, "intermediate_size", a, kind=int),
        max_position=_get(d, "max_position_embeddings", a, kind=int),
        bos_token_id=_token_id(d, "bos_token_id"), eos_token_id=_token_id(d, "eos_token_id"),
        pad_token_id=_token_id(d, "pad_token_id"))


def _gpt_neox(d: dict) -> ModelConfig:
    a = "GPTNeoXForCausalLM"
    f = _rope_decoder_fields(d, a, kv_heads=False)
    attn_bias = _get(d, "attention_bias", a, True, bool)  # absent in Pythia's config: biases present
    return ModelConfig(
        arch="gpt_neox", **f,
        norm="layernorm", norm_eps=float(_get(d, "layer_norm_eps", a, 1e-5, float)),
        mlp="plain", activation=_activation(d, "hidden_act", "gelu"),
        qkv_bias=attn_bias, out_bias=attn_bias, mlp_bias=True, positions="rope",
        **_rope(d, f["head_dim"], f["max_position"], theta_key="rotary_emb_base", pct_key="rotary_pct",
                default_pct=0.25),
        parallel_residual=_get(d, "use_parallel_residual", a, True, bool),
        tie_word_embeddings=_get(d, "tie_word_embeddings", a, False, bool))


def _llama(d: dict) -> ModelConfig:
    a = "LlamaForCausalLM"
    f = _rope_decoder_fields(d, a, kv_heads=True)
    attn_bias = _get(d, "attention_bias", a, False, bool)  # q, k, v and o
    return ModelConfig(
        arch="llama", **f,
        norm="rmsnorm", norm_eps=float(_get(d, "rms_norm_eps", a, 1e-6, float)),
        mlp="gated", activation=_activation(d, "hidden_act", "silu"),
        qkv_bias=attn_bias, out_bias=attn_bias, mlp_bias=_get(d, "mlp_bias", a, False, bool),
        positions="rope", **_rope(d, f["head_dim"], f["max_position"]),
        tie_word_embeddings=_get(d, "tie_word_embeddings", a, False, bool))


def _starcoder2(d: dict) -> ModelConfig:
    a = "Starcoder2ForCausalLM"
    f = _rope_decoder_fields(d, a, kv_heads=True)
    bias = _get(d, "use_bias", a, True, bool)  # every projection; the LayerNorms always have one
    return ModelConfig(
        arch="starcoder2", **f,
        norm="layernorm", norm_eps=float(_get(d, "norm_epsilon", a, 1e-5, float)),
        mlp="plain", activation=_activation(d, "hidden_act", "gelu_pytorch_tanh"),
        qkv_bias=bias, out_bias=bias, mlp_bias=bias, positions="rope",
        **_rope(d, f["head_dim"], f["max_position"]),
        sliding_window=_get(d, "sliding_window", a, None, int),
        tie_word_embeddings=_get(d, "tie_word_embeddings", a, True, bool))


def _xglm(d: dict) -> ModelConfig:
    a = "XGLMForCausalLM"

    def alias(key: str, other: str, kind=int):  # transformers maps hidden_size -> d_model etc.
        return _get(d, key if key in d or other not in d else other, a, kind=kind)

    D, H = alias("d_model", "hidden_size"), alias("attention_heads", "num_attention_heads")
    if D % H:
        raise ConfigError(f"config.json fields 'd_model'={D} and 'attention_heads'={H}: "
                          "d_model is not a multiple of the head count")
    scale = _get(d, "scale_embedding", a, True, bool)
    return ModelConfig(
        arch="xglm", vocab_size=_get(d, "vocab_size", a, kind=int), hidden_size=D,
        n_layers=alias("num_layers", "num_hidden_layers"), n_heads=H, n_kv_heads=H, head_dim=D // H,
        intermediate_size=_get(d, "ffn_dim", a, kind=int),
        max_position=_get(d, "max_position_embeddings", a, kind=int),
        norm="layernorm", norm_eps=1e-5, mlp="plain", activation=_activation(d, "activation_function", "gelu"),
        qkv_bias=True, out_bias=True, mlp_bias=True,
        positions="sinusoidal", sinusoidal_offset=2,  # fairseq: position p reads row p + 2
        embed_scale=math.sqrt(D) if scale else 1.0,
        tie_word_embeddings=_get(d, "tie_word_embeddings", a, True, bool),
        bos_token_id=_token_id(d, "bos_token_id", 0), eos_token_id=_token_id(d, "eos_token_id", 2),
        pad_token_id=_token_id(d, "pad_token_id", 1))  # the pad row of the sinusoidal table is zero


# ModelConfig field -> the config.json key it is read from, for messages (per model_type where
# the names differ); a ModelConfig.validate failure then names the key the user can edit
_HF_KEYS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "n_layers": "num_hidden_layers",
            "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
            "intermediate_size": "intermediate_size", "max_position": "max_position_embeddings",
            "rope_theta": "rope_theta", "rotary_dim": "partial_rotary_factor", "sliding_window": "sliding_window",
            "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id",
            "tie_word_embeddings": "tie_word_embeddings", "activation": "hidden_act"}
_HF_KEYS_BY_TYPE = {
    "gpt_neox": {"norm_eps": "layer_norm_eps", "rope_theta": "rotary_emb_base", "rotary_dim": "rotary_pct",
                 "parallel_residual": "use_parallel_residual"},
    "llama": {"norm_eps": "rms_norm_eps"},
    "starcoder2": {"norm_eps": "norm_epsilon"},
    "xglm": {"hidden_size": "d_model", "n_layers": "num_layers", "n_heads": "attention_heads",
             "intermediate_size": "ffn_dim", "activation": "activation_function"},
}


def _naming_keys(make: Callable[[dict], ModelConfig], model_type: str) -> Callable[[dict], ModelConfig]:
    """make_config whose ModelConfig.validate errors name the config.json key."""
    def make_config(d: dict) -> ModelConfig:
        try:
            return make(d)
        except ConfigError as e:
            if not e.field or str(e).startswith("config.json"):
                raise
            f = e.field
            rp = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else None
            if f.startswith("rope_params."):
                key = f"{'rope_parameters' if rp is not None else 'rope_scaling'}.{f.split('.', 1)[1]}"
            elif rp is not None and f in ("rope_theta", "rotary_dim"):
                key = "rope_parameters." + ("rope_theta" if f == "rope_theta" else "partial_rotary_factor")
            else:
                key = _HF_KEYS_BY_TYPE.get(model_type, {}).get(f, _HF_KEYS.get(f, f))
            raise ConfigError(f"config.json field '{key}': {e.reason}", field=f, reason=e.reason) from None
    make_config.__name__ = make.__name__
    return make_config


# --------------------------------------------------------------------------- weight names
@dataclass(frozen=True)
class Adapter:
    hf_arch: str  # the `architectures[0]` string
    model_type: str  # config.json `model_type`
    make_config: Callable[[dict], ModelConfig]  # ConfigError names the config.json key (_naming_keys)
    layer_prefix: str  # HF prefix of layer i is f"{layer_prefix}{i}."
    layer_names: dict  # canonical module inside a layer -> HF module
    global_names: dict  # canonical top-level module -> HF module
    ignore: tuple  # regexes of checkpoint tensors that are not weights (buffers)
    fused_qkv: bool = False  # GPT-NeoX: q, k, v in one per-head interleaved tensor

    def __post_init__(self):
        object.__setattr__(self, "make_config", _naming_keys(self.make_config, self.model_type))

    @property
    def head_name(self) -> str:
        """HF name of the output head (stored by some tied checkpoints too)."""
        return self.global_names["lm_head"] + ".weight"


_ROTARY_BUFFERS = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"model\.rotary_emb\.inv_freq")

ADAPTERS: dict[str, Adapter] = {a.hf_arch: a for a in (
    Adapter("GPTNeoXForCausalLM", "gpt_neox", _gpt_neox, "gpt_neox.layers.",
            {"norm1": "input_layernorm", "norm2": "post_attention_layernorm",
             "attn.q": "attention.query_key_value", "attn.k": "attention.query_key_value",
             "attn.v": "attention.query_key_value", "attn.o": "attention.dense",
             "mlp.up": "mlp.dense_h_to_4h", "mlp.down": "mlp.dense_4h_to_h"},
            {"embed": "gpt_neox.embed_in", "norm_f": "gpt_neox.final_layer_norm", "lm_head": "embed_out"},
            (r"gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)",
             r"gpt_neox\.rotary_emb\.inv_freq"),
            fused_qkv=True),
    Adapter("LlamaForCausalLM", "llama", _llama, "model.layers.",
            {"norm1": "input_layernorm", "norm2": "post_attention_layernorm",
             "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
             "attn.o": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
             "mlp.down": "mlp.down_proj"},
            {"embed": "model.embed_tokens", "norm_f": "model.norm", "lm_head": "lm_head"},
            _ROTARY_BUFFERS),
    Adapter("Starcoder2ForCausalLM", "starcoder2", _starcoder2, "model.layers.",
            {"norm1": "input_layernorm", "norm2": "post_attention_layernorm",
             "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
             "attn.o": "self_attn.o_proj", "mlp.up": "mlp.c_fc", "mlp.down": "mlp.c_proj"},
            {"embed": "model.embed_tokens", "norm_f": "model.norm", "lm_head": "lm_head"},
            _ROTARY_BUFFERS),
    Adapter("XGLMForCausalLM", "xglm", _xglm, "model.layers.",
            {"norm1": "self_attn_layer_norm", "norm2": "final_layer_norm",
             "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
             "attn.o": "self_attn.out_proj", "mlp.up": "fc1", "mlp.down": "fc2"},
            {"embed": "model.embed_tokens", "norm_f": "model.layer_norm", "lm_head": "lm_head"},
            # the sinusoidal table is computed, never loaded (older exports store it)
            (r"model\.embed_positions\.(weights|_float_tensor)",)),
)}
_BY_MODEL_TYPE = {a.model_type: a for a in ADAPTERS.values()}


def adapter_for(hf_config: dict) -> Adapter:
    """The adapter for `architectures[0]`, or for `model_type` when `architectures` is absent."""
    if not isinstance(hf_config, dict):
        raise ConfigError(f"config.json: expected a JSON object, got {type(hf_config).__name__}")
    archs = hf_config.get("architectures")
    supported = ", ".join(ADAPTERS)
    if archs:
        name = archs[0] if isinstance(archs, list) else archs
        if not isinstance(name, str) or name not in ADAPTERS:
            raise ConfigError(f"config.json field 'architectures': unsupported architecture {name!r}; "
                              f"supported: {supported}")
        return ADAPTERS[name]
    mt = hf_config.get("model_type")
    if isinstance(mt, str) and mt in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[mt]
    raise ConfigError(f"config.json: unsupported or missing architecture (fields 'architectures' and "
                      f"'model_type' = {mt!r}); supported: {supported} "
                      f"(model_type {', '.join(_BY_MODEL_TYPE)})")


def config_from_hf(hf_config: dict) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict (either form). ConfigError names the field."""
    return adapter_for(hf_config).make_config(hf_config)


def weight_table(adapter: Adapter, cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """HF tensor name -> the canonical name(s) it fills, for every entry of cfg.param_shapes().

    One HF tensor fills several canonical ones only for GPT-NeoX's fused query_key_value
    (in q, k, v order). A tied head has no entry (see `Adapter.head_name`).
    """
    table: dict[str, list[str]] = {}
    for canon in cfg.param_shapes():
        parts = canon.split(".")
        if parts[0] == "layers":  # layers.{i}.{module...}.{weight|bias}
            module = ".".join(parts[2:-1])
            hf = f"{adapter.layer_prefix}{parts[1]}.{adapter.layer_names[module]}.{parts[-1]}"
        else:
            hf = f"{adapter.global_names[parts[0]]}.{parts[-1]}"
        table.setdefault(hf, []).append(canon)
    return {k: tuple(v) for k, v in table.items()}


def hf_shape(cfg: ModelConfig, canon_names: tuple[str, ...]) -> tuple[int, ...]:
    """Shape of the HF tensor that fills `canon_names` (fused tensors stack on dim 0)."""
    shapes = cfg.param_shapes()
    first = shapes[canon_names[0]]
    return (sum(shapes[n][0] for n in canon_names),) + tuple(first[1:])


def split_tensor(adapter: Adapter, cfg: ModelConfig, canon_names: tuple[str, ...], t, only: str | None = None):
    """The canonical tensors held by HF tensor `t` (a torch tensor or a numpy array), as
    [(name, tensor)]; only=NAME returns that one part alone. Parts of a fused tensor are copies
    (reshape of a strided slice), the unfused tensor is `t` itself."""
    if len(canon_names) == 1:
        return [(canon_names[0], t)]
    assert adapter.fused_qkv and len(canon_names) == 3, canon_names
    # GPT-NeoX query_key_value: output rows are laid out (H, 3, hd): per head its q, k, v rows.
    H, hd = cfg.n_heads, cfg.head_dim
    per_head = t.reshape(H, 3, hd, *t.shape[1:])  # (H, 3, hd[, D]), a view
    return [(name, per_head[:, j].reshape(H * hd, *t.shape[1:]))
            for j, name in enumerate(canon_names) if only in (None, name)]


def is_ignored(adapter: Adapter, hf_name: str) -> bool:
    """Checkpoint tensors that are buffers, not weights (recomputed by our model)."""
    return any(re.fullmatch(p, hf_name) for p in adapter.ignore)
