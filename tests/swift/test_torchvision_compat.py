"""Tests for the torchvision compatibility step (kdcompose.compat).

Every check runs in a fresh interpreter: the step must act *before* torchvision is first imported,
and this pytest process may already have imported it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

import kdcompose.compat
from kdcompose.compat import _startup
from kdcompose.compat.torchvision_ops import (
    PTH_LINE,
    PTH_NAME,
    install_startup_hook,
    remove_startup_hook,
    startup_hook_installed,
    startup_hook_path,
)

pytestmark = pytest.mark.swift

SRC = Path(kdcompose.compat.__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop(_startup.DISABLE_ENV, None)
    env.update(extra)
    return env


def _run(code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> dict:
    """Run ``code`` in a new interpreter; it must print one JSON object as its last line."""
    proc = subprocess.run(
        [sys.executable, *args, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env if env is not None else _env(),
        timeout=timeout,
    )
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def ops_loadable() -> bool | None:
    """Independent oracle: can torchvision's compiled ``_C`` load next to this torch? None: no torchvision."""
    res = _run(
        """
        import importlib.util, json, os, glob
        spec = importlib.util.find_spec("torchvision")
        if spec is None:
            print(json.dumps({"ok": None})); raise SystemExit
        import torch
        lib = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "_C*.so"))
        try:
            torch.ops.load_library(lib[0]); ok = True
        except (OSError, IndexError):
            ok = False
        print(json.dumps({"ok": ok}))
        """
    )
    return res["ok"]


def test_the_hook_line_is_one_import_line_as_site_runs_it() -> None:
    assert PTH_LINE.startswith("import ") and PTH_LINE.count("\n") == 1  # site executes `import` lines
    assert PTH_NAME.endswith(".pth")


def test_in_process_fix_makes_torchvision_importable(ops_loadable: bool | None) -> None:
    if ops_loadable is None:
        pytest.fail("torchvision is not installed; it is a required dependency of the VL path")
    res = _run(
        """
        import json, torch
        from kdcompose.compat import ensure_torchvision_importable as ensure
        first, second = ensure(), ensure()
        import torchvision
        from torchvision.transforms import functional as F
        from torchvision.transforms import v2
        img = torch.rand(3, 40, 60)
        resized = F.resize(img, [20, 30], antialias=True)
        third = ensure()
        try:
            boxes = torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1]])
            kept = torchvision.ops.nms(boxes, torch.tensor([1.0, 0.5]), 0.5)
            nms = ["ok", kept.tolist()]
        except RuntimeError as exc:
            nms = ["RuntimeError", str(exc)]
        print(json.dumps({"r": [first, second, third], "shape": list(resized.shape), "nms": nms}))
        """
    )
    expected = "native" if ops_loadable else "patched"
    assert res["r"] == [expected, expected, expected]
    assert res["shape"] == [3, 20, 30]
    if ops_loadable:
        assert res["nms"] == ["ok", [0]]
    else:
        assert res["nms"][0] == "RuntimeError"
        assert "Couldn't load custom C++ ops" in res["nms"][1]


def test_without_fix_import_fails_when_ops_cannot_load(ops_loadable: bool | None) -> None:
    """Control: proves the fix (not something else) is what makes the import work here."""
    if not ops_loadable and ops_loadable is not None:
        proc = subprocess.run(
            [sys.executable, "-c", "import torchvision"],
            capture_output=True,
            text=True,
            env=_env(**{_startup.DISABLE_ENV: "1"}),
            timeout=120,
        )
        assert proc.returncode != 0
        assert "torchvision::nms does not exist" in proc.stderr
    else:
        pytest.skip("torchvision's compiled ops load on this machine; nothing to fix")


def test_absent_without_torchvision_and_without_importing_torch() -> None:
    # -S: no site-packages at all, so neither torch nor torchvision is findable. The module is loaded
    # by path, as the .pth line does (the package __init__ may import torch).
    res = _run(
        f"""
        import importlib.util, json, sys
        spec = importlib.util.spec_from_file_location("_probe", {_startup.__file__!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        print(json.dumps({{"r": mod.ensure_torchvision_importable(), "torch": "torch" in sys.modules,
                          "hook": mod.install()}}))
        """,
        "-S",
    )
    assert res == {"r": "absent", "torch": False, "hook": True}


def test_lazy_import_hook_runs_only_on_torchvision_import(ops_loadable: bool | None) -> None:
    # Loaded by path like the .pth line does: the kdcompose package __init__ may import torch itself.
    res = _run(
        f"""
        import importlib.util, json, sys
        spec = importlib.util.spec_from_file_location("_probe", {_startup.__file__!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        TorchvisionImportHook = mod.TorchvisionImportHook
        installed = [mod.install(), mod.install()]
        n_hooks = sum(isinstance(f, TorchvisionImportHook) for f in sys.meta_path)
        import json, collections  # unrelated imports must not trigger anything
        torch_before = "torch" in sys.modules
        import torchvision.transforms.functional
        after = sum(type(f).__name__ == "TorchvisionImportHook" for f in sys.meta_path)
        res = {{"installed": installed, "n": n_hooks, "torch_before": torch_before, "after": after,
                "status": mod.ensure_torchvision_importable()}}
        print(json.dumps(res))
        """
    )
    status = "native" if ops_loadable else "patched"
    assert res == {"installed": [True, True], "n": 1, "torch_before": False, "after": 0, "status": status}


