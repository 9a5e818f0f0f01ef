"""The tolerance of every test that compares fp32 results with numbers computed another way.

Two computations of the same maths in fp32 differ by rounding: another CPU's vector width
(ATEN_CPU_CAPABILITY), oneDNN on or off, 1 or 2 threads, a batched or a single-view convolution
all change the order of the sums. That noise grows with the size of the values (a x300 encoder
offset near 40 carries 300 times the absolute error of an output in [0, 1]), so the tolerance is
relative to the largest magnitude of the expected values, not a fixed atol.

Measured on an AVX-512 CPU under 1 and 2 threads, oneDNN off, ATEN_CPU_CAPABILITY=default,
avx2 and avx512, and all of those together, the worst |actual - expected| relative to the largest
|expected|: 6.6e-6 (batched against single-view decodes, tests/test_vae.py), 4.8e-6 (the official
8-view decode), 3.5e-6 (the Flux x300 encode offset: 1.56e-4 on values up to 45), the others less.
FP32 is 15x the worst; a real defect (a wrong view order, a dropped channel, a missed scale) moves
a result by 1e-2 of its size or more. ROUNDING: 5.7e-8 measured (the tiled blend), 1e-6 is 17x.
"""

import numpy as np
import torch

# results of long fp32 sums (convolutions, matmuls, norms) computed two ways
FP32 = 1e-4
# results a few elementwise roundings apart, no long sums (a blend whose weights sum to 1)
ROUNDING = 1e-6


def _tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    return torch.from_numpy(np.array(x))  # a copy: read-only arrays (broadcast views) included


def assert_close_rel(actual, expected, rel: float = FP32, *, scale: float | None = None, msg: str | None = None):
    """|actual - expected| <= rel * scale everywhere; scale defaults to max |expected|.

    Pass ``scale`` where the values were clipped after the sums (a decode to [0, 1]): the noise
    follows the raw values before the clip.
    """
    a, e = _tensor(actual), _tensor(expected)
    if scale is None:
        scale = float(e.abs().max()) if e.numel() else 0.0
    atol = rel * max(scale, 1e-30)
    if msg is None:

        def msg(generated: str) -> str:
            return f"{generated}\n(allowed: {rel:g} x {scale:.4g}, the size of the values; tests/tolerance.py)"

    torch.testing.assert_close(a, e, atol=atol, rtol=0, check_dtype=False, msg=msg)
