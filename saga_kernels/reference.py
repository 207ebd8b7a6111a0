"""Plain-PyTorch definitions of every saga_kernels op: the obvious, materializing formula.

This module is the test oracle and nothing else: call it in float64 and compare. It may
allocate [N, V] logits, [N, N] similarity matrices and full attention maps freely.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
