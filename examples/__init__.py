"""Reproductions of Cooijmans et al., "Recurrent Batch Normalization" (ICLR 2017) with fused_bnlstm.

Run each from the repository root, e.g. ``python -m examples.gamma_gradient_flow``; see examples/README.md.
"""
