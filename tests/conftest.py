"""Fixtures shared across the test folders."""

import os

import pytest
import torch

from tests.e2e.e2ehelpers import CHROMIUM, CHROMIUM_ARGS


@pytest.fixture(scope="session", autouse=True)
def fp16_operands():
    """In-process searches run fp16 products whatever this CPU's `auto` choice is (bf16 on some), so
    every fast score a test compares is the same on every machine; the bf16 tests ask for bf16
    themselves, and servers the browser tests start run the default."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("vfs.search.fast_dtype", lambda *a: torch.float16)
        yield


@pytest.fixture(scope="session")
def device() -> str:
    """Where the engine's search tests run: `VFS_TEST_DEVICE=cuda` runs them on a GPU (CI has none;
    bench/gpu_all.sh does it on a lent one). Asking for a device this machine lacks fails."""
    name = os.environ.get("VFS_TEST_DEVICE", "cpu")
    if name != "cpu" and not getattr(torch, torch.device(name).type).is_available():
        pytest.fail(f"VFS_TEST_DEVICE={name}, but torch sees no {name} device here")
    return name


@pytest.fixture
def force_form(monkeypatch):
    """`force_form("cells")`: every search of the test runs that exact form (`plan_query` answers
    it; "pairs" needs the kernel built here)."""
    from vfs.scoring import QueryPlan

    def force(method: str) -> None:
        monkeypatch.setattr("vfs.search.plan_query", lambda *a: QueryPlan(method))

    return force


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for every browser test of the session (dashboard and notebook):
    Playwright's sync API runs one instance per thread, so two folders cannot each start one."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: apt-get install -y chromium chromium-driver")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()
