"""jmoss's CUDA 13 fix: a patched copy of the installed Jittor under JMOSS_HOME, chosen for nvcc >= 13."""

import sys

import pytest
from click.testing import CliRunner

from jmoss import cuda_fix, jittor_setup
from jmoss.cli import main


def test_build_patches_a_copy_and_leaves_site_packages_alone(tmp_path):
    version, source = cuda_fix.installed_jittor()
    before = (source / "extern/cuda/inc/helper_cuda.h").read_text()
    manifest = cuda_fix.build(tmp_path)
    assert manifest["applied"] == [1, 2, 3, 4, 5, 6] and manifest["complete"]
    copy = cuda_fix.fix_dir(version, tmp_path) / "jittor"
    helper = (copy / "extern/cuda/inc/helper_cuda.h").read_text()
    assert "deviceProp.computeMode" not in helper and "deviceProp.clockRate" not in helper
    assert "cudaDevAttrComputeMode" in helper and "cudaDevAttrClockRate" in helper
    assert '"-std=c++17"' in (copy / "compiler.py").read_text().split("def convert_nvcc_flags")[1]
    assert "cub::Max()" not in (copy / "other/code_softmax.py").read_text()
    where = (copy / "extern/cuda/cub/ops/cub_where_op.cc").read_text()
    assert "thrust::counting_iterator" in where and "cub::TransformInputIterator" not in where
    assert (source / "extern/cuda/inc/helper_cuda.h").read_text() == before
    assert cuda_fix.usable_dir(tmp_path) == cuda_fix.fix_dir(version, tmp_path)
    assert cuda_fix.undo(tmp_path) and not cuda_fix.state(tmp_path)["built"]


def test_skipped_fix_is_recorded_and_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(cuda_fix.SKIP_ENV, "1,3")
    manifest = cuda_fix.build(tmp_path)
    assert manifest["applied"] == [2, 4, 5, 6] and not manifest["complete"]
    copy = cuda_fix.fix_dir(manifest["jittor_version"], tmp_path) / "jittor"
    assert "deviceProp.computeMode" in (copy / "extern/cuda/inc/helper_cuda.h").read_text()
    with pytest.raises(cuda_fix.CudaFixError, match="incomplete"):
        cuda_fix.usable_dir(tmp_path)


def test_changed_jittor_source_fails_loudly():
    with pytest.raises(cuda_fix.CudaFixError, match="fix #4"):
        cuda_fix.patch_text(cuda_fix.FIXES[3], "no such text here")


def test_missing_fix_tells_the_command(tmp_path):
    with pytest.raises(cuda_fix.CudaFixError, match="jmoss doctor --fix-cuda"):
        cuda_fix.usable_dir(tmp_path)


def test_cuda13_toolkit_accepted_only_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("JMOSS_HOME", str(tmp_path))
    assert jittor_setup.cuda_toolkit_usable((12, 4))
    assert not jittor_setup.cuda_toolkit_usable((10, 2)) and not jittor_setup.cuda_toolkit_usable(None)
    assert not jittor_setup.cuda_toolkit_usable((13, 0))
    cuda_fix.build()
    assert jittor_setup.cuda_toolkit_usable((13, 0))


def test_doctor_fix_and_undo_commands(tmp_path, monkeypatch):
    monkeypatch.setenv("JMOSS_HOME", str(tmp_path))
    runner = CliRunner()
    built = runner.invoke(main, ["doctor", "--fix-cuda"])
    assert built.exit_code == 0, built.output
    assert "CUDA 13 fix built in" in built.output and (tmp_path / cuda_fix.FIX_DIR_NAME).is_dir()
    undone = runner.invoke(main, ["doctor", "--undo-cuda-fix"])
    assert undone.exit_code == 0 and "removed CUDA 13 fix" in undone.output
    assert not (tmp_path / cuda_fix.FIX_DIR_NAME).exists()
    assert runner.invoke(main, ["doctor", "--fix-cuda", "--undo-cuda-fix"]).exit_code != 0


def test_runtime_without_libcudart_is_a_clear_error(monkeypatch):
    from jmoss import cuda_runtime

    monkeypatch.setattr(cuda_runtime, "_lib", None)
    monkeypatch.setenv("JMOSS_CUDART", "/nonexistent/libcudart.so")
    with pytest.raises(cuda_runtime.DeviceError, match="JMOSS_CUDART"):
        cuda_runtime.mem_info()


def test_doctor_reports_each_fix_and_a_changed_copy(tmp_path, monkeypatch):
    from jmoss import doctor

    monkeypatch.setenv("JMOSS_HOME", str(tmp_path))
    monkeypatch.setenv(cuda_fix.SKIP_ENV, "3")
    cuda_fix.build()
    lines = dict(doctor.report())  # shown once built, whether or not this machine has nvcc 13
    assert "incomplete" in lines["CUDA 13 fix"] and "will not import" in lines["CUDA 13 fix"]
    assert lines["CUDA 13 fix #3"].startswith("LEFT OUT") and lines["CUDA 13 fix #1"].startswith("applied")
    monkeypatch.delenv(cuda_fix.SKIP_ENV)
    manifest = cuda_fix.build()
    lines = dict(doctor.report())
    assert lines["CUDA 13 fix"].startswith("built in")
    assert all(lines[f"CUDA 13 fix #{n}"].startswith("applied") for n in range(1, 7))
    helper = cuda_fix.fix_dir(manifest["jittor_version"]) / "jittor/extern/cuda/inc/helper_cuda.h"
    helper.write_text(helper.read_text() + "\n// edited by hand\n")
    assert "changed since the build: extern/cuda/inc/helper_cuda.h" in dict(doctor.report())["CUDA 13 fix"]
    with pytest.raises(cuda_fix.CudaFixError, match="changed since the build"):
        cuda_fix.usable_dir()
