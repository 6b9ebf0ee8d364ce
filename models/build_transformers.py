"""Build the transformer fine-tuning examples: models and data, generated (nothing downloads).

    python models/build_transformers.py --out build/transformers

writes, into ``--out``:

* ``bert_tiny.onnx``: ``transformers.BertForSequenceClassification`` built from a ``BertConfig``
  (2 layers, hidden 128, 2 heads, intermediate 512, a 64-token vocabulary, 2 labels) with random
  weights (seeded), exported with torch's TorchScript exporter; inputs ``input_ids`` and
  ``attention_mask`` (int64, N x T), output ``logits`` (N x 2).
* ``bert_presence.npz``: a token-presence task a tiny model learns in a few epochs: sequences of
  8..24 random tokens (padded to T=24, ``attention_mask`` 0 on the padding); the label is 1 when
  both trigger tokens (ids 5 and 6) occur among the real tokens.  Keys ``input_ids_train``,
  ``attention_mask_train``, ``labels_train`` and the same with ``_test`` (the layout
  ``onnxbp train`` reads for models with several inputs).
* ``gpt2_tiny.onnx``: ``transformers.GPT2LMHeadModel`` from a ``GPT2Config`` (2 layers, 2 heads,
  n_embd 64, a 32-token vocabulary, 32 positions), inputs ``input_ids`` and ``attention_mask``,
  output ``logits`` (N x T x V).
* ``gpt2_corpus.npz``: a corpus of counting sequences (``a, a+s, a+2s, ... mod V`` with a random
  start ``a`` and step ``s`` in 1..3), padded; ``labels`` are the shifted ``input_ids`` with
  ``-100`` where there is no next token (:func:`onnxbp.training.data.causal_lm_labels`).

Dropout is off in both configs (``*_dropout = 0``) so that training is deterministic and matches
PyTorch step for step.  ``do_constant_folding=False`` keeps the torch parameter names on the
initializers (folding would replace each Linear weight by a transposed copy named
``onnx::MatMul_<n>``), so ``--freeze 'bert.embeddings.*'`` and the PyTorch parity test can name them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger("build_transformers")

OPSET = 17
TRIGGERS = (5, 6)
BERT_VOCAB, BERT_T = 64, 24
GPT_VOCAB, GPT_T = 32, 16


def bert_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=BERT_VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=512, max_position_embeddings=64, type_vocab_size=2, num_labels=2,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")


def gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=GPT_VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=2, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0,
                      attn_implementation="eager")


def bert_torch(seed: int = 0):
    """The torch BERT-tiny classifier (train mode, dropout 0), seeded weights."""
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return _distinct(BertForSequenceClassification(bert_config()).eval())


def gpt2_torch(seed: int = 0):
    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    return _distinct(GPT2LMHeadModel(gpt2_config()).eval())


def _distinct(model):
    """Perturb the constant-initialised tensors (zero biases, LayerNorm's ones and zeros) by seeded
    noise of 0.02: the TorchScript exporter merges initializers with equal values into one, which
    would tie parameters torch keeps apart."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.add_(0.02 * torch.randn_like(p))
    return model


class _LogitsOnly:
    """Wrap a transformers model so that the exported graph has exactly the logits output."""

    def __new__(cls, model):
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask):
                return self.m(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]

        return Wrapper(model)


