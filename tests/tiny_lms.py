"""Tiny non-Qwen LMs for tests: transformers Llama / Mistral / Gemma / Phi-3 checkpoints, each with its own
byte-level BPE tokenizer carrying that family's special tokens and a chat template (Jinja, written here
to the family's documented layout), saved with `save_pretrained` (no downloads).

`write_tiny_family(dir, family) -> Path` with family in `FAMILIES`:
- "llama3": LlamaForCausalLM, `<|begin_of_text|>`, `<|start_header_id|>`/`<|end_header_id|>`, `<|eot_id|>`;
- "mistral": MistralForCausalLM, `<s>`, `</s>`, `[INST]`, `[/INST]` (system folded into the first user turn);
- "gemma": GemmaForCausalLM, `<bos>`, `<eos>`, `<start_of_turn>`/`<end_of_turn>`, role "model";
- "phi3": Phi3ForCausalLM, `<|user|>`, `<|assistant|>`, `<|end|>`, `<|endoftext|>`;
- "smollm": LlamaForCausalLM with ChatML (`<|im_start|>`/`<|im_end|>`), as SmolLM.
None of them has an image token: the VLM adds one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from qwenvl_lab.qwen.convert import tiktoken_to_hf
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
)

from tests.tiny_qwen import _tiny_ranks

_SYS_FOLD = "{% set ns = namespace(sys='') %}"
JINJA = {
    "llama3": (
        "{{ bos_token }}{% for m in messages %}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}" + _SYS_FOLD + "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{% set ns.sys = m['content'] + '\n\n' %}"
        "{% elif m['role'] == 'user' %}{{ '[INST] ' + ns.sys + m['content'] + ' [/INST]' }}{% set ns.sys = '' %}"
        "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    "gemma": (
        "{{ bos_token }}" + _SYS_FOLD + "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{% set ns.sys = m['content'] + '\n\n' %}"
        "{% elif m['role'] == 'user' %}{{ '<start_of_turn>user\n' + ns.sys + m['content'] + '<end_of_turn>\n' }}"
        "{% set ns.sys = '' %}"
        "{% else %}{{ '<start_of_turn>model\n' + m['content'] + '<end_of_turn>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    "phi3": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
    "smollm": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}
# family -> (special tokens, bos, eos, pad, LM config class, LM class)
SPECS = {
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|end_of_text|>", None, LlamaConfig, LlamaForCausalLM),
    "mistral": (["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", None, MistralConfig,
                MistralForCausalLM),
    "gemma": (["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<pad>",
              GemmaConfig, GemmaForCausalLM),
    "phi3": (["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], None, "<|endoftext|>",
             "<|endoftext|>", Phi3Config, Phi3ForCausalLM),
    "smollm": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>",
               LlamaConfig, LlamaForCausalLM),
}
FAMILIES = tuple(SPECS)
TEMPLATE_OF = {"llama3": "llama3", "mistral": "mistral", "gemma": "gemma", "phi3": "phi3", "smollm": "chatml"}


def tiny_family_tokenizer(family: str) -> PreTrainedTokenizerFast:
    specials, bos, eos, pad, _, _ = SPECS[family]
    tok = PreTrainedTokenizerFast(tokenizer_object=tiktoken_to_hf(_tiny_ranks(), specials), bos_token=bos,
                                  eos_token=eos, pad_token=pad)
    tok.chat_template = JINJA[family]
    return tok


def write_tiny_family(out_dir: str | Path, family: str, seed: int = 0) -> Path:
    """A random tiny LM of `family` plus its tokenizer, in transformers' own format; returns the directory."""
    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    specials, bos, eos, pad, config_cls, model_cls = SPECS[family]
    tok = tiny_family_tokenizer(family)
    kw = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
              tie_word_embeddings=family == "gemma")
    if family == "gemma":
        kw["head_dim"] = 16
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kw))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out
