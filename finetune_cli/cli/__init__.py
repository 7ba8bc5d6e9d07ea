"""The command line: one Typer app per command group, joined in main.py. No
TensorFlow at import.
"""
