"""Mass-univariate least squares over many columns at once (pure NumPy/SciPy kernels).

OLS: ``B = (X'X)^-1 X'Y`` from a sparse ``X`` (rows without data are zero), one ``p x p`` inverse for all
columns. AR(1): each column's lag-1 autocorrelation ``rho`` of its OLS residuals (over pairs of
consecutive valid samples), rounded to ``rho_step`` (0.01: columns with the same rounded ``rho`` share one
inverse, as in nilearn), then OLS of ``y[t] - rho y[t-1]`` on ``X[t] - rho X[t-1]`` over the valid pairs
(Cochrane-Orcutt: the first sample of each valid stretch is dropped).

Contrasts: a t contrast has one weight vector over conditions and is tested at every lag; an F contrast
tests the same weights at all lags jointly (``q = lags`` numerator degrees of freedom).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from gmfx._errors import ParameterError

__all__ = ["Prepared", "prepare", "fit_columns", "output_rows", "RHO_STEP"]

#: AR(1) coefficients are rounded to this step (columns in one bin share their whitened design inverse)
RHO_STEP = 0.01


@dataclass(frozen=True)
class Prepared:
    """What every block of one face needs: the design, its Gram matrices and the contrasts."""

    matrix: sp.csr_array  # (time, p), zero rows outside valid
    design: _Split  # the same, as sparse columns of interest + dense nuisance (fast products)
    valid: np.ndarray  # (time,)
    gram_inverse: np.ndarray  # (p, p)
    dof: int
    n_interest: int
    t_weights: np.ndarray  # (n_t, p_interest / n_lags) weights over conditions
    f_weights: np.ndarray  # (n_f, conditions)
    n_lags: int
    ar1: bool
    pairs: np.ndarray  # (time - 1,) valid[t] & valid[t - 1]
    grams: tuple[np.ndarray, np.ndarray, np.ndarray]  # A = X1'X1, C = X1'X0, D = X0'X0 over pairs
    ar1_dof: int


@dataclass(frozen=True)
class _Split:
    """A design as its sparse columns of interest (FIR: a few ones per event) and dense nuisance columns:
    ``X'Y`` and ``XB`` then cost one sparse product of the events' size plus one BLAS product, ~5x
    faster than one sparse matrix holding the dense nuisance columns too."""

    sparse: sp.csr_array
    dense: np.ndarray

    @classmethod
    def of(cls, matrix: sp.csr_array, n_interest: int) -> _Split:
        return cls(sp.csr_array(matrix[:, :n_interest]), np.ascontiguousarray(matrix[:, n_interest:].toarray()))

    def t_dot(self, y: np.ndarray) -> np.ndarray:
        return np.concatenate([self.sparse.T @ y, self.dense.T @ y])

    def dot(self, beta: np.ndarray) -> np.ndarray:
        k = self.sparse.shape[1]
        return self.sparse @ beta[:k] + self.dense @ beta[k:]

    def rows(self, chosen: slice) -> _Split:
        return _Split(sp.csr_array(self.sparse[chosen]), self.dense[chosen])


def _inverse(gram: np.ndarray, names, where: str) -> np.ndarray:
    scale = np.sqrt(np.clip(np.diag(gram), 1e-300, None))
    empty = np.flatnonzero(np.diag(gram) <= 0)
    if empty.size:
        listed = ", ".join(str(names[i]) for i in empty[:5])
        raise ParameterError(
            f"{empty.size} regressor(s) have no valid sample ({listed}{', ...' if empty.size > 5 else ''})",
            where=where,
            fix="check that the events fall inside the recording and the face is detected after them, "
            "or shorten the window",
        )
    normalised = gram / scale[:, None] / scale[None, :]
    condition = np.linalg.cond(normalised)
    if not condition < 1e10:
        raise ParameterError(
            f"the design is singular (condition number {condition:.3g}): some regressors are linear combinations "
            "of others",
            where=where,
            fix="lower drift_order, drop motion regressors, or remove a modulator that repeats a condition",
        )
    return np.linalg.inv(normalised) / scale[:, None] / scale[None, :]


def prepare(
    matrix: sp.csr_array, valid: np.ndarray, *, n_interest: int, n_lags: int, t_weights: np.ndarray,
    f_weights: np.ndarray, ar1: bool, names=(), where: str = "glm",
) -> Prepared:  # fmt: skip
    """Gram matrices and degrees of freedom of a design (once per face, shared by every block)."""
    p = matrix.shape[1]
    gram = (matrix.T @ matrix).toarray()
    names = list(names) or [f"column {i}" for i in range(p)]
    dof = int(valid.sum()) - p
    if dof < 1:
        raise ParameterError(
            f"the design has {p} regressors but only {int(valid.sum())} valid samples",
            where=where,
            fix="fit a longer recording, fewer lags (window) or a lower drift_order",
        )
    pairs = valid[1:] & valid[:-1]
    grams: tuple = (np.zeros((0, 0)),) * 3
    if ar1:
        keep = sp.diags_array(pairs.astype(np.float64))
        current, previous = keep @ matrix[1:], keep @ matrix[:-1]
        grams = tuple((a.T @ b).toarray() for a, b in ((current, current), (current, previous), (previous, previous)))
    return Prepared(
        matrix=matrix, design=_Split.of(matrix, n_interest), valid=valid, gram_inverse=_inverse(gram, names, where), dof=dof, n_interest=n_interest,
        t_weights=np.atleast_2d(t_weights).reshape(-1, n_interest // n_lags), f_weights=np.atleast_2d(f_weights).reshape(-1, n_interest // n_lags),
        n_lags=n_lags, ar1=ar1, pairs=pairs, grams=grams, ar1_dof=int(pairs.sum()) - p,
    )  # fmt: skip


def output_rows(prepared_or_counts) -> dict[str, slice]:
    """Where each output sits in the packed ``(row, column)`` result of :func:`fit_columns`."""
    n_interest, n_lags, n_t, n_f = prepared_or_counts
    sizes = {"beta": n_interest, "se": n_interest, "sigma2": 1, "rho": 1, "mean": 1, "t": n_t * n_lags,
             "effect": n_t * n_lags, "F": n_f}  # fmt: skip
    rows, start = {}, 0
    for name, size in sizes.items():
        rows[name] = slice(start, start + size)
        start += size
    return rows


def _contrast_matrices(prepared: Prepared) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(n_t * lags, p)`` t rows (contrast-major) and one ``(lags, p)`` matrix per F contrast."""
    p, lags = prepared.matrix.shape[1], prepared.n_lags

    def at_lags(weights: np.ndarray) -> np.ndarray:
        rows = np.zeros((lags, p))
        for condition, weight in enumerate(weights):
            rows[np.arange(lags), condition * lags + np.arange(lags)] = weight
        return rows

    t_rows = np.concatenate([at_lags(w) for w in prepared.t_weights]) if prepared.t_weights.size else np.zeros((0, p))
    return t_rows, [at_lags(w) for w in prepared.f_weights]


