"""The scan's run directory: a manifest, one atomic JSON file per finished probe, checkpoints.

Layout::

    OUT/manifest.json         what was scanned (hashes, seed, options): resume only if it matches
    OUT/probes/NAME.json      a finished probe's ProbeResult, written atomically
    OUT/partial/NAME/KEY.json a probe's checkpoints (e.g. one per eps), written atomically
    OUT/report.{json,html,md} the reports, written atomically at the end

Re-running the same command on the same OUT skips every probe that has a result file and
resumes a probe part-way from its checkpoints.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from modelshield import __version__
from modelshield.core.errors import ScanStateError
from modelshield.core.io import atomic_write_json
from modelshield.core.results import ProbeResult

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class RunDir:
    """A resumable scan directory bound to one set of inputs (its fingerprint)."""

    def __init__(
        self, root: str | Path, fingerprint: dict[str, Any], *, fresh: bool = False
    ) -> None:
        self.root = Path(root)
        self.fingerprint = fingerprint
        if self.root.exists() and not self.root.is_dir():
            raise ScanStateError(f"--out {self.root} exists and is not a directory")
        manifest = self.root / MANIFEST
        if manifest.exists() and not fresh:
            try:
                old = json.loads(manifest.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise ScanStateError(
                    f"{manifest} is unreadable ({exc}); pass --fresh to start over"
                ) from None
            if old.get("fingerprint") != fingerprint:
                diff = sorted(
                    k
                    for k in set(fingerprint) | set(old.get("fingerprint", {}))
                    if fingerprint.get(k) != old.get("fingerprint", {}).get(k)
                )
                raise ScanStateError(
                    f"{self.root} holds a scan of different inputs ({', '.join(diff)} differ); "
                    "use another --out or pass --fresh to start over"
                )
            self.resumed = True
        else:
            if fresh and self.root.exists():
                for sub in ("probes", "partial"):
                    shutil.rmtree(self.root / sub, ignore_errors=True)
            self.resumed = False
            atomic_write_json(
                manifest, {"modelshield_version": __version__, "fingerprint": fingerprint}
            )
        (self.root / "probes").mkdir(parents=True, exist_ok=True)

    def probe_path(self, name: str) -> Path:
        return self.root / "probes" / f"{name}.json"

    def finished(self, name: str) -> ProbeResult | None:
        """The stored result of a finished probe, or ``None``."""
        path = self.probe_path(name)
        if not path.exists():
            return None
        try:
            return ProbeResult.from_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError) as exc:
            logger.warning("ignoring unreadable probe result %s (%s); re-running it", path, exc)
            return None

    def save(self, result: ProbeResult) -> Path:
        path = self.probe_path(result.probe)
        atomic_write_json(path, result.to_dict())
        return path

    def checkpoint(
        self, probe: str, key: str, compute: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        """Return the stored checkpoint ``probe/key``, or compute, store and return it."""
        path = self.root / "partial" / probe / f"{key}.json"
        if path.exists():
            try:
                data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
                logger.info("%s: reusing checkpoint %s", probe, key)
                return data
            except (OSError, json.JSONDecodeError):
                logger.warning("ignoring unreadable checkpoint %s", path)
        data = compute()
        atomic_write_json(path, data)
        return data


ENV_PACKAGES = (
    "modelshield",
    "torch",
    "numpy",
    "scipy",
    "onnxruntime",
    "opacus",
    "flwr",
    "tenseal",
    "mpyc",
)
"""Packages whose versions the report records (those installed)."""


def environment() -> dict[str, Any]:
    """Python, platform and the versions of the packages a result depends on."""
    import platform
    from importlib import metadata

    packages: dict[str, str] = {}
    for name in ENV_PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "machine": platform.machine(),
        "packages": packages,
    }


def run_record(
    command: str, seed: int, device: Any, started: float, **extra: Any
) -> dict[str, Any]:
    """The report's ``run`` block: id, command, seed, device, the package versions and
    platform (the reproducibility manifest), start and finish times (UTC)."""
    return {
        "id": uuid.uuid4().hex[:12],
        "command": command,
        "seed": seed,
        "device": str(device),
        "environment": environment(),
        **extra,
        "started": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "finished": datetime.now(timezone.utc).isoformat(),
    }
