"""hyclora.kernels.common.launch_tuned: the autotuner picks once per key, then direct launches."""

from __future__ import annotations

import functools

import torch

from hyclora.kernels import common

# nothing on disk: the process memo alone (tests/kernels/test_tuning_cache.py tests the disk)
launch = functools.partial(common.launch_tuned, cache=common.TuningCache(None))


class _Config:
    def __init__(self, block):
        self.block = block

    def all_kwargs(self):
        return {"BLOCK": self.block, "num_warps": 4}


class _Recorder:
    def __init__(self, log, tag):
        self.log, self.tag = log, tag

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.tag, grid, args, kwargs))


class _FakeTuner(_Recorder):
    """What launch_tuned reads of triton's Autotuner: arg_names, keys, best_config, fn, [grid]."""

    arg_names = ["x_ptr", "M", "N", "BITS", "BLOCK"]
    keys = ["N", "BITS"]

    def __init__(self, log):
        super().__init__(log, "tuner")
        self.fn = _Recorder(log, "direct")
        self.best_config = None

    def __getitem__(self, grid):
        launch = super().__getitem__(grid)

        def run(*args, **kwargs):
            launch(*args, **kwargs)
            self.best_config = _Config(64 if args[2] > 100 else 16)  # "tuned" per N
        return run


def test_autotuner_once_per_key_then_direct_launches():
    common.forget_tuned()
    log = []
    tuner = _FakeTuner(log)
    x16, x32 = torch.zeros(1, dtype=torch.float16), torch.zeros(1)
    grid = lambda meta: (1,)  # noqa: E731
    launch(tuner, grid, (x16, 7, 128), {"BITS": 2})
    launch(tuner, grid, (x16, 9, 128), {"BITS": 2})  # M is not in the key
    assert [e[0] for e in log] == ["tuner", "direct"]
    assert log[1][3] == {"BITS": 2, "BLOCK": 64, "num_warps": 4} and log[1][2] == (x16, 9, 128)
    for args, kwargs in (((x16, 7, 32), {"BITS": 2}),    # another N
                         ((x16, 7, 128), {"BITS": 4}),   # another key constexpr
                         ((x32, 7, 128), {"BITS": 2})):  # another dtype
        log.clear()
        launch(tuner, grid, args, kwargs)
        launch(tuner, grid, args, kwargs)
        assert [e[0] for e in log] == ["tuner", "direct"], (args, kwargs)
    assert log[1][3]["BLOCK"] == 64
    log.clear()
    launch(tuner, grid, (x16, 7, 32), {"BITS": 2})
    assert log[0][0] == "direct" and log[0][3]["BLOCK"] == 16  # N=32's own config
    common.forget_tuned()
    launch(tuner, grid, (x16, 7, 32), {"BITS": 2})
    assert log[-1][0] == "tuner"
