"""The host's kind and the arithmetic chosen from it: the engine's screen product, ``auto``
extraction, the warning for an emulated precision."""
from __future__ import annotations

import logging

import pytest
import torch

from fol_plugin import host
from fol_plugin.features import ExtractionConfig
from fol_plugin.features.extract import extraction_precision, warn_if_emulated

ZEN3 = ("AMD EPYC 7B13", ("avx2", "fma"))
ZEN4 = ("AMD EPYC 9B14", ("avx512_bf16", "avx512_vnni", "avx512f", "avx2", "fma"))
SAPPHIRE_RAPIDS = ("Intel Xeon Platinum 8481C", ("amx_bf16", "amx_int8", "avx512_bf16", "avx512f", "avx2", "fma"))
ICE_LAKE = ("Intel Xeon Platinum 8373C", ("avx512_vnni", "avx512f", "avx2", "fma"))


@pytest.fixture
def on_host(monkeypatch):
    """``on_host(cpuinfo, **environment)``: this process sees that CPU and those library caps."""

    def use(cpuinfo, **environment) -> host.Host:
        monkeypatch.setattr(host, "_read_cpuinfo", lambda: cpuinfo)
        for name in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", host.PRODUCT_ENV):
            monkeypatch.delenv(name, raising=False)
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        return host.detect_host()

    return use


@pytest.mark.parametrize(
    ("cpuinfo", "kind", "product"),
    [(ZEN3, "AVX2", "fp32"), (ICE_LAKE, "AVX-512", "fp32"), (ZEN4, "AVX-512 BF16", "bf16"), (SAPPHIRE_RAPIDS, "AMX", "bf16")],
)
def test_each_kind_screens_with_its_native_product(on_host, cpuinfo, kind, product):
    found = on_host(cpuinfo)
    assert (found.kind, found.emulated) == (kind, False)
    assert host.screen_product() == product
    assert host.auto_extraction_precision() == product


def test_library_caps_make_a_host_compute_as_a_lower_kind(on_host):
    for kind, environment in host.EMULATION_ENV.items():
        found = on_host(SAPPHIRE_RAPIDS, **environment)
        assert (found.kind, found.emulated) == (kind, True)
        assert found.describe() == f"{kind} (emulated on AMX)"
    assert on_host(ZEN4, ONEDNN_MAX_CPU_ISA="AVX2").kind == "AVX2"
    assert on_host(ZEN4, ATEN_CPU_CAPABILITY="avx2").kind == "AVX2"
    assert on_host(ZEN4, ONEDNN_MAX_CPU_ISA="ALL").kind == "AVX-512 BF16"
    assert on_host(ZEN3, ONEDNN_MAX_CPU_ISA="AVX512_CORE_AMX").kind == "AVX2"  # a cap never raises a kind
    assert host.screen_product() == "fp32"


def test_emulable_kinds_are_those_below(on_host):
    assert host.emulable_kinds(on_host(SAPPHIRE_RAPIDS)) == ("AVX-512 BF16", "AVX-512", "AVX2")
    assert host.emulable_kinds(on_host(ZEN4)) == ("AVX-512", "AVX2")
    assert host.emulable_kinds(on_host(ZEN3)) == ()
    assert host.emulable_kinds(on_host(ZEN4, ONEDNN_MAX_CPU_ISA="AVX2")) == ()  # already emulated


def test_the_environment_forces_the_screen_product(on_host, monkeypatch):
    on_host(ZEN3)
    monkeypatch.setenv(host.PRODUCT_ENV, "bf16")
    assert host.screen_product() == "bf16"
    monkeypatch.setenv(host.PRODUCT_ENV, "int8")
    with pytest.raises(host.HostSettingError, match="FOL_RERANK_PRODUCT='int8'; choose one of bf16, fp32 or unset it"):
        host.screen_product()


def test_without_cpu_flags_a_measurement_decides_and_is_cached(on_host, monkeypatch, user_cache):
    on_host(None)
    timed = []

    def fake_time(dtype: torch.dtype) -> float:
        timed.append(dtype)
        return {torch.float32: 1.0, torch.bfloat16: 9.0, torch.float16: 4.0}[dtype]

    monkeypatch.setattr(host, "_time_product", fake_time)
    assert host.detect_host().native_bf16 is None
    assert host.screen_product() == "fp32"
    assert host.product_slowdown("bf16") == 9.0 and len(timed) == 2
    assert host.screen_product() == "fp32" and len(timed) == 2  # read back, not measured again
    assert list((user_cache / host.MEASUREMENTS_FOLDER).glob("*.json"))


def test_a_real_measurement_is_a_positive_ratio(on_host):
    on_host(ZEN4)
    assert host.product_slowdown("bf16") > 0


def test_auto_extraction_resolves_per_device(on_host):
    on_host(ZEN3)
    assert extraction_precision(ExtractionConfig(precision="auto")) == "fp32"
    on_host(ZEN4)
    assert extraction_precision(ExtractionConfig(precision="auto")) == "bf16"
    assert extraction_precision(ExtractionConfig(precision="fp16")) == "fp16"


def test_an_emulated_extraction_precision_warns_with_the_measured_slowdown(on_host, monkeypatch, caplog):
    monkeypatch.setattr(host, "product_slowdown", lambda precision: {"bf16": 8.4, "fp16": 8.9}[precision])
    on_host(ZEN3)
    with caplog.at_level(logging.WARNING):
        warn_if_emulated(ExtractionConfig(precision="bf16"))
    assert caplog.messages == [
        "--extraction_precision bf16: this CPU (AVX2) has no bf16 units, and a bf16 matrix product measured 8.4x slower "
        "than float32 here; use fp32 (the published numbers) or auto"
    ]
    caplog.clear()
    on_host(ZEN4)
    for precision in ("bf16", "fp32", "auto"):
        warn_if_emulated(ExtractionConfig(precision=precision))
    warn_if_emulated(ExtractionConfig(precision="fp16"))
    assert len(caplog.messages) == 1 and "fp16 matrix product measured 8.9x slower" in caplog.messages[0]
