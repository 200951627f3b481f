"""The shims name the megatron-core version they were written for: another version warns
once, and a missing attribute stops before anything is patched, naming both versions (one
line from the CLI)."""

from __future__ import annotations

import warnings

import pytest
import torch
from megatron.core import package_info
from megatron.core.tensor_parallel import random as mp_random

from megatron_gr.cli import main
from megatron_gr.compat import WRITTEN_FOR, MegatronVersionError, MegatronVersionWarning, cpu_mode, cpu_mode_active
from megatron_gr.compat import version


@pytest.fixture
def other_version(monkeypatch):
    monkeypatch.setattr(package_info, "__version__", "0.99.0")
    version._warn_once.cache_clear()
    yield "0.99.0"
    version._warn_once.cache_clear()


def test_written_for_is_the_installed_version():
    # the pin in pyproject.toml; when it moves, the shims must be checked and this constant moved
    assert WRITTEN_FOR == "0.16.1" == package_info.__version__


def test_the_written_for_version_enters_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error", MegatronVersionWarning)
        with cpu_mode():
            pass


def test_another_version_warns_once_naming_both(other_version):
    with pytest.warns(MegatronVersionWarning) as record:
        with cpu_mode():
            assert torch.zeros(1, device="cuda").device.type == "cpu"  # the shims still apply
        with cpu_mode():
            pass
    ours = [w for w in record if issubclass(w.category, MegatronVersionWarning)]
    assert len(ours) == 1
    shown = warnings.formatwarning(ours[0].message, ours[0].category, ours[0].filename, ours[0].lineno)
    assert shown.count("\n") == 1  # one line on the console, no source line under it
    assert "0.16.1" in shown and other_version in shown


def test_a_missing_attribute_stops_before_anything_stays_patched(other_version, monkeypatch):
    current_device = vars(torch.cuda)["current_device"]
    monkeypatch.delattr(mp_random, "_set_cuda_rng_state")  # patched after torch.cuda's functions
    with pytest.warns(MegatronVersionWarning):
        with pytest.raises(MegatronVersionError) as error:
            with cpu_mode():
                pytest.fail("entered a CPU mode with a shim missing")
    message = str(error.value)
    assert "_set_cuda_rng_state" in message and "0.16.1" in message and other_version in message
    assert not cpu_mode_active()
    assert vars(torch.cuda)["current_device"] is current_device  # the shims applied before were undone
    assert not hasattr(mp_random, "_set_cuda_rng_state")  # and the missing one was not created


def test_cli_reports_a_missing_attribute_in_one_line(other_version, monkeypatch, capsys):
    monkeypatch.delattr(mp_random, "_get_cuda_rng_state")
    with pytest.warns(MegatronVersionWarning):
        code = main(["pretrain", "--device", "cpu", "--train-iters", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: megatron-core 0.99.0 has no ") and "\n" not in err
    assert "_get_cuda_rng_state" in err and "megatron-core==0.16.1" in err
