"""Stain normalisation of H&E batches on the device: Macenko and Reinhard, in torch.

::

    from tilenet.stain import Macenko, Reinhard
    n = Macenko().fit(ref)         # ref: RGB uint8 (H, W, 3), a reference image or region
    out = n(batch)                 # uint8 (B, 3, H, W) in, uint8 (B, 3, H, W) out, same device
    state = n.state_dict()         # plain tensors and numbers: store it with a model
    n = stain_from_state(state)    # or Macenko.from_state(state)

Each tile of a batch is normalised on its own (its stain vectors and concentrations, as
the per-image reference implementations do), all tiles at once. They follow torchstain's
numpy backend (Macenko: ``Io`` 240, ``alpha`` 1, ``beta`` 0.15, linear percentiles, values
truncated to uint8; Reinhard: its CIE-LAB constants, population statistics) to within
2/255. What those crash on or turn to NaN passes through unchanged instead, flagged by
:meth:`normalize`: a tile with too few stained pixels (white glass), one colour (black,
uniform), a single stain (the two stain directions under ``min_angle`` apart) or a singular
system. Work is done in chunks of about ``chunk_pixels`` pixels (float32, ~12 bytes each).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from tilenet.errors import InputError

if TYPE_CHECKING:
    import torch

__all__ = [
    "METHODS",
    "Macenko",
    "Reinhard",
    "StainNormalizer",
    "make_stain",
    "plain_state",
    "stain_from_state",
]


def _torch() -> Any:
    import torch

    return torch


def _as_batch(ref: Any) -> torch.Tensor:
    """An RGB uint8 reference (H, W, 3) array or tensor as a (1, 3, H, W) CPU tensor."""
    torch = _torch()
    arr = ref.detach().cpu().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise InputError(
            f"stain reference must be RGB uint8 of shape (H, W, 3), got {arr.dtype} "
            f"{tuple(arr.shape)}"
        )
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None]


def _check_batch(batch: torch.Tensor) -> None:
    torch = _torch()
    if not isinstance(batch, torch.Tensor) or batch.dtype != torch.uint8 or batch.ndim != 4:
        raise InputError(
            "stain normalisation takes a uint8 tensor (B, 3, H, W), got "
            f"{getattr(batch, 'dtype', type(batch).__name__)} {tuple(getattr(batch, 'shape', ()))}"
        )
    if batch.shape[1] != 3:
        raise InputError(f"stain normalisation needs RGB (3 channels), got {batch.shape[1]}")


def _percentile(sorted_: torch.Tensor, count: torch.Tensor, q: float) -> torch.Tensor:
    """numpy's linear percentile ``q`` of the first ``count`` values of each sorted row."""
    torch = _torch()
    pos = (count.clamp(min=1) - 1).to(sorted_.dtype) * (q / 100.0)
    lo = pos.floor().long()
    hi = torch.minimum(lo + 1, (count.clamp(min=1) - 1).long())
    vlo = sorted_.gather(-1, lo.unsqueeze(-1)).squeeze(-1)
    vhi = sorted_.gather(-1, hi.unsqueeze(-1)).squeeze(-1)
    return vlo + (vhi - vlo) * (pos - lo.to(pos.dtype))


class StainNormalizer:
    """What the normalisers share: chunking, pass-through, state."""

    method = ""

    def __init__(self, *, chunk_pixels: int = 1 << 22) -> None:
        self.chunk_pixels = int(chunk_pixels)
        self.fitted = False
        #: The source statistics set by :meth:`with_source`: one transform for every tile.
        self.source: tuple[torch.Tensor, torch.Tensor] | None = None

    def with_source(self, rgb: Any) -> StainNormalizer:
        """Estimate the source's stains once, from ``rgb`` (RGB uint8 (H, W, 3): a slide's
        thumbnail), and map every tile with that one transform: a per-pixel map, so tiles
        of a tiled inference meet without seams (per-tile estimates differ tile to tile).
        Returns ``self``."""
        self.source = self._source_stats(_as_batch(rgb).reshape(1, 3, -1))
        return self

    def _source_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """The normalised batch (uint8 (B, 3, H, W), on ``batch``'s device)."""
        return self.normalize(batch)[0]

    def normalize(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out, ok)``: the normalised batch and a bool (B,) tensor, False where a tile was
        passed through unchanged (too little stain, one colour, one stain)."""
        torch = _torch()
        _check_batch(batch)
        b, _, h, w = batch.shape
        if b == 0:
            return batch.clone(), torch.ones(0, dtype=torch.bool, device=batch.device)
        step = max(1, self.chunk_pixels // max(1, h * w))
        outs, oks = [], []
        with torch.no_grad():
            for i in range(0, b, step):
                x = batch[i : i + step]
                y, ok = self._normalize(x.reshape(x.shape[0], 3, h * w))
                ok = ok & torch.isfinite(y).all(dim=(1, 2))
                y = torch.nan_to_num(y, nan=0.0).clamp(0, 255).to(torch.uint8)  # truncates
                y = torch.where(ok[:, None, None], y, x.reshape_as(y))
                outs.append(y.reshape(x.shape))
                oks.append(ok)
        return torch.cat(outs), torch.cat(oks)

    def _normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The fitted normaliser as plain tensors and numbers (``torch.save``-able, loads
        with ``weights_only=True``)."""
        raise NotImplementedError


