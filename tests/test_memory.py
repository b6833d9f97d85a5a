"""Where OMC's buffers live: mapped codes, the decompression workspace."""

import mmap

import torch

from speechbrain_omc import OMCConfig, compress_module
from speechbrain_omc.codec.memory import Workspace, mapped_empty, trim_heap


def _mapping_of(tensor: torch.Tensor) -> tuple[str, int]:
    """(name, size) of the process mapping holding the tensor's first byte."""
    ptr = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            if lo <= ptr < hi:
                return (fields[5] if len(fields) > 5 else "anonymous"), hi - lo
    raise AssertionError("address not mapped")


def _pages(nbytes: int) -> int:
    return -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE


def test_workspace_reuses_a_buffer_only_once_every_view_is_gone():
    ws = Workspace()
    a = ws.take(1 << 16)
    b = ws.take(1 << 16)
    assert a.data_ptr() != b.data_ptr()  # both in use
    view, first = a[5:9], a.data_ptr()
    del a
    c = ws.take(1 << 16)
    assert c.data_ptr() not in (first, b.data_ptr())  # the view pins a's buffer
    del view
    assert ws.take(1 << 16).data_ptr() == first
    assert ws.nbytes == 3 * 4 * (1 << 16)


def test_workspace_trim_keeps_at_most_the_idle_budget():
    ws = Workspace(idle_bytes=4 * (1 << 16))
    held = [ws.take(1 << 16) for _ in range(4)]
    del held
    ws.trim()
    assert ws.nbytes == 4 * (1 << 16)
    live = ws.take(1 << 18)
    ws.trim()  # a buffer in use is never dropped
    assert ws.nbytes >= 4 * (1 << 18)
    live.fill_(1.0)
    assert float(live.sum()) == 1 << 18


def test_workspace_of_any_size_holds_one_buffer_per_type():
    """exact=False: a reader of entries of many sizes, one at a time, ends
    with one buffer of the largest size per type; a tensor still held is
    never handed out again."""
    ws = Workspace(exact=False)
    for numel in (1 << 16, 1 << 18, 1 << 17, 1 << 18, 1 << 16):
        codes = ws.take(numel, dtype=torch.uint8)
        values = ws.take(numel)
        assert values.dtype == torch.float32 and codes.dtype == torch.uint8
        del codes, values
    assert ws.nbytes == (1 << 18) + 4 * (1 << 18)
    held = ws.take(1 << 16)
    other = ws.take(1 << 16)  # the largest buffer is in use: a new one
    assert held.data_ptr() != other.data_ptr()
    del held, other
    assert ws.take(1 << 17).numel() == 1 << 17


def test_an_exact_workspace_pools_by_size_in_bytes():
    ws = Workspace()
    ptr = ws.take(1 << 16).data_ptr()  # float32: 256 KiB
    codes = ws.take(1 << 18, dtype=torch.uint8)  # the same 256 KiB
    assert codes.data_ptr() == ptr and ws.nbytes == 1 << 18


def test_small_requests_and_other_devices_use_torch_empty():
    ws = Workspace()
    assert ws.take(10).numel() == 10 and ws.nbytes == 0
    meta = ws.take(1 << 20, "meta")
    assert meta.device.type == "meta" and ws.nbytes == 0
    assert mapped_empty(10).numel() == 10


def test_mapped_empty_is_its_own_mapping_outside_the_heap():
    t = mapped_empty(1 << 20, torch.float32)
    t.fill_(2.5)
    assert t.shape == (1 << 20,) and float(t[-1]) == 2.5
    name, size = _mapping_of(t)
    assert name != "[heap]" and size >= _pages(4 << 20)
    assert _mapping_of(torch.empty(16))[0] == "[heap]"  # malloc's, for contrast
    assert isinstance(trim_heap(), bool)


def test_engine_keeps_codes_in_mapped_pages_and_reads_through_the_workspace():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 8))
    handle = compress_module(model, OMCConfig(format="e3m7"))
    big = handle.slots["0.weight"].codes.packed  # 90,112 bytes of e3m7 codes
    assert _mapping_of(big)[0] != "[heap]"
    handle.set_sgd(lr=0.1)
    for _ in range(3):
        model(torch.randn(4, 256)).sum().backward()
        handle.step()
    # One buffer served every forward and backward read of the big weight.
    assert handle.workspace.nbytes == 4 * 256 * 256
