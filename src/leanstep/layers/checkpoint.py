"""Activation checkpointing that leaves state dicts and BatchNorm statistics as they were.

Checkpointing trades compute for memory: a wrapped module keeps only its inputs during the
forward pass and runs again during backward to rebuild what its backward needs. Two pitfalls of
wrapping naively are handled here:

- the recompute runs in training mode, so every BatchNorm inside would update its running
  statistics twice per step; the statistics are restored after the recompute;
- a wrapper adds a level to the parameter names, so pretrained checkpoints would not load;
  ``Checkpointed`` hides its level from ``state_dict`` and ``load_state_dict``;
- the checkpoint keeps the block's inputs for the recompute, so a block that starts by writing
  over its input (``InplaceABN``, an in-place activation) would corrupt them: the forward runs
  on copies of the inputs (temporary, nothing saved), and so does the recompute of a block that
  was seen writing over them.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

__all__ = ["Checkpointed", "CheckpointedSequential", "checkpointed_call"]


@contextlib.contextmanager
def _running_stats_restored(module: nn.Module):
    """Undo any running-statistics update that ``module``'s norm layers make inside the block."""
    saved = [
        (buffer, buffer.clone())
        for norm in module.modules()
        if isinstance(norm, _BatchNorm) and norm.track_running_stats
        for buffer in (norm.running_mean, norm.running_var, norm.num_batches_tracked)
        if buffer is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _tensor_copies(values: tuple) -> tuple:
    return tuple(v.clone() if isinstance(v, torch.Tensor) else v for v in values)


def checkpointed_call(module: nn.Module, *args):
    """Call ``module(*args)`` under non-reentrant checkpointing when it saves memory.

    Outside training or without grad nothing would be saved for backward, so it is a plain call.
    The first call is the real forward; later calls are autograd's recomputes, whose running
    statistics updates are undone. The inputs, which the checkpoint keeps for the recompute, are
    copied for the first call, and for recomputes too if the first call wrote over its copies.
    """
    if not (module.training and torch.is_grad_enabled()):
        return module(*args)
    calls = 0
    writes_inputs = False

    def run(*inputs):
        nonlocal calls, writes_inputs
        calls += 1
        if calls == 1:
            copies = _tensor_copies(inputs)
            versions = [t._version for t in copies if isinstance(t, torch.Tensor)]
            output = module(*copies)
            writes_inputs = versions != [t._version for t in copies if isinstance(t, torch.Tensor)]
            return output
        if writes_inputs:
            inputs = _tensor_copies(inputs)
        with _running_stats_restored(module):
            return module(*inputs)

    return checkpoint(run, *args, use_reentrant=False)


class Checkpointed(nn.Module):
    """Wrap ``module`` so its activations are recomputed in backward instead of stored.

    Its state dict is the wrapped module's, key for key, so checkpoints load either way.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self._register_state_dict_hook(_drop_wrapper_prefix)
        self._register_load_state_dict_pre_hook(_add_wrapper_prefix)

    def forward(self, *args):
        return checkpointed_call(self.module, *args)


def _drop_wrapper_prefix(module, state_dict, prefix, local_metadata):
    inner = prefix + "module."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)
    return state_dict


def _add_wrapper_prefix(state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    inner = prefix + "module."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix) :]] = state_dict.pop(key)


class CheckpointedSequential(nn.Sequential):
    """An ``nn.Sequential`` checkpointed in segments of ``segment`` consecutive children.

    Children keep their own indices (``0``, ``1``, ...), so the state dict equals that of the
    plain ``nn.Sequential``.
    """

    def __init__(self, *modules: nn.Module, segment: int):
        if not isinstance(segment, int) or isinstance(segment, bool) or segment < 1:
            raise ValueError(f"segment must be an int >= 1, got {segment!r}")
        super().__init__(*modules)
        self.segment = segment

    def forward(self, x):
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(x)
        children = list(self)
        for start in range(0, len(children), self.segment):
            x = checkpointed_call(nn.Sequential(*children[start : start + self.segment]), x)
        return x

    def extra_repr(self) -> str:
        return f"segment={self.segment}"
