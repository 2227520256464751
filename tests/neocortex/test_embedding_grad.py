"""The in-place input-embedding gradient (neocortex/embedding_grad.py) against autograd's."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from biollm_cls.neocortex.embedding_grad import accumulate_embedding_grad_in_place


def _loss(emb: nn.Embedding, ids: torch.Tensor, probe: torch.Tensor, tied: bool) -> torch.Tensor:
    out = emb(ids)  # (B, T, H)
    loss = (out * probe).sum()
    if tied:  # a head that reads the first rows of the same weight, as a tied, capped LM head does
        loss = loss + (out.flatten(0, 1) @ emb.weight[:5].T).pow(2).sum()
    return loss


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_in_place_gradient_equals_autograds(tied, padding_idx):
    torch.manual_seed(0)
    ref = nn.Embedding(12, 4, padding_idx=padding_idx)
    emb = copy.deepcopy(ref)
    assert accumulate_embedding_grad_in_place(emb)
    ids = torch.tensor([[0, 3, 3, 7], [11, 0, 3, 2]])  # repeated ids and the padding id
    probe = torch.randn(2, 4, 4)
    for _ in range(2):  # the second backward accumulates onto an existing .grad
        _loss(ref, ids, probe, tied).backward()
        _loss(emb, ids, probe, tied).backward()
    torch.testing.assert_close(emb.weight.grad, ref.weight.grad)
    assert emb.weight.grad.abs().sum() > 0


def test_frozen_weight_gets_no_gradient_and_outputs_match():
    emb = nn.Embedding(6, 3)
    ref_out = emb(torch.tensor([1, 2]))
    assert accumulate_embedding_grad_in_place(emb)
    emb.weight.requires_grad_(False)
    out = emb(torch.tensor([1, 2]))
    torch.testing.assert_close(out, ref_out.detach())
    assert not out.requires_grad and emb.weight.grad is None


def test_deepcopy_binds_the_copy():
    emb = nn.Embedding(6, 3)
    accumulate_embedding_grad_in_place(emb)
    twin = copy.deepcopy(emb)
    twin(torch.tensor([1, 1])).sum().backward()
    assert emb.weight.grad is None
    assert twin.weight.grad[1].tolist() == [2.0, 2.0, 2.0]


class _Scaled(nn.Embedding):
    def forward(self, ids):
        return super().forward(ids) * 2.0


@pytest.mark.parametrize("make", [lambda: _Scaled(6, 3), lambda: nn.Embedding(6, 3, max_norm=1.0),
                                  lambda: nn.Embedding(6, 3, sparse=True), lambda: nn.Linear(3, 3), lambda: None])
def test_other_modules_keep_autograds_backward(make):
    module = make()
    assert not accumulate_embedding_grad_in_place(module)
    assert module is None or "forward" not in vars(module)
