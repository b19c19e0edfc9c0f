"""Autograd functions for TopK SAE training that touch only the k selected latents.

The dense [batch, d_sae] encoder product is computed without a graph; these functions take the
gathered values and compute their backward passes with sparse products, so a training step costs
about one dense matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class GatheredEncode(torch.autograd.Function):
    """values[b, j] = (x_c @ W_enc + b_enc)[b, idx[b, j]] with a sparse backward.

    The caller computes the dense pre-activations without a graph and passes the gathered
    ``values``; backward costs O(batch · m · d_in) instead of a dense [d_in, d_sae] product.
    """

    @staticmethod
    def forward(
        ctx, x_c: Tensor, w_enc: Tensor, b_enc: Tensor, idx: Tensor, values: Tensor
    ) -> Tensor:
        # x_c [B, d_in], w_enc [d_in, d_sae], b_enc [d_sae], idx [B, m] int64, values [B, m]
        ctx.save_for_backward(x_c, w_enc, idx)
        return values.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        # grad [B, m]
        x_c, w_enc, idx = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx, w_enc.T.contiguous(), per_sample_weights=grad, mode="sum")
        if ctx.needs_input_grad[1]:
            grad_w = torch.sparse.mm(_sparse_t(idx, grad, w_enc.shape[1]), x_c).T  # [d_in, d_sae]
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros_like(w_enc[0]).index_add_(0, idx.reshape(-1), grad.reshape(-1))
        return grad_x, grad_w, grad_b, None, None


class SparseDecode(torch.autograd.Function):
    """out[b] = Σ_j vals[b, j] · W_dec[idx[b, j]] (no bias) with a sparse backward."""

    @staticmethod
    def forward(ctx, idx: Tensor, vals: Tensor, w_dec: Tensor) -> Tensor:
        # idx [B, m] int64, vals [B, m], w_dec [d_sae, d_in] -> [B, d_in]
        ctx.save_for_backward(idx, vals, w_dec)
        return F.embedding_bag(idx, w_dec, per_sample_weights=vals, mode="sum")

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        # grad [B, d_in]
        idx, vals, w_dec = ctx.saved_tensors
        grad = grad.contiguous()
        grad_vals = grad_w = None
        if ctx.needs_input_grad[1]:
            # grad_vals[b, j] = grad[b] · W_dec[idx[b, j]]: embedding_bag's own backward does
            # this gather-dot without materialising W_dec[idx] [B, m, d_in].
            with torch.enable_grad():
                v = vals.detach().requires_grad_()
                out = F.embedding_bag(idx, w_dec.detach(), per_sample_weights=v, mode="sum")
                (grad_vals,) = torch.autograd.grad(out, v, grad)
        if ctx.needs_input_grad[2]:
            grad_w = torch.sparse.mm(_sparse_t(idx, vals, w_dec.shape[0]), grad)  # [d_sae, d_in]
        return None, grad_vals, grad_w


def _sparse_t(idx: Tensor, vals: Tensor, d_sae: int) -> Tensor:
    """Sparse [d_sae, B] transpose of the [B, d_sae] matrix with vals [B, m] at idx [B, m]."""
    batch, m = idx.shape
    rows = torch.arange(batch, device=idx.device).repeat_interleave(m)
    return torch.sparse_coo_tensor(
        torch.stack([idx.reshape(-1), rows]),
        vals.reshape(-1),
        (d_sae, batch),
        check_invariants=False,
    )
