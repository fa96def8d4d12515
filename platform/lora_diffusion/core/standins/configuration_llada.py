"""Stand-in (tiny in tests, real size for the memory plan: core/standin.py)
for LLaDA's configuration_llada.py (GSAI-ML/LLaDA-8B-Instruct): the fields the
modeling file reads, under the released names (d_model, n_heads, n_layers, mlp_hidden_size,
embedding_size, weight_tying, include_bias, mask_token_id)."""

from transformers import PretrainedConfig


class LLaDAConfig(PretrainedConfig):
    model_type = "llada"

    def __init__(self, d_model=16, n_heads=2, n_kv_heads=None, n_layers=2, mlp_hidden_size=32,
                 vocab_size=126464, embedding_size=126464, weight_tying=False, include_bias=False,
                 include_qkv_bias=False, rms_norm_eps=1e-5, mask_token_id=126336, block_type="llama",
                 **kwargs):
        self.d_model, self.n_heads, self.n_layers = d_model, n_heads, n_layers
        self.n_kv_heads = n_kv_heads or n_heads
        self.mlp_hidden_size, self.vocab_size, self.embedding_size = mlp_hidden_size, vocab_size, embedding_size
        self.weight_tying, self.include_bias, self.include_qkv_bias = weight_tying, include_bias, include_qkv_bias
        self.rms_norm_eps, self.mask_token_id, self.block_type = rms_norm_eps, mask_token_id, block_type
        super().__init__(**kwargs)
