"""Stand-in for MDLM's configuration_mdlm.py (kuleshov-group/mdlm-owt on the hub). Defaults are tiny;
the released sizes come from its config.json (core/backbone_configs/mdlm-owt.json).
`frequency_embedding_size` is not a released field: the released TimestepEmbedder fixes it at 256."""

from transformers import PretrainedConfig


class MDLMConfig(PretrainedConfig):
    model_type = "mdlm"

    def __init__(self, vocab_size=50258, model_length=128, hidden_dim=16, cond_dim=8, n_blocks=2,
                 n_heads=2, dropout=0.0, time_conditioning=True, frequency_embedding_size=256, **kwargs):
        self.vocab_size, self.model_length = vocab_size, model_length
        self.hidden_dim, self.cond_dim = hidden_dim, cond_dim
        self.n_blocks, self.n_heads, self.dropout = n_blocks, n_heads, dropout
        self.time_conditioning = time_conditioning
        self.frequency_embedding_size = frequency_embedding_size
        super().__init__(**kwargs)
