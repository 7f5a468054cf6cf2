"""Prepare a dataset once: ImageFolder tree, FFCV .beton and MXNet RecordIO under OUT/NAME/.

    python tools/dataset.py demo --out data                         # offline: scikit-learn digits
    python tools/dataset.py cifar10 --src ~/archives --out data     # cifar-10-python.tar.gz in ~/archives
    python tools/dataset.py imagenet --src /data/imagenet --out data --max-side 512 --quality 90
    python tools/dataset.py cifar10 --out data --verify             # check every output against its manifest
    make dataset DATA=stl10 SRC=~/archives WORKERS=8

Training never converts; this tool does (as FFCV keeps its write_datasets.py apart). Re-running with
the same parameters skips finished outputs (OUT/NAME/manifest.json); --force rebuilds.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

try:
    import pipelines  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.formats import BETON_MODE_CHOICES, FORMATS, RAW_MAX_SIDE, kernels
from pipelines.formats.convert import ConvertError, ConvertOptions, all_cores, convert
from pipelines.formats.manifest import MANIFEST, check_output, load_manifest
from pipelines.formats.sources import SOURCES, SourceError, build_source

log = logging.getLogger("dataset")

EPILOG = """\
outputs (OUT/NAME/):
  SPLIT/<class>/*     ImageFolder tree. Always written for sources that do not come as one:
                      demo, cifar10, cifar100, stl10, tiny-imagenet, a flat ImageNet val/ and a
                      class subset (imagenet100, --classes; files hard-linked when possible).
                      For imagenet and folder splits that already are ImageFolder trees it is a
                      symlink to the source split, made only when 'folder' is in --formats.
  SPLIT.rec/.idx      MXNet RecordIO for DALI's readers.mxnet (source JPEGs passed through;
                      PNG for in-memory datasets; re-encoded when converted or over --max-side).
  SPLIT.beton         FFCV (--beton-mode auto: raw pixels when train's median longer side is
                      <= 64 px, JPEG otherwise; decided once, the same for every split).
  manifest.json       counts per split and class, skipped/converted files and empty class
                      folders with reasons, parameters, the seed of the record order, a
                      fingerprint of the source and the SHA-256 of every output file.
records (.rec and .beton) are written in a seeded random order (--seed); labels unchanged.
re-runs skip finished outputs (parameters, sizes, sample counts and SHA-256 matching the manifest),
rebuild those whose source changed (names, sizes, mtimes) or that no longer match, and --force
rebuilds all; any --workers count writes the same bytes. OUT/NAME is locked while a conversion
writes it (OUT/NAME/.lock): a second one into the same directory stops at once.
--verify converts nothing: it checks every output listed in OUT/NAME/manifest.json (sizes, sample
counts, SHA-256) and exits 2 naming each mismatch. Loaders check counts and sizes on every open.
In --beton-mode raw, an image whose pixels exceed one 8 MiB .beton page is downscaled to fit (listed
in the manifest with the reason).
splits: train and val; stl10 adds 'unlabeled' (100,000 images, label -1).
sources needing --src: imagenet, imagenet100 (train/ and val/), folder (an ImageFolder tree, or a
directory with train/ [val/]), cifar10/cifar100/stl10 (official archive or its extracted folder;
downloaded with torchvision when omitted and a network exists), tiny-imagenet (folder or zip).
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=sorted(SOURCES), metavar="DATA",
                   help=f"dataset to prepare: {', '.join(sorted(SOURCES))}")
    p.add_argument("--out", default="data", help="output root; files go to OUT/DATA/ (default: data)")
    p.add_argument("--src", default=None, help="where the source data is (archive, folder); see below")
    p.add_argument("--formats", default="beton,rec",
                   help=f"comma-separated subset of {','.join(FORMATS)} (default: beton,rec)")
    p.add_argument("--max-side", type=int, default=0,
                   help="cap the longer side of re-encoded / .beton JPEG images, px (default 0: keep)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    p.add_argument("--beton-mode", default="auto", choices=BETON_MODE_CHOICES,
                   help=f"FFCV image write mode (default auto: raw when train's median longer side is <= "
                        f"{RAW_MAX_SIDE} px, else jpg, for every split)")
    p.add_argument("--compress-p", type=float, default=0.5,
                   help="JPEG fraction in --beton-mode proportion (default 0.5)")
    p.add_argument("--classes", default=None,
                   help="file with one class (folder) name per line: selects classes (imagenet100, folder)")
    p.add_argument("--workers", type=int, default=None,
                   help=f"processes that decode and encode (default: every core this process may use, {all_cores()})")
    p.add_argument("--seed", type=int, default=0, help="seed of the records' random order (default 0)")
    p.add_argument("--force", action="store_true", help="rebuild outputs even if the manifest says finished")
    p.add_argument("--verify", action="store_true",
                   help="convert nothing: check OUT/DATA's outputs against its manifest, SHA-256 included")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-jit", action="store_true",
                   help="run the Numba kernels as plain Python, for debugging (same as RESSL_NUMBA_JIT=0)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Validate everything cheap first (options, source files), then convert; returns the exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.no_jit:
        kernels.set_jit_enabled(False)
    if args.verify:
        return verify(Path(args.out) / args.dataset)
    try:
        formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
        opts = ConvertOptions(formats=formats, max_side=args.max_side, quality=args.quality,
                              beton_mode=args.beton_mode, compress_p=args.compress_p,
                              workers=all_cores() if args.workers is None else args.workers,
                              force=args.force, progress=False if args.no_progress else None, seed=args.seed)
        extra = {"classes_file": args.classes} if args.classes else {}
        source = build_source(args.dataset, args.src, out=Path(args.out), **extra)
        manifest = convert(source, args.out, opts)
    except (ConvertError, SourceError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2
    out = Path(args.out) / source.name
    for split, info in manifest["splits"].items():
        log.info("%s/%s: %d images, %d converted, %d skipped", source.name, split, info["count"],
                 info["converted"], info["skipped"])
    log.info("wrote %s (manifest: %s)", out, out / "manifest.json")
    return 0


def verify(out: Path) -> int:
    """Check every output listed in ``out``'s manifest (sizes, counts, SHA-256); 0 when all match, else 2."""
    manifest = load_manifest(out)
    outputs = manifest.get("outputs", {})
    if not outputs:
        log.error("%s: no manifest listing outputs (expected %s written by this tool)", out, out / MANIFEST)
        return 2
    failed = 0
    for key, entry in outputs.items():
        problems = check_output(out, key, entry, hashes=True)
        for problem in problems:
            log.error("%s: %s", key, problem)
        if not problems:
            log.info("%s: matches the manifest (%s samples)", key, entry.get("count", "-"))
        failed += bool(problems)
    if failed:
        log.error("%d of %d outputs of %s do not match %s; rebuild them with --force", failed, len(outputs), out,
                  out / MANIFEST)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
