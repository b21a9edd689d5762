"""The losses against independent, naive formulations, and the gradient-flow facts each relies on."""
import math

import pytest
import torch
import torch.nn.functional as F

from sewer_ssl.losses import barlow_twins_loss, byol_loss, dino_loss, nt_xent_loss
from sewer_ssl.methods import mae_loss, mae_loss_released, patchify, unpatchify

SEEDS = [0, 1, 2]


# --- naive references (float64, explicit loops) ---------------------------------------------------

def byol_naive(p, z):
    p, z = p.double(), z.double()
    return sum(2 - 2 * (p[i] @ z[i]) / (p[i].norm() * z[i].norm()) for i in range(len(p))) / len(p)


def barlow_naive(z1, z2, lambd, scale):
    def std(z):
        z = z.double()
        mu = z.sum(0) / len(z)
        var = ((z - mu) ** 2).sum(0) / len(z)  # biased, as BatchNorm1d in training mode
        return (z - mu) / (var + 1e-5) ** 0.5
    a, b = std(z1), std(z2)
    n, k = a.shape
    total = 0.0
    for i in range(k):
        for j in range(k):
            c = sum(a[m, i] * b[m, j] for m in range(n)) / n
            total += (1 - c) ** 2 if i == j else lambd * c ** 2
    return scale * total


def dino_naive(student, teacher, center, ts, tt):
    total, terms = 0.0, 0
    for i, t in enumerate(teacher):
        for j, s in enumerate(student):
            if i == j:
                continue
            pair = 0.0
            for n in range(len(s)):
                e = torch.exp((t[n].double() - center.double()) / tt)
                q = e / e.sum()
                x = s[n].double() / ts
                log_p = x - torch.log(torch.exp(x).sum())
                pair += -(q * log_p).sum()
            total += pair / len(s)
            terms += 1
    return total / terms


def mae_naive(pred, target, mask, norm):
    pred, target = pred.double(), target.double()
    b, l, p = pred.shape
    total, count = 0.0, 0
    for i in range(b):
        for j in range(l):
            if mask[i, j]:
                t = target[i, j]
                if norm:
                    mu = t.sum() / p
                    t = (t - mu) / (((t - mu) ** 2).sum() / (p - 1) + 1e-6) ** 0.5
                total += ((pred[i, j] - t) ** 2).sum() / p
                count += 1
    return total / count


