"""esper.train's compile cache directory and its compile-time line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default

from esper.compile_cache import CACHE_ENV, compile_line, default_cache_dir, use_stable_cache


@pytest.mark.parametrize(("before", "after"), [
    (None, default_cache_dir()),  # unset
    (torch_default(), default_cache_dir()),  # torch's /tmp default, written by an import
    ("/somewhere/else", Path("/somewhere/else")),  # the user's choice stands
])
def test_cache_dir_is_stable_unless_chosen(monkeypatch: pytest.MonkeyPatch, before: str | None, after: Path) -> None:
    if before is None:
        monkeypatch.delenv(CACHE_ENV, raising=False)
    else:
        monkeypatch.setenv(CACHE_ENV, before)
    assert use_stable_cache() == after
    assert Path(os.environ[CACHE_ENV]) == after
    assert default_cache_dir() == Path.home() / ".cache" / "esper" / "inductor"


def test_compile_line_takes_the_compile_out_of_the_throughput() -> None:
    # 120 env-epochs at 2/s took 60 s, 40 of them compiling: 6 env-epochs/s without it.
    assert compile_line(1, 40.0, 120, 2.0) == "compiled 1 graph in 40.0s; 6.0 env-epochs/s without it"
    assert compile_line(2, 0.5, 10, 10.0).startswith("compiled 2 graphs in 0.5s; 20.0 env-epochs/s")
