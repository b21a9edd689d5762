"""Metrics against independent formulations: F2-CIW (both forms), per-code recall, RankMe, alpha."""
import numpy as np
import pandas as pd
import pytest

from sewer_ssl.config import CIW, CODES
from sewer_ssl.metrics import (alpha_exponent, eigenspectrum, f2_ciw, f2_ciw_binary, f2_per_code,
                               per_code_recall, rankme)

W = np.array([CIW[c] for c in CODES])


def _f2_numpy(y_true, y_pred):
    "F2-CIW straight from the counts: F2_c = 5PR/(4P+R), 0 where undefined; CIW-weighted mean."
    tp = (y_true * y_pred).sum(0).astype(float)
    fp = ((1 - y_true) * y_pred).sum(0)
    fn = (y_true * (1 - y_pred)).sum(0)
    f2 = np.zeros(len(CODES))
    for c in range(len(CODES)):
        if tp[c] == 0: continue            # P or R is 0 or undefined: F2 = 0
        p, r = tp[c] / (tp[c] + fp[c]), tp[c] / (tp[c] + fn[c])
        f2[c] = 5 * p * r / (4 * p + r)
    return (W * f2).sum() / W.sum(), f2


@pytest.mark.parametrize("seed", range(6))
def test_f2_ciw_matches_direct_formula(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 200))
    y_true = (rng.random((n, 17)) < rng.uniform(0.02, 0.5, 17)).astype(int)
    y_pred = (rng.random((n, 17)) < rng.uniform(0.02, 0.5, 17)).astype(int)
    y_true[:, seed] = 0                     # an absent code, sometimes predicted
    expected, per_code = _f2_numpy(y_true, y_pred)
    assert np.isclose(f2_ciw(y_true, y_pred), expected)
    assert np.allclose(f2_per_code(y_true, y_pred), per_code)


def test_f2_ciw_perfect_and_dataframe_columns_by_name():
    rng = np.random.default_rng(0)
    y = (rng.random((50, 17)) < 0.3).astype(int)
    y[0] = 1                                 # every code present
    assert np.isclose(f2_ciw(y, y), 1.0)
    df = pd.DataFrame(y, columns=list(CODES))
    shuffled = df[list(reversed(CODES))]     # columns are read by name, not position
    assert np.isclose(f2_ciw(shuffled, df), 1.0)


@pytest.mark.parametrize("seed", range(4))
def test_binary_f2_ciw_is_weighted_5r_over_4_plus_r(seed):
    rng = np.random.default_rng(seed)
    codes = (rng.random((300, 17)) < 0.08).astype(int)
    codes[:, 3] = 0                          # an absent code counts as F2 = 0
    defect = (codes.any(1) & (rng.random(300) < 0.6)) | (rng.random(300) < 0.2)   # misses and false alarms
    d = defect.astype(int)
    r = per_code_recall(codes, d).to_numpy()
    expected = np.nan_to_num(5 * r / (4 + r))
    assert np.allclose(f2_per_code(codes, codes * d[:, None]), expected)
    assert np.isclose(f2_ciw_binary(codes, d), (W * expected).sum() / W.sum())
    # false alarms on images without codes do not change it
    assert np.isclose(f2_ciw_binary(codes, d | (codes.sum(1) == 0)), f2_ciw_binary(codes, d))


def test_per_code_recall_worked_example():
    codes = pd.DataFrame(0, index=range(5), columns=list(CODES))
    codes.loc[[0, 1, 2], "RB"] = 1           # three cracks
    codes.loc[[2, 3], "RO"] = 1              # two root images, one also cracked
    d = [1, 0, 1, 0, 1]                      # flags images 0, 2 and the normal image 4
    r = per_code_recall(codes, d)
    assert np.isclose(r["RB"], 2 / 3) and np.isclose(r["RO"], 1 / 2)
    assert r.drop(["RB", "RO"]).isna().all() and list(r.index) == list(CODES)


@pytest.mark.parametrize("r", [1, 2, 5, 12])
def test_rankme_counts_equal_singular_values(r):
    rng = np.random.default_rng(r)
    u, _ = np.linalg.qr(rng.normal(size=(80, r)))
    v, _ = np.linalg.qr(rng.normal(size=(24, r)))
    z = u @ (3.0 * np.eye(r)) @ v.T          # N x K with r equal non-zero singular values
    assert abs(rankme(z) - r) < 1e-3 * r


@pytest.mark.parametrize("r", [2, 7])
def test_centred_rankme_ignores_a_common_offset(r):
    """Zero-mean features with r equal singular values, shifted by one common vector orthogonal to them:
    the centred RankMe is r, the uncentred one matches the hand-computed entropy of (offset, spread)."""
    rng = np.random.default_rng(r)
    n, k, shift = 120, 32, 6.0
    u, _ = np.linalg.qr(np.c_[np.ones(n), rng.normal(size=(n, r))])   # columns 1.. orthogonal to 1
    v, _ = np.linalg.qr(rng.normal(size=(k, r + 1)))
    z = u[:, 1:] @ (2.0 * np.eye(r)) @ v[:, :r].T + shift * v[:, r]
    s = np.r_[shift * np.sqrt(n), np.full(r, 2.0)]
    p = s / s.sum() + 1e-6
    assert abs(rankme(z, centre=True) - r) < 1e-2
    assert abs(rankme(z) - np.exp(-(p * np.log(p)).sum())) < 1e-2
    assert rankme(z) < rankme(z, centre=True)


def test_alpha_exponent_recovers_a_chosen_power_law():
    rng = np.random.default_rng(0)
    n, k, alpha = 300, 40, 1.3
    lam = np.arange(1, 31) ** -alpha
    u, _ = np.linalg.qr(np.c_[np.ones(n), rng.normal(size=(n, len(lam)))])   # columns orthogonal to 1
    v, _ = np.linalg.qr(rng.normal(size=(k, len(lam))))
    z = u[:, 1:] @ np.diag(np.sqrt(lam * (n - 1))) @ v.T + 5.0              # an offset: centring removes it
    assert np.allclose(eigenspectrum(z)[:30], lam)
    assert np.isclose(alpha_exponent(z), alpha)
    assert np.isclose(alpha_exponent(z, fit_range=(3, 20)), alpha)
    assert np.isnan(alpha_exponent(np.ones((10, 4))))                          # collapse: nothing to fit


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="N x 17"):
        f2_ciw(np.zeros((4, 16)), np.zeros((4, 16)))
    with pytest.raises(ValueError, match="only 0 and 1"):
        f2_ciw(np.zeros((4, 17)), np.full((4, 17), 0.7))
    with pytest.raises(ValueError, match="must align"):
        per_code_recall(np.zeros((4, 17)), [1, 0])
    with pytest.raises(ValueError, match="lacks the code column"):
        f2_ciw_binary(pd.DataFrame({"RB": [1]}), [1])
    with pytest.raises(ValueError, match="fit_range"):
        alpha_exponent(np.random.default_rng(0).normal(size=(20, 5)), fit_range=(3, 2))
