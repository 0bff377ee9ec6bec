"""Finding and loading a fast BLAS: bounded discovery, the CPU check, the SONAME copy, the routes."""

import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_dpo._platform import blas as _blas
from mlx_dpo._platform import elf as _elf
from tests.support import ROOT

LINUX = sys.platform.startswith("linux")
needs_linux = pytest.mark.skipif(not LINUX, reason="the BLAS preload is Linux-only")

# A float32 product and a LAPACK call through MLX, against float64 NumPy.
CHECK = """
import json, mlx_dpo, numpy as np, mlx.core as mx
rng = np.random.default_rng(0)
a, b = rng.normal(size=(300, 200)).astype(np.float32), rng.normal(size=(200, 150)).astype(np.float32)
product = float(np.abs(np.array(mx.array(a) @ mx.array(b)) - a.astype(np.float64) @ b.astype(np.float64)).max())
m = rng.normal(size=(40, 40)) + 40 * np.eye(40)
inverse = np.array(mx.linalg.inv(mx.array(m.astype(np.float32)), stream=mx.cpu))
lapack = float(np.abs(inverse - np.linalg.inv(m)).max())
print(json.dumps({"status": list(mlx_dpo._platform.blas.status), "product": product, "lapack": lapack}))
"""


def run_check(route):
    env = {k: v for k, v in os.environ.items() if k != "MLX_DPO_BLAS"}
    if route is not None:
        env["MLX_DPO_BLAS"] = route
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("route", [None, "off", "system", "wheel", "mkl"])
def test_every_route_computes_what_numpy_computes(route):
    result = run_check(route)
    kind, detail = result["status"]
    assert result["product"] < 1e-3 and result["lapack"] < 1e-4
    if route == "off":
        assert kind == "off"
    elif LINUX:
        # A route that is not here says why; one that is here must load.
        assert kind in ("loaded", "missing"), detail
        assert detail  # the library loaded, or why each route was passed over
        if kind == "loaded" and route is not None:
            assert detail.endswith(f"({route})")


@needs_linux
def test_the_default_route_loads_the_wheel_where_this_cpu_runs_it():
    """pip installs cmeel-openblas on Linux; without a system OpenBLAS it must be used where it runs."""
    found, why = _blas.wheel_openblas()
    if found is None:
        assert "this CPU lacks" in why  # the only allowed reason: the build's CPU target is not this CPU
    else:
        assert found.preload[-1].endswith("libgfortran.so.5")
        assert _elf.soname(found.preload[-1]) == "libgfortran.so.5"


CMEEL_ONLY = _blas.WHEELS[:1]  # the single-target build alone: the checks of its target


def write_fake_openblas(folder: Path, config: bytes) -> Path:
    lib = folder / "cmeel.prefix" / "lib"
    lib.mkdir(parents=True)
    path = lib / "libopenblas.so.0"
    path.write_bytes(b"\0junk\0" + config + b"\0\0more\0SKYLAKEX\0HASWELL\0")
    return path


@pytest.mark.parametrize(
    "config, target",
    [
        (b"OpenBLAS 0.3.31 NO_AFFINITY SKYL", "SKYLAKEX"),  # the core name's string merged by the linker
        (b"OpenBLAS 0.3.29 NO_AFFINITY ZEN", "ZEN"),
        (b"OpenBLAS 0.3.21 NO_LAPACKE DYNAMIC_ARCH NO_AFFIN", "DYNAMIC_ARCH"),
        (b"OpenBLAS 0.3.31 NO_AFFINITY NEOVERSEN2", "NEOVERSEN2"),
        (b"OpenBLAS 0.3.31 NO_AFFINITY LOONGSON3R5", "LOONGSON3R5"),  # unknown: reported as is
    ],
)
def test_the_build_target_is_read_without_loading(tmp_path, config, target):
    assert _blas.openblas_target(str(write_fake_openblas(tmp_path, config))) == target


def test_a_build_for_a_newer_cpu_is_passed_over_with_the_reason(tmp_path, monkeypatch):
    write_fake_openblas(tmp_path, b"OpenBLAS 0.3.31 NO_AFFINITY SKYL")
    monkeypatch.setattr(_blas, "WHEELS", CMEEL_ONLY)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    monkeypatch.setattr(_blas, "cpu_flags", lambda: {"sse4_2", "avx", "avx2", "fma"})  # an AVX2-only CPU
    found, why = _blas.wheel_openblas()
    assert found is None
    assert "SKYLAKEX" in why and "avx512f" in why and "avx2" not in why.split("lacks")[1]


