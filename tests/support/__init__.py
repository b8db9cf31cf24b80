"""Code the tests share: fakes, builders and process helpers (never shipped, never imported by the product or bench/).

Tests import shared code from here (and ``tests.conftest``), never from another ``test_*`` module.
"""
