"""Pruning and depth reduction (EGP, NEPENTHE, EASIER, LaCoOT, DSD², double descent).

Shared machinery: activation call sites (``sites``), activation entropy (``entropy``), iterative
magnitude pruning on the core masks (``imp``), exact depth surgery (``surgery``) and ``compact``
(zeroed channels into smaller dense layers). Every structure edit is a recorded
``sobre.core.edits`` edit, so pruned models reload from their recipe without pickles.
"""
