#!/usr/bin/env python3
"""Helpers for benches/soak/run.sh (standard library only).

Subcommands:
  ports N                              N free loopback TCP ports
  rec FILE KEY VALUE                   set KEY (dotted path) in a JSON file; VALUE as JSON if it parses
  status EPS                           leader line: "id addr applied commit audit_records" (or nothing)
  node EPS                             one endpoint's "applied audit_records role"
  wait-node EP EPS --since T [--readyz URL] [--timeout S] [--min-applied N] [--pid P]
                                       poll until EP's applied index reaches the leader's (and /readyz
                                       answers 200); print seconds since T, "timeout", or "exited"
                                       if process P ended first
  wait-mtime FILE OLD_NS --since T [--timeout S]
                                       poll until FILE's mtime (ns) is newer than OLD_NS; print
                                       mtime - T in seconds, or "timeout"
  load-summary LOG                     parse ration-load's output: "ops seconds ops_per_s errors"
  render DIR OUT_MD                    the markdown report from DIR/phase-*.json and DIR/run.json
"""

import glob
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

RATIONCTL = os.environ.get("RATIONCTL", "rationctl")


def ports(n):
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    print(" ".join(str(s.getsockname()[1]) for s in socks))
    for s in socks:
        s.close()


def rec(path, key, value):
    try:
        data = json.load(open(path))
    except (FileNotFoundError, json.JSONDecodeError):
        data = {}
    try:
        v = json.loads(value)
    except json.JSONDecodeError:
        v = value
    d = data
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = v
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def statuses(eps, timeout_ms=3000):
    """Rows of `rationctl endpoint status -o json` (those endpoints that answered)."""
    try:
        out = subprocess.run(
            [RATIONCTL, "--endpoints", eps, "-o", "json", "--timeout-ms", str(timeout_ms),
             "endpoint", "status"],
            capture_output=True, text=True, timeout=timeout_ms / 1000 * 4 + 5,
        ).stdout
        return json.loads(out) if out.strip() else []
    except (subprocess.TimeoutExpired, json.JSONDecodeError):
        return []


def leader_of(eps):
    for r in statuses(eps):
        if r.get("role") == "leader":
            return r
    return None


