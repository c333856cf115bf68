"""The autotuner's choices across padded lengths and runs (issue 23): token buckets in the key, the
JSON cache on disk (round trip, corrupt / foreign files, device and Triton version in the key),
the progress line, and a real autotuned kernel under the interpreter."""

from __future__ import annotations

import json
import logging
import os
import warnings

import pytest
import torch

from hyclora.kernels import common

triton = pytest.importorskip("triton")


class _Config:
    def __init__(self, block, warps=4):
        self.block, self.warps = block, warps

    def all_kwargs(self):
        return {"BLOCK": self.block, "num_warps": self.warps}


class _Recorder:
    def __init__(self, log, tag):
        self.log, self.tag = log, tag

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.tag, args, kwargs))


def _fake_pack_kernel(x_ptr, M, N, BITS, BLOCK):  # noqa: N803 - the kernel's argument names
    """Named like a kernel: launch_tuned names the cache file after it."""


class _FakeTuner(_Recorder):
    """What launch_tuned reads of triton's Autotuner: arg_names, keys, configs, base_fn, fn, cache,
    best_config, [grid]. "Tuning" picks the config of BLOCK 64, and records how full Triton's own
    memo was when it ran."""

    arg_names = ["x_ptr", "M", "N", "BITS", "BLOCK"]
    keys = ["N", "BITS"]
    base_fn = staticmethod(_fake_pack_kernel)

    def __init__(self, log):
        super().__init__(log, "tuner")
        self.fn = _Recorder(log, "direct")
        self.configs = [_Config(16), _Config(64), _Config(64, warps=8)]
        self.cache = {}
        self.best_config = None
        self.memo_sizes = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("tuner", args, kwargs))
            self.memo_sizes.append(len(self.cache))
            self.cache[("key", len(self.cache))] = self.best_config = self.configs[1]
        return run


GRID = lambda meta: (1,)  # noqa: E731
X = torch.zeros(1, dtype=torch.float16)
CPU_TAG = common.device_tag(torch.device("cpu"))


@pytest.fixture(autouse=True)
def _fresh_memo():
    common.forget_tuned()
    yield
    common.forget_tuned()


def _launch(tuner, m, cache, n=128, bits=2):
    common.launch_tuned(tuner, GRID, (X, m, n), {"BITS": bits}, tokens=m, cache=cache)


def _kinds(log):
    return [e[0] for e in log]


def test_token_buckets():
    assert [common.token_bucket(m) for m in (1, 1024, 1025, 4096, 4097, 16384, 70000)] == \
        [1024, 1024, 4096, 4096, 16384, 16384, 262144]


def test_new_lengths_in_one_bucket_reuse_the_choice_with_their_own_m(tmp_path):
    log, cache = [], common.TuningCache(str(tmp_path))
    tuner = _FakeTuner(log)
    _launch(tuner, 1500, cache)
    _launch(tuner, 3000, cache)  # another padded length, same bucket (<= 4096)
    assert _kinds(log) == ["tuner", "direct"]
    assert log[1][1] == (X, 3000, 128) and log[1][2] == {"BITS": 2, "BLOCK": 64, "num_warps": 4}
    _launch(tuner, 5000, cache)  # the next bucket is tuned on its own
    assert _kinds(log) == ["tuner", "direct", "tuner"]
    # Triton's own memo (keyed without the bucket) was emptied before each tuning
    assert tuner.memo_sizes == [0, 0]


def test_choice_survives_a_new_process_without_tuning(tmp_path):
    log = []
    tuner = _FakeTuner(log)
    _launch(tuner, 2000, common.TuningCache(str(tmp_path)))
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith("-fake_pack.json")
    common.forget_tuned()  # a new process: empty memo, the file read again
    log.clear()
    fresh = common.TuningCache(str(tmp_path))
    _launch(tuner, 3100, fresh)
    _launch(tuner, 2500, fresh)
    assert _kinds(log) == ["direct", "direct"] and log[0][2]["BLOCK"] == 64 and log[0][1][1] == 3100
    _launch(tuner, 2000, fresh, bits=4)  # another key: not on disk
    assert _kinds(log)[-1] == "tuner"
    data = json.loads((tmp_path / files[0]).read_text())
    assert data["kernel"] == "fake_pack" and data["triton"] == triton.__version__
    assert sorted(data["entries"].values(), key=str) == [{"BLOCK": 64, "num_warps": 4}] * 2
    assert any("N=128,BITS=4,M<=4096|float16" in k for k in data["entries"])


