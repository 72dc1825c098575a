"""Image computations shared by several stages (below the stages, above the contracts).

Modules:
    preprocess  the model's preprocessing (``model.json``'s spec), applied by train, generate,
                evaluate and export alike.
    images      real and synthetic datasets onto one grid and intensity scale.
    neighbours  nearest neighbours and distances to closest records.
    gan         the conditional generator and projection discriminator (2D or 3D).
    levels      how many times the networks halve their grid (torch-free: the config checks it).
    model_dir   loading a trained MODEL_DIR's networks and checkpoint; sampling the generator.
    classifier  the small CNN judge: evaluate's feature spaces and utility classifiers, training's model selection.
    frechet     Gaussian fits and the Fréchet distance (FID) between feature sets.

Compute only: nothing here imports MLflow tracking, click or progress (``lint-imports`` checks it).
"""
