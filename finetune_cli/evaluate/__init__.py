"""Evaluation: predictions, metrics, the report, gates, Grad-CAM."""
