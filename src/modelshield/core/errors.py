"""One error hierarchy for the whole library (DESIGN.md "Core contracts").

Messages name the parameter, the value given and what is allowed. The CLI turns every
:class:`ModelShieldError` into one line on stderr and exit code 2.
"""

from __future__ import annotations


class ModelShieldError(Exception):
    """Base class of every error modelshield raises on purpose."""


class InvalidConfigError(ModelShieldError, ValueError):
    """A parameter has a value outside what is allowed."""


class UnknownComponentError(InvalidConfigError, KeyError):
    """A registry was asked for a name it does not know."""

    def __str__(self) -> str:  # KeyError quotes its message; we do not want that
        return str(self.args[0]) if self.args else ""


class UnsupportedModelError(ModelShieldError, TypeError):
    """The model (or model file) is of a kind this operation cannot use."""


class ModelLoadError(ModelShieldError):
    """A model file is missing, truncated or cannot be read."""


class UnsafeModelFileError(ModelLoadError):
    """A model file would execute code on load and the user did not opt in."""


class DataError(ModelShieldError, ValueError):
    """Input data is malformed: wrong shape or dtype, NaNs, labels out of range."""


class QueryBudgetExceeded(ModelShieldError):
    """A query to an :class:`~modelshield.core.oracle.Oracle` would exceed its budget."""


class PrivacyBudgetExceeded(ModelShieldError):
    """Training or release would spend more privacy budget than allowed."""


class OracleError(ModelShieldError):
    """A black-box model could not be queried (endpoint unreachable, bad reply)."""


class ScanStateError(ModelShieldError):
    """A run directory belongs to a different scan and cannot be resumed."""


class FederatedError(ModelShieldError):
    """A federated deployment failed: a Flower process died, timed out or the run failed."""