def _statistics(beta: np.ndarray, rss: np.ndarray, inverse: np.ndarray, dof: int, prepared: Prepared) -> dict[str, np.ndarray]:
    sigma2 = rss / dof
    t_rows, f_mats = _contrast_matrices(prepared)
    effect = t_rows @ beta
    t_var = np.einsum("ij,jk,ik->i", t_rows, inverse, t_rows)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = effect / np.sqrt(t_var[:, None] * sigma2[None, :])
        f = []
        for c in f_mats:
            cb = c @ beta
            middle = np.linalg.pinv(c @ inverse @ c.T)
            f.append((cb * (middle @ cb)).sum(0) / (c.shape[0] * sigma2))
    k = prepared.n_interest
    se = np.sqrt(np.diag(inverse)[:k, None] * sigma2[None, :])
    return {"beta": beta[:k], "se": se, "sigma2": sigma2, "t": t, "effect": effect,
            "F": np.array(f).reshape(len(f_mats), -1)}  # fmt: skip


def fit_columns(y: np.ndarray, prepared: Prepared) -> np.ndarray:
    """Fit every column of ``y`` ``(time, m)``; return the packed ``(rows, m)`` outputs (see :func:`output_rows`).

    Columns with NaN on valid samples (a vertex lost while the face was found) are fitted one by one
    over their own finite samples; columns left without enough samples are NaN.
    """
    n_t, n_f = prepared.t_weights.shape[0], prepared.f_weights.shape[0]
    rows = output_rows((prepared.n_interest, prepared.n_lags, n_t, n_f))
    out = np.full((rows["F"].stop, y.shape[1]), np.nan)
    y = np.array(y, dtype=np.float64)  # our own copy: invalid rows are zeroed in place
    lost = ~np.isfinite(y)
    lost[~prepared.valid] = False
    finite = ~lost.any(axis=0)
    raw = {int(c): y[:, c].copy() for c in np.flatnonzero(~finite)}
    y[~prepared.valid] = 0.0
    if finite.all():
        out[:] = _fit_regular(y, prepared, rows)
    elif finite.any():
        out[:, finite] = _fit_regular(y[:, finite], prepared, rows)
    for column, values in raw.items():
        own = prepared.valid & np.isfinite(values)
        keep = sp.diags_array(own.astype(np.float64))
        try:
            single = prepare(
                sp.csr_array(keep @ prepared.matrix), own, n_interest=prepared.n_interest, n_lags=prepared.n_lags,
                t_weights=prepared.t_weights, f_weights=prepared.f_weights, ar1=prepared.ar1,
            )  # fmt: skip
        except ParameterError:
            continue  # too few samples or an empty regressor for this column: NaN
        out[:, column] = _fit_regular(np.where(own, values, 0.0)[:, None], single, rows)[:, 0]
    return out