def export(model, path: Path, seq_len: int) -> None:
    """TorchScript export with a symbolic batch N and sequence length T (``seq_len`` is the traced
    example's); initializers keep torch's names (without the wrapper's ``m.`` prefix)."""
    import onnx
    import torch

    wrapped = _LogitsOnly(model)
    ids = torch.zeros((2, seq_len), dtype=torch.int64)
    mask = torch.ones((2, seq_len), dtype=torch.int64)
    axes = {"input_ids": {0: "N", 1: "T"}, "attention_mask": {0: "N", 1: "T"}, "logits": {0: "N"}}
    if model.config.model_type == "gpt2":
        axes["logits"][1] = "T"
    with torch.no_grad():
        torch.onnx.export(wrapped, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], dynamic_axes=axes, opset_version=OPSET,
                          do_constant_folding=False, dynamo=False)
    m = onnx.load(str(path))
    renames = {t.name: t.name[2:] for t in m.graph.initializer if t.name.startswith("m.")}
    for t in m.graph.initializer:
        t.name = renames.get(t.name, t.name)
    for n in m.graph.node:
        for k, name in enumerate(n.input):
            if name in renames:
                n.input[k] = renames[name]
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))


def presence_data(n_train: int = 768, n_test: int = 256, seed: int = 0) -> dict:
    """Token-presence classification: label 1 iff both trigger tokens occur among the real tokens.

    Half the sequences hold both triggers (label 1); the others one of them (20% each) or neither
    (10%), so presence of either alone does not tell the label.  The padding holds trigger ids too:
    only the attention mask tells it apart from real tokens."""
    rng = np.random.default_rng(seed)
    a, b = TRIGGERS

    def split(n):
        ids = np.zeros((n, BERT_T), np.int64)
        mask = np.zeros((n, BERT_T), np.int64)
        kind = rng.choice(4, n, p=[0.1, 0.2, 0.2, 0.5])  # neither, a only, b only, both
        for i in range(n):
            length = int(rng.integers(8, BERT_T + 1))
            toks = rng.integers(max(TRIGGERS) + 1, BERT_VOCAB, length)  # ids 0..6 are never ordinary tokens
            where = rng.permutation(length)
            if kind[i] in (1, 3):
                toks[where[0]] = a
            if kind[i] in (2, 3):
                toks[where[1]] = b
            ids[i, :length] = toks
            mask[i, :length] = 1
            ids[i, length:] = TRIGGERS[i % 2]
        return ids, mask, (kind == 3).astype(np.int64)

    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        ids, mask, labels = split(n)
        out.update({f"input_ids_{name}": ids, f"attention_mask_{name}": mask, f"labels_{name}": labels})
    return out


def counting_corpus(n_train: int = 384, n_test: int = 64, seed: int = 1) -> dict:
    """Sequences ``a, a+s, a+2s, ... (mod V)`` of 6..16 tokens, right-padded, causal-LM labels."""
    from onnxbp.training.data import causal_lm_labels

    rng = np.random.default_rng(seed)

    def split(n):
        ids = np.zeros((n, GPT_T), np.int64)
        mask = np.zeros((n, GPT_T), np.int64)
        for i in range(n):
            length = int(rng.integers(6, GPT_T + 1))
            a, s = int(rng.integers(0, GPT_VOCAB)), int(rng.integers(1, 4))
            ids[i, :length] = (a + s * np.arange(length)) % GPT_VOCAB
            mask[i, :length] = 1
        return ids, mask, causal_lm_labels(ids, mask)

    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        ids, mask, labels = split(n)
        out.update({f"input_ids_{name}": ids, f"attention_mask_{name}": mask, f"labels_{name}": labels})
    return out


def build(out: Path, seed: int = 0) -> dict:
    """Write the two models and their data sets into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"bert": out / "bert_tiny.onnx", "bert_data": out / "bert_presence.npz",
             "gpt2": out / "gpt2_tiny.onnx", "gpt2_data": out / "gpt2_corpus.npz"}
    export(bert_torch(seed), paths["bert"], BERT_T)
    np.savez_compressed(paths["bert_data"], **presence_data())
    export(gpt2_torch(seed), paths["gpt2"], GPT_T)
    np.savez_compressed(paths["gpt2_data"], **counting_corpus())
    for p in paths.values():
        log.info("wrote %s (%d bytes)", p, p.stat().st_size)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="build/transformers", help="output folder (default: build/transformers)")
    ap.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    build(Path(args.out), args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
