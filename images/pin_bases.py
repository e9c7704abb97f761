"""Pin the base images of the step images by digest: ``FROM repo:tag`` -> ``FROM repo:tag@sha256:...``.

    python images/pin_bases.py            # resolve every base's digest now and rewrite the Dockerfiles
    python images/pin_bases.py --check    # exit 1 naming each base that has no digest (release CI)
    make -C images pin                    # the same as the first line

The digest of ``repo:tag`` is asked of the registry with ``docker buildx imagetools
inspect`` (the manifest list's digest, so one pin serves every platform); ``--resolver
CMD`` names another command that prints the digest of the image given as its last argument
(``crane digest``, ``skopeo``...). A base already pinned keeps its tag and gets the
current digest (``--keep`` leaves pinned ones alone). Needs the registry to be reachable,
which is why the repository's Dockerfiles carry tags only until a release build runs this.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

IMAGES = Path(__file__).resolve().parent
FROM = re.compile(r"^(?P<lead>FROM\s+(?:--platform=\S+\s+)?)(?P<ref>[^\s@]+)(?:@(?P<digest>sha256:[0-9a-f]{64}))?"
                  r"(?P<rest>(?:\s+AS\s+\S+)?\s*)$", re.IGNORECASE)
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
DEFAULT_RESOLVER = "docker buildx imagetools inspect --format '{{json .Manifest.Digest}}'"


def dockerfiles(root: Path = IMAGES) -> list[Path]:
    return sorted(root.glob("*/Dockerfile"))


def bases(text: str) -> list[tuple[int, str, str | None]]:
    """(line index, image reference, digest or None) of each ``FROM`` that names an image
    (not ``scratch``, not an earlier stage)."""
    stages: set[str] = set()
    out = []
    for i, line in enumerate(text.splitlines()):
        m = FROM.match(line.strip())
        if not m:
            continue
        ref = m.group("ref")
        named = ref.lower() == "scratch" or ref.lower() in stages or "$" in ref
        alias = m.group("rest").split()
        if alias:
            stages.add(alias[-1].lower())
        if not named:
            out.append((i, ref, m.group("digest")))
    return out


def resolve(ref: str, resolver: str) -> str:
    """The registry's digest of ``ref`` from ``resolver``'s output."""
    cmd = [*shlex.split(resolver), ref]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise SystemExit(f"pin_bases: {cmd[0]!r} not found; install it or pass --resolver") from None
    found = DIGEST.search(r.stdout)
    if r.returncode != 0 or not found:
        raise SystemExit(f"pin_bases: could not resolve {ref} with {' '.join(cmd)!r} "
                         f"(exit {r.returncode}): {(r.stderr or r.stdout).strip()[-500:]}")
    return found.group(0)


def pin(path: Path, resolver: str, keep: bool = False) -> list[str]:
    """Rewrite ``path``'s base images with their digests; returns what changed."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    changed = []
    for i, ref, digest in bases("".join(lines)):
        if digest and keep:
            continue
        new = resolve(ref, resolver)
        if new == digest:
            continue
        m = FROM.match(lines[i].strip())
        end = "\n" if lines[i].endswith("\n") else ""
        lines[i] = f"{m.group('lead')}{ref}@{new}{m.group('rest').rstrip()}{end}"
        changed.append(f"{path.relative_to(path.parents[1])}: {ref} -> {new}")
    if changed:
        path.write_text("".join(lines), encoding="utf-8")
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report bases without a digest (exit 1 if any)")
    ap.add_argument("--resolver", default=DEFAULT_RESOLVER,
                    help="command printing the digest of the image given last (default: %(default)s)")
    ap.add_argument("--keep", action="store_true", help="leave bases that already have a digest as they are")
    ap.add_argument("--root", type=Path, default=IMAGES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    files = dockerfiles(args.root)
    if args.check:
        missing = [f"{p.relative_to(args.root.parent)}: {ref}" for p in files
                   for _, ref, digest in bases(p.read_text(encoding="utf-8")) if not digest]
        for m in missing:
            print(f"not pinned by digest: {m}")
        return 1 if missing else 0
    for p in files:
        for line in pin(p, args.resolver, keep=args.keep):
            print(f"pinned {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
