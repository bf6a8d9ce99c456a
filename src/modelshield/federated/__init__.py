"""Federated learning on Flower: apps, robust aggregation, attacking clients, DP-FL, SecAgg+."""
