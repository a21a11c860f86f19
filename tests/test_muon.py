"""--optimizer muon: common.MuonAdamW against torch's own Muon and AdamW, its Newton-Schulz orthogonalisation
against the SVD, and which parameters it gives Muon. Exact resume with it is in test_jepa_options.py."""

import copy

import pytest
import torch

import common
from common import orthogonalize, param_groups
from conftest import TINY_TRAIN
from train_ijepa import build_model, build_optimizer, parse_args


@pytest.mark.parametrize("shape", [(64, 16), (16, 64)])
def test_orthogonalize_keeps_the_singular_vectors_and_pulls_the_singular_values_near_one(monkeypatch, shape):
    """In fp32, on a well-conditioned matrix: U^T O V is diagonal (the SVD's own singular vectors), with
    every entry in the band the quintic iteration is built for, not all equal to one."""
    monkeypatch.setattr(common, "cpu_has_fast_bf16", lambda: False)
    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    rotated = u.T @ orthogonalize(matrix) @ vh.T
    diagonal = rotated.diagonal()
    assert (rotated - torch.diag(diagonal)).abs().max() < 1e-4
    assert diagonal.min() > 0.6 and diagonal.max() < 1.3 and diagonal.std() > 0.01
    assert orthogonalize(matrix).shape == matrix.shape


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_orthogonalize_on_a_stack_equals_each_matrix_alone(monkeypatch, fast_bf16):
    """MuonAdamW iterates on the matrices of one shape as one stack: the same as one at a time, each scaled
    by its own norm (a stack of very different scales)."""
    monkeypatch.setattr(common, "cpu_has_fast_bf16", lambda: fast_bf16)
    generator = torch.Generator().manual_seed(0)
    stack = torch.randn(3, 48, 16, generator=generator) * torch.tensor([1e-3, 1.0, 50.0]).view(3, 1, 1)
    alone = torch.stack([orthogonalize(matrix) for matrix in stack])
    torch.testing.assert_close(orthogonalize(stack), alone, rtol=0, atol=1e-2 if fast_bf16 else 1e-5)
    assert orthogonalize(stack.view(3, 1, 48, 16)).shape == (3, 1, 48, 16)


def test_only_the_hidden_matrices_get_muon():
    model = build_model(parse_args(TINY_TRAIN))
    names = {id(p): n for n, p in model.named_parameters()}
    hidden, decay, no_decay = param_groups(model, 0.04, muon=True)
    assert hidden["muon"] and not decay.get("muon") and hidden["apply_wd"]
    hidden_names = {names[id(p)] for p in hidden["params"]}
    expected = {n for n, p in model.named_parameters()
                if p.requires_grad and p.ndim == 2 and ("encoder.blocks." in n or "predictor_blocks." in n)}
    assert hidden_names == expected and "encoder.blocks.0.mlp.fc1.weight" in hidden_names
    assert {"encoder.patch_embed.proj.weight", "predictor.predictor_embed.weight",
            "predictor.predictor_proj.weight"} <= {names[id(p)] for p in decay["params"]}
    plain = param_groups(model, 0.04)  # without muon: AdamW's two groups, the matrices back in the first
    assert {id(p) for p in plain[0]["params"]} == {id(p) for p in hidden["params"] + decay["params"]}


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon arrived in torch 2.9")
@pytest.mark.parametrize("momentum_flag, momentum", [([], 0.95), (["--muon-momentum", "0.8"], 0.8)])
def test_muon_adamw_steps_as_torch_muon_on_hidden_matrices_and_torch_adamw_elsewhere(monkeypatch, momentum_flag,
                                                                                      momentum):
    """Three steps of random gradients with the lr and weight decay changed between steps, as the schedules
    do: the optimiser train_ijepa.py builds for --optimizer muon (momentum 0.95 by default, else
    --muon-momentum M) gives the same weights as torch.optim.Muon (that momentum, RMS matched to AdamW, its bf16
    iteration) on the hidden matrices and torch.optim.AdamW on the rest."""
    monkeypatch.setattr(common, "cpu_has_fast_bf16", lambda: True)  # torch's Muon always iterates in bf16
    args = parse_args([*TINY_TRAIN, "--optimizer", "muon", *momentum_flag])
    model = build_model(args)
    reference, initial = copy.deepcopy(model), copy.deepcopy(model)
    optimizer = build_optimizer(model, args, torch.device("cpu"))
    hidden, *adamw_groups = param_groups(reference, args.weight_decay, muon=True)
    muon = torch.optim.Muon(hidden["params"], lr=1e-3, weight_decay=0.04, momentum=momentum,
                            adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(adamw_groups, lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for lr, weight_decay in [(1e-3, 0.04), (5e-4, 0.1), (2e-4, 0.4)]:
        for p, q in zip(model.parameters(), reference.parameters()):
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=generator)
                q.grad = p.grad.clone()
        common.set_optimizer_values(optimizer, lr, weight_decay)
        for other in (muon, adamw):
            common.set_optimizer_values(other, lr, weight_decay)
        optimizer.step()
        muon.step()
        adamw.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    for p, p0 in zip(model.parameters(), initial.parameters()):
        assert not p.requires_grad or not torch.equal(p, p0)  # every trainable parameter moved
