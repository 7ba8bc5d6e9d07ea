"""The run folder's records: the folder and its status, the lock, the resumable
state, experiment tracking. No TensorFlow at import.
"""