class Macenko(StainNormalizer):
    """Macenko et al. (ISBI 2009): stain vectors from the extreme angles of the optical
    densities in the plane of their two main directions; concentrations rescaled to the
    reference's 99th percentile and recombined with the reference's stain vectors.

    Unfitted, it uses torchstain's default H&E reference. A tile needs ``min_pixels``
    pixels with optical density >= ``beta`` in every channel and stain directions at least
    ``min_angle`` radians apart, else it passes through (H&E tiles measure 0.5-0.8; one
    stain with sensor noise ~0.13).
    """

    method = "macenko"

    def __init__(
        self,
        *,
        io: float = 240.0,
        alpha: float = 1.0,
        beta: float = 0.15,
        min_pixels: int = 64,
        min_angle: float = 0.25,
        chunk_pixels: int = 1 << 22,
    ) -> None:
        super().__init__(chunk_pixels=chunk_pixels)
        torch = _torch()
        self.io, self.alpha, self.beta = float(io), float(alpha), float(beta)
        self.min_pixels, self.min_angle = int(min_pixels), float(min_angle)
        self.stain_matrix = torch.tensor(
            [[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]], dtype=torch.float32
        )
        self.max_conc = torch.tensor([1.9705, 1.0308], dtype=torch.float32)

    def fit(self, ref: Any) -> Macenko:
        """Take the stain vectors and maximum concentrations of ``ref`` (RGB uint8 (H, W, 3))."""
        x = _as_batch(ref)
        he, _, max_c, ok = self._stains(x.reshape(1, 3, -1))
        if not bool(ok[0]):
            raise InputError(
                "stain reference has too little of two stains to fit Macenko (white, one "
                "colour or one stain); choose a region with haematoxylin and eosin"
            )
        self.stain_matrix, self.max_conc = he[0].float(), max_c[0].float()
        self.fitted = True
        return self

    def _stains(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per tile of uint8 (B, 3, N): stain matrix (B, 3, 2), concentrations (B, 2, N),
        their 99th percentiles (B, 2), and whether the tile was usable (B,)."""
        torch = _torch()
        od = -torch.log((x.float() + 1) / self.io)  # (B, 3, N)
        valid = (od >= self.beta).all(1)  # transparent pixels out
        n = valid.sum(1)
        m = valid.unsqueeze(1).double()
        odd = od.double()
        mean = (odd * m).sum(-1) / n.clamp(min=1).unsqueeze(-1)
        cen = (odd - mean.unsqueeze(-1)) * m
        cov = cen @ cen.transpose(1, 2) / (n.clamp(min=2) - 1).view(-1, 1, 1)
        _, vecs = torch.linalg.eigh(cov)
        v = vecs[..., 1:3]  # the plane of the two largest eigenvalues
        # Signs: the mean density projects positively on both, so the angles of the
        # (positive) densities stay away from the ±pi cut and the percentiles are as numpy's.
        sign = torch.where((mean.unsqueeze(1) @ v).squeeze(1) < 0, -1.0, 1.0).to(v.dtype)
        v = (v * sign.unsqueeze(1)).float()
        t = v.transpose(1, 2) @ od  # (B, 2, N)
        phi = torch.atan2(t[:, 1], t[:, 0])
        phi = torch.where(valid, phi, torch.full_like(phi, math.inf)).sort(-1).values
        lo = _percentile(phi, n, self.alpha)
        hi = _percentile(phi, n, 100 - self.alpha)
        vmin = (v @ torch.stack([lo.cos(), lo.sin()], -1).unsqueeze(-1)).squeeze(-1)
        vmax = (v @ torch.stack([hi.cos(), hi.sin()], -1).unsqueeze(-1)).squeeze(-1)
        h_first = (vmin[:, 0] > vmax[:, 0]).view(-1, 1)
        he = torch.stack(
            [torch.where(h_first, vmin, vmax), torch.where(h_first, vmax, vmin)], dim=-1
        )  # (B, 3, 2): haematoxylin first
        # least squares: (HE^T HE)^-1 HE^T OD, with a singular system flagged
        hth = (he.transpose(1, 2) @ he).double()
        det = hth[:, 0, 0] * hth[:, 1, 1] - hth[:, 0, 1] * hth[:, 1, 0]
        ok = (n >= self.min_pixels) & ((hi - lo).abs() >= self.min_angle) & (det > 1e-8)
        safe = torch.where(ok.view(-1, 1, 1), hth, torch.eye(2, dtype=hth.dtype, device=x.device))
        conc = (torch.linalg.inv(safe).float() @ he.transpose(1, 2)) @ od
        count = torch.full((x.shape[0], 2), x.shape[2], device=x.device)
        max_c = _percentile(conc.sort(-1).values, count, 99)
        ok &= (max_c > 1e-6).all(1)
        return he, conc, max_c, ok

    def _source_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        he, _, max_c, ok = self._stains(x)
        if not bool(ok[0]):
            raise InputError(
                "stain source has too little of two stains for Macenko (white, one colour or "
                "one stain)"
            )
        return he[0].float(), max_c[0].float()

    def _normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        torch = _torch()
        if self.source is not None:
            he = self.source[0].to(x.device).expand(x.shape[0], 3, 2)
            od = -torch.log((x.float() + 1) / self.io)
            pinv = torch.linalg.pinv(he[:1])
            conc = pinv @ od
            max_c = self.source[1].to(x.device).expand(x.shape[0], 2)
            ok = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        else:
            _, conc, max_c, ok = self._stains(x)
        ref_he = self.stain_matrix.to(x.device)
        scale = (max_c / self.max_conc.to(x.device)).clamp(min=1e-12)
        conc = conc / scale.unsqueeze(-1)
        return self.io * (-(ref_he @ conc)).exp(), ok

    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "stain_matrix": self.stain_matrix.detach().cpu().clone(),
            "max_conc": self.max_conc.detach().cpu().clone(),
            "io": self.io,
            "alpha": self.alpha,
            "beta": self.beta,
            "min_pixels": self.min_pixels,
            "min_angle": self.min_angle,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Macenko:
        """The normaliser :meth:`state_dict` described."""
        torch = _torch()
        n = cls(
            io=state["io"],
            alpha=state["alpha"],
            beta=state["beta"],
            min_pixels=state["min_pixels"],
            min_angle=state["min_angle"],
        )
        n.stain_matrix = torch.as_tensor(state["stain_matrix"], dtype=torch.float32).cpu()
        n.max_conc = torch.as_tensor(state["max_conc"], dtype=torch.float32).cpu()
        n.fitted = True
        return n


# CIE-LAB as torchstain computes it (sRGB, D65 white, its constants).
_RGB2XYZ = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_WHITE = (0.95047, 1.0, 1.08883)


def _rgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (B, 3, N) -> L (0..100), a, b as float32 (B, 3, N)."""
    torch = _torch()
    rgb = x.float() / 255
    rgb = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = torch.tensor(_RGB2XYZ, dtype=torch.float32, device=x.device)
    white = torch.tensor(_WHITE, dtype=torch.float32, device=x.device).view(1, 3, 1)
    xyz = (m @ rgb) / white
    f = torch.where(xyz > 0.008856, xyz.clamp(min=0) ** (1 / 3), 7.787 * xyz + 16 / 116)
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], 1)


