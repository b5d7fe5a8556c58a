"""FSDP and DeepSpeed on a CPU process group (gloo), and what sharded engines need around saving.

- `enable_fsdp_on_cpu(accelerator, plugin_args)`: accelerate turns FSDP on only for accelerator devices
  (GPU, NPU, XPU, ...); a CPU process group silently gets DDP instead. PyTorch's FSDP2 (`fully_shard`)
  itself runs on a CPU device mesh over gloo, so the Trainer hands accelerate the FSDP plugin it skipped
  and the same FSDP2 code path as on GPUs runs (sharding, gathering for saves, sharded resume).
- `prepare_deepspeed_on_cpu()`: DeepSpeed's CPU accelerator would JIT-compile its shared-memory
  all-reduce (a C++ op, minutes on a small machine, once per machine) the first time a process group
  starts; gloo does the same collectives, so that op is marked unavailable unless
  `QWENVL_DS_SHM_COMM=1` asks for it.
- `retie(vlm, state_dict)`: gathered state dicts hold separate copies of tied weights (the LM head and
  the embedding); make them one tensor again so the checkpoint stores it once, as for an unsharded model.
"""

from __future__ import annotations

import logging
import os

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

log = logging.getLogger(__name__)

SHM_ENV = "QWENVL_DS_SHM_COMM"


def enable_fsdp_on_cpu(accelerator, plugin_args: dict) -> bool:
    """Turn FSDP on for a multi-process CPU run that accelerate left on DDP; False when not applicable."""
    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        log.warning("fsdp=true is ignored: FSDP needs several processes (NPROC>1); this run has distributed type %s",
                    state.distributed_type)
        return False
    plugin = FullyShardedDataParallelPlugin(**plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # Every later AcceleratorState() copies the process-level state over its own (accelerate itself
    # writes the engine's type back the same way).
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    log.info("FSDP2 on a CPU process group (gloo)")
    return True


def prepare_deepspeed_on_cpu() -> None:
    """Without CUDA, DeepSpeed communicates through gloo instead of compiling its shared-memory op."""
    if torch.cuda.is_available() or os.environ.get(SHM_ENV) == "1":
        return
    import deepspeed.ops

    # DeepSpeed keeps this dict for the process (its module says edits persist); the op is looked up in it
    # before any build.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def retie(vlm: torch.nn.Module, state_dict: dict) -> dict:
    """Point every alias of a shared parameter at its first name's tensor (in place; returns the dict)."""
    first: dict[int, str] = {}
    for name, p in vlm.named_parameters(remove_duplicate=False):
        if id(p) in first:
            if name in state_dict and first[id(p)] in state_dict:
                state_dict[name] = state_dict[first[id(p)]]
        else:
            first[id(p)] = name
    return state_dict
