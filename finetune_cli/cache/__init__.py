"""The frozen-base caches: pooled features on disk, cached activations, and the
heads trained on them.
"""
