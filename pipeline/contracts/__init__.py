"""What crosses a stage boundary, one module per artifact, used by its writer and its readers alike.

- :mod:`pipeline.contracts.dataset`: a dataset folder and its ``manifest.csv``.
"""
