"""Dataset formats: RecordIO and FFCV .beton writers/readers, sources, Numba conversion kernels.

Submodules import their heavy dependencies (FFCV, Pillow, scikit-learn) only when used:

* :mod:`.recordio` - ``write_recordio`` / ``read_recordio`` / ``RecordIOWriter`` / ``RecordIOReader``
* :mod:`.beton` - ``write_beton`` (FFCV's DatasetWriter; fields ``image``, ``label``)
* :mod:`.sources` - ``build_source`` and the dataset readers (demo, CIFAR, STL-10, ImageNet, ...)
* :mod:`.convert` - ``convert``: a source into ImageFolder / .rec / .beton + manifest.json
* :mod:`.kernels` - Numba kernels and the JIT switch ``set_jit_enabled``

Crash-safe writes (temp file, fsync, rename) come from :mod:`ressl.io`, shared with checkpoints.
"""

__all__ = ["beton", "convert", "kernels", "recordio", "sources"]
