"""Top-r factorisation of a weight matrix into DuDe's initial ``A0, B0``.

Pure torch, no process group: the sharded initialiser (``sharded_init.py``) calls these
functions on whichever rank owns a layer, and every rank would get the same answer.

For a weight ``W0 [out, in] = U S V^T`` and rank ``r`` the variants place the singular
values differently (arXiv 2505.14367, §3):

    dude   : A0 = sqrt(S_r) V_r^T    B0 = U_r sqrt(S_r)     (paper default, = PiSSA)
    dude_a : A0 = S_r V_r^T          B0 = U_r
    dude_b : A0 = V_r^T              B0 = U_r S_r

In every case ``B0 @ A0 = U_r S_r V_r^T``, the best rank-r approximation of ``W0``.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch

VARIANTS = ("dude", "dude_a", "dude_b")
SVD_METHODS = ("exact", "randomized")


@dataclass(frozen=True)
class Factors:
    """Result of factorising one weight.

    Attributes:
        lora_a: ``[r, in]`` float32.
        lora_b: ``[out, r]`` float32.
        energy: fraction of ``||W0||_F^2`` captured by the top-r components, in [0, 1].
    """

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    energy: float


def layer_seed(name: str, seed: int = 0) -> int:
    """A 63-bit seed derived from a layer name, identical on every rank and every run."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def exact_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets of ``weight`` by a full SVD in float32.

    Returns:
        ``(U_r [out, r], S_r [r], Vh_r [r, in])``, all float32.
    """
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def randomized_svd(
    weight: torch.Tensor,
    rank: int,
    *,
    oversample: int = 16,
    niter: int = 4,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets by a randomized range finder (Halko et al. 2011, Alg. 4.4).

    Costs about ``out * in * (rank + oversample) * (2 * niter + 2)`` flops instead of
    ``out * in * min(out, in)``. The Gaussian test matrix comes from a generator seeded
    with ``seed``, so the factors depend only on the weight and the seed, not on the rank
    that computes them.

    Returns:
        ``(U_r [out, r], S_r [r], Vh_r [r, in])``, all float32.
    """
    w = weight.float()
    out_features, in_features = w.shape
    k = min(rank + oversample, out_features, in_features)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(in_features, k, generator=gen, dtype=torch.float32).to(w.device)
    # Re-orthonormalise after every product: without it the power iterations lose the
    # smaller of the top-r directions to rounding.
    q, _ = torch.linalg.qr(w @ omega)
    for _ in range(niter):
        z, _ = torch.linalg.qr(w.T @ q)
        q, _ = torch.linalg.qr(w @ z)
    u_small, s, vh = torch.linalg.svd(q.T @ w, full_matrices=False)
    u = q @ u_small
    return u[:, :rank], s[:rank], vh[:rank]


def split_singular_values(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, variant: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Place the singular values into ``(A0, B0)`` as the variant prescribes."""
    if variant == "dude":
        root = s.sqrt()
        return root[:, None] * vh, u * root[None, :]
    if variant == "dude_a":
        return s[:, None] * vh, u.clone()
    if variant == "dude_b":
        return vh.clone(), u * s[None, :]
    raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")


@torch.no_grad()
def factorize(
    weight: torch.Tensor,
    rank: int,
    *,
    variant: str = "dude",
    method: str = "exact",
    name: str = "",
    seed: int = 0,
    oversample: int = 16,
    niter: int = 4,
) -> Factors:
    """Factorise one weight into the variant's initial ``A0, B0`` (float32).

    Args:
        weight: ``[out, in]`` in any floating dtype; the SVD always runs in float32.
        rank: number of singular components ``r``; must be ``<= min(out, in)``.
        variant: ``dude``, ``dude_a`` or ``dude_b``.
        method: ``exact`` or ``randomized``.
        name: layer name; seeds the randomized SVD so every rank gets identical factors.
        seed: run seed, mixed with ``name``.
        oversample: extra columns of the randomized range finder (>= 8 recommended).
        niter: power iterations of the randomized range finder.

    Raises:
        ValueError: bad rank, variant or method.
    """
    if weight.dim() != 2:
        raise ValueError(f"{name or 'weight'}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if not 0 < rank <= min(out_features, in_features):
        raise ValueError(
            f"{name or 'weight'}: rank {rank} must be in [1, min(out, in) = "
            f"{min(out_features, in_features)}] for a weight of shape {tuple(weight.shape)}"
        )
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    if method == "exact":
        u, s, vh = exact_svd(weight, rank)
    elif method == "randomized":
        u, s, vh = randomized_svd(
            weight, rank, oversample=oversample, niter=niter, seed=layer_seed(name, seed)
        )
    else:
        raise ValueError(f"unknown svd method {method!r}; valid: {', '.join(SVD_METHODS)}")
    total = squared_norm(weight)
    energy = float(s.pow(2).sum().item() / total) if total > 0 else 0.0
    lora_a, lora_b = split_singular_values(u, s, vh, variant)
    return Factors(lora_a=lora_a.contiguous(), lora_b=lora_b.contiguous(), energy=energy)


def squared_norm(weight: torch.Tensor, chunk_rows: int = 1024) -> float:
    """``||weight||_F^2`` summed in float64 a block of rows at a time (no float32 copy of the
    whole weight: at 28672 x 8192 that would be 940 MB more on the device during init)."""
    total = torch.zeros((), dtype=torch.float64, device=weight.device)
    for start in range(0, weight.shape[0], chunk_rows):
        total += weight[start:start + chunk_rows].float().square().sum(dtype=torch.float64)
    return float(total)


def svd_cost(out_features: int, in_features: int, rank: int, method: str, *, oversample: int = 16, niter: int = 4) -> float:
    """Estimated flops of factorising one ``[out, in]`` weight (used by the init plan)."""
    if method == "exact":
        return float(out_features) * in_features * min(out_features, in_features)
    k = min(rank + oversample, out_features, in_features)
    return float(out_features) * in_features * k * (2 * niter + 2)


def measure_svd_gflops(rank: int, method: str, *, oversample: int = 8, niter: int = 2, size: int = 512,
                       device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Throughput of :func:`factorize` on ``device``, in :func:`svd_cost` units (Gflop/s).

    Times one factorisation of a random ``size x size`` matrix of ``dtype`` (the weights'
    own: a bf16 weight also pays for its float32 copy and the energy sum, in proportion to
    the cost) after one warm-up (the first CUDA call pays for its kernels and handles). ``svd_cost`` is a model, so this
    is a rate in that model's units; a small SVD runs below the speed of large ones, so
    estimates made from it err on the slow side.
    """
    device = torch.device(device)
    rank = min(rank, size)
    weight = torch.randn(size, size, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    kwargs = {"method": method, "name": "calibration", "oversample": oversample, "niter": niter}
    factorize(weight, rank, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    factorize(weight, rank, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = max(time.perf_counter() - start, 1e-6)
    return svd_cost(size, size, rank, method, oversample=oversample, niter=niter) / seconds / 1e9
