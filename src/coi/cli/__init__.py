"""The command line: `main()` is the only place that turns errors into exit codes."""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Sequence


def _print_error(message: str, details: str | None = None, resolution: str | None = None) -> None:
    out = [f"Error: {message}"]
    if details:
        out += [f"  {line}" for line in details.rstrip().splitlines()]
    if resolution:
        out.append(f"  To fix: {resolution}")
    sys.stderr.write("\n".join(out) + "\n")


def loaded() -> None:
    """The command has what it needs loaded: collect garbage again, leaving all of that out of
    it for good (see `main`)."""
    gc.freeze()
    gc.enable()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the coi CLI and return its exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--version"]:
        # Answered before importing click: scripts call this often and it should be instant.
        from coi import __version__

        sys.stdout.write(f"coi version {__version__}\n")
        return 0

    # Importing allocates much and frees almost nothing, so collecting garbage meanwhile is
    # wasted: 15-20 % of a short command's CPU (`perf stat`, 20 runs of `coi list`), in every
    # one of ten sessions started at once. Collection resumes once the command has connected
    # to the daemon (`loaded`), by when its modules are in; a command that never connects
    # (`coi setup`, `coi config`) runs without it, allocating little.
    gc.disable()
    try:
        return _dispatch(args)
    finally:
        gc.enable()  # for a caller that goes on in this process


def _dispatch(args: list[str]) -> int:
    import click

    from coi.cli.app import cli
    from coi.errors import CoiError

    if os.environ.get("_COI_COMPLETE", "").startswith("powershell"):
        import coi.cli.completion  # noqa: F401  (registers the PowerShell completion)
    try:
        rv = cli.main(args=args, prog_name="coi", standalone_mode=False)
    except CoiError as err:
        _print_error(err.message, err.details, err.resolution)
        return err.exit_code
    except click.exceptions.Exit as err:
        return int(err.exit_code)
    except click.exceptions.Abort:
        sys.stderr.write("Cancelled.\n")
        return 130
    except click.UsageError as err:
        from coi.cli.app import usage_error_text

        sys.stderr.write(usage_error_text(err))
        # One code for every usage mistake, the parser's and coi's own checks alike (upstream
        # exits 1 for cobra's and 2 for its own: scripts could not tell them from failures).
        return 2
    except click.ClickException as err:
        _print_error(err.format_message())
        return err.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("\nInterrupted.\n")
        return 130
    except BrokenPipeError:
        return 0
    except SystemExit as err:
        return err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    return rv if isinstance(rv, int) else 0
