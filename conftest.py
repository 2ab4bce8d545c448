"""Root conftest: loads the suite's plugin and adds the GPU fingerprint to pytest-benchmark's
machine_info. `pytest-benchmark compare` imports this file, so nothing here may need a GPU or torch
at import time."""

pytest_plugins = ("fixtures.plugin",)

# pytest-benchmark's CPU-frequency fields change from run to run and make every comparison warn.
_NOISY_CPU_FIELDS = ("hz_actual", "hz_actual_friendly", "hz_advertised", "hz_advertised_friendly")


def pytest_benchmark_update_machine_info(config, machine_info):
    from fixtures.gpu import fingerprint

    cpu = machine_info.get("cpu")
    if isinstance(cpu, dict):
        for k in _NOISY_CPU_FIELDS:
            cpu.pop(k, None)
    machine_info["gpu"] = fingerprint()