def _lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """L, a, b (B, 3, N) -> RGB in 0..255 (float, clipped)."""
    torch = _torch()
    y = (lab[:, 0] + 16) / 116
    xyz = torch.stack([lab[:, 1] / 500 + y, y, y - lab[:, 2] / 200], 1)
    xyz = torch.where(xyz > 0.2068966, xyz**3, (xyz - 16 / 116) / 7.787)
    white = torch.tensor(_WHITE, dtype=torch.float32, device=lab.device).view(1, 3, 1)
    inv = torch.linalg.inv(torch.tensor(_RGB2XYZ, dtype=torch.float64)).float().to(lab.device)
    rgb = inv @ (xyz * white)
    rgb = torch.where(
        rgb > 0.0031308, 1.055 * rgb.clamp(min=0.0031308) ** (1 / 2.4) - 0.055, rgb * 12.92
    )
    return rgb.clamp(0, 1) * 255


class Reinhard(StainNormalizer):
    """Reinhard et al. (2001): each CIE-LAB channel of a tile standardised to its own mean
    and standard deviation, then given the reference's. A tile whose lightness varies by
    less than ``min_std`` (white, black, one colour) passes through; a colour channel that
    does not vary is shifted, not scaled."""

    method = "reinhard"

    def __init__(self, *, min_std: float = 1.0, chunk_pixels: int = 1 << 22) -> None:
        super().__init__(chunk_pixels=chunk_pixels)
        torch = _torch()
        self.min_std = float(min_std)
        self.mean = torch.zeros(3)
        self.std = torch.ones(3)

    def fit(self, ref: Any) -> Reinhard:
        """Take the LAB means and standard deviations of ``ref`` (RGB uint8 (H, W, 3))."""
        lab = _rgb_to_lab(_as_batch(ref).reshape(1, 3, -1))[0]
        self.mean, self.std = lab.mean(-1), lab.std(-1, unbiased=False)
        self.fitted = True
        return self

    def _normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        torch = _torch()
        if not self.fitted:
            raise InputError("Reinhard needs a reference: call fit(ref) first")
        lab = _rgb_to_lab(x)
        if self.source is not None:
            mu = self.source[0].to(x.device).view(1, 3, 1)
            sd = self.source[1].to(x.device).view(1, 3, 1)
            ok = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        else:
            mu = lab.mean(-1, keepdim=True)
            sd = lab.std(-1, unbiased=False, keepdim=True)
            ok = sd[:, 0, 0] >= self.min_std
        gain = torch.where(sd > 1e-3, self.std.to(x.device).view(1, 3, 1) / sd.clamp(min=1e-3), 1)
        out = (lab - mu) * gain + self.mean.to(x.device).view(1, 3, 1)
        return _lab_to_rgb(out), ok

    def _source_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lab = _rgb_to_lab(x)[0]
        sd = lab.std(-1, unbiased=False)
        if float(sd[0]) < self.min_std:
            raise InputError("stain source does not vary (white, black or one colour)")
        return lab.mean(-1), sd

    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "mean": self.mean.detach().cpu().clone(),
            "std": self.std.detach().cpu().clone(),
            "min_std": self.min_std,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Reinhard:
        """The normaliser :meth:`state_dict` described."""
        torch = _torch()
        n = cls(min_std=state["min_std"])
        n.mean = torch.as_tensor(state["mean"], dtype=torch.float32).cpu()
        n.std = torch.as_tensor(state["std"], dtype=torch.float32).cpu()
        n.fitted = True
        return n


