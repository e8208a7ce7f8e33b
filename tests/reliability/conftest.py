"""Reliability tests run real `glmv serve` processes, as the end-to-end tests do."""

from tests.e2e.conftest import media_dir, serve  # noqa: F401  (fixtures shared with tests/e2e)
