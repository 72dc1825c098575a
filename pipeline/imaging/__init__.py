"""Image computations shared by several stages (below the stages, above the contracts).

- :mod:`pipeline.imaging.preprocess`: the model's preprocessing (``model.json``'s spec), applied by
  train, generate, evaluate and export alike.
- :mod:`pipeline.imaging.images`: real and synthetic datasets onto one grid and intensity scale.
- :mod:`pipeline.imaging.neighbours`: nearest neighbours and distances to closest records.
"""
