"""Gaussian-mixture data whose marginals under every SDE are known in closed form.

Data p_0 = sum_k pi_k N(mu_k, S_k). Every SDE in `diffusion.sde` has the Gaussian kernel
x_t = alpha(t) x_0 + sigma(t) z, so the marginal at time t is again a mixture,

    p_t(x) = sum_k pi_k N(x; alpha(t) mu_k, alpha(t)^2 S_k + sigma(t)^2 I),

with alpha, sigma from `sde.marginal_coeffs` (for the VE SDE alpha = 1 and, with score_sde's
convention, sigma(t) = sigma_min (sigma_max / sigma_min)^t: p_0 is then the data blurred by
sigma_min, a marginal the SDE carries forward exactly). With the eigendecomposition S_k = U_k
diag(lam_k) U_k^T, computed once at construction, component k at time t is U_k diag(v_k(t)) U_k^T
with v_k(t) = alpha(t)^2 lam_k + sigma(t)^2, so densities, scores and samples need one rotation
into each eigenbasis (cost B K D^2), and none at all when every S_k is diagonal (cost B K D). The
score is grad_x log p_t(x) = -sum_k r_k(x) C_k(t)^{-1} (x - alpha(t) mu_k) with the
responsibilities r_k(x) = softmax_k(log pi_k + log N_k(x)), computed from log-densities (stable).

Shapes: weights (K,), means (K, D), covs (K, D, D); x is (B, D) and t is (B,) (or a scalar);
log-densities are (B,), scores (B, D). Every method is pure jnp and may be jitted with the mixture
closed over, or passed as a pytree argument (it is registered as one). Computations follow the
dtype of x (float32 or float64); samples follow the dtype of the fields.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.data import embedded
from diffusion.sde import SDE, ScoreWithVelocity

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32 in the rotations on GPUs


def _is_tracer(*arrays) -> bool:
    """Whether any of `arrays` is traced inside a transformation (has no value to check yet).

    Asked by converting to numpy, which only a traced array refuses (public errors, unlike
    `jax.core.Tracer`, whose home has moved between JAX versions)."""
    try:
        for a in arrays:
            np.asarray(a)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return True
    return False


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianMixture:
    """The mixture sum_k weights[k] N(means[k], covs[k]) and its exact diffusion marginals.

    Attributes:
      weights: (K,) non-negative, summing to one.
      means: (K, D).
      covs: (K, D, D), symmetric positive definite.
      eigvals: (K, D) eigenvalues lam of each covariance (derived).
      eigvecs: (K, D, D) orthonormal eigenvectors U (columns), covs = U diag(lam) U^T; None when
        every covariance is diagonal (then U = I and eigvals are the diagonals) (derived).
      rotated_means: (K, D) U_k^T mu_k, the means in each component's eigenbasis (derived).
      diagonal: whether every covariance is diagonal (the rotation-free fast path) (derived).
    """

    weights: Array
    means: Array
    covs: Array
    eigvals: Array = dataclasses.field(init=False, repr=False)
    eigvecs: Array | None = dataclasses.field(init=False, repr=False)
    rotated_means: Array = dataclasses.field(init=False, repr=False)
    diagonal: bool = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        weights, means, covs = (jnp.asarray(a) for a in (self.weights, self.means, self.covs))
        dtype = jnp.result_type(weights, means, covs)
        if not jnp.issubdtype(dtype, jnp.floating):
            dtype = jnp.asarray(0.0).dtype
        weights, means, covs = (a.astype(dtype) for a in (weights, means, covs))
        if weights.ndim != 1 or weights.shape[0] < 1:
            raise ValueError(f"weights must have shape (K,) with K >= 1, got {weights.shape}.")
        k = weights.shape[0]
        if means.ndim != 2 or means.shape[0] != k or means.shape[1] < 1:
            raise ValueError(f"means must have shape (K, D) = ({k}, D) to match weights "
                             f"{weights.shape}, got {means.shape}.")
        d = means.shape[1]
        if covs.shape != (k, d, d):
            raise ValueError(f"covs must have shape (K, D, D) = {(k, d, d)} to match means "
                             f"{means.shape}, got {covs.shape}.")
        if _is_tracer(weights, means, covs):
            # Built inside a transformation: values cannot be checked; general (rotated) path.
            eigvals, eigvecs = jnp.linalg.eigh(covs, symmetrize_input=True)
            rotated = jnp.einsum("kde,kd->ke", eigvecs, means, precision=_HIGHEST)
            diagonal = False
        else:
            means64 = np.asarray(means, np.float64)
            eigvals, eigvecs, diagonal = self._validate(
                np.asarray(weights, np.float64), means64, np.asarray(covs, np.float64))
            rotated = means if diagonal else jnp.asarray(
                np.einsum("kde,kd->ke", eigvecs, means64), dtype)
            eigvals = jnp.asarray(eigvals, dtype)
            eigvecs = None if diagonal else jnp.asarray(eigvecs, dtype)
        for name, value in [("weights", weights), ("means", means), ("covs", covs),
                            ("eigvals", eigvals), ("eigvecs", eigvecs),
                            ("rotated_means", rotated), ("diagonal", diagonal)]:
            object.__setattr__(self, name, value)

    @staticmethod
    def _validate(weights: np.ndarray, means: np.ndarray, covs: np.ndarray):
        """Checks the values (float64 copies); returns eigvals, eigvecs and the diagonal flag."""
        if not (np.all(np.isfinite(weights)) and np.all(np.isfinite(means))
                and np.all(np.isfinite(covs))):
            raise ValueError("weights, means and covs must be finite.")
        if np.any(weights < 0):
            raise ValueError(f"weights must be non-negative, got {weights}.")
        if abs(weights.sum() - 1.0) > 1e-5:
            raise ValueError(f"weights must sum to 1, got sum {weights.sum():.8g}.")
        scale = np.max(np.abs(covs), axis=(1, 2))
        asymmetry = np.max(np.abs(covs - np.swapaxes(covs, 1, 2)), axis=(1, 2))
        if np.any(asymmetry > 1e-5 * scale):
            bad = int(np.argmax(asymmetry > 1e-5 * scale))
            raise ValueError(f"covs must be symmetric; component {bad} is not "
                             f"(max |C - C^T| = {asymmetry[bad]:.3g}).")
        d = covs.shape[-1]
        diagonal = bool(np.all(covs[:, ~np.eye(d, dtype=bool)] == 0.0))
        if diagonal:
            eigvals, eigvecs = np.diagonal(covs, axis1=1, axis2=2).copy(), None
        else:
            eigvals, eigvecs = np.linalg.eigh(0.5 * (covs + np.swapaxes(covs, 1, 2)))
        smallest = eigvals.min(axis=1)
        if np.any(smallest <= 0.0):
            bad = int(np.argmin(smallest))
            raise ValueError(f"covs must be positive definite; component {bad} has smallest "
                             f"eigenvalue {smallest[bad]:.3g}.")
        return eigvals, eigvecs, diagonal

    # ----------------------------------------------------------------------- constructors

    @classmethod
    def isotropic(cls, weights, means, std) -> GaussianMixture:
        """Components N(means[k], std[k]^2 I); std a scalar or (K,)."""
        means = jnp.asarray(means)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, D), got {means.shape}.")
        k, d = means.shape
        std = jnp.asarray(std)
        if std.ndim == 0:
            std = jnp.full((k,), std, std.dtype)
        if std.shape != (k,):
            raise ValueError(f"std must be a scalar or have shape (K,) = ({k},), got {std.shape}.")
        if not _is_tracer(std) and not np.all(np.asarray(std) > 0):
            raise ValueError(f"std must be positive, got {std}.")
        covs = jnp.reshape(std**2, (k, 1, 1)) * jnp.eye(d, dtype=std.dtype)[None]
        return cls(weights, means, covs)

    @classmethod
    def ring(cls, n_components: int = embedded.GMM_COMPONENTS,
             radius: float = embedded.GMM_RADIUS, std: float = embedded.GMM_STD,
             dim: int = 2) -> GaussianMixture:
        """Equal-weight isotropic components centred on a circle in the first two coordinates.

        The defaults are the "gmm" toy dataset's (`data.gmm_params()`): 8 components of std
        0.25 at radius 2, the first on the positive x axis; the other dim - 2 coordinates are 0.
        """
        if n_components < 1 or dim < 2:
            raise ValueError(f"ring needs n_components >= 1 and dim >= 2, got {n_components} "
                             f"and {dim}.")
        means = embedded.ring_means(n_components, radius, dim)
        weights = np.full(n_components, 1.0 / n_components)
        return cls.isotropic(jnp.asarray(weights), jnp.asarray(means), jnp.asarray(std))

    @classmethod
    def random(cls, key: Array, dim: int, n_components: int = 4, scale: float = 1.0,
               min_eig: float = 0.05) -> GaussianMixture:
        """A random mixture, deterministic in key (a concrete PRNG key, typed or raw).

        Means scale * N(0, I) (coordinates of std scale), covariances Q diag(lam) Q^T with Q Haar
        orthogonal and lam uniform in [min_eig, 1], weights Dirichlet(2, ..., 2). Drawn by numpy
        from a generator seeded with the key's bits (no JAX compilation), in float64, then cast
        to the default float dtype.
        """
        if not 0.0 < min_eig <= 1.0:
            raise ValueError(f"min_eig must lie in (0, 1], got {min_eig}.")
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
        weights = rng.dirichlet(np.full(n_components, 2.0))
        means = scale * rng.standard_normal((n_components, dim))
        q, r = np.linalg.qr(rng.standard_normal((n_components, dim, dim)))
        q = q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]  # Haar-distributed
        lam = rng.uniform(min_eig, 1.0, (n_components, dim))
        covs = np.einsum("kde,ke,kfe->kdf", q, lam, q)
        covs = 0.5 * (covs + np.swapaxes(covs, 1, 2))
        return cls(jnp.asarray(weights / weights.sum()), jnp.asarray(means), jnp.asarray(covs))

    # ----------------------------------------------------------------------- marginals

    @property
    def dim(self) -> int:
        """D, the data dimension."""
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        """K, the number of components."""
        return self.weights.shape[0]

    def _coeffs(self, t, sde: SDE | None, batch: int, dtype) -> tuple[Array, Array]:
        """alpha(t), sigma(t) as (batch,) arrays; (1, 0) for the data (t None)."""
        if t is None:
            return jnp.ones((batch,), dtype), jnp.zeros((batch,), dtype)
        if sde is None:
            raise ValueError("A time t needs the sde whose marginal p_t is meant (sde=...).")
        t = jnp.asarray(t, dtype)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != batch):
            raise ValueError(f"t must be a scalar or have shape ({batch},), got {t.shape}.")
        alpha, sigma = sde.marginal_coeffs(jnp.broadcast_to(t, (batch,)))
        return alpha.astype(dtype), sigma.astype(dtype)

    def _check_x(self, x) -> Array:
        x = jnp.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B, D) with D = {self.dim}, got {x.shape}.")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(self.means.dtype)
        return x

    def marginal(self, sde: SDE | None, t) -> tuple[Array, Array]:
        """Component means alpha mu_k (B, K, D) and variances alpha^2 lam_k + sigma^2 (B, K, D).

        The variances are in each component's eigenbasis (`eigvecs`, or the standard basis when
        `diagonal`): the covariance of component k is U_k diag(variances[:, k]) U_k^T. t is (B,)
        (None: the data, B = 1).
        """
        dtype = self.means.dtype
        batch = 1 if t is None else max(jnp.size(t), 1)
        alpha, sigma = self._coeffs(t, sde, batch, dtype)
        return self._marginal(alpha, sigma)

    def _marginal(self, alpha: Array, sigma: Array) -> tuple[Array, Array]:
        a = alpha[:, None, None]
        means = a * self.means.astype(alpha.dtype)[None]
        variances = a**2 * self.eigvals.astype(alpha.dtype)[None] + sigma[:, None, None] ** 2
        return means, variances

    def moments(self, t=None, sde: SDE | None = None) -> tuple[Array, Array]:
        """Mean (D,) and covariance (D, D) of p_t for a scalar t (None: of the data)."""
        dtype = self.means.dtype
        alpha, sigma = (c[0] for c in self._coeffs(t, sde, 1, dtype))
        mean0 = self.weights @ self.means
        second = jnp.einsum("k,kde->de", self.weights, self.covs
                            + self.means[:, :, None] * self.means[:, None, :], precision=_HIGHEST)
        cov0 = second - mean0[:, None] * mean0[None, :]
        return alpha * mean0, alpha**2 * cov0 + sigma**2 * jnp.eye(self.dim, dtype=dtype)

    def _terms(self, x: Array, t, sde: SDE | None) -> tuple[Array, Array, Array]:
        """log pi_k + log N_k(x) (B, K); residuals y (B, K, D) and variances v (B, K, D) in the
        eigenbases, so that C_k^{-1}(x - m_k) = U_k (y / v)."""
        dtype = x.dtype
        alpha, sigma = self._coeffs(t, sde, x.shape[0], dtype)
        a = alpha[:, None, None]
        v = a**2 * self.eigvals.astype(dtype)[None] + sigma[:, None, None] ** 2
        if self.diagonal:
            xr = x[:, None, :]
        else:
            xr = jnp.einsum("kde,bd->bke", self.eigvecs.astype(dtype), x, precision=_HIGHEST)
        y = xr - a * self.rotated_means.astype(dtype)[None]
        log_normal = -0.5 * (self.dim * math.log(2.0 * math.pi)
                             + jnp.sum(jnp.log(v), axis=-1) + jnp.sum(y**2 / v, axis=-1))
        log_joint = jnp.log(self.weights.astype(dtype))[None] + log_normal
        return log_joint, y, v

    def log_prob(self, x, t=None, sde: SDE | None = None) -> Array:
        """log p_t(x) in nats, (B,), for x (B, D) and t (B,); t None: the data density p_0."""
        log_joint, _, _ = self._terms(self._check_x(x), t, sde)
        return jax.nn.logsumexp(log_joint, axis=-1)

    def score(self, x, t=None, sde: SDE | None = None) -> Array:
        """The exact score grad_x log p_t(x), (B, D) (t None: of the data)."""
        x = self._check_x(x)
        log_joint, y, v = self._terms(x, t, sde)
        g = jax.nn.softmax(log_joint, axis=-1)[:, :, None] * y / v  # r_k U_k^T C_k^{-1}(x - m_k)
        if self.diagonal:
            return -jnp.sum(g, axis=1)
        return -jnp.einsum("kde,bke->bd", self.eigvecs.astype(x.dtype), g, precision=_HIGHEST)

    def posterior_mean(self, x, t, sde: SDE) -> Array:
        """E[x_0 | x_t = x], (B, D): sum_k r_k(x) (mu_k + alpha S_k C_k^{-1} (x - alpha mu_k)),
        finite where alpha(t) = 0 (there it is the data mean)."""
        x = self._check_x(x)
        log_joint, y, v = self._terms(x, t, sde)
        alpha, _ = self._coeffs(t, sde, x.shape[0], x.dtype)
        r = jax.nn.softmax(log_joint, axis=-1)
        pulled = r[:, :, None] * self.eigvals.astype(x.dtype)[None] * y / v   # S_k C_k^{-1}(.)
        if self.diagonal:
            shrink = jnp.sum(pulled, axis=1)
        else:
            shrink = jnp.einsum("kde,bke->bd", self.eigvecs.astype(x.dtype), pulled,
                                precision=_HIGHEST)
        return r @ self.means.astype(x.dtype) + alpha[:, None] * shrink

    def velocity(self, x, t, sde: SDE) -> Array:
        """The exact probability-flow velocity alpha' E[x_0 | x_t] + sigma' E[z | x_t], (B, D),
        with E[z | x_t] = -sigma score; finite where alpha(t) = 0."""
        x = self._check_x(x)
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0],))
        _, sigma, d_alpha, d_sigma = sde.marginal_rates(t)
        noise = -sigma[:, None] * self.score(x, t, sde)
        return d_alpha[:, None] * self.posterior_mean(x, t, sde) + d_sigma[:, None] * noise

    def score_fn(self, sde: SDE) -> ScoreWithVelocity:
        """The exact score as a sampler's score_fn(x (B, D), t (B,)) -> (B, D), with the exact
        velocity (`sde.ScoreWithVelocity`)."""
        return ScoreWithVelocity(lambda x, t: self.score(x, t, sde),
                                 lambda x, t: self.velocity(x, t, sde))

    def sample(self, key: Array, n: int, t=None, sde: SDE | None = None) -> Array:
        """n exact samples (n, D) of p_t (t a scalar or (n,)), or of the data when t is None."""
        dtype = self.means.dtype
        alpha, sigma = self._coeffs(t, sde, n, dtype)
        k_c, k_z = jax.random.split(key)
        c = jax.random.categorical(k_c, jnp.log(self.weights), shape=(n,))
        z = jax.random.normal(k_z, (n, self.dim), dtype)
        v = alpha[:, None] ** 2 * self.eigvals[c] + sigma[:, None] ** 2
        w = jnp.sqrt(v) * z  # N(0, diag(v)) in the component's eigenbasis
        if not self.diagonal:
            # All K rotations and a pick (n K D memory) rather than gathering U[c] (n D^2).
            w = jnp.einsum("kde,ne->nkd", self.eigvecs, w, precision=_HIGHEST)[jnp.arange(n), c]
        return alpha[:, None] * self.means[c] + w


def _flatten(gm: GaussianMixture):
    children = (gm.weights, gm.means, gm.covs, gm.eigvals, gm.eigvecs, gm.rotated_means)
    return children, gm.diagonal


def _unflatten(diagonal: bool, children) -> GaussianMixture:
    gm = object.__new__(GaussianMixture)  # no re-validation: the leaves may be tracers
    names = ("weights", "means", "covs", "eigvals", "eigvecs", "rotated_means")
    for name, value in zip(names, children, strict=True):
        object.__setattr__(gm, name, value)
    object.__setattr__(gm, "diagonal", diagonal)
    return gm


jax.tree_util.register_pytree_node(GaussianMixture, _flatten, _unflatten)