def patchify_naive(imgs, p):
    b, c, h, w = imgs.shape
    return torch.stack([imgs[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(0, 2, 3, 1).reshape(b, -1)
                        for i in range(h // p) for j in range(w // p)], 1)


# --- NT-Xent stays as it was -------------------------------------------------------------------------

def test_nt_xent_unchanged():
    eye = torch.eye(8) * 10
    assert nt_xent_loss(eye, eye, 0.05) < 1e-3
    a, b = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    nt_xent_loss(a, b, 0.2).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


# --- BYOL ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n,k", [(2, 3), (8, 16), (33, 256)])
def test_byol_matches_references(seed, n, k):
    g = torch.Generator().manual_seed(seed)
    p, z = torch.randn(n, k, generator=g), torch.randn(n, k, generator=g) * 5
    got = byol_loss(p, z)
    assert torch.allclose(got, ((F.normalize(p, dim=1) - F.normalize(z, dim=1)) ** 2).sum(1).mean(), atol=1e-5)
    assert torch.allclose(got.double(), byol_naive(p, z), atol=1e-5)


def test_byol_gradient_reaches_prediction_only():
    p, z = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    byol_loss(p, z).backward()
    assert p.grad.abs().sum() > 0 and z.grad is None


# --- Barlow Twins --------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n,k,lambd,scale", [(8, 4, 0.0051, 0.024), (5, 7, 0.5, 1.0), (12, 10, 0.0051, 1.0)])
def test_barlow_matches_loop(seed, n, k, lambd, scale):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, k, generator=g) * 3 + 1, torch.randn(n, k, generator=g)
    assert torch.allclose(barlow_twins_loss(a, b, lambd, scale).double(), barlow_naive(a, b, lambd, scale),
                          rtol=1e-5, atol=1e-6)


def test_barlow_decorrelated_identical_views_give_zero_and_scale_is_global():
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    z = torch.kron(torch.kron(h2, h2), h2)[:, 1:]  # zero-mean, unit-variance, orthogonal columns
    assert barlow_twins_loss(z, z, 0.0051, 1.0) < 1e-6
    a, b = torch.randn(16, 6), torch.randn(16, 6)
    assert torch.allclose(barlow_twins_loss(a, b, 0.0051, 0.024), 0.024 * barlow_twins_loss(a, b, 0.0051, 1.0))


# --- DINO ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("b,k,n_local", [(3, 5, 2), (4, 16, 0), (2, 8, 4)])
def test_dino_matches_double_loop(seed, b, k, n_local):
    g = torch.Generator().manual_seed(seed)
    student = [torch.randn(b, k, generator=g) for _ in range(2 + n_local)]
    teacher = [torch.randn(b, k, generator=g) for _ in range(2)]
    center = torch.randn(k, generator=g) * 0.1
    for ts, tt in [(0.1, 0.04), (0.2, 0.07)]:
        assert torch.allclose(dino_loss(student, teacher, center, ts, tt).double(),
                              dino_naive(student, teacher, center, ts, tt), rtol=1e-5, atol=1e-5)


def test_dino_no_gradient_to_teacher_and_uniform_student_costs_log_k():
    k = 32
    student = [torch.randn(4, k, requires_grad=True) for _ in range(4)]
    teacher = [torch.randn(4, k, requires_grad=True) for _ in range(2)]
    dino_loss(student, teacher, torch.zeros(k), 0.1, 0.04).backward()
    assert all(s.grad.abs().sum() > 0 for s in student) and all(t.grad is None for t in teacher)
    uniform = [torch.zeros(4, k) for _ in range(4)]
    assert abs(dino_loss(uniform, [torch.randn(4, k) * 5] * 2, torch.randn(k), 0.1, 0.04).item() - math.log(k)) < 1e-5


# --- MAE ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,p", [((2, 3, 8, 8), 4), ((3, 3, 12, 12), 3), ((1, 3, 8, 12), 4)])
def test_patchify_matches_slicing_and_round_trips(shape, p):
    imgs = torch.randn(shape)
    assert torch.equal(patchify(imgs, p), patchify_naive(imgs, p))
    if shape[2] == shape[3]:
        assert torch.equal(unpatchify(patchify(imgs, p), p), imgs)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("b,l,p", [(2, 4, 12), (3, 16, 48)])
@pytest.mark.parametrize("norm", [True, False])
def test_mae_matches_loop(seed, b, l, p, norm):
    g = torch.Generator().manual_seed(seed)
    pred, target = torch.randn(b, l, p, generator=g), torch.rand(b, l, p, generator=g) * 4
    mask = (torch.rand(b, l, generator=g) < 0.75).float()
    mask[0, 0] = 1
    assert torch.allclose(mae_loss(pred, target, mask, norm).double(), mae_naive(pred, target, mask, norm),
                          rtol=1e-5, atol=1e-6)


def test_mae_visible_patches_do_not_matter():
    pred, target = torch.randn(4, 16, 48, requires_grad=True), torch.rand(4, 16, 48)
    mask = (torch.rand(4, 16) < 0.75).float()
    mask[:, 0] = 1
    changed = pred.detach().clone()
    changed[mask == 0] = torch.randn_like(changed[mask == 0]) * 100
    assert torch.equal(mae_loss(changed, target, mask, True), mae_loss(pred, target, mask, True))
    mae_loss(pred, target, mask, True).backward()
    assert (pred.grad[mask == 0] == 0).all() and pred.grad[mask == 1].abs().sum() > 0


def test_mae_released_defect():
    torch.manual_seed(0)
    view1, view2 = torch.rand(8, 3, 32, 32), torch.rand(8, 3, 32, 32)
    mask = (torch.rand(8, 4) < 0.75).float()
    mask[:, 0] = 1
    t1 = patchify(view1, 16)
    perfect = (t1 - t1.mean(-1, keepdim=True)) / (t1.var(-1, keepdim=True) + 1e-6) ** 0.5
    released = mae_loss_released(perfect, view2, mask, 16)
    assert mae_loss(perfect, t1, mask, True) < 1e-6 and released > 1.5
    # it is exactly the correct loss, applied to the first 2 images against the other view's pixels
    assert torch.allclose(released, mae_loss(perfect[:2], patchify(view2[:2], 16), mask[:2], True))
    other = view2.clone()
    other[2:] = torch.rand(6, 3, 32, 32)
    assert torch.equal(mae_loss_released(perfect, other, mask, 16), released)
    worse = perfect.clone()
    worse[2:] = 0
    assert torch.equal(mae_loss_released(worse, view2, mask, 16), released)
    assert mae_loss(worse, t1, mask, True) > 0.5
