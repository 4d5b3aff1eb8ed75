"""Classifiers: the contract, architecture families, checkpoints and the arithmetic they compute in."""
