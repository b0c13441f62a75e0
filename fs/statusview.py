"""`modelfs status`: what the cache holds (from its index and files: cache/inventory.py),
and, beside a live mount, what the mount is doing (its status socket: fs/status.py): bytes
read by readers, verified, the fetch rate and the ETA of the rest. `--watch` refreshes it.
"""

from __future__ import annotations

import dataclasses
import sys
import time

from .sizes import format_size

from .status import query


def _display(parts) -> str:
    from modelfs.fetcher.names import ModelName
    return ModelName(*parts).short()


def report(cache_dir) -> dict:
    """The cache's models merged with the live mount's view of them (if a mount answers)."""
    from modelfs.cache.inventory import inventory

    models, totals = inventory(cache_dir)
    live = query(cache_dir)
    live_models = {m["name"]: m for m in live["models"]} if live else {}
    rows = []
    for m in models:
        name = _display(m.parts)
        row = {"name": name, "size": m.size, "cached": m.cached, "sealed": m.sealed,
               "complete": m.complete_manifest, "last_used": m.last_used or None,
               "blobs": [dataclasses.asdict(b) for b in m.blobs]}
        row.update(_live_fields(live_models.pop(name, None)))
        rows.append(row)
    for name, lm in sorted(live_models.items()):  # known to the mount, nothing cached yet
        rows.append({"name": name, "size": lm["size"], "cached": lm["cached"],
                     "sealed": lm["sealed"], "complete": False, "last_used": None,
                     "blobs": [], **_live_fields(lm)})
    mount = None
    if live:
        mount = {k: live[k] for k in ("pid", "mountpoint", "rate", "sources", "evicted_bytes")}
    return {"cache": str(cache_dir), **totals, "mount": mount, "models": rows}


def _live_fields(lm: dict | None) -> dict:
    if lm is None:
        return {"read": None, "pushed": None, "verified": None, "rate": None, "eta": None}
    return {"read": lm["read"], "pushed": lm["pushed"], "verified": lm["verified"],
            "rate": lm["rate"],
            "eta": lm["eta"], "cached": lm["cached"], "sealed": lm["sealed"]}


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds + 0.5)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def render(doc: dict) -> str:
    live = doc["mount"] is not None
    head = ["NAME", "SIZE", "CACHED"] + (["VERIFIED", "READ", "RATE", "ETA"] if live else []) + \
        ["SEALED", "LAST USED"]
    rows = [head]
    for m in doc["models"]:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(m["last_used"])) \
            if m["last_used"] else "-"
        row = [m["name"], format_size(m["size"]), format_size(m["cached"])]
        if live:
            have = m["read"] is not None
            row += [format_size(m["verified"]) if have else "-",
                    format_size(m["read"] + m["pushed"]) if have else "-",
                    f"{format_size(int(m['rate']))}/s" if have else "-", _eta(m["eta"])]
        rows.append(row + ["yes" if m["sealed"] else "no", used])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    cap = f" of a {format_size(doc['cap'])} cap" if doc["cap"] else " (no cap)"
    lines.append(f"\ncache {doc['cache']}: {format_size(doc['cached'])} cached{cap}, "
                 f"{format_size(doc['allocated'])} allocated on disk")
    if live:
        mount = doc["mount"]
        lines.append(f"mounted on {mount['mountpoint']} (pid {mount['pid']}): fetching at "
                     f"{format_size(int(mount['rate']))}/s, "
                     f"{format_size(mount['evicted_bytes'])} evicted")
        for label, c in sorted(mount["sources"].items()):
            lines.append(f"  {label}: {c['fetches']} fetches, {format_size(c['bytes'])}, "
                         f"{c['retries']} retries, {c['errors']} errors, "
                         f"{c['bad_chunks']} bad chunks")
    return "\n".join(lines)


def watch(cache_dir, interval: float, out=sys.stdout) -> None:
    """Print the status every `interval` seconds until interrupted (a terminal is cleared
    between reports; a pipe gets them one after another)."""
    clear = "\x1b[H\x1b[2J" if out.isatty() else ""
    try:
        while True:
            out.write(clear + render(report(cache_dir)) + "\n" + ("" if clear else "\n"))
            out.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        pass
