"""Random-weight checkpoints with the *shapes* of real models, built offline, for latency only.

No cross-encoder or Provence checkpoint can be downloaded here, so the benchmark measures their
pruning latency with random weights in the real architectures (their recall/compression with
random weights means nothing and is not reported):

* cross-encoder: the shape of cross-encoder/ms-marco-MiniLM-L-6-v2 (BERT, 6 layers, hidden 384);
* Provence: the shape of naver/provence-reranker-debertav3-v1 (DeBERTa-v3-large: 24 layers,
  hidden 1024, 16 heads, relative attention), both with MiniLM's WordPiece tokenizer.
"""

from __future__ import annotations

import os

import torch


def _tokenizer():
    from transformers import AutoTokenizer

    from tokenprune.methods.context.scorers.bi_encoder import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


def build_cross_encoder(path: str) -> str:
    from transformers import BertConfig, BertForSequenceClassification

    if not os.path.exists(os.path.join(path, "config.json")):
        tok = _tokenizer()
        torch.manual_seed(0)
        config = BertConfig(vocab_size=tok.vocab_size, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                            intermediate_size=1536, max_position_embeddings=512, num_labels=1)
        BertForSequenceClassification(config).save_pretrained(path)
        tok.save_pretrained(path)
    return path


def build_provence(path: str, large: bool = True) -> str:
    from safetensors.torch import save_file
    from transformers import DebertaV2Config, DebertaV2Model

    if not os.path.exists(os.path.join(path, "config.json")):
        tok = _tokenizer()
        torch.manual_seed(0)
        hidden, layers, heads = (1024, 24, 16) if large else (256, 4, 4)
        config = DebertaV2Config(
            vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=4 * hidden, max_position_embeddings=512, type_vocab_size=0, relative_attention=True,
            position_buckets=256, pos_att_type=["p2c", "c2p"], position_biased_input=False, norm_rel_ebd="layer_norm",
            share_att_key=True, pooler_hidden_size=hidden, pooler_hidden_act="gelu", num_labels=1,
        )
        backbone = DebertaV2Model(config)
        state = {f"deberta.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
        for name, (i, o) in {"pooler.dense": (hidden, hidden), "classifier": (hidden, 1), "token_classifier": (hidden, 2)}.items():
            layer = torch.nn.Linear(i, o)
            state[f"{name}.weight"], state[f"{name}.bias"] = layer.weight.detach(), layer.bias.detach()
        os.makedirs(path, exist_ok=True)
        config.save_pretrained(path)
        save_file(state, os.path.join(path, "model.safetensors"))
        tok.save_pretrained(path)
    return path
