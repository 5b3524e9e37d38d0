"""Fail unless the running environment holds exactly the packages of a lock file (imglora aside).

    python .ci/check_lock.py requirements.lock
"""
import re
import sys
from importlib.metadata import distributions


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(lock: str) -> int:
    want = {}
    for line in open(lock, encoding="utf-8"):
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split(";", 1)[0].strip().split("==")
            want[norm(name)] = version
    skip = {"imglora", "pip", "setuptools", "wheel"}
    have = {norm(d.metadata["Name"]): d.version for d in distributions() if norm(d.metadata["Name"]) not in skip}
    want = {k: v for k, v in want.items() if k not in skip}
    diff = sorted(set(want.items()) ^ set(have.items()))
    for name, version in diff:
        where = "lock only" if want.get(name) == version else "installed only"
        print(f"{lock}: {name}=={version} ({where})", file=sys.stderr)
    if diff:
        print(f"{lock}: the environment differs from the lock; rebuild it with `make install`", file=sys.stderr)
        return 1
    print(f"{lock}: the environment equals the lock ({len(want)} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
