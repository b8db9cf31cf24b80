"""The hospital's secret randomness: DP noise and Poisson sampling drawn from OS entropy.

Why not torch's or NumPy's generators: DP-SGD's guarantee needs noise and batch sampling that the
server cannot predict. A generator seeded from anything a message carries (the run seed, a
partition id, a round number) lets the coordinator regenerate the noise and subtract it; torch's
default generator even starts from a fixed seed in every fresh process, and its ``manual_seed``
keeps 32 bits of a seed. Opacus's own ``secure_mode`` needs ``torchcsprng``, which has no build for
this torch. So every random bit here comes from an AES-256-CTR keystream (``cryptography``) keyed
with 32 bytes of ``os.urandom``: a cryptographically secure generator that nothing outside this
process can reproduce.

Gaussians, two ways:

- training noise (``add_gaussian_``): Box-Muller in float32 on 24-bit uniforms, vectorised by
  torch, as fast as torch's own ``randn`` (which uses the same transform on its Mersenne Twister);
- ``hardened`` (a hospital policy choice, and always for the statistics answer, which is released
  as it is): Opacus's ``secure_mode`` mitigation of the floating-point attack on Gaussian sampling
  (Holohan & Braghin 2021, section 5.1): each value is the sum of four independent N(0, 1) draws
  divided by 2, computed in float64 from 53-bit uniforms, so the low-order bits of a released value
  do not single out the draw behind it. It costs several times the fast path (docs/benchmarks.md).

Values are generated in blocks and handed out in slices, so a tiny model's step (tens of
parameters) does not pay a cipher call and a dozen tensor operations each time.

``SecretRandom.reproducible`` keys the same stream from a seed instead: it exists for benchmarks
and tests in simulation only, and everything it produces is marked not private by its caller.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY_BYTES = 32
_BLOCK = 1 << 15  # values generated per refill
_MITIGATION_DRAWS = 4  # Opacus secure_mode: sum of 4 N(0, 1) draws / 2


class SecretRandom:
    """A stream of secret uniforms and Gaussians (one per release: a training round, a statistics answer)."""

    def __init__(self, key: bytes | None = None, *, private: bool = True, hardened: bool = False) -> None:
        if key is None:
            key = os.urandom(KEY_BYTES)
        elif len(key) != KEY_BYTES:
            raise ValueError(f"a SecretRandom key is {KEY_BYTES} bytes")
        # A fresh key per stream: the all-zero initial counter block is never reused with it.
        self._cipher = Cipher(algorithms.AES(bytes(key)), modes.CTR(bytes(16))).encryptor()
        self.private = private
        self.hardened = hardened
        self._normals = np.empty(0)
        self._normal_at = 0
        self._uniforms = np.empty(0)
        self._uniform_at = 0
        self._noise = torch.empty(0)
        self._noise_at = 0

    @classmethod
    def reproducible(cls, seed: int, *labels: object, hardened: bool = False) -> SecretRandom:
        """A stream keyed by ``seed`` and ``labels``: NOT private (the seed reproduces it). Simulation only."""
        material = "/".join(["fedcare-reproducible-noise", str(int(seed)), *map(str, labels)])
        return cls(hashlib.sha256(material.encode()).digest(), private=False, hardened=hardened)

    # ---- raw stream ----------------------------------------------------------------------------
    def _words(self, n: int) -> np.ndarray:
        out = np.empty(n, dtype="<u8")
        if n:
            self._cipher.update_into(bytes(8 * n), memoryview(out).cast("B"))  # type: ignore[arg-type]  # numpy declares ndarray a Buffer only for Python >= 3.12
        return out.astype(np.uint64, copy=False)

    def _fresh_uniforms(self, n: int) -> np.ndarray:
        """``n`` uniforms in [0, 1), each from 53 fresh bits."""
        return (self._words(n) >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def _fresh_fast_normals(self, n: int) -> torch.Tensor:
        """``n`` N(0, 1) float32 values: Box-Muller on 24-bit uniforms (torch's own transform)."""
        pairs = (n + 1) // 2
        words = torch.from_numpy(self._words((2 * pairs + 1) // 2).view(np.int32)[: 2 * pairs])
        u = ((words >> 8) & 0xFFFFFF).float().mul_(2.0**-24)  # [0, 1)
        radius = torch.log1p(u[:pairs].neg_()).mul_(-2.0).sqrt_()  # 1 - u in (0, 1]: finite log
        angle = u[pairs:].mul_(2.0 * np.pi)
        out = torch.empty(2 * pairs)
        torch.mul(radius, torch.cos(angle), out=out[:pairs])
        torch.mul(radius, torch.sin(angle), out=out[pairs:])
        return out[:n]

    def _training_normals(self, n: int) -> torch.Tensor:
        """``n`` N(0, 1) values as a CPU tensor: hardened (float64) or fast (float32), from the block buffer."""
        if self.hardened:
            return torch.from_numpy(self.standard_normal(n))
        if n <= len(self._noise) - self._noise_at:
            self._noise_at += n
            return self._noise[self._noise_at - n : self._noise_at]
        if n >= _BLOCK:
            return self._fresh_fast_normals(n)
        rest = self._noise[self._noise_at :]
        self._noise = self._fresh_fast_normals(_BLOCK)
        self._noise_at = n - len(rest)
        return torch.cat([rest, self._noise[: self._noise_at]])

    def _fresh_normals(self, n: int) -> np.ndarray:
        """``n`` N(0, 1) values, each the sum of four Box-Muller draws divided by 2."""
        draws = _MITIGATION_DRAWS * n
        pairs = (draws + 1) // 2
        u = self._fresh_uniforms(2 * pairs)
        radius = np.sqrt(-2.0 * np.log1p(-u[:pairs]))  # 1 - u in (0, 1]: finite log
        angle = 2.0 * np.pi * u[pairs:]
        z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:draws]
        return z.reshape(n, _MITIGATION_DRAWS).sum(axis=1) / np.sqrt(_MITIGATION_DRAWS)

    # ---- what callers draw ---------------------------------------------------------------------
    def random_bytes(self, n: int) -> bytes:
        return self._words((n + 7) // 8).tobytes()[:n]

    def uniform(self, n: int) -> np.ndarray:
        """``n`` independent uniforms in [0, 1) (float64)."""
        self._uniforms, self._uniform_at, out = _take(self._uniforms, self._uniform_at, n, self._fresh_uniforms)
        return out

    def standard_normal(self, n: int) -> np.ndarray:
        """``n`` independent N(0, 1) values (float64, hardened: the four-draw mitigation)."""
        self._normals, self._normal_at, out = _take(self._normals, self._normal_at, n, self._fresh_normals)
        return out

    def gaussian_like(self, reference: torch.Tensor, std: float) -> torch.Tensor:
        """N(0, std^2) noise of ``reference``'s shape, dtype and device."""
        values = self._training_normals(reference.numel()).reshape(reference.shape)
        return (values * std).to(device=reference.device, dtype=reference.dtype)

    def add_gaussian_(self, target: torch.Tensor, std: float) -> None:
        """In place: ``target += N(0, std^2)`` element-wise (``target`` contiguous)."""
        values = self._training_normals(target.numel())
        target.view(-1).add_(values.to(device=target.device, dtype=target.dtype), alpha=std)

    def torch_generator(self) -> torch.Generator:
        """A torch generator seeded from this stream (for shuffling where no privacy rests on it)."""
        return torch.Generator().manual_seed(int.from_bytes(self.random_bytes(8), "little") >> 1)


def _take(buffer: np.ndarray, at: int, n: int, fresh) -> tuple[np.ndarray, int, np.ndarray]:
    """(buffer, position, n values): serve from ``buffer``, refilling with ``fresh`` as needed."""
    if n <= len(buffer) - at:
        return buffer, at + n, buffer[at : at + n].copy()
    rest = buffer[at:]
    needed = n - len(rest)
    block = fresh(max(needed, _BLOCK))
    out = np.concatenate([rest, block[:needed]])
    return block, needed, out


class SecretPoissonBatches:
    """Poisson-sampled batches over in-memory tensors: each example joins each step with probability
    ``sample_rate``, decided by the hospital's secret stream (empty batches included: they are steps).

    Exactly ``steps`` batches per pass, so the privacy plan counts the steps that are taken (Opacus's
    loader takes ``int(1 / sample_rate)``, which is one fewer than planned for some batch counts).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, sample_rate: float, steps: int, rng: SecretRandom) -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample rate {sample_rate} is not in (0, 1]")
        self.x, self.y, self.sample_rate, self.steps, self.rng = x, y, sample_rate, steps, rng

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        n = len(self.y)
        for _ in range(self.steps):
            chosen = torch.from_numpy(np.flatnonzero(self.rng.uniform(n) < self.sample_rate))
            yield self.x[chosen], self.y[chosen]
