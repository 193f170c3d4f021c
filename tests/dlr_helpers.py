"""Tiny random models of every family DLR-Lock supports, built offline from transformers configs."""
import torch

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "gpt_neox", "bert"]


def tiny_model(family: str, seed: int = 0):
    import transformers as T

    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)
    cfgs = {
        "llama": lambda: T.LlamaConfig(**common, num_key_value_heads=2),
        "mistral": lambda: T.MistralConfig(**common, num_key_value_heads=2),
        "qwen2": lambda: T.Qwen2Config(**common, num_key_value_heads=2),
        "qwen3": lambda: T.Qwen3Config(**common, num_key_value_heads=2, head_dim=8),
        "gemma": lambda: T.GemmaConfig(**common, num_key_value_heads=2, head_dim=8),
        "phi3": lambda: T.Phi3Config(**common, num_key_value_heads=2, pad_token_id=0),
        "gpt2": lambda: T.GPT2Config(vocab_size=128, n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=64),
        "gpt_neox": lambda: T.GPTNeoXConfig(**common),
        "bert": lambda: T.BertConfig(**common),
    }
    torch.manual_seed(seed)
    cfg = cfgs[family]()
    model = (T.BertModel(cfg) if family == "bert" else T.AutoModelForCausalLM.from_config(cfg)).eval()
    return model
