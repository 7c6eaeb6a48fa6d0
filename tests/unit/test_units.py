"""Sizes and durations as people write and read them."""

from __future__ import annotations

import pytest

from coi.units import binary_text, parse_bytes, parse_duration, size_text


def test_sizes_parse_in_decimal_and_binary_units() -> None:
    assert parse_bytes("100MiB") == 100 * 2**20
    assert parse_bytes("500KB") == 500_000
    assert parse_bytes(" 1048576B ") == 1048576
    assert parse_bytes("2GiB") == 2 * 2**30
    for bad in ("lots", "10", "1.5GB", "-1MB", "10 MB"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_sizes_print_in_the_unit_that_fits() -> None:
    assert (size_text(100_000), size_text(1_234_567), size_text(3e9)) == (
        "100 KB",
        "1.2 MB",
        "3.0 GB",
    )
    assert (binary_text(512), binary_text(1536), binary_text(5 * 2**30)) == (
        "512 B",
        "1.5 KiB",
        "5.0 GiB",
    )
    assert binary_text(44 * 2**20, "") == "44.0MiB"


def test_durations_are_go_style() -> None:
    assert parse_duration("1h30m") == 5400 and parse_duration("1.5s") == 1.5
    with pytest.raises(ValueError):
        parse_duration("0s")
