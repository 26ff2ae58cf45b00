"""The Triton products of CUDA searches (`vfs.triton_products`): interpreted on this CPU in a process
of their own (tests/triton_interpreted.py), compiled where `VFS_TEST_DEVICE` names a GPU."""

import importlib.util
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from vfs import triton_products

TESTS = Path(__file__).parent
INTERPRETER_BUG = "only 0-dimensional arrays can be converted to Python scalars"
"""Triton 3.6's interpreter with numpy 2.4 (a GPU machine's torch 2.11): it passes a kernel's scalar
arguments as 1-element arrays, which `range` cannot take; Triton 3.8's runs the same kernels."""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed here")
def test_the_kernels_interpreted_on_the_cpu():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(TESTS / "triton_interpreted.py"),
        ],
        env=os.environ | {"TRITON_INTERPRET": "1"},
        cwd=TESTS.parent,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode and INTERPRETER_BUG in done.stdout and version("triton").startswith("3.6."):
        pytest.skip(f"Triton's interpreter fails here on loops over runtime bounds ({INTERPRETER_BUG!r})")
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]


def test_the_kernels_run_only_on_cuda_for_fp16_and_not_when_turned_off(monkeypatch):
    """Where they build (taken as given here: no GPU on CI), and only there."""
    checked = []
    monkeypatch.setattr(triton_products, "_builds", lambda device: checked.append(device) or True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert triton_products.runs_on(torch.device("cuda"), torch.float16)
    assert triton_products.runs_on(torch.device("cuda:0"), torch.float16)
    assert checked == [torch.device("cuda", 0)] * 2  # one check per GPU, however it is named
    assert not triton_products.runs_on(torch.device("cpu"), torch.float16)
    assert not triton_products.runs_on(torch.device("cuda"), torch.bfloat16)
    monkeypatch.setattr(triton_products, "_builds", lambda device: False)
    assert not triton_products.runs_on(torch.device("cuda"), torch.float16)
    monkeypatch.setattr(triton_products, "_builds", lambda device: True)
    monkeypatch.setenv("VFS_KERNEL", "off")
    assert not triton_products.runs_on(torch.device("cuda"), torch.float16)
    monkeypatch.setenv("VFS_KERNEL", "of")
    with pytest.raises(ValueError, match="VFS_KERNEL"):
        triton_products.runs_on(torch.device("cuda"), torch.float16)


def test_the_compiled_kernels_give_fp32_sums_on_the_gpu(device):
    """Compiled for the GPU the search runs on: the shapes of the bench grid's slices, against float64."""
    dev = torch.device(device)
    if dev.type != "cuda":
        pytest.skip("compiles the kernels for the GPU VFS_TEST_DEVICE names")
    assert triton_products.runs_on(dev, torch.float16), "the Triton products do not build on this GPU"
    g = torch.Generator(device=dev).manual_seed(0)
    for n, cells, c, k in ((300, 49, 2048, 9), (200, 196, 768, 14), (1000, 49, 192, 70)):
        images = torch.randn(n, cells, c, generator=g, device=dev).relu_().half()
        weights = torch.randn(k, c, generator=g, device=dev).half()
        rows = images.view(-1, c)
        out = triton_products.rows_product(weights, rows).double()
        exact = weights.double() @ rows.double().T
        assert ((out - exact).abs() <= c * 2.0**-24 * (weights.double().abs() @ rows.double().abs().T)).all()
        whole = torch.randn(cells, c, generator=g, device=dev).half()
        sums = triton_products.cell_sums(whole, images).double()
        exact = images.view(n, -1).double() @ whole.view(-1).double()
        size = images.view(n, -1).double().abs() @ whole.view(-1).double().abs()
        assert ((sums - exact).abs() <= (c + cells) * 2.0**-24 * size).all()