_METHODS: dict[str, type[Macenko] | type[Reinhard]] = {"macenko": Macenko, "reinhard": Reinhard}
#: The normalisers by name.
METHODS = tuple(_METHODS)


def make_stain(method: str, ref: Any) -> Macenko | Reinhard:
    """The normaliser ``method`` ("macenko" or "reinhard") fitted to ``ref`` (RGB uint8)."""
    if method not in _METHODS:
        raise InputError(f"stain method must be one of {sorted(_METHODS)}, got {method!r}")
    return _METHODS[method]().fit(ref)


def plain_state(normaliser: StainNormalizer) -> dict[str, Any]:
    """A fitted normaliser's :meth:`~StainNormalizer.state_dict` as plain data (tensors as
    nested lists of their float32 values): for a model spec, JSON or HDF5 attributes.
    :func:`stain_from_state` reads it back to the same normaliser."""
    return {
        k: v.tolist() if hasattr(v, "tolist") else v for k, v in normaliser.state_dict().items()
    }


def stain_from_state(state: dict[str, Any]) -> Macenko | Reinhard:
    """The normaliser a :meth:`~StainNormalizer.state_dict` describes (by its ``method``)."""
    method = state.get("method") if isinstance(state, dict) else None
    if method not in _METHODS:
        raise InputError(
            f"stain normaliser state names method {method!r}; expected one of {sorted(_METHODS)}"
        )
    return _METHODS[method].from_state(state)
