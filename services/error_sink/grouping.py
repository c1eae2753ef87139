"""Which group a report belongs to: its fingerprint, hashed with its service.

Fingerprint, in order of preference:
1. the report's own ``fingerprint`` (an item ``{{ default }}`` expands to the default below);
2. the exception type and its in-app frames (file and function, not line numbers, so an edit
   elsewhere in a file does not split a group);
3. the exception type and its message with numbers and ids stripped;
4. the message with numbers and ids stripped.

A frame is in-app unless its file is in site-packages / dist-packages, the standard library,
node_modules or a browser extension (boxoffice's own files always count as in-app).
Groups are per service: the same fingerprint in two services is two groups.
"""

from __future__ import annotations

import functools
import hashlib
import re
import uuid

DEFAULT = "{{ default }}"
_NAMESPACE = uuid.UUID("6f1c1d0e-5b2a-4c47-9d7e-2d2f3b7a1e01")

# A line's indentation and trailing blanks are [ \t]*, not \s*: \s also matches newlines, so at each
# line of a run of blank lines the pattern scanned every following one (256 KiB of newlines in a
# stacktrace took 126 s of the error-sink's CPU).
_PY_FRAME = re.compile(r'^[ \t]*File "([^"]+)", line \d+, in (\S.*)$', re.M)
_JS_FRAME = re.compile(r"^[ \t]*at (?:(.+?) \()?((?:[a-z]+:/+)?[^\s()]+?):\d+(?::\d+)?\)?[ \t\r]*$",
                       re.M)
_NOT_IN_APP = ("site-packages", "dist-packages", "/lib/python", "<frozen", "node_modules",
               "chrome-extension:", "moz-extension:", "safari-extension:", "<string>",
               "webpack/bootstrap", "<anonymous>", "/usr/lib/", "\\lib\\")
_IDS = re.compile(
    r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"  # uuids
    r"|\b[a-z]{1,8}_[A-Za-z0-9]{8,}\b"  # prefixed ids: pi_..., evt_..., cus_...
    r"|\b0x[0-9a-fA-F]+\b|\b(?=[0-9a-fA-F]*\d)[0-9a-fA-F]{10,}\b"  # hex: addresses, digests
    r"|[\w.+-]+@[\w-]+\.[\w.-]+"  # e-mail addresses
)
_NUMS = re.compile(r"\d+(?:\.\d+)?")
_SPACES = re.compile(r"\s+")


def in_app(path: str) -> bool:
    if "-packages/boxoffice/" in path:  # boxoffice installed (not editable) in a container
        return True
    return not any(marker in path for marker in _NOT_IN_APP)


def _tail(path: str) -> str:
    """The last two parts of a path or URL, without query: stable across install roots."""
    path = path.split("?", 1)[0].split("#", 1)[0].replace("\\", "/")
    return "/".join(path.rstrip("/").split("/")[-2:])


@functools.lru_cache(maxsize=4096)
def app_frames(stacktrace: str) -> tuple[str, ...]:
    """In-app frames of a stacktrace (Python or JavaScript text), innermost last."""
    frames = [(path, func.strip()) for path, func in _PY_FRAME.findall(stacktrace)]
    if not frames:
        # JavaScript stacks list the innermost call first
        frames = [(path, (func or "?").strip()) for func, path in _JS_FRAME.findall(stacktrace)][::-1]
    return tuple(f"{_tail(path)}:{func}" for path, func in frames if in_app(path))[-30:]


def normalize(message: str) -> str:
    """A message with ids, numbers and runs of spaces replaced, for grouping."""
    message = _IDS.sub("<id>", message[:1024])
    return _SPACES.sub(" ", _NUMS.sub("<n>", message)).strip()[:512]


def _clean(parts: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    return tuple(part.replace("\x1f", " ")[:512] for part in parts)


@functools.lru_cache(maxsize=4096)
def by_frames(error_type: str, stacktrace: str) -> tuple[str, ...] | None:
    """The fingerprint by the type and in-app frames; None when no frame is in the app."""
    frames = app_frames(stacktrace)
    return _clean((error_type, *frames)) if frames else None


def default_fingerprint(error_type: str | None, stacktrace: str | None,
                        message: str) -> tuple[str, ...]:
    if error_type:
        by_frames_fp = by_frames(error_type, stacktrace) if stacktrace else None
        if by_frames_fp:
            return by_frames_fp
        return _clean((error_type, normalize(message)))
    return _clean((normalize(message),))


def fingerprint(error_type: str | None, stacktrace: str | None, message: str,
                own: list[str] | None) -> tuple[str, ...]:
    """The fingerprint of a report (see the module's docstring)."""
    if own:
        if DEFAULT in own:
            default = default_fingerprint(error_type, stacktrace, message)
            return _clean([part for item in own for part in (default if item == DEFAULT else [item])])
        return _clean(own)
    return default_fingerprint(error_type, stacktrace, message)


@functools.lru_cache(maxsize=8192)
def group_key(service: str, fp: tuple[str, ...]) -> tuple[str, str]:
    """(fingerprint_hash, group id): the id is derived from the hash, so every replica of the
    error-sink names a group the same way without asking the database first."""
    digest = hashlib.sha256("\x1f".join((service, *fp)).encode()).hexdigest()
    return digest, str(uuid.uuid5(_NAMESPACE, digest))


def title(error_type: str | None, message: str) -> str:
    first = message.strip().split("\n", 1)[0]
    text = f"{error_type}: {first}" if error_type and not first.startswith(error_type) else first
    return text[:200] or (error_type or "error")
