"""ModelConfig: the hyper-parameters of a Qwen3-MoE model, from a HF config.json or a .m file."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

ARCH = "qwen3moe"  # llama.cpp's architecture name, used as the GGUF key prefix


class ConfigError(ValueError):
    """A config that dmoe cannot run, with a message that names the field."""


@dataclass(frozen=True)
class ModelConfig:
    """Every size the engine needs; field names follow HF's Qwen3MoeConfig."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.type == "int" and getattr(self, f.name) <= 0:
                raise ConfigError(f"config: {f.name} must be positive, got {getattr(self, f.name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 8:
            raise ConfigError(f"config: head_dim must be a multiple of 8 (attention's vectors), got {self.head_dim}")
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(
                f"config: num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts ({self.num_experts})"
            )

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf_file(cls, path: str, layers: int | None = None) -> ModelConfig:
        """From a HF config.json file (keeping only `layers` layers if given); its problems as ConfigError."""
        try:
            with open(path) as f:
                hf = json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: {e}") from None
        if not isinstance(hf, dict):
            raise ConfigError(f"{path}: not a config.json (a JSON object)")
        if layers:
            hf["num_hidden_layers"] = layers
        return cls.from_hf(hf)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Read a HF config.json dict, in both the transformers 4 and 5 spellings."""
        model_type = hf.get("model_type")
        if model_type != "qwen3_moe":
            raise ConfigError(f"config.json: model_type is {model_type!r}, expected 'qwen3_moe'")
        if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
            raise ConfigError("config.json: dense (mlp_only_layers / decoder_sparse_step) layers are not supported")
        if hf.get("attention_bias", False):
            raise ConfigError("config.json: attention_bias=true is not supported")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ConfigError(f"config.json: rope scaling {rope.get('rope_type', rope.get('type'))!r} is not supported")
        try:
            num_experts = hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"]
            heads = hf["num_attention_heads"]
            return cls(
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                num_hidden_layers=hf["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=hf.get("num_key_value_heads") or heads,
                head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
                moe_intermediate_size=hf["moe_intermediate_size"],
                num_experts=num_experts,
                num_experts_per_tok=hf["num_experts_per_tok"],
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                max_position_embeddings=hf.get("max_position_embeddings", 40960),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            )
        except KeyError as e:
            raise ConfigError(f"config.json: missing field {e.args[0]!r}") from None

    def to_hf(self) -> dict[str, Any]:
        """The transformers config.json form (for building reference models and synthetic checkpoints)."""
        d = dataclasses.asdict(self)
        d.update(
            model_type="qwen3_moe",
            architectures=["Qwen3MoeForCausalLM"],
            intermediate_size=self.moe_intermediate_size * self.num_experts_per_tok,
            hidden_act="silu",
            mlp_only_layers=[],
            decoder_sparse_step=1,
            attention_bias=False,
        )
        return d

    def gguf_metadata(self) -> dict[str, Any]:
        """The llama.cpp `qwen3moe.*` keys, plus `dmoe.*` for what llama.cpp does not store."""
        a = ARCH
        return {
            f"{a}.context_length": self.max_position_embeddings,
            f"{a}.embedding_length": self.hidden_size,
            f"{a}.block_count": self.num_hidden_layers,
            f"{a}.feed_forward_length": self.moe_intermediate_size * self.num_experts_per_tok,
            f"{a}.expert_feed_forward_length": self.moe_intermediate_size,
            f"{a}.attention.head_count": self.num_attention_heads,
            f"{a}.attention.head_count_kv": self.num_key_value_heads,
            f"{a}.attention.key_length": self.head_dim,
            f"{a}.attention.value_length": self.head_dim,
            f"{a}.attention.layer_norm_rms_epsilon": self.rms_norm_eps,
            f"{a}.rope.freq_base": self.rope_theta,
            f"{a}.expert_count": self.num_experts,
            f"{a}.expert_used_count": self.num_experts_per_tok,
            f"{a}.vocab_size": self.vocab_size,
            "dmoe.norm_topk_prob": self.norm_topk_prob,
        }

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], vocab_size: int, tied: bool) -> ModelConfig:
        """Read the keys `gguf_metadata` writes. llama.cpp files lack `dmoe.*`: llama.cpp always
        renormalises the top-k weights for qwen3moe, so that is the default."""
        a = ARCH

        def need(key: str) -> Any:
            if f"{a}.{key}" not in meta:
                raise ConfigError(f"model file: missing metadata key {a}.{key}")
            return meta[f"{a}.{key}"]

        try:
            heads = int(need("attention.head_count"))
            hidden = int(need("embedding_length"))
            return cls(
                vocab_size=vocab_size,
                hidden_size=hidden,
                num_hidden_layers=int(need("block_count")),
                num_attention_heads=heads,
                num_key_value_heads=int(meta.get(f"{a}.attention.head_count_kv", heads)),
                head_dim=int(meta.get(f"{a}.attention.key_length", hidden // max(heads, 1))),
                moe_intermediate_size=int(need("expert_feed_forward_length")),
                num_experts=int(need("expert_count")),
                num_experts_per_tok=int(need("expert_used_count")),
                norm_topk_prob=bool(meta.get("dmoe.norm_topk_prob", True)),
                rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
                rope_theta=float(meta.get(f"{a}.rope.freq_base", 10000.0)),
                max_position_embeddings=int(need("context_length")),
                tie_word_embeddings=tied,
            )
        except (TypeError, ValueError, OverflowError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"model file: a metadata value of the wrong type or size ({e})") from None
