"""A random-weight (scratch) LM is built in its base dtype directly: no fp32 copy of it exists at any time
(building in fp32 and casting held both, +2 bytes per parameter of peak host memory for a bf16 build)."""

import pytest
import torch
from qwenvl_lab.model.config import VLMConfig
from qwenvl_lab.model.model import LM_BACKBONES

from tests.tiny_opt import LLAMA_LM, QWEN_LM


@pytest.mark.parametrize("backend,lm_config", [("qwen", QWEN_LM), ("hf", LLAMA_LM)])
def test_scratch_lm_is_constructed_in_its_base_dtype(backend, lm_config):
    created = []
    real_empty = torch.empty

    def spy(*args, **kwargs):  # every nn.Linear / nn.Embedding weight starts as torch.empty
        t = real_empty(*args, **kwargs)
        created.append(t.dtype)
        return t

    # load_lm reads the LM keys only; the tower is never built here
    cfg = VLMConfig(lm="scratch", lm_backend=backend, lm_config=dict(lm_config), towers=[{"backend": "hf_siglip", "name_or_path": "unused"}], dtype="bfloat16",
                    image_token_id=250)
    torch.empty = spy
    try:
        lm = LM_BACKBONES[backend].load_lm(cfg)
    finally:
        torch.empty = real_empty
    assert {p.dtype for p in lm.parameters()} == {torch.bfloat16}
    assert torch.float32 not in created and torch.bfloat16 in created
    assert torch.get_default_dtype() == torch.float32  # restored for everything built afterwards
