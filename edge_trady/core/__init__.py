"""Torch-free pieces both sides share: layer costs, budgets, channel selection, gradient masks,
learning-rate schedules, plan files and the memory model."""
