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


@pytest.mark.parametrize("embedding_in_place", [False, True])
def test_head_gradient_in_place_adds_to_the_lookups_either_way(embedding_in_place):
    """The tied head's part lands in .grad whether the lookup's comes in place or through autograd (the trunk
    compiled as a whole runs the plain lookup)."""
    from biollm_cls.neocortex.embedding_grad import head_logits

    torch.manual_seed(1)
    ref = nn.Embedding(12, 4)
    emb = copy.deepcopy(ref)
    if embedding_in_place:
        accumulate_embedding_grad_in_place(emb)
    ids = torch.tensor([[1, 3, 3, 7]])
    for module, head in ((ref, lambda h, w: h @ w[:5].T), (emb, lambda h, w: head_logits(h, w, 5))):
        hidden = module(ids).tanh()  # (1, 4, H)
        head(hidden, module.weight).pow(2).sum().backward()
    torch.testing.assert_close(emb.weight.grad, ref.weight.grad)
    assert emb.weight.grad[5:].abs().sum() > 0 and emb.weight.grad[:5].abs().sum() > 0
