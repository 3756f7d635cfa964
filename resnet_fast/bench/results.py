"""The GPU check's results as data: records, and the one JSON document they make.

:mod:`resnet_fast.bench.gpu_check` appends one JSON object per line to ``results.jsonl``
the moment each result exists (a kill keeps every line written), and assembles the lines
into one document, committed as ``benchmarks/results/<gpu>-<yyyymmdd>.json`` and read by
:mod:`resnet_fast.bench.report`. Either form can be read back with :func:`load_document`.

Every record has a ``type``:

``run``
    the command, start time, deadline, ``dry_run`` (a CPU rehearsal: no number in it is a
    performance number) and the stage plan with each stage's budget;
``environment``
    device, capability, driver, torch / CUDA / cuDNN / Triton / torchvision / Python versions,
    the extension's build information and what each resnet_fast backend can run;
``stage``
    one per stage or task: ``status`` (ok, failed, timed out, skipped), seconds used, the
    budget, and why where it did not run or finished badly;
``measurement``
    a number with its conditions: ``kind`` ``throughput`` (a model's images/s, ms/step and
    peak memory per variant and mode), ``primitive`` (an operator against its bandwidth
    floor) or ``build`` (seconds to compile the extension);
``check``
    a verdict: ``outcome`` (passed, failed, skipped, error), with the measured ``error`` and
    its ``tolerance`` where the check has them, and the ``message`` of a failure;
``skip``
    something not measured, and why (an unavailable backend or variant);
``curve``
    a training run's per-epoch loss and held-out accuracy (the convergence check);
``self_check``
    the output of ``python -m resnet_fast.check --json`` as it wrote it, and the validation
    records it produced.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

FORMAT = "resnet_fast-gpu-check/1"
RECORD_TYPES = ("run", "environment", "stage", "measurement", "check", "skip", "curve", "self_check")
# The document's list for each repeatable record type.
DOCUMENT_LISTS = {"stage": "stages", "measurement": "measurements", "check": "checks", "skip": "skipped",
                  "curve": "curves", "self_check": "self_checks"}
DRY_RUN_LABEL = "CPU dry run — not a performance number"


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one line of ``path`` and flush it to the file at once."""
    if record.get("type") not in RECORD_TYPES:
        raise ValueError(f"record type must be one of {', '.join(RECORD_TYPES)}, got {record.get('type')!r}")
    with path.open("a") as stream:
        stream.write(json.dumps(record, default=str) + "\n")
        stream.flush()


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a last line cut short by a kill is left out."""
    records = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}: line {number} is not JSON") from None
    return records


def assemble(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The results document: the run and the environment, then every other record by type, in order."""
    document: dict[str, Any] = {"format": FORMAT, "run": {}, "environment": {}}
    document.update({name: [] for name in DOCUMENT_LISTS.values()})
    for record in records:
        kind = record.get("type")
        if kind in ("run", "environment"):
            document[kind] = {**document[kind], **record}
        elif kind in DOCUMENT_LISTS:
            document[DOCUMENT_LISTS[kind]].append(record)
        else:
            raise ValueError(f"unknown record type {kind!r}")
    return document


def slug(text: str) -> str:
    """``NVIDIA H200`` → ``nvidia-h200``: lower case, runs of other characters as one dash."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def document_name(document: dict[str, Any]) -> str:
    """``<gpu>-<yyyymmdd>.json`` (``cpu-dry-run-<yyyymmdd>.json`` for a dry run)."""
    started = document["run"].get("started")
    day = (datetime.fromisoformat(started) if started else datetime.now(timezone.utc)).strftime("%Y%m%d")
    if document["run"].get("dry_run"):
        return f"cpu-dry-run-{day}.json"
    return f"{slug(str(document['environment'].get('device_name') or 'unknown-gpu'))}-{day}.json"


def write_document(document: dict[str, Any], path: Path) -> None:
    """Write ``document`` to ``path`` through a temporary file, so a reader never sees half of it."""
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(json.dumps(document, indent=1, default=str) + "\n")
    temporary.replace(path)


def load_document(path: Path) -> dict[str, Any] | None:
    """A results document from ``path`` (a ``.jsonl`` of records or the assembled ``.json``);
    None when ``path`` holds something else (e.g. a pytest-benchmark file)."""
    if path.suffix == ".jsonl":
        return assemble(read_records(path))
    data = json.loads(path.read_text())
    if isinstance(data, dict) and data.get("format") == FORMAT:
        return data
    return None


def skips_by_reason(records: Iterable[dict[str, Any]]) -> dict[str, list[str]]:
    """The ``skip`` records' variants grouped by reason, each variant once, in order of appearance."""
    grouped: dict[str, list[str]] = {}
    for record in records:
        if record.get("type") == "skip":
            variants = grouped.setdefault(record["reason"], [])
            if record.get("variant", "?") not in variants:
                variants.append(record.get("variant", "?"))
    return grouped
