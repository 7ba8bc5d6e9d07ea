"""Deployment: export formats with their parity check, and promotion of a run."""
