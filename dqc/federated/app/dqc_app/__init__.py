"""Flower components of the federated quality control; the logic is in `dqc.federated`."""
