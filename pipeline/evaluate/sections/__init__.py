"""The report's metric sections, one module per section, each built from image sets and features.

Modules:
    common      how a figure is put into a section (a null figure gets ``<key>_reason``).
    fidelity    ``fidelity``: FID/KID/PRDC per feature space, the real-vs-real reference, ratios.
    diversity   ``diversity``: same-class MS-SSIM of synthetic vs real pairs.
    privacy     ``privacy``: distances to the closest record, memorization, membership inference, DP.
    utility     ``utility``: synthetic label accuracy and the augmentation comparison.

The pure metrics they call live one level up (:mod:`pipeline.evaluate.fidelity`, ...); the gates
decided from the sections in :mod:`pipeline.evaluate.gates`.
"""