def readyz(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except Exception:  # noqa: BLE001 - any failure means "not ready"
        return False


def exited(pid):
    """Whether process `pid` has ended (gone, or a zombie not yet waited for)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.split()[:2] == ["State:", "Z"] for line in f)
    except FileNotFoundError:
        return True


def wait_node(ep, eps, since, ready_url=None, timeout=600.0, min_applied=0, pid=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pid is not None and exited(pid):
            return "exited"
        lead = leader_of(eps)
        if lead is not None:
            target = max(lead["applied_index"], min_applied)
            mine = statuses(ep, 2000)
            if mine and mine[0]["applied_index"] >= target:
                if ready_url is None or readyz(ready_url):
                    return "%.2f" % (time.time() - since)
        time.sleep(0.1)
    return "timeout"


def wait_mtime(path, old_ns, since, timeout=600.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            m = os.stat(path).st_mtime_ns
            if m > old_ns:
                return "%.2f" % (m / 1e9 - since)
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    return "timeout"


def load_summary(log):
    # "1790000 ops in 30.0 s: 59666 ops/s; latency ...; 0 errors"
    for line in open(log, errors="replace"):
        if " ops in " in line and " errors" in line:
            w = line.split()
            ops = int(w[0])
            secs = float(w[3])
            rate = float(w[5])
            errors = int(line.rsplit(";", 1)[1].split()[0])
            print(ops, secs, rate, errors)
            return
    print("0 0 0 -1")


# ---------------------------------------------------------------------- report

MB = 1e6
DAYS30_RECORDS = 20_000 * 86_400 * 30  # 10k grants/s = 20k audit records/s, for 30 days


def fnum(v, digits=1):
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    if abs(v) >= 1e5:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def human(v, header):
    """A projected figure in the column's unit, and in a larger unit when it is large."""
    s = fnum(v, 1)
    if "(MB)" in header and abs(v) >= 1e3:
        big = [(1e6, "TB"), (1e3, "GB")]
        d, u = next((d, u) for d, u in big if abs(v) >= d)
        return f"{s} ({v / d:,.1f} {u})"
    if "(s)" in header and abs(v) >= 120:
        big = [(86400, "days"), (3600, "h"), (60, "min")]
        d, u = next((d, u) for d, u in big if abs(v) >= d)
        return f"{s} ({v / d:,.1f} {u})"
    return s


def fit(xs, ys):
    """Least-squares slope and intercept, or None with fewer than 2 points."""
    pts = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
    if len(pts) < 2:
        return None
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
    return slope, my - slope * mx


def num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def render(d, out_md):
    run = json.load(open(os.path.join(d, "run.json")))
    phases = sorted((json.load(open(p)) for p in glob.glob(os.path.join(d, "phase-*.json"))),
                    key=lambda p: p["phase"])
    nodes = [str(i) for i in range(1, 4)]

    # Per phase, the columns: (header, shown value, number for the slope or None, sloped?).
    def mb(v):
        return None if v is None else v / MB

    def col_values(p):
        rss_mb = [mb((p.get("rss_kb", {}).get(n) or 0) * 1024) if p.get("rss_kb", {}).get(n)
                  else None for n in nodes]
        disk = [p.get("disk", {}).get(n, {}).get("total") for n in nodes]
        rec = p.get("audit_records")
        disk_max = max([v for v in disk if v is not None], default=None)
        rss_max = max([v for v in rss_mb if v is not None], default=None)
        snap = mb(p.get("snapshot_bytes"))
        rr = p.get("restart_rss_kb")
        rr = mb(rr * 1024) if rr else None
        t = lambda k: p.get(k)  # noqa: E731
        return [
            ("cumulative load (s)", t("cumulative_load_s"), None, False),
            ("ops/s", t("ops_per_s"), None, False),
            ("errors", t("errors"), None, False),
            ("audit records (M)", None if rec is None else rec / 1e6, None, False),
            ("RSS n1 / n2 / n3 (MB)", " / ".join(fnum(v, 0) for v in rss_mb), rss_max, True),
            ("snapshot (MB)", snap, snap, True),
            ("snapshot build (s)", t("snapshot_build_s"), num(t("snapshot_build_s")), True),
            ("snapshot save (s)", t("snapshot_save_s"), num(t("snapshot_save_s")), True),
            ("follower restart to ready (s)", t("restart_ready_s"), num(t("restart_ready_s")),
             True),
            ("RSS after restart (MB)", rr, rr, True),
            ("new learner catch-up (s)", t("learner_catchup_s"), num(t("learner_catchup_s")),
             True),
            ("disk n1 / n2 / n3 (MB)", " / ".join(fnum(mb(v), 0) for v in disk), mb(disk_max),
             True),
            ("disk bytes / audit record (max node)",
             None if not rec or disk_max is None else disk_max / rec, None, False),
        ]

    cols = [col_values(p) for p in phases]
    headers = [c[0] for c in cols[0]] if cols else []
    whole = ("errors", "cumulative load (s)", "ops/s", "disk bytes / audit record (max node)")
    lines = []
    lines.append("| phase | " + " | ".join(headers) + " |")
    lines.append("|---" * (len(headers) + 1) + "|")
    for p, c in zip(phases, cols):
        cells = []
        for h, v, _, _ in c:
            if h in whole and isinstance(v, (int, float)):
                cells.append(f"{v:,.0f}")
            else:
                cells.append(fnum(v, 2 if "(s)" in h or "(M)" in h else 1))
        lines.append(f"| {p['phase']} | " + " | ".join(cells) + " |")

    # Slopes: change per million audit records, per phase and fitted over all phases.
    recs_m = [None if p.get("audit_records") is None else p["audit_records"] / 1e6 for p in phases]
    sloped = [i for i, c in enumerate(cols[0]) if c[3]] if cols else []

    def slope_row(label, k):
        cells = []
        for i in range(len(headers)):
            if i not in sloped:
                cells.append("")
                continue
            a, b = cols[k - 1][i][2], cols[k][i][2]
            dr = None if recs_m[k] is None or recs_m[k - 1] is None else recs_m[k] - recs_m[k - 1]
            if a is None or b is None or not dr:
                cells.append("n/a")
            else:
                cells.append(f"{(b - a) / dr:+,.2f}")
        return f"| {label} | " + " | ".join(cells) + " |"

    for k in range(1, len(phases)):
        lines.append(slope_row(f"slope {k}→{k + 1} (per M records)", k))
    cells_fit, cells_proj = [], []
    for i in range(len(headers)):
        if i not in sloped:
            cells_fit.append("")
            cells_proj.append("")
            continue
        f = fit(recs_m, [c[i][2] for c in cols])
        if f is None:
            cells_fit.append("n/a")
            cells_proj.append("n/a")
        else:
            cells_fit.append(f"{f[0]:+,.2f}")
            cells_proj.append(human(f[1] + f[0] * DAYS30_RECORDS / 1e6, headers[i]))
    if len(phases) >= 2:
        lines.append("| fitted slope, all phases (per M records) | " + " | ".join(cells_fit) + " |")
        lines.append(
            f"| projection: 30 days at 10k grants/s ({DAYS30_RECORDS / 1e6:,.0f} M records) | "
            + " | ".join(cells_proj) + " |")

    md = []
    md.append("# Soak run: bounded growth (issue #14)\n")
    md.append(
        f"Run {run.get('started')}, commit `{run.get('commit')}`, {run.get('phases')} phases of "
        f"{run.get('phase_seconds')} s of `ration-load --batch 256 --concurrency 12` (fresh client "
        f"ids each phase) against three `rationd` on loopback; {run.get('machine')}. "
        f"Command: `{run.get('command')}`.\n")
    md.append(
        "Measured after each phase, with the load stopped: RSS (VmRSS) of each node; the leader "
        "builds a snapshot on request (`rationctl snapshot save` against it: *build* is from the "
        "request to the new `snapshot.bin`'s mtime, *save* until the checked download finished); "
        "a follower is SIGKILLed and restarted with the same flags (*restart to ready*: from its "
        "start until `/readyz` answers 200 and its applied index reaches the leader's); a new "
        "empty node is added as a learner ("
        + ("started with `--join <leader>`; *catch-up*: from its start"
           if run.get("learner_add", "join") == "join" else
           "`rationctl member add`; *catch-up*: from the add")
        + " until its applied index reaches the leader's), then removed; `du -sb` of each data "
        "directory. "
        "Slopes are the change per million audit records (the chain head) between phases and "
        "fitted over all phases (for RSS and disk: the largest node); the projection extends the "
        "fit linearly to 30 days of 20k audit records/s. \"timeout\" means the wait's limit "
        f"({run.get('max_wait_s')} s) passed.\n")
    md.extend(lines)
    md.append("")

    # Disk breakdown.
    md.append("## Disk per node (`du -sb`, MB)\n")
    md.append("| phase | node | total | " + "entries |")
    md.append("|---|---|---|---|")
    for p in phases:
        for n in nodes + ["learner"]:
            dn = p.get("disk", {}).get(n)
            if not dn:
                continue
            parts = ", ".join(f"{k} {v / MB:,.1f}" for k, v in sorted(dn.get("entries", {}).items()))
            md.append(f"| {p['phase']} | {n} | {dn.get('total', 0) / MB:,.1f} | {parts} |")
    md.append("")

    md.append("## Details\n")
    for p in phases:
        det = [
            f"leader n{p.get('leader')}",
            f"load {p.get('ops', 'n/a'):,} ops in {p.get('load_s', 'n/a')} s"
            if isinstance(p.get("ops"), int) else "load: n/a",
            f"applied index {p.get('applied_index')}",
            f"peak RSS (VmHWM) n1/n2/n3 "
            + " / ".join(fnum((p.get('hwm_kb', {}).get(n) or 0) * 1024 / MB, 0) for n in nodes)
            + " MB",
            f"snapshot holds {p.get('snapshot_audit_records', 'n/a')} audit records",
            f"restarted n{p.get('restart_node')}",
            f"learner n{p.get('learner_id')} caught up via "
            f"{p.get('learner_via', 'n/a')}, RSS {fnum((p.get('learner_rss_kb') or 0) * 1024 / MB, 0)} MB",
        ]
        md.append(f"- phase {p['phase']}: " + "; ".join(str(x) for x in det) + ".")
    if run.get("node_config"):
        md.append("\nNodes ran with `--config` holding:\n\n```toml\n" + run["node_config"].strip()
                  + "\n```")
        for note in p.get("notes", []):
            md.append(f"  - {note}")
    md.append("")
    text = "\n".join(md)
    with open(out_md, "w") as f:
        f.write(text)
    print(text)


def main(argv):
    cmd = argv[1]
    if cmd == "ports":
        ports(int(argv[2]))
    elif cmd == "rec":
        rec(argv[2], argv[3], argv[4])
    elif cmd == "status":
        r = leader_of(argv[2])
        if r:
            print(r["id"], r["addr"], r["applied_index"], r["commit_index"], r["audit_records"])
    elif cmd == "node":
        rows = statuses(argv[2])
        if rows:
            print(rows[0]["applied_index"], rows[0]["audit_records"], rows[0]["role"])
    elif cmd in ("wait-node", "wait-mtime"):
        import argparse
        ap = argparse.ArgumentParser()
        ap.add_argument("a")
        ap.add_argument("b")
        ap.add_argument("--since", type=float, required=True)
        ap.add_argument("--readyz")
        ap.add_argument("--timeout", type=float, default=600)
        ap.add_argument("--min-applied", type=int, default=0)
        ap.add_argument("--pid", type=int)
        o = ap.parse_args(argv[2:])
        if cmd == "wait-node":
            print(wait_node(o.a, o.b, o.since, o.readyz, o.timeout, o.min_applied, o.pid))
        else:
            print(wait_mtime(o.a, int(o.b), o.since, o.timeout))
    elif cmd == "load-summary":
        load_summary(argv[2])
    elif cmd == "render":
        render(argv[2], argv[3])
    else:
        sys.exit(f"unknown subcommand {cmd}")


if __name__ == "__main__":
    main(sys.argv)