FAKE_TORCHVISION_SOURCE = textwrap.dedent(
    """
    #include <torch/library.h>
    #include <ATen/ATen.h>
    at::Tensor nms_cpu(const at::Tensor& dets, const at::Tensor& scores, double) {
      return at::arange(dets.size(0), dets.options().dtype(at::kLong));
    }
    TORCH_LIBRARY(torchvision, m) {
      m.def("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor");
      m.def("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor");
    }
    TORCH_LIBRARY_IMPL(torchvision, CPU, m) { m.impl("nms", nms_cpu); }
    """
)


def _compile_fake_torchvision(root: Path) -> bool:
    """Build a stand-in ``torchvision`` whose ``_C`` really loads and registers nms with a CPU kernel.
    The compiled library (10 s of g++) is cached under ``$KDCOMPOSE_CACHE``, keyed by the source,
    the compiler and torch's version."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return False
    import torch
    from torch.utils.cpp_extension import include_paths, library_paths

    from kdcompose.testing._cache import atomic_build, cache_root, content_key

    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    libdir = library_paths()[0]
    description = {"source": FAKE_TORCHVISION_SOURCE, "cxx": cxx, "torch": torch.__version__, "lib": libdir}
    key = content_key(description)

    def build(tmp: Path, _final: Path) -> None:
        src = tmp / "fake.cpp"
        src.write_text(FAKE_TORCHVISION_SOURCE)
        cmd = [cxx, "-O0", "-shared", "-fPIC", "-std=c++20", "-w", str(src)]
        cmd += [f"-I{p}" for p in include_paths()]
        cmd += ["-o", str(tmp / f"_C{suffix}"), f"-L{libdir}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{libdir}"]
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)

    built = atomic_build(cache_root() / "test-builds" / f"fake-torchvision-{key}", key, build, description)
    pkg = root / "torchvision"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        f"import torch, os\ntorch.ops.load_library(os.path.join(os.path.dirname(__file__), '_C{suffix}'))\n"
    )
    shutil.copyfile(built / f"_C{suffix}", pkg / f"_C{suffix}")
    return True


def test_native_when_compiled_ops_load(tmp_path: Path) -> None:
    """A torchvision whose ``_C`` loads must be left alone: no schema declared by us."""
    if not _compile_fake_torchvision(tmp_path):
        pytest.skip("no C++ compiler to build a loadable stand-in torchvision extension")
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    res = _run(
        """
        import json, torch
        from kdcompose.compat import _startup
        first, second = _startup.ensure_torchvision_importable(), _startup.ensure_torchvision_importable()
        ours = _startup._library is not None
        import torchvision
        kept = torch.ops.torchvision.nms(torch.zeros(3, 4), torch.zeros(3), 0.5).tolist()
        print(json.dumps({"r": [first, second, _startup.ensure_torchvision_importable()], "ours": ours,
                          "kept": kept, "file": torchvision.__file__}))
        """,
        env=env,
    )
    assert res["file"].startswith(str(tmp_path))
    assert res["r"] == ["native", "native", "native"]
    assert res["ours"] is False
    assert res["kept"] == [0, 1, 2]


def test_pth_startup_hook_in_fresh_child_process(tmp_path: Path, ops_loadable: bool | None) -> None:
    """The route the ``swift`` CLI takes: a new interpreter whose site dir holds our ``.pth``.

    The user site directory (``PYTHONUSERBASE``) is a real site dir processed at start-up, so this
    exercises exactly what an installed wheel's ``.pth`` does, without touching the real
    site-packages.
    """
    base = tmp_path / "userbase"
    env = _env(PYTHONUSERBASE=str(base))
    env.pop("PYTHONNOUSERSITE", None)
    user_site = _run("import json, site; print(json.dumps({'s': site.getusersitepackages()}))", env=env)["s"]
    assert not startup_hook_installed(user_site)
    path = install_startup_hook(user_site)
    assert path == startup_hook_path(user_site) and path.read_text() == PTH_LINE
    assert install_startup_hook(user_site) == path  # idempotent

    res = _run(
        """
        import json, sys
        at_start = {"alias": "_kdcompose_torchvision_startup" in sys.modules, "torch": "torch" in sys.modules,
                    "kdcompose": "kdcompose" in sys.modules}
        import transformers
        from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor
        import torchvision
        status = sys.modules["_kdcompose_torchvision_startup"].ensure_torchvision_importable()
        print(json.dumps({"start": at_start, "status": status, "tv": torchvision.__version__}))
        """,
        env=env,
    )
    # The hook is loaded at start-up, imports neither torch nor the kdcompose package, and fixes the import.
    assert res["start"] == {"alias": True, "torch": False, "kdcompose": False}
    assert res["status"] == ("native" if ops_loadable else "patched")

    assert remove_startup_hook(user_site) is True
    assert remove_startup_hook(user_site) is False
    assert not startup_hook_installed(user_site)


def test_broken_install_never_breaks_startup(tmp_path: Path) -> None:
    """A leftover ``.pth`` with kdcompose gone must be silent: no output, exit 0."""
    install_startup_hook(tmp_path / "site")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            f"import site, sys; site.addsitedir({str(tmp_path / 'site')!r}); "
            "print('_kdcompose_torchvision_startup' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.strip() == "False"
