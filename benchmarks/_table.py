"""Every benchmark's figures (``benchmarks/results/*.json``) as one markdown table, with the machine each
was measured on. ``make benchmarks`` runs the scripts and then this.

    python benchmarks/_table.py [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import pathlib

from _common import RESULTS, load_results


def _number(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def machine_label(machine: dict) -> str:
    gpus = ", ".join(machine.get("gpus") or []) or "no GPU"
    return f"{machine.get('cores')} cores {machine.get('cpu')}; {gpus}"


def table(results: dict[str, dict]) -> str:
    machines: dict[str, str] = {}
    lines = ["| benchmark | case | value | unit | ratio | vs | target | machine |", "|---|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        label = machine_label(result.get("machine", {}))
        key = machines.setdefault(label, f"M{len(machines) + 1}")
        for row in result.get("rows", []):
            ratio = row.get("ratio")
            target = row.get("target")
            mark = "" if ratio is None or target is None else (" ok" if ratio >= target else " **missed**")
            lines.append(
                f"| {name} | {row['case']} | {_number(row['value'])} | {row['unit']} | "
                f"{_number(ratio)}{'x' if ratio is not None else ''} | {row.get('baseline') or ''} | "
                f"{'>= ' + _number(target) + 'x' + mark if target is not None else ''} | {key} |"
            )
    lines.append("")
    for label, key in machines.items():
        lines.append(f"- {key}: {label}")
    for name, result in results.items():
        versions = result.get("versions", {})
        lines.append(f"- {name}: {result.get('started', '?')}, commit {result.get('git_commit')}, "
                     f"`{' '.join(result.get('command', []))}`, gmfx {versions.get('gmfx', '?')}")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args()
    results = load_results(args.results)
    if not results:
        raise SystemExit(f"no benchmark results in {args.results}: run `make benchmarks` (or a script in benchmarks/) first")
    print(table(results))


if __name__ == "__main__":
    main()
