"""The one exception type users see: what is wrong, where, and what to do."""

from __future__ import annotations


class FedcareError(Exception):
    """A problem the user can fix, reported as one line (no traceback)."""

    # set only where a ClientApp's train fails (client/client_app.py): the received model's test, reported with it
    evaluation: dict | None

    def __init__(self, problem: str, hint: str = "") -> None:
        self.problem = problem
        self.hint = hint
        super().__init__(f"{problem}" + (f" -> {hint}" if hint else ""))


class BudgetExhausted(FedcareError):
    """A hospital refuses to train because the round would exceed its privacy budget."""
