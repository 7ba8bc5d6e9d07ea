"""Searches over a config: the learning-rate range test and the KerasTuner search."""
