"""The bottom layer: errors, atomic files, path checks, seed streams, progress, config sections.

Nothing here knows about stages, contracts or MLflow; every other layer may import it.
"""
