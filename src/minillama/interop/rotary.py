"""The one place that knows how Meta's and Hugging Face's rotary layouts of wq/wk differ.

Meta (and llama2.c, and Mini Llama) rotate adjacent pairs of a head's dimensions: (0,1), (2,3), ...
Hugging Face rotates dimension i with i + head_dim/2. Both compute the same function once the rows of wq and wk
within each head are reordered: pair member 0 of every pair first, then pair member 1.
"""

from torch import Tensor


def interleaved_to_halves(weight: Tensor, n_heads: int) -> Tensor:
    """Reorder the output rows of a Meta-layout wq/wk (n_heads*head_dim, dim) into Hugging Face's layout."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def halves_to_interleaved(weight: Tensor, n_heads: int) -> Tensor:
    """Inverse of `interleaved_to_halves`."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)
