"""Data: tokenizers, synthetic verifiable domains, prompt datasets and SFT batches."""

from gopd_mega.data.prompts import DataError, FilterSummary, Prompt, PromptDataset, sft_batch
from gopd_mega.data.synthetic import DOMAINS, Domain, check, make_datasets, make_split, register_domain
from gopd_mega.data.tokenizer import CharTokenizer, Tokenizer

__all__ = [
    "DOMAINS",
    "CharTokenizer",
    "DataError",
    "Domain",
    "FilterSummary",
    "Prompt",
    "PromptDataset",
    "Tokenizer",
    "check",
    "make_datasets",
    "make_split",
    "register_domain",
    "sft_batch",
]
