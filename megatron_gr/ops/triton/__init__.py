"""Triton kernels of the ops in :mod:`megatron_gr.ops`, each with the signature of its
PyTorch reference. Import the kernel modules only after :func:`megatron_gr.ops.backend.require_backend` passed."""
