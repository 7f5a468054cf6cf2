"""Dataset formats: RecordIO and FFCV .beton writers/readers, sources, Numba conversion kernels.

Submodules import their heavy dependencies (FFCV, Pillow, scikit-learn, Numba) only when used:

* :mod:`.recordio` - the RecordIO layout once: ``MAGIC``, ``read_index`` / ``check_index`` /
  ``read_record``, ``RecordIOWriter`` / ``RecordIOReader`` (no Numba at import: loaders use it)
* :mod:`.beton` - ``write_beton`` / ``BetonWriter`` (FFCV's field encoders, FFCV's file layout,
  streamed from the main process; fields ``image``, ``label``), byte-identical to FFCV's own
  ``DatasetWriter`` with one worker, for any number of our processes
* :mod:`.manifest` - ``manifest.json`` and the checks of outputs against it (loaders, ``--verify``)
* :mod:`.sources` - ``build_source``: a dataset by name, over :mod:`.source` (the ``Source`` model),
  :mod:`.arrays` (demo, CIFAR, STL-10 in memory), :mod:`.trees` (ImageFolder, ImageNet,
  Tiny-ImageNet files) and :mod:`.archive` (a tar archive read in place)
* :mod:`.convert` - ``convert``: a source into ImageFolder / .rec / .beton + manifest.json, over
  :mod:`.options` (``ConvertOptions``, the record order), :mod:`.encode` (the one pass per split in
  forked workers) and :mod:`.image` (one image classified, converted and encoded)
* :mod:`.kernels` - Numba kernels and the one JIT switch ``set_jit_enabled`` of every kernel
* :mod:`.children` - worker processes that die with their parent; ``ordered_map``, the pool that
  ends with an error naming the item when a worker dies
* :mod:`.synthetic` - the deterministic photo-like JPEGs of the benchmarks

The names below are the formats' vocabulary, written once and imported by the converter, the
``.beton`` writer, ``tools/dataset.py`` and the benchmark's data. Crash-safe writes (temp file,
fsync, rename) come from :mod:`ressl.io`, shared with checkpoints.
"""

FORMATS = ("folder", "rec", "beton")  # what `make dataset` writes: ImageFolder tree, RecordIO, FFCV
BETON_MODES = ("raw", "jpg", "proportion", "smart")  # FFCV RGBImageField write modes
BETON_MODE_CHOICES = ("auto", *BETON_MODES)  # auto: raw or jpg, decided once per dataset (convert.py)
RAW_MAX_SIDE = 64  # beton mode "auto": raw pixels when train's median longer side is at most this

__all__ = [
    "BETON_MODES",
    "BETON_MODE_CHOICES",
    "FORMATS",
    "RAW_MAX_SIDE",
    "archive",
    "arrays",
    "beton",
    "children",
    "convert",
    "encode",
    "image",
    "kernels",
    "manifest",
    "options",
    "recordio",
    "source",
    "sources",
    "synthetic",
    "trees",
]
