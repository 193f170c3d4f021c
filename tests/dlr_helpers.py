"""Tiny random models of every family DLR-Lock supports, built offline from transformers configs."""
import torch

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "gpt_neox", "bert",
            "falcon", "stablelm", "olmo", "olmo2", "gemma3", "phi", "gptj", "opt", "bloom"]
NEW_FAMILIES = FAMILIES[FAMILIES.index("falcon"):]
MOE_FAMILIES = ["mixtral", "qwen2_moe"]


def tiny_model(family: str, seed: int = 0, vocab_size: int = 128, **overrides):
    import transformers as T

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # inside the tiny vocabulary
    gpt_like = dict(vocab_size=vocab_size, n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=64)
    decoder = {k: v for k, v in common.items() if k != "intermediate_size"}
    cfgs = {
        "llama": lambda: T.LlamaConfig(**common, num_key_value_heads=2),
        "mistral": lambda: T.MistralConfig(**common, num_key_value_heads=2),
        "qwen2": lambda: T.Qwen2Config(**common, num_key_value_heads=2),
        "qwen3": lambda: T.Qwen3Config(**common, num_key_value_heads=2, head_dim=8),
        "gemma": lambda: T.GemmaConfig(**common, num_key_value_heads=2, head_dim=8),
        "phi3": lambda: T.Phi3Config(**common, num_key_value_heads=2, pad_token_id=0),
        "gpt2": lambda: T.GPT2Config(**gpt_like),
        "gpt_neox": lambda: T.GPTNeoXConfig(**common),
        "bert": lambda: T.BertConfig(**common),
        # parallel attention + MLP (the default Falcon-7B layout), no biases
        "falcon": lambda: T.FalconConfig(**decoder, ffn_hidden_size=64, **ids),
        "stablelm": lambda: T.StableLmConfig(**common, num_key_value_heads=2, **ids),
        "olmo": lambda: T.OlmoConfig(**common, num_key_value_heads=2, **ids),
        "olmo2": lambda: T.Olmo2Config(**common, num_key_value_heads=2, **ids),
        "gemma3": lambda: T.Gemma3TextConfig(**common, num_key_value_heads=2, head_dim=8, sliding_window=8, **ids),
        "phi": lambda: T.PhiConfig(**common, **ids),
        "gptj": lambda: T.GPTJConfig(**gpt_like, rotary_dim=4, resid_pdrop=0.1, **ids),
        "opt": lambda: T.OPTConfig(**decoder, ffn_dim=64, word_embed_proj_dim=32, dropout=0.1, **ids),
        "bloom": lambda: T.BloomConfig(vocab_size=vocab_size, hidden_size=32, n_layer=2, n_head=4,
                                       hidden_dropout=0.1, **ids),
        "mixtral": lambda: T.MixtralConfig(**common, num_key_value_heads=2, num_local_experts=4,
                                           num_experts_per_tok=2),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(**common, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                              moe_intermediate_size=32, shared_expert_intermediate_size=64),
    }
    torch.manual_seed(seed)
    cfg = cfgs[family]()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = (T.BertModel(cfg) if family == "bert" else T.AutoModelForCausalLM.from_config(cfg)).eval()
    return model


def mlp_parameter_names(model) -> set[str]:
    """Names of the parameters a DLR-Net replaces (every feed-forward block's), from the family's adapter."""
    from weightlock.dlr.modeling_weightlock_dlr import adapter_for, find_layers, mlp_modules

    adapter = adapter_for(model)
    own = {id(p) for layer in find_layers(model, adapter) for m in mlp_modules(layer, adapter)
           for p in m.parameters()}
    return {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in own}
