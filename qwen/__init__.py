"""The Qwen language-model family (Qwen-1, Qwen2/2.5, Qwen3 dense), written here without remote code."""

if not __package__.startswith("qwenvl_lab."):  # the old spelling: `python -m qwen...` from the checkout
    from qwenvl_lab._moved import refuse  # (absolute: this is not qwenvl_lab.*)

    refuse(__package__)

from .config import QWenConfig
from .modeling import QWenLMHeadModel, QWenModel, QWenOutput
from .tokenizer import HFQwenTokenizer, QWenTokenizer, QwenTokenizerBase, load_tokenizer

__all__ = [
    "QWenConfig", "QWenModel", "QWenLMHeadModel", "QWenOutput",
    "QWenTokenizer", "HFQwenTokenizer", "QwenTokenizerBase", "load_tokenizer",
]
