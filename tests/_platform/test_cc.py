"""_platform/cc.py: a C file built once per machine into a private cache, and every way it cannot be."""

import os
import shutil
import stat

import pytest

from mlx_dpo._platform import cc

SOURCE = "int twice(int x) { return 2 * x; }\n"


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(cc.ENV, raising=False)
    if cc.find_compiler() is None:
        pytest.skip("no C compiler on this machine")
    return tmp_path / "cache" / "mlx_dpo" / "kernels"


def test_built_once_in_a_private_folder_then_reused(tmp_path, cache_home, monkeypatch):
    src = tmp_path / "twice.c"
    src.write_text(SOURCE)
    lib, how = cc.build(str(src))
    assert lib is not None and lib.twice(21) == 42 and "-O3" in how
    built = list(cache_home.glob("twice-*.so"))
    assert len(built) == 1 and not os.stat(cache_home).st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    calls = []
    monkeypatch.setattr(cc, "compile_library", lambda *a: calls.append(a))
    assert cc.build(str(src))[0].twice(5) == 10 and calls == []  # the cached library, not a new build
    src.write_text(SOURCE.replace("2 * x", "3 * x"))  # an edited source builds afresh
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert cc.build(str(src))[0].twice(5) == 15 and len(list(cache_home.glob("twice-*.so"))) == 2


def test_a_source_that_does_not_compile_is_an_answer_not_an_error(tmp_path, cache_home):
    src = tmp_path / "broken.c"
    src.write_text("int broken( {\n")
    lib, why = cc.build(str(src))
    assert lib is None and why.startswith("the kernel did not build:") and "error" in why
    assert not list(cache_home.glob("*.so")) and not list(cache_home.glob(".build-*"))


def test_no_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv(cc.ENV, "off")
    src = tmp_path / "twice.c"
    src.write_text(SOURCE)
    assert cc.build(str(src)) == (None, f"no C compiler found (cc, gcc or clang; ${cc.ENV} names one)")
    monkeypatch.setenv(cc.ENV, "")
    monkeypatch.setenv("CC", "")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert cc.build(str(src))[0] is None
