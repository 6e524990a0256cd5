"""Repairing a teacher cache before a build resumes: what ``kdcompose teacher-cache`` does first.

A re-run of the builder on an existing directory checks every shard in full (not the stamps a
validate trusts) and then:

- keeps whole shards (their samples are not recomputed);
- removes damaged shards (cut short, changed bytes, unreadable) and forgets missing ones: their
  samples are no longer in the cache, so the build recomputes exactly them;
- lists shards of this cache that an interrupted build wrote but never listed, once their data
  matches the checksum in their own header (otherwise they are damaged and removed);
- refuses a shard of another cache (another teacher, tokenizer, template, K or dtype), naming
  it: it is someone's data, and moving it out is the user's call.

The plan is made before the teacher loads (:func:`plan_repair`: reads and hashes files only) and
applied after the build has shown that it adds to this very cache (:func:`apply_repair`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcompose.errors import ConfigError
from kdcompose.teachers.cache import (
    MANIFEST_NAME,
    TeacherCacheError,
    integrity_problem,
    read_manifest,
    shard_record,
    summarize_records,
    write_manifest,
)
from kdcompose.teachers.cache_integrity import (
    SHARD_GLOB,
    ShardIssue,
    shard_records,
    stamp_written,
    unlisted_data_intact,
    verify_cache,
)

OUT_FLAG = "--out"


@dataclass
class RepairPlan:
    """What a resumed build finds in its directory (``manifest`` None: a new cache)."""

    manifest: dict[str, Any] | None = None
    keep: dict[str, dict[str, Any]] = field(default_factory=dict)
    damaged: list[ShardIssue] = field(default_factory=list)
    missing: list[ShardIssue] = field(default_factory=list)
    unlisted: list[ShardIssue] = field(default_factory=list)

    @property
    def lost_samples(self) -> int:
        return sum(i.samples or 0 for i in (*self.damaged, *self.missing))


def plan_repair(directory: Path) -> RepairPlan:
    """Check every shard of ``directory`` in full; ConfigError (``--out``) for what a build must
    not touch: shards without a readable manifest, an old format, another cache's shards."""
    if not (directory / MANIFEST_NAME).exists():
        if any(directory.glob(SHARD_GLOB)):
            raise ConfigError.single(
                OUT_FLAG,
                f"{directory} holds cache shards but no manifest; delete it or choose another --out",
            )
        return RepairPlan()
    try:
        manifest = read_manifest(directory)
    except TeacherCacheError as exc:
        raise ConfigError.single(OUT_FLAG, f"{exc} (or choose another --out)") from None
    problem = integrity_problem(directory, manifest, shards=False)
    if problem is not None:
        raise ConfigError.single(OUT_FLAG, problem)
    issues = verify_cache(directory, manifest, full=True)
    foreign = [i for i in issues if i.kind == "foreign"]
    if foreign:
        listed = "; ".join(i.describe() for i in foreign)
        raise ConfigError.single(
            OUT_FLAG,
            f"{directory} holds shards of another cache ({listed}): move them out of {directory} (or choose "
            "another --out), then re-run; the build recomputes the samples of a listed shard moved out",
        )
    bad = {i.name for i in issues}
    return RepairPlan(
        manifest=manifest,
        keep={name: r for name, r in shard_records(manifest).items() if name not in bad},
        damaged=[i for i in issues if i.kind == "damaged"],
        missing=[i for i in issues if i.kind == "missing"],
        unlisted=[i for i in issues if i.kind == "unlisted"],
    )


def apply_repair(directory: Path, plan: RepairPlan) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Remove the damaged shards, list the intact unlisted ones, and write the manifest of what is
    left (``complete: false``). Returns the kept shard records and a report for ``last_build``
    (empty when nothing needed repair)."""
    records = dict(plan.keep)
    removed = [i.name for i in plan.damaged]
    adopted = []
    for issue in plan.unlisted:
        path = directory / issue.name
        if unlisted_data_intact(path):
            records[issue.name] = shard_record(path)
            stamp_written(directory, issue.name, records[issue.name]["xxh3_128"])
            adopted.append(issue.name)
        else:
            removed.append(issue.name)
    for name in removed:
        (directory / name).unlink(missing_ok=True)
    if not (removed or plan.missing or adopted):
        return records, {}
    report = {
        "removed": sorted(removed),
        "missing": sorted(i.name for i in plan.missing),
        "adopted": sorted(adopted),
        "lost_samples": plan.lost_samples,
    }
    if plan.manifest is not None:
        write_manifest(directory, {**plan.manifest, **summarize_records(records), "complete": False})
    return records, report


def repair_summary(report: dict[str, Any]) -> str | None:
    """One line for the build's report (None when nothing needed repair)."""
    parts = []
    if report.get("removed"):
        parts.append(f"removed {len(report['removed'])} damaged shard(s) ({', '.join(report['removed'])})")
    if report.get("missing"):
        parts.append(
            f"{len(report['missing'])} listed shard(s) were missing ({', '.join(report['missing'])})"
        )
    if report.get("adopted"):
        parts.append(f"listed {len(report['adopted'])} shard(s) an interrupted build left")
    if not parts:
        return None
    return "; ".join(parts) + f"; their {report.get('lost_samples', 0)} samples were recomputed"
