"""Training: the job (lock, signals, workers), the setup every job shares,
phase inputs, the trainer and its epochs.
"""
