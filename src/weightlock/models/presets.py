"""Model sizes for pretraining from scratch (Llama architecture)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..config import check_types
from ..errors import WeightlockError


@dataclass
class ModelConfig:
    """Shape of a Llama-architecture causal LM (``transformers.LlamaForCausalLM``)."""

    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    vocab_size: int = 4096
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (types, positive sizes, heads dividing the width); raise :class:`WeightlockError`."""
        check_types(self, "model config")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int) and not isinstance(v, bool) and v <= 0:
                raise WeightlockError(f"model config: {f.name} must be positive, got {v}")
        if self.hidden_size % self.num_attention_heads:
            raise WeightlockError(
                f"model config: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )

    def to_hf(self, tokenizer=None):
        """The Hugging Face ``LlamaConfig`` of this model (validated first); with ``tokenizer``, its vocabulary
        size and special-token ids."""
        from transformers import LlamaConfig

        self.validate()
        kw = asdict(self)
        if kw["num_key_value_heads"] is None:
            kw["num_key_value_heads"] = kw["num_attention_heads"]
        ids = {}
        if tokenizer is not None:
            kw["vocab_size"] = len(tokenizer)
            ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
        return LlamaConfig(**kw, **ids, attention_dropout=0.0, rms_norm_eps=1e-5)


PRESETS: dict[str, ModelConfig] = {
    # a test-sized model: trains in seconds
    "tiny": ModelConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=256),
    # the demo's base model: ~4.2M parameters
    "small": ModelConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                         max_position_embeddings=1024),
}


def preset(name: str) -> ModelConfig:
    """A fresh copy of the preset ``name`` (see ``PRESETS``); an unknown name is a :class:`WeightlockError`."""
    if name not in PRESETS:
        raise WeightlockError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**asdict(PRESETS[name]))
