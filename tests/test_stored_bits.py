"""The report's bits per element (``Grid.bits_per_element``, quest_pl.quant.bits_per_element) is what a packed export
stores for a weight: for every grid, the bits of its code tensors (codes, and the 2:4 position index) per weight equal
the claimed bits minus the scale's share. (The scale itself is counted at ``SCALE_BITS`` per row or group, or in the
block formats' own encoding.) 2:4-sparse INT4 stores 3 bits per weight (the kept half's codes and their positions),
ternary 2 bits (three levels in two whole bits)."""

import pytest
import torch
from torch import nn

from quest_pl.packing import encode_weight
from quest_pl.quant import QuantConfig, quantize_
from quest_pl.quantizers.base import SCALE_BITS

ROWS, COLS = 64, 256
CODE_TENSORS = ("codes", "index")  # the rest: table (per layer), scale, tensor_scale


@pytest.mark.parametrize(
    ("grid", "bits", "code_bits"),
    [
        ("uniform", 4, 4),
        ("gaussian_mse", 2, 2),
        ("gaussian_mse", 4, 4),
        ("lloyd_max", 4, 4),
        ("fp4", 4, 4),
        ("int_sparse24", 4, 3),
        ("int_sparse24", 2, 2),
        ("ternary", 1.585, 2),
    ],
)
def test_claimed_bits_are_the_stored_code_bits(grid, bits, code_bits):
    torch.manual_seed(0)
    config = QuantConfig.make(grid=grid, bits=bits, estimator="trust", hadamard=False, a_bits=None)
    model = quantize_(nn.Sequential(nn.Linear(COLS, ROWS), nn.Linear(ROWS, 2)), config)
    stored = encode_weight(model[0]).tensors
    per_weight = sum(8 * stored[k].numel() * stored[k].element_size() for k in CODE_TENSORS if k in stored)
    per_weight /= ROWS * COLS
    claimed = config.weight.build_grid().bits_per_element(COLS)
    assert per_weight == code_bits
    assert claimed == code_bits + SCALE_BITS / COLS


def test_block_formats_count_their_scale_encoding():
    """MXFP4 / NVFP4: 4-bit codes plus one 8-bit scale per block of 32 / 16, as stored."""
    for grid, block in (("mxfp4", 32), ("nvfp4", 16)):
        config = QuantConfig.make(grid=grid, bits=4, estimator="trust", hadamard=False, a_bits=None)
        model = quantize_(nn.Sequential(nn.Linear(COLS, ROWS), nn.Linear(ROWS, 2)), config)
        stored = encode_weight(model[0]).tensors
        per_weight = 8 * (stored["codes"].numel() + stored["scale"].numel()) / (ROWS * COLS)
        assert per_weight == 4 + 8 / block == config.weight.build_grid().bits_per_element(COLS)
