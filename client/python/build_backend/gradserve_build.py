"""The PEP 517 build backend of the gradserve Python package, with the standard library only.

Why not setuptools: pip builds a package in an isolated environment and installs the backend
named in ``build-system.requires`` from PyPI into it. On a machine that reaches only Debian's
mirror (and in any offline CI), that download fails, and Debian's python3-setuptools is hidden
from the isolated build. A backend with no requirements, shipped in the tree
(``backend-path``), makes ``pip install ./client/python`` work with nothing but pip.

What it builds: a pure-Python wheel of ``gradserve/`` plus what is generated at build time, from
the one source of each (Note [Generated files]):

* the protobuf and gRPC stubs of ``proto/gradserve/v1/gradserve.proto`` and
  ``proto/gradserve/optimizer/v1/optimizer.proto``, by Debian's ``protoc`` and
  ``grpc_python_plugin`` (python3-grpc-tools bundles an older protoc);
* ``service_config.json``, the channel policy shared with the C++ client.

Note [Generated files]: the sources live outside the package directory (``../../proto``,
``../service_config.json``) because the C++ build and other languages read the same files. An
sdist carries copies under ``_sources/`` so that it builds away from the repository.

Also a command line, for working in the tree without installing::

    python3 build_backend/gradserve_build.py generate [DIR]

writes the generated files into ``DIR/gradserve`` together with a copy of the package's sources
(default: in place, into ``client/python/gradserve``), so ``PYTHONPATH=DIR`` imports it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

PROJECT_DIR = Path(__file__).resolve().parent.parent  # client/python
PACKAGE = "gradserve"
PROTOS = ("gradserve/v1/gradserve.proto", "gradserve/optimizer/v1/optimizer.proto")
# What generate() writes into the package; never taken from the tree, where a generate in place
# may have left stale copies.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
GENERATED_NAMES = ("service_config.json",)


def _metadata_fields() -> Dict[str, object]:
    with open(PROJECT_DIR / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def _source(relative_in_repo: str, sdist_name: str) -> Path:
    """A file or directory the package is generated from (Note [Generated files])."""
    in_sdist = PROJECT_DIR / "_sources" / sdist_name
    if in_sdist.exists():
        return in_sdist
    in_repo = PROJECT_DIR.parent.parent / relative_in_repo
    if in_repo.exists():
        return in_repo
    raise FileNotFoundError(f"{relative_in_repo} not found: build from a gradserve checkout "
                            "or from its sdist")


def _proto_root() -> Path:
    return _source("proto", "proto")


def _service_config() -> Path:
    return _source("client/service_config.json", "service_config.json")


def _tool(name: str, env: str, hint: str) -> str:
    path = os.environ.get(env) or shutil.which(name) or ""
    if not path or not os.access(path, os.X_OK):
        raise RuntimeError(f"{name} not found ({hint}); deploy/install-deps.sh installs it")
    return path


def generate(package_dir: Path) -> List[Path]:
    """Writes the stubs and service_config.json into ``package_dir``; returns what it wrote."""
    protoc = _tool("protoc", "PROTOC", "apt install protobuf-compiler")
    plugin = os.environ.get("GRPC_PYTHON_PLUGIN", "/usr/bin/grpc_python_plugin")
    _tool(plugin, "GRPC_PYTHON_PLUGIN", "apt install protobuf-compiler-grpc")
    proto_root = _proto_root()
    written: List[Path] = []
    with tempfile.TemporaryDirectory() as scratch:
        # -I proto_root keeps the package path in the generated imports ("from gradserve.v1
        # import gradserve_pb2"), which is why the stubs live inside the gradserve package.
        subprocess.run([protoc, f"-I{proto_root}", f"--python_out={scratch}",
                        f"--pyi_out={scratch}",  # typed messages for IDEs and mypy
                        f"--plugin=protoc-gen-grpc_python={plugin}",
                        f"--grpc_python_out={scratch}",
                        *(str(proto_root / p) for p in PROTOS)], check=True)
        generated_root = Path(scratch) / PACKAGE
        for source in sorted([*generated_root.rglob("*.py"), *generated_root.rglob("*.pyi")]):
            target = package_dir / source.relative_to(generated_root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            written.append(target)
    config = package_dir / "service_config.json"
    shutil.copyfile(_service_config(), config)
    written.append(config)
    return written


def _package_sources() -> List[Path]:
    """The package's own files (not generated ones, not caches), relative to PROJECT_DIR."""
    root = PROJECT_DIR / PACKAGE
    files = []
    for path in sorted(root.rglob("*")):
        if path.is_dir() or "__pycache__" in path.parts or path.suffix == ".pyc" or \
                path.name.endswith(GENERATED_SUFFIXES) or path.name in GENERATED_NAMES:
            continue
        files.append(path.relative_to(PROJECT_DIR))
    return files


def _dist_name() -> str:
    return f"{PACKAGE}-{_metadata_fields()['version']}"


