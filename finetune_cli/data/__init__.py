"""The data: indexing a folder or CSV, the pre-flight image check, the tf.data
pipeline, the recorded split.
"""
