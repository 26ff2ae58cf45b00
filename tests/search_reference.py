"""The search's definition as a plain loop: the reference every fast path is tested against."""

import numpy as np


def brute_force(features: np.ndarray, query: np.ndarray, mask: np.ndarray):
    """Loop over every image and placement: cos(vec(f_q ⊙ m), vec(f_d ⊙ m)) on the cropped box."""
    rows, cols = np.nonzero(mask > 0)
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    m = mask[y0:y1, x0:x1, None].astype(np.float64)
    q = (query[y0:y1, x0:x1].astype(np.float64) * m).ravel()
    n, h, w, _ = features.shape
    mh, mw = y1 - y0, x1 - x0
    best = np.full(n, -np.inf)
    where = np.zeros((n, 2), dtype=int)
    for i in range(n):
        for y in range(h - mh + 1):
            for x in range(w - mw + 1):
                r = (features[i, y : y + mh, x : x + mw].astype(np.float64) * m).ravel()
                denom = np.linalg.norm(q) * np.linalg.norm(r)
                s = q @ r / denom if denom > 0 else 0.0
                if s > best[i]:
                    best[i], where[i] = s, (y, x)
    return best, where


def every_placement(features: np.ndarray, query: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(n, Ph, Pw) float64 scores of every placement: the same definition, vectorised over images."""
    rows, cols = np.nonzero(mask > 0)
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    m = mask[y0:y1, x0:x1, None].astype(np.float64)
    q = query[y0:y1, x0:x1].astype(np.float64) * m
    n, h, w, _ = features.shape
    mh, mw = y1 - y0, x1 - x0
    out = np.zeros((n, h - mh + 1, w - mw + 1))
    for y in range(h - mh + 1):
        for x in range(w - mw + 1):
            r = features[:, y : y + mh, x : x + mw].astype(np.float64) * m
            num = (r * q).sum((1, 2, 3))
            den = np.linalg.norm(q) * np.sqrt((r * r).sum((1, 2, 3)))
            out[:, y, x] = np.where(den > 0, num / np.where(den > 0, den, 1), 0)
    return out
