"""Uncertainty: Packed-Ensembles for any model, deep-ensemble baselines and their evaluation.

- ``packed``: packed layers (``PackedLinear``, ``PackedConv1d/2d/3d``, ``PackedLayerNorm``) and
  ``split_members`` (member-major ``(M·B, K)`` logits to ``(B, M, K)``).
- ``packify``: ``packify(model, ...)`` converts a model through ``torch.fx``; ``unpack_member``
  extracts one member as a standalone network.
- ``ensemble``: ``DeepEnsemble`` (sequential or ``torch.func`` stacked) and ``EnsembleLoss``.
- ``metrics``: accuracy, NLL, Brier, ECE, entropy, mutual information, disagreement, OOD scores
  and ``ood_metrics``, as plain functions over ``(B, M, K)`` probabilities and as torchmetrics.

See docs/uncertainty.md.
"""