def test_an_unknown_build_target_is_never_loaded(tmp_path, monkeypatch):
    write_fake_openblas(tmp_path, b"OpenBLAS 0.3.31 NO_AFFINITY LOONGSON3R5")
    monkeypatch.setattr(_blas, "WHEELS", CMEEL_ONLY)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    found, why = _blas.wheel_openblas()
    assert found is None and "unknown CPU target (LOONGSON3R5)" in why


@needs_linux
def test_a_fitting_build_gets_mlx_wheels_libgfortran_renamed(tmp_path, monkeypatch):
    write_fake_openblas(tmp_path, b"OpenBLAS 0.3.31 NO_AFFINITY SKYL")
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    monkeypatch.setattr(_blas, "cpu_flags", lambda: set(_blas.TARGET_NEEDS["SKYLAKEX"]))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    found, why = _blas.wheel_openblas()
    assert why == "" and found.route == "wheel" and found.path.startswith(str(tmp_path))
    gfortran = found.preload[-1]
    assert gfortran.startswith(str(tmp_path / "cache" / "mlx_dpo" / "blas"))
    assert _elf.soname(gfortran) == "libgfortran.so.5"
    assert any("libquadmath" in p for p in found.preload[:-1])


# A folder tree like Debian's /usr/lib with LLVM installed: directory links that
# loop (llvm-14/build/Release -> ..) and no OpenBLAS anywhere.
DISCOVERY = """
import json, sys, time
from mlx_dpo._platform import blas as _blas
root = sys.argv[1]
_blas.SYSTEM_PATHS = tuple(f"{root}/usr/lib/{p}/libopenblas.so.0" for p in ("x86_64-linux-gnu", "llvm-14/build/Release"))
sys.path[:] = [f"{root}/usr/lib/llvm-14/build/Release", f"{root}/usr/lib"]
sys.prefix = sys.base_prefix = f"{root}/usr"
_blas._ldconfig = lambda name: None  # the machine's own linker cache is not part of the tree
start = time.perf_counter()
found, why = _blas.find("")
print(json.dumps({"seconds": time.perf_counter() - start, "found": found, "why": why}))
"""


def test_discovery_is_bounded_in_a_tree_with_a_symlink_loop(tmp_path):
    lib = tmp_path / "usr" / "lib"
    build = lib / "llvm-14" / "build"
    build.mkdir(parents=True)
    (lib / "x86_64-linux-gnu").mkdir()
    (build / "Release").symlink_to("..")
    (build / "Debug+Asserts").symlink_to("..")
    (lib / "x86_64-linux-gnu" / "up").symlink_to("../..")
    out = subprocess.run([sys.executable, "-c", DISCOVERY, str(tmp_path)], capture_output=True, text=True, timeout=30, check=True)
    result = json.loads(out.stdout)
    assert result["found"] is None
    assert result["why"][:2] == ["no system OpenBLAS", "cmeel-openblas not installed; ngsolve-openblas not installed"]
    assert result["seconds"] < 2


@needs_linux
def test_elf_copy_changes_only_the_soname(tmp_path):
    libs = Path(_blas._in_sys_path("mlx_cpu.libs"))
    src = sorted(libs.glob("libgfortran*.so*"))[0]
    dst = tmp_path / "libgfortran.so.5"
    _elf.copy_with_soname(str(src), str(dst), "libgfortran.so.5")
    old, new = src.read_bytes(), dst.read_bytes()
    assert _elf.soname(str(src)) == src.name and _elf.soname(str(dst)) == "libgfortran.so.5"
    changed = [i for i, (x, y) in enumerate(zip(old, new)) if x != y]
    start = old.index(src.name.encode() + b"\0")
    assert len(old) == len(new) and changed and start <= changed[0] and changed[-1] < start + len(src.name)
    with pytest.raises(ValueError, match="longer"):
        _elf.copy_with_soname(str(src), str(tmp_path / "x"), "x" * 200)
    with pytest.raises(ValueError, match="not a 64-bit"):
        _elf.soname(__file__)


def test_missing_blas_warns_with_what_to_run_and_what_it_gains():
    env = {**os.environ, "MLX_DPO_BLAS": "/nonexistent/libopenblas.so"}
    code = "import mlx_dpo; print(mlx_dpo._platform.blas.status[0]); print(mlx_dpo._platform.blas.describe())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    if LINUX:
        status, line = out.splitlines()
        assert status == "failed" and line.startswith("[WARNING]")
        assert "sudo apt-get install libopenblas0-pthread" in line and "pip install mkl" in line and "faster" in line


def test_nothing_found_names_each_route_passed_over(monkeypatch):
    monkeypatch.setattr(_blas, "FINDERS", {r: (lambda r=r: (None, f"no {r}")) for r in _blas.ROUTES})
    assert _blas.find("") == (None, ["no system", "no wheel", "no mkl"])
    monkeypatch.setattr(_blas, "status", ("missing", "no system; no wheel; no mkl"))
    assert "no fast BLAS for this CPU (no system; no wheel; no mkl)" in _blas.describe()


