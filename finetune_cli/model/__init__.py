"""The model: the keras.applications registry, the classifier built on a base,
weights files, saved models.
"""
