"""Which exceptions a command ends with as one line (``error: …``, exit 2), and that line.

Bad input, an unreachable tracking server or storage, and MLflow/Optuna/database errors are the
user's to fix: one line naming the problem, no traceback, no password. Anything else is a bug and
keeps its traceback. MLflow, Optuna and SQLAlchemy are recognised without importing them (a command
that never loaded them cannot have raised their errors).
"""

from __future__ import annotations

import os
import sys
from urllib.parse import urlsplit

from ..config import ConfigError
from ..data import DataError

# Raised by libraries the commands use, for conditions outside the program: by module and class name.
LIBRARY_ERRORS = (("mlflow.exceptions", "MlflowException"), ("optuna.exceptions", "OptunaError"),
                  ("sqlalchemy.exc", "SQLAlchemyError"))
MAX_CHARS = 1000


def _library_error(exc: BaseException) -> bool:
    for module, name in LIBRARY_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return True
    return False


def user_error(exc: BaseException) -> bool:
    return isinstance(exc, (ConfigError, DataError, ValueError, RuntimeError, OSError)) or _library_error(exc)


def one_line(exc: BaseException, *urls: str | None) -> str:
    """``exc``'s message on one line (at most ``MAX_CHARS``), without the password of any of ``urls``
    or of ``MLFLOW_TRACKING_URI``. A library's error is named by its type (``MlflowException: …``)."""
    text = " ".join((str(getattr(exc, "message", None) or exc).strip() or type(exc).__name__).split())
    if _library_error(exc) and not text.startswith(type(exc).__name__):
        text = f"{type(exc).__name__}: {text}"
    for url in (*urls, os.environ.get("MLFLOW_TRACKING_URI")):
        try:
            password = urlsplit(url).password if url else None
        except ValueError:
            continue
        if password:
            text = text.replace(password, "***")
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS - 1] + "…"