def test_the_default_folder_is_used_when_none_is_given(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "_disk_cache", common.TuningCache(str(tmp_path)))
    log = []
    common.launch_tuned(_FakeTuner(log), GRID, (X, 7, 128), {"BITS": 2}, tokens=7)
    assert _kinds(log) == ["tuner"] and len(os.listdir(tmp_path)) == 1


@pytest.mark.parametrize("content, match", [
    ("{not json", "ignoring the tuning cache"),
    (json.dumps([1, 2]), "ignoring the tuning cache"),
    (json.dumps(dict(format=1, kernel="fake_pack", **dict(CPU_TAG, device="NVIDIA A100-SXM4-80GB"),
                     entries={})), "written for"),
    (json.dumps(dict(format=1, kernel="fake_pack", **dict(CPU_TAG, triton="2.0.0"), entries={})), "written for"),
])
def test_unreadable_or_foreign_files_are_ignored_with_a_warning(tmp_path, content, match):
    cache = common.TuningCache(str(tmp_path))
    path = cache.path(CPU_TAG, "fake_pack")
    with open(path, "w") as f:
        f.write(content)
    log = []
    with pytest.warns(UserWarning, match=match):
        _launch(_FakeTuner(log), 2000, cache)
    assert _kinds(log) == ["tuner"]
    data = json.loads(open(path).read())  # rewritten, readable, ours
    assert data["device"] == CPU_TAG["device"] and data["triton"] == triton.__version__ and len(data["entries"]) == 1


def test_a_stored_config_the_kernel_does_not_list_is_not_launched(tmp_path):
    log = []
    tuner = _FakeTuner(log)
    _launch(tuner, 2000, common.TuningCache(str(tmp_path)))
    path = common.TuningCache(str(tmp_path)).path(CPU_TAG, "fake_pack")
    data = json.loads(open(path).read())
    (entry,) = data["entries"]
    data["entries"][entry] = {"BLOCK": 4096, "num_warps": 4}  # not in tuner.configs
    with open(path, "w") as f:
        json.dump(data, f)
    common.forget_tuned()
    log.clear()
    with pytest.warns(UserWarning, match="not one of the kernel's configs"):
        _launch(tuner, 2000, common.TuningCache(str(tmp_path)))
    assert _kinds(log) == ["tuner"]
    assert json.loads(open(path).read())["entries"][entry] == {"BLOCK": 64, "num_warps": 4}


def test_a_changed_kernel_source_is_tuned_again(tmp_path, monkeypatch):
    log = []
    tuner = _FakeTuner(log)
    _launch(tuner, 2000, common.TuningCache(str(tmp_path)))
    common.forget_tuned()
    monkeypatch.setattr(common, "_source_hash", lambda tuner: "another-source")
    _launch(tuner, 2000, common.TuningCache(str(tmp_path)))
    assert _kinds(log) == ["tuner", "tuner"]


def test_the_file_is_named_after_device_capability_triton_and_kernel(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    h100 = common.device_tag(torch.device("cuda", 0))
    assert h100 == {"device": "NVIDIA H100 80GB HBM3", "capability": "9.0", "triton": triton.__version__}
    cache = common.TuningCache(str(tmp_path))
    path = os.path.basename(cache.path(h100, "quant_pack"))
    assert path == f"NVIDIA_H100_80GB_HBM3-sm9.0-triton{triton.__version__}-quant_pack.json"
    assert len({cache.path(tag, "quant_pack") for tag in (h100, dict(h100, device="NVIDIA H200"),
                                                           dict(h100, capability="8.0"), dict(h100, triton="3.5.0"),
                                                           CPU_TAG)}) == 5
    assert cache.path(h100, "quant_pack") != cache.path(h100, "unpack_dequant")


def test_ranks_writing_one_file_keep_each_others_entries(tmp_path):
    a, b = common.TuningCache(str(tmp_path)), common.TuningCache(str(tmp_path))
    a.lookup(CPU_TAG, "k", "x", [])  # both read the (missing) file before either writes
    b.lookup(CPU_TAG, "k", "x", [])
    a.store(CPU_TAG, "k", "from-a", {"BLOCK": 16})
    b.store(CPU_TAG, "k", "from-b", {"BLOCK": 64})
    entries = json.loads(open(a.path(CPU_TAG, "k")).read())["entries"]
    assert entries == {"from-a": {"BLOCK": 16}, "from-b": {"BLOCK": 64}}
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]  # no temporary file left


