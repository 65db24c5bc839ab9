"""``saft data``: prepare few-shot manifests and check dataset roots from the shell.

:func:`register` adds the commands to the ``saft`` parser; :func:`main` runs them on
their own (handy in tests and in containers that only need the data step). Handlers
turn every expected failure (missing root, bad flags, unsafe manifest lines, broken
images) into one ``saft data <command>: error: ...`` paragraph on stderr and exit code
2, so a pipeline log shows what to fix instead of a traceback. ``validate`` exits 1
when it ran fine but found problems, so scripts can tell "bad data" from "bad call".
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Sequence

from saft.data.manifest import read_manifest
from saft.data.prepare import (
    SUPPORTED_DATASETS,
    PrepareConfig,
    PrepareError,
    PrepareResult,
    check_dataset,
    prepare_dataset,
)
from saft.config import add_arguments, from_arguments
from saft.data.storage import StorageError, open_storage
from saft.data.validate import validate_dataset, validate_root

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_ERROR = 2

# Failures caused by the input rather than by a bug. The data layer's input errors
# (PrepareError, DataValidationError, FewShotError, ManifestError, UnsafePathError, and
# the adapters' EvalOnlyError / LayoutError / UnknownDatasetError) all derive from ValueError; StorageError covers unreachable
# roots and OSError unwritable output folders. Anything else keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, StorageError, OSError)


def _fail(command: str, err: BaseException) -> int:
    print(f"saft data {command}: error: {err}", file=sys.stderr)
    return EXIT_ERROR


def _guarded(command: str, handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run ``handler``, reporting input errors as one message with exit code 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except USER_ERRORS as err:
            return _fail(command, err)

    run.__doc__ = handler.__doc__
    return run


def format_summary(result: PrepareResult) -> str:
    """The few lines a user needs after ``prepare``: what was drawn and where it went."""
    record = result.record
    lines = [
        f"prepared {record['root']} ({record['dataset']}, split {record['split']}, subset {record['subset']}, "
        f"{record['shots']} shot(s), seed {record['seed']})",
        f"  classes:       {len(result.classes)}",
        f"  train images:  {result.train_count}",
        f"  val images:    {result.val_count}",
    ]
    lines.append(f"  images read:   {record['counts']['read']} of {record['counts']['images']} in the split")
    if result.skipped:
        lines.append(f"  skipped:       {result.skipped} broken file(s), replaced by the next images of their classes")
    lines.append(f"  manifest hash: {result.manifest_hash} (train.jsonl)")
    if result.val_hash is not None:
        lines.append(f"  val hash:      {result.val_hash} (val.jsonl)")
    lines.append(f"  output folder: {result.out_dir}")
    lines += [f"  WARNING: {text}" for text in record.get("warnings", [])]
    return "\n".join(lines)


def _prepare(args: argparse.Namespace) -> int:
    """Handler of ``saft data prepare``."""
    result = prepare_dataset(args.root, args.out, from_arguments(PrepareConfig, args))
    print(format_summary(result))
    return EXIT_OK


def _validate(args: argparse.Namespace) -> int:
    """Handler of ``saft data validate``: print the report, exit 1 when it has errors."""
    check_dataset(args.dataset)
    if args.manifest and args.split is not None:
        raise PrepareError(
            "--split chooses the images of ROOT to check, --manifest lists them itself; give one or the other"
        )
    storage = open_storage(args.root)
    if args.manifest:
        # Manifest problems (unsafe paths, bad fields) are refused before any file is read.
        report = validate_root(storage, read_manifest(args.manifest))
        print(report.format())
        return EXIT_OK if report.ok else EXIT_FINDINGS
    check = validate_dataset(storage, args.dataset, args.split)
    if check.dataset != "imagefolder":
        with_images = len({entry.label for entry in check.entries})
        print(f"{check.dataset}, split {check.split}: {len(check.entries)} image(s) in {with_images} of the "
              f"{len(check.expected)} class(es) this split must cover")
    print(check.report.format())
    if not check.classes:
        # An empty or mistyped root has nothing wrong in it, yet is no dataset.
        print(f"no class folders found under {storage.uri}; expected the layout ROOT/<class name>/<image>")
        return EXIT_FINDINGS
    return EXIT_OK if check.report.ok else EXIT_FINDINGS


def _adapters(args: argparse.Namespace) -> int:
    """Handler of ``saft data adapters``: every dataset adapter, what it reads and where."""
    from saft.data.adapters import get_adapter, list_adapters

    for name in list_adapters():
        adapter = get_adapter(name)
        spec = adapter.spec
        use = "evaluation only" if adapter.eval_only else f"trainable (default split: {adapter.default_split})"
        print(f"{name}: {adapter.title} — {use}; splits: {', '.join(adapter.splits) or 'the whole root'}")
        if getattr(spec, "layout_hint", None):
            print(f"    layout: {spec.layout_hint}")
    print("\nLayouts in detail: docs/datasets.md")
    return EXIT_OK


def _dataset_flags(parser: argparse.ArgumentParser, split_help: str) -> None:
    parser.add_argument(
        "--dataset",
        default="imagefolder",
        metavar="NAME",
        help=f"dataset adapter that reads ROOT (layouts: docs/datasets.md); one of: {', '.join(SUPPORTED_DATASETS)} "
             "(default: imagefolder)",
    )
    parser.add_argument("--split", metavar="NAME", help=split_help)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``data prepare`` and ``data validate`` to an argparse subparsers object.

    Each leaf parser sets ``func`` to a handler ``(args) -> int`` for the caller to
    dispatch. Returns the ``data`` parser.
    """
    data = subparsers.add_parser(
        "data",
        help="prepare few-shot manifests and check dataset roots",
        description="Prepare few-shot manifests from a dataset root and check roots for broken files.",
    )
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    prepare = data_sub.add_parser(
        "prepare",
        help="draw a few-shot split of a root and write train/val manifests, classes, templates and prepare.json",
        description=(
            "List one split of ROOT, draw a deterministic few-shot split, read and check only the drawn images, "
            "and write train.jsonl (val.jsonl with --val-shots), classes.json, templates.json and prepare.json "
            "into --out. The same inputs always give byte-identical files; on any error --out is left unchanged. "
            "'saft data validate' checks every image of a split."
        ),
    )
    prepare.add_argument("root", metavar="ROOT",
                         help="dataset root: a local folder or s3://bucket/prefix, laid out as --dataset expects "
                              "(imagefolder: ROOT/<class>/<image>)")
    prepare.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    add_arguments(prepare, PrepareConfig)
    prepare.set_defaults(func=_guarded("prepare", _prepare))

    adapters = data_sub.add_parser("adapters", help="list the dataset adapters, their splits and layouts",
                                   description="Every dataset --dataset can name: trainable or evaluation-only, its "
                                               "splits and the files it expects under ROOT.")
    adapters.set_defaults(func=_guarded("adapters", _adapters))

    validate = data_sub.add_parser(
        "validate",
        help="check a root (or a manifest over it) for broken, unsafe or duplicate files",
        description=(
            "Check every image of one split of ROOT (as --dataset indexes it), or the files a manifest "
            "lists, and print a report. From an s3:// root the objects are streamed, not kept in the blob cache. "
            "Exit code 0: no errors (warnings allowed); 1: errors found; 2: the check could not run."
        ),
    )
    validate.add_argument("root", metavar="ROOT", help="dataset root: a local folder or s3://bucket/prefix")
    _dataset_flags(validate, "split of the dataset to check (default: its default split: train for trainable "
                             "datasets, test for evaluation-only ones, all for imagefolder)")
    validate.add_argument("--manifest", metavar="FILE",
                         help="check only the files this JSON-lines manifest lists, including their sha256")
    validate.set_defaults(func=_guarded("validate", _validate))

    from saft.data.synth import DOMAINS

    synth = data_sub.add_parser("synth", help="render one domain of the embedded world as an ImageFolder tree",
                                description="Deterministic shape images (same arguments, same bytes on every "
                                            "machine) written as OUT/<shape>/<index>.png; existing files are kept.")
    synth.add_argument("--domain", required=True, choices=DOMAINS, help="rendering domain")
    synth.add_argument("--per-class", type=int, default=100, help="images per shape (default: 100)")
    synth.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    synth.add_argument("--out", required=True, help="output folder")
    synth.set_defaults(func=_guarded("synth", _synth))
    return data


def _synth(args: argparse.Namespace) -> int:
    from saft.data.synth import write_domain

    root = write_domain(args.out, args.domain, args.per_class, seed=args.seed)
    print(f"wrote {args.per_class} images per shape of domain {args.domain} under {root}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """A parser holding only the ``data`` commands."""
    parser = argparse.ArgumentParser(prog="saft", description="SAFT data commands.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; returns the exit code (argparse's 2 for bad flags)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2), already printed by argparse
        return exit_.code if isinstance(exit_.code, int) else EXIT_ERROR
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
