"""Print the runtime requirements of pyproject.toml, one per line, for pip -r.

The images install dependencies before the source is copied in, so that a code
change does not reinstall torch; reading them from pyproject.toml keeps the pins
in one place. ``--extra model`` adds an optional group (the worker image's model
stack; the API image has none), ``--only torch torchvision`` selects the packages
that come from PyTorch's own index (a CUDA or CPU build), ``--exclude`` leaves
them out.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path


def name_of(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    # PEP 503 normalisation, so that "Pillow" and "pillow" select the same package.
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(
    pyproject: Path,
    only: list[str] | None = None,
    exclude: list[str] | None = None,
    extras: list[str] | None = None,
) -> list[str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    deps = list(project["dependencies"])
    for extra in extras or ():
        if extra not in optional:
            raise SystemExit(f"pyproject.toml has no extra {extra!r}")
        deps += optional[extra]
    wanted = {name_of(n) for n in only} if only else None
    unwanted = {name_of(n) for n in exclude or ()}
    return [d for d in deps if (wanted is None or name_of(d) in wanted) and name_of(d) not in unwanted]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    parser.add_argument("--only", nargs="+", metavar="NAME")
    parser.add_argument("--exclude", nargs="+", metavar="NAME")
    parser.add_argument("--extra", action="append", default=[], metavar="EXTRA", help="repeatable")
    args = parser.parse_args(argv)
    lines = requirements(args.pyproject, args.only, args.exclude, args.extra)
    if args.only and len(lines) != len(args.only):
        # A renamed or dropped pin must break the build, not silently install the wrong torch.
        print(f"pyproject.toml does not list all of {args.only}", file=sys.stderr)
        return 1
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
