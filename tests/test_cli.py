"""The command line works without a GPU: it says so and exits 0."""

from __future__ import annotations

import pytest
import torch

from flashcore.__main__ import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
@pytest.mark.parametrize("argv", [["bench", "--shape", "mission", "--iters", "5"], ["build"]])
def test_without_a_gpu_the_cli_explains_and_exits_0(argv, capsys):
    assert main(argv) == 0
    assert "No CUDA GPU" in capsys.readouterr().out