def _fit_regular(y: np.ndarray, prepared: Prepared, rows: dict[str, slice]) -> np.ndarray:
    """Columns with data on every valid sample (zeros elsewhere)."""
    x = prepared.design
    beta = prepared.gram_inverse @ x.t_dot(y)
    residual = y - x.dot(beta)  # zero on invalid rows (both terms are)
    out = np.empty((rows["F"].stop, y.shape[1]))
    out[rows["mean"]] = y.sum(0) / prepared.valid.sum()
    squares = np.einsum("tm,tm->m", residual, residual)
    if not prepared.ar1:
        stats = _statistics(beta, squares, prepared.gram_inverse, prepared.dof, prepared)
        out[rows["rho"]] = np.nan
    else:
        pairs = prepared.pairs
        current, previous = y[1:] * pairs[:, None], y[:-1] * pairs[:, None]
        lagged = np.einsum("tm,tm->m", residual[1:] * pairs[:, None], residual[:-1])
        with np.errstate(divide="ignore", invalid="ignore"):
            rho = np.nan_to_num(np.clip(np.round(lagged / squares / RHO_STEP) * RHO_STEP, -0.99, 0.99))
        out[rows["rho"]] = rho
        # whitened products for all columns at once: yw = y1 - rho y0, Xw = X1 - rho X0 over the valid pairs
        x1, x0 = x.rows(slice(1, None)), x.rows(slice(None, -1))
        x1y1, x1y0, x0y1, x0y0 = x1.t_dot(current), x1.t_dot(previous), x0.t_dot(current), x0.t_dot(previous)
        y1y1, y1y0, y0y0 = (np.einsum("tm,tm->m", a, b) for a, b in ((current, current), (current, previous), (previous, previous)))
        stats = {name: np.empty((rows[name].stop - rows[name].start, y.shape[1])) for name in ("beta", "se", "t", "effect", "F")}
        stats["sigma2"] = np.empty(y.shape[1])
        a, c, d = prepared.grams
        for value in np.unique(rho):
            chosen = rho == value
            xtyw = x1y1[:, chosen] - value * (x1y0[:, chosen] + x0y1[:, chosen]) + value**2 * x0y0[:, chosen]
            ytyw = y1y1[chosen] - 2 * value * y1y0[chosen] + value**2 * y0y0[chosen]
            gram = a - value * (c + c.T) + value**2 * d
            inverse = _inverse(gram, [f"column {i}" for i in range(gram.shape[0])], "glm(ar1=True)")
            beta_bin = inverse @ xtyw
            rss = np.clip(ytyw - np.einsum("pm,pm->m", beta_bin, xtyw), 0.0, None)  # ||yw - Xw b||^2 at the solution
            for name, values in _statistics(beta_bin, rss, inverse, prepared.ar1_dof, prepared).items():
                if name == "sigma2":
                    stats[name][chosen] = values
                else:
                    stats[name][:, chosen] = values
    for name, values in stats.items():
        out[rows[name]] = values
    return out
