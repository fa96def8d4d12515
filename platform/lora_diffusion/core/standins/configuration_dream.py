"""Stand-in (tiny in tests, real size for the memory plan: core/standin.py)
for Dream's configuration_dream.py (Dream-org/Dream-v0-Instruct-7B): Qwen2-style
fields under the released names, mask_token_id 151666."""

from transformers import PretrainedConfig


class DreamConfig(PretrainedConfig):
    model_type = "Dream"

    def __init__(self, vocab_size=152064, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=None, rms_norm_eps=1e-6, mask_token_id=151666,
                 pad_token_id=151643, bos_token_id=151643, eos_token_id=151643, **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.rms_norm_eps, self.mask_token_id = rms_norm_eps, mask_token_id
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         **kwargs)