def _metadata() -> str:
    project = _metadata_fields()
    lines = ["Metadata-Version: 2.1", f"Name: {project['name']}",
             f"Version: {project['version']}", f"Summary: {project['description']}",
             f"Requires-Python: {project['requires-python']}"]
    lines += [f"Requires-Dist: {d}" for d in project.get("dependencies", [])]
    for extra, deps in project.get("optional-dependencies", {}).items():
        lines.append(f"Provides-Extra: {extra}")
        lines += [f"Requires-Dist: {d}; extra == \"{extra}\"" for d in deps]
    readme = PROJECT_DIR / project["readme"]
    lines.append("Description-Content-Type: text/markdown")
    return "\n".join(lines) + "\n\n" + readme.read_text(encoding="utf-8")


def _wheel_file() -> str:
    return ("Wheel-Version: 1.0\nGenerator: gradserve_build\nRoot-Is-Purelib: true\n"
            "Tag: py3-none-any\n")


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _write_wheel(wheel_directory: str, files: Dict[str, bytes]) -> str:
    dist = _dist_name()
    dist_info = f"{dist}.dist-info"
    files = dict(files)
    files[f"{dist_info}/METADATA"] = _metadata().encode("utf-8")
    files[f"{dist_info}/WHEEL"] = _wheel_file().encode("utf-8")
    record = [_record_line(name, data) for name, data in files.items()]
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode("utf-8")
    name = f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(Path(wheel_directory) / name, "w", zipfile.ZIP_DEFLATED) as wheel:
        for path, data in files.items():
            # A fixed timestamp: the same tree gives the same wheel, byte for byte.
            info = zipfile.ZipInfo(path, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            wheel.writestr(info, data)
    return name


# --- PEP 517 / PEP 660 hooks ----------------------------------------------------------------


def get_requires_for_build_wheel(config_settings: Optional[dict] = None) -> List[str]:
    return []


def get_requires_for_build_sdist(config_settings: Optional[dict] = None) -> List[str]:
    return []


def get_requires_for_build_editable(config_settings: Optional[dict] = None) -> List[str]:
    return []


def build_wheel(wheel_directory: str, config_settings: Optional[dict] = None,
                metadata_directory: Optional[str] = None) -> str:
    with tempfile.TemporaryDirectory() as scratch:
        staged = Path(scratch) / PACKAGE
        files: Dict[str, bytes] = {}
        for relative in _package_sources():
            files[relative.as_posix()] = (PROJECT_DIR / relative).read_bytes()
        for path in generate(staged):
            files[(Path(PACKAGE) / path.relative_to(staged)).as_posix()] = path.read_bytes()
        return _write_wheel(wheel_directory, files)


def build_editable(wheel_directory: str, config_settings: Optional[dict] = None,
                   metadata_directory: Optional[str] = None) -> str:
    """A wheel whose .pth puts client/python on sys.path; the stubs are generated in place."""
    generate(PROJECT_DIR / PACKAGE)
    return _write_wheel(wheel_directory,
                        {f"__editable__.{PACKAGE}.pth": f"{PROJECT_DIR}\n".encode("utf-8")})


def build_sdist(sdist_directory: str, config_settings: Optional[dict] = None) -> str:
    dist = _dist_name()
    name = f"{dist}.tar.gz"
    members = [Path("pyproject.toml"), Path(_metadata_fields()["readme"]),
               Path("build_backend/gradserve_build.py"), *_package_sources()]
    with tarfile.open(Path(sdist_directory) / name, "w:gz", format=tarfile.PAX_FORMAT) as sdist:
        def add(path_on_disk: Path, arcname: str) -> None:
            info = sdist.gettarinfo(str(path_on_disk), arcname=f"{dist}/{arcname}")
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with open(path_on_disk, "rb") as f:
                sdist.addfile(info, f)

        for member in members:  # The generated files are rebuilt from _sources/ by build_wheel.
            add(PROJECT_DIR / member, member.as_posix())
        for proto in PROTOS:
            add(_proto_root() / proto, f"_sources/proto/{proto}")
        add(_service_config(), "_sources/service_config.json")
        pkg_info = io.BytesIO(_metadata().encode("utf-8"))
        info = tarfile.TarInfo(f"{dist}/PKG-INFO")
        info.size = len(pkg_info.getvalue())
        sdist.addfile(info, pkg_info)
    return name


def _generate_command(argv: List[str]) -> int:
    if len(argv) > 1:
        print("usage: gradserve_build.py generate [DIR]", file=sys.stderr)
        return 2
    if not argv:
        written = generate(PROJECT_DIR / PACKAGE)
        print(f"generated {len(written)} files in {PROJECT_DIR / PACKAGE}")
        return 0
    out = Path(argv[0]).resolve() / PACKAGE
    # A complete package, not stubs alone: a stubs-only "gradserve" directory earlier on
    # sys.path would hide the package's own modules (a regular package is never merged).
    for relative in _package_sources():
        target = out.parent / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PROJECT_DIR / relative, target)
    written = generate(out)
    print(f"wrote the gradserve package with {len(written)} generated files to {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "generate":
        sys.exit(_generate_command(sys.argv[2:]))
    print("usage: gradserve_build.py generate [DIR]", file=sys.stderr)
    sys.exit(2)
