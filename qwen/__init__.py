"""The Qwen language-model family (Qwen-1, Qwen2/2.5, Qwen3 dense), written here without remote code."""

from qwen.config import QWenConfig
from qwen.modeling import QWenLMHeadModel, QWenModel, QWenOutput
from qwen.tokenizer import HFQwenTokenizer, QWenTokenizer, QwenTokenizerBase, load_tokenizer

__all__ = [
    "QWenConfig", "QWenModel", "QWenLMHeadModel", "QWenOutput",
    "QWenTokenizer", "HFQwenTokenizer", "QwenTokenizerBase", "load_tokenizer",
]