def test_an_unwritable_folder_warns_once_and_tunes_in_memory(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cache = common.TuningCache(str(blocker / "autotune"))  # a folder below a file cannot exist
    log = []
    tuner = _FakeTuner(log)
    with pytest.warns(UserWarning, match="cannot write the tuning cache"):
        _launch(tuner, 2000, cache)
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        _launch(tuner, 3000, cache)
        _launch(tuner, 2000, cache, bits=4)  # tuned, kept in memory, not written: no second warning
    assert not later and _kinds(log) == ["tuner", "direct", "tuner"]


def test_one_progress_line_per_kernel_and_bucket_none_from_the_cache(tmp_path, caplog):
    log = []
    tuner = _FakeTuner(log)
    cache = common.TuningCache(str(tmp_path))
    with caplog.at_level(logging.INFO, logger="hyclora.kernels.tuning"):
        for m in (1500, 3000, 4000):
            _launch(tuner, m, cache)
        _launch(tuner, 5000, cache)
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 2, lines
        assert lines[0].startswith("hyclora: tuning fake_pack[N=128,BITS=2,M<=4096] over 3 configs")
        assert "M<=16384" in lines[1] and str(tmp_path) in lines[1]
        common.forget_tuned()
        caplog.clear()
        fresh = common.TuningCache(str(tmp_path))
        _launch(tuner, 2000, fresh)
        _launch(tuner, 9000, fresh)
        assert not caplog.records  # everything from the cache: silent


@pytest.mark.skipif(not common.INTERPRET, reason="runs the kernel on CPU under TRITON_INTERPRET=1")
def test_a_real_autotuned_kernel_same_output_for_lengths_of_one_bucket(tmp_path):
    from hyclora.quant import core, triton_kernels

    timings = iter([2.0, 1.0] * 10)  # "measured": the second config wins every tuning
    benched = []

    def fake_bench(kernel_call, quantiles):
        kernel_call()
        benched.append(1)
        t = next(timings)
        return [t, t, t]

    configs = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "ROW_ITERS": 1}, num_warps=4),
               triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "ROW_ITERS": 2}, num_warps=4)]
    tuner = triton.autotune(configs=configs, key=["N", "BITS", "GROUP"], do_bench=fake_bench)(
        triton_kernels._quant_pack_kernel)
    n, bits = 48, 2
    lo = torch.linspace(-2.0, -1.0, n)
    inv = torch.linspace(0.5, 1.5, n)

    def pack(m, cache):
        x = torch.randn(m, n, generator=torch.Generator().manual_seed(m))
        out = torch.empty((m, triton_kernels.packed_width(n, bits)), dtype=torch.uint8)

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"] * meta["ROW_ITERS"]), triton.cdiv(n, meta["BLOCK_N"]))
        common.launch_tuned(tuner, grid, (x, lo, inv, out, m, n, out.shape[1], x.stride(0), 1),
                            dict(BITS=bits, GROUP=0), tokens=m, cache=cache)
        assert torch.equal(out, core.quantize_pack_torch(x, lo, inv, bits)), m

    cache = common.TuningCache(str(tmp_path))
    pack(37, cache)  # tuned: both configs timed
    assert len(benched) == 2 and tuner.best_config.kwargs["BLOCK_N"] == 32
    assert [f.rsplit("-", 1)[1] for f in os.listdir(tmp_path)] == ["quant_pack.json"]
    pack(53, cache)  # same bucket, another length: the stored tiles, masks on the real M
    assert len(benched) == 2
    common.forget_tuned()
    pack(29, common.TuningCache(str(tmp_path)))  # a new process: from disk, nothing timed
    assert len(benched) == 2


def test_examples_show_the_tuning_progress_line(capsys):
    import logging

    from hyclora.training.run import show_hyclora_info

    ours = logging.getLogger("hyclora")
    root_handlers, our_handlers, level = logging.getLogger().handlers[:], ours.handlers[:], ours.level
    logging.getLogger().handlers.clear()
    ours.handlers.clear()
    try:
        show_hyclora_info()
        logging.getLogger("hyclora.kernels.tuning").info("hyclora: tuning k[N=8,M<=1024] over 2 configs")
        assert "hyclora: tuning k[N=8,M<=1024]" in capsys.readouterr().err
        show_hyclora_info()  # once configured, left alone
        assert len(ours.handlers) == 1
    finally:
        ours.handlers[:] = our_handlers
        ours.setLevel(level)
        logging.getLogger().handlers[:] = root_handlers
