"""Users file for `python app.py --auth-file PATH`: salted scrypt password hashes, one user a line.

Line format: `name:scrypt:n:r:p:salt_hex:hash_hex`. The file never holds a password, so it can
sit beside the app; a leaked file still costs an attacker a memory-hard search per user.

    python -m app.auth add --file users.txt --user alice      # reads the password (getpass or stdin)
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import hmac
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


@dataclass(frozen=True)
class PasswordHash:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    def encode(self) -> str:
        return f"scrypt:{self.n}:{self.r}:{self.p}:{self.salt.hex()}:{self.digest.hex()}"

    @classmethod
    def decode(cls, text: str) -> PasswordHash:
        scheme, n, r, p, salt, digest = text.split(":")
        if scheme != "scrypt":
            raise ValueError(f"unknown hash scheme {scheme!r}")
        return cls(int(n), int(r), int(p), bytes.fromhex(salt), bytes.fromhex(digest))


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=2**26, dklen=32)


def hash_password(password: str) -> PasswordHash:
    salt = os.urandom(16)
    return PasswordHash(SCRYPT_N, SCRYPT_R, SCRYPT_P, salt, _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P))


def verify_password(password: str, stored: PasswordHash) -> bool:
    candidate = _scrypt(password, stored.salt, stored.n, stored.r, stored.p)
    return hmac.compare_digest(candidate, stored.digest)


def load_users(path: str | Path) -> dict[str, PasswordHash]:
    """Users of the file; a malformed line raises with its line number (never its content)."""
    users = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        try:
            name, encoded = line.split(":", 1)
            users[name] = PasswordHash.decode(encoded)
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: not a 'name:scrypt:...' entry") from exc
    return users


def add_user(path: str | Path, name: str, password: str) -> None:
    """Add or replace one user; the file is created with owner-only permissions."""
    if not name or ":" in name or name != name.strip():
        raise ValueError("user names may not be empty, contain ':' or surrounding spaces")
    if not password:
        raise ValueError("empty password")
    path = Path(path)
    users = load_users(path) if path.exists() else {}
    users[name] = hash_password(password)
    text = "".join(f"{user}:{h.encode()}\n" for user, h in users.items())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def checker(path: str | Path) -> Callable[[str, str], bool]:
    """The `auth=` callable for Gradio's launch: reads the file once at start-up."""
    users = load_users(path)
    if not users:
        raise ValueError(f"{path} has no users; add one with `python -m app.auth add --file {path} --user NAME`")

    def check(name: str, password: str) -> bool:
        stored = users.get(name)
        return stored is not None and verify_password(password, stored)

    return check


def _read_password() -> str:
    """getpass on a terminal (asked twice); otherwise the first line of stdin, for scripts."""
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    password = getpass.getpass("password: ")
    if password != getpass.getpass("again: "):
        raise ValueError("the passwords differ")
    return password


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.auth", description="Manage the app's users file.")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="add or replace a user (password from getpass or stdin)")
    add.add_argument("--file", required=True)
    add.add_argument("--user", required=True)
    args = parser.parse_args(argv)
    try:
        add_user(args.file, args.user, _read_password())
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"user {args.user} saved in {args.file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
