"""The top-level package: public names resolve lazily (`from hf_regtools import EarlyDropoutCallback`), cheaply."""

import json
import pkgutil
import subprocess
import sys
from importlib import import_module

import pytest

import hf_regtools
from hf_regtools._registry import TECHNIQUES

NOT_EXPORTED = {"testing"}  # utilities for downstream tests, imported from `hf_regtools.testing.*`


def public_packages():
    """Every subpackage with an `__all__` (technique packages, diagnostics, optim, ...) except `NOT_EXPORTED`."""
    packages = {}
    for module in pkgutil.iter_modules(hf_regtools.__path__):
        if module.ispkg and module.name not in NOT_EXPORTED:
            package = import_module(f"hf_regtools.{module.name}")
            if hasattr(package, "__all__"):
                packages[module.name] = package
    return packages


def test_importing_the_package_imports_neither_torch_transformers_nor_timm():
    code = ("import sys, hf_regtools; names = dir(hf_regtools); hf_regtools.__all__; "
            "print(__import__('json').dumps([m for m in ('torch', 'transformers', 'timm', 'datasets', "
            "'huggingface_hub', 'accelerate') if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(proc.stdout) == []


@pytest.mark.parametrize("name", sorted(hf_regtools._LAZY))
def test_every_exported_name_resolves(name):
    module = import_module(hf_regtools._LAZY[name])
    assert getattr(hf_regtools, name) is getattr(module, name)


def test_every_public_package_name_is_exported_at_the_top():
    packages = public_packages()
    assert {"weight_selection", "alpha_svrg", "dropout_schedules", "diagnostics"} <= packages.keys()
    for package_name, package in packages.items():
        for name in package.__all__:
            assert name in hf_regtools.__all__, f"hf_regtools.{package_name}.{name} is not in hf_regtools._EXPORTS"
            assert getattr(hf_regtools, name) is getattr(package, name), f"{package_name}.{name}"


@pytest.mark.parametrize("technique", sorted(TECHNIQUES))
def test_every_technique_package_and_entry_point_is_public(technique):
    info = TECHNIQUES[technique]
    assert technique in public_packages(), f"hf_regtools.{technique} has no __all__"
    for kind, target in info.entry_points.items():
        attribute = target.partition(":")[2]
        assert getattr(hf_regtools, attribute) is info.load(kind), (kind, target)


def test_names_as_in_the_issue_and_dir():
    from hf_regtools import (AlphaSVRG, AlphaSVRGConfig, AlphaSVRGTrainerMixin, DropRateController,  # noqa: F401
                             DropScheduleCallback, EarlyDropoutCallback, EarlyStochasticDepthCallback,
                             GradientDiagnosticsCallback, LateDropoutCallback, LateStochasticDepthCallback,
                             RegtoolsTrainerMixin, TechniqueMetricsCallback, WeightSelectionConfig,
                             initialize_student, select_weights)

    assert issubclass(AlphaSVRGTrainerMixin, RegtoolsTrainerMixin)
    assert issubclass(EarlyDropoutCallback, DropScheduleCallback) and issubclass(DropScheduleCallback,
                                                                                 TechniqueMetricsCallback)
    assert set(hf_regtools.__all__) <= set(dir(hf_regtools)) and "__version__" in hf_regtools.__all__
    assert len(hf_regtools.__all__) == len(set(hf_regtools.__all__))


def test_an_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="module 'hf_regtools' has no attribute 'NoSuchCallback'"):
        hf_regtools.NoSuchCallback  # noqa: B018
    with pytest.raises(ImportError):
        from hf_regtools import NoSuchCallback  # noqa: F401