@needs_linux
def test_the_library_cache_refuses_folders_others_could_write_or_own(tmp_path):
    assert _blas.private_folder(str(tmp_path / "new" / "blas"))  # made, for this user alone
    assert (tmp_path / "new" / "blas").stat().st_mode & 0o777 == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    assert not _blas.private_folder(str(shared))
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "new" / "blas")
    assert not _blas.private_folder(str(link))
    if os.getuid() == 0:  # only root can give a folder away
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 12345, -1)
        assert not _blas.private_folder(str(foreign))


@needs_linux
def test_a_planted_library_of_the_same_size_is_replaced_before_it_loads(tmp_path):
    data = bytes(range(256)) * 64
    path = _blas.cached_copy(str(tmp_path), "libgfortran.so.5", data)
    assert Path(path).read_bytes() == data
    Path(path).write_bytes(bytes(len(data)))  # another library, the same size
    assert _blas.cached_copy(str(tmp_path), "libgfortran.so.5", data) == path
    assert Path(path).read_bytes() == data
    assert [p.name for p in Path(path).parent.iterdir()] == ["libgfortran.so.5"]  # no temporary left behind


@needs_linux
def test_a_shared_cache_home_falls_back_to_a_private_folder(tmp_path, monkeypatch):
    shared = tmp_path / "cache"
    (shared / "mlx_dpo" / "blas").mkdir(parents=True)
    (shared / "mlx_dpo" / "blas").chmod(0o777)
    monkeypatch.setenv("XDG_CACHE_HOME", str(shared))
    monkeypatch.setattr(_blas.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    assert _blas.cache_dir() == str(tmp_path / "tmp" / f"mlx_dpo-blas-{os.getuid()}")


AVX2_ONLY = {"sse4_2", "avx", "avx2", "fma"}


@needs_linux
def test_an_avx2_cpu_passes_over_the_avx512_build_and_loads_the_dynamic_arch_one(tmp_path, monkeypatch):
    write_fake_openblas(tmp_path, b"OpenBLAS 0.3.31 NO_AFFINITY SKYL")
    dynamic = tmp_path / "ngsolve_openblas"
    dynamic.mkdir()
    (dynamic / "libopenblasp-r0.3.33.so").write_bytes(b"\0OpenBLAS 0.3.33 DYNAMIC_ARCH NO_AFFINITY Haswell\0")
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    monkeypatch.setattr(_blas, "cpu_flags", lambda: AVX2_ONLY)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    found, why = _blas.wheel_openblas()
    assert why == "" and found.route == "wheel" and found.path == str(dynamic / "libopenblasp-r0.3.33.so")
    monkeypatch.setattr(_blas, "cpu_flags", lambda: AVX2_ONLY | set(_blas.TARGET_NEEDS["SKYLAKEX"]))
    assert _blas.wheel_openblas()[0].path.endswith("libopenblas.so.0")  # AVX-512: the single-target build first
    (dynamic / "libopenblasp-r0.3.33.so").unlink()
    monkeypatch.setattr(_blas, "cpu_flags", lambda: AVX2_ONLY)
    found, why = _blas.wheel_openblas()
    assert found is None and "cmeel-openblas is built for SKYLAKEX and this CPU lacks avx512f" in why
    assert "ngsolve-openblas not installed" in why


def pinned() -> dict:
    """The BLAS wheels pyproject.toml pins: name -> (version, the platform_machine it is for)."""
    text = (ROOT / "pyproject.toml").read_text()
    return {m[0]: (m[1], m[2]) for m in re.findall(r'"([a-z-]+openblas)==([0-9.a-z]+);[^"]*platform_machine == \'(\w+)\'', text)}


def test_the_pinned_blas_wheels_are_builds_whose_target_the_loader_reads():
    pins = pinned()
    assert set(pins) == {"ngsolve-openblas", "cmeel-openblas"}
    assert pins["ngsolve-openblas"][1] == "x86_64" and pins["cmeel-openblas"][1] == "aarch64"
    machine = platform.machine()
    checked = 0
    for (name, parts), expected in zip(_blas.WHEELS, ("NEOVERSEN2", "DYNAMIC_ARCH")):
        version, arch = pins[name]
        if arch != machine or not LINUX:
            continue
        assert importlib.metadata.version(name) == version  # what pip installed is the pinned build
        folder = _blas._in_sys_path(*parts[:-1])
        path = sorted(Path(folder).glob(parts[-1]))[0]
        assert _blas.openblas_target(str(path)) == expected
        checked += 1
    if LINUX and machine in ("x86_64", "aarch64"):
        assert checked == 1
