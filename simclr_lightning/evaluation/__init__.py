"""Evaluation of SimCLR representations: metrics, probes, figures, reports and the protocol.

``metrics`` computes classification metrics and the collapse guard, and ``fairness`` the
per-group metrics. ``probe`` extracts features and fits kNN and logistic probes. ``embedding``
draws 2-D projections and the PNG figures, and ``report`` writes markdown reports over methods and
seeds. ``protocol`` runs the ``simclr-lightning evaluate`` command, and ``cifar`` is its CIFAR-10
validation path. Import the modules directly: this package imports nothing, so it stays cheap.
"""
