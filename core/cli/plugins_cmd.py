"""``avatar plugins``: what is installed, where it came from, and whether it works."""

from __future__ import annotations

import json

import click

from ..plugins import get_plugin_manager


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """List plugins: distribution, version, what each registered, and status."""
    pm = get_plugin_manager()
    rows = [r.to_dict() for r in sorted(pm.records.values(), key=lambda r: r.name)]
    if as_json:
        click.echo(json.dumps({"plugins": rows}, indent=2))
        return
    header = f"{'plugin':<18} {'distribution':<22} {'status':<12} registered"
    click.echo(header)
    click.echo("-" * len(header))
    for r in rows:
        dist = f"{r['distribution'] or '-'} {r['version'] or ''}".strip()
        comps = ", ".join(
            [
                f"{c['kind'].replace('_', ' ')}:{c['name']}" + ("" if c["usable"] else " (unavailable)")
                for c in r["registered"]
            ]
            + [f"command:{c}" for c in r["commands"]]
        ) or "-"
        click.echo(f"{r['name']:<18} {dist:<22} {r['status']:<12} {comps}")
        if r["error"]:
            click.echo(f"{'':<18} error: {r['error']}")
        for c in r["registered"]:
            if not c["usable"]:
                fix = f" -> {c['install']}" if c["install"] else ""
                click.echo(f"{'':<18} {c['name']}: {c['reason']}{fix}")
        if r["install"] and r["status"] != "loaded" and not r["registered"]:
            click.echo(f"{'':<18} install: {r['install']}")
