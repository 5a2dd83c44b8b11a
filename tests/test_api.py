"""The public API: every name resolves, none collides with a subpackage, internals stay inside."""

import subprocess
import sys

import gmfx

INTERNALS = {"Stage", "Region", "Task", "RegionStore", "store_location", "open_dataset", "write_lazy"}


def test_every_public_name_is_listed_once_and_resolves():
    names = [name for name in gmfx.__all__ if name != "__version__"]
    assert len(names) == len(set(names))
    assert set(names) == set(gmfx._LAZY)
    for name in names:
        assert getattr(gmfx, name) is not None


def test_internals_are_not_public():
    assert not INTERNALS & set(gmfx.__all__)
    for name in INTERNALS:
        assert not hasattr(gmfx, name), name


def test_stage_runners_survive_importing_the_subpackages():
    """Importing gmfx.preproc (as gmfx.align does) sets the attribute ``preproc`` on gmfx: no public
    name may be that attribute. Run in a fresh interpreter so the import order is the user's."""
    code = (
        "import gmfx, inspect\n"
        "gmfx.align\n"
        "import gmfx.stages.decode, gmfx.stages.recon, gmfx.stages.preproc, gmfx.preproc, gmfx.models\n"
        "for name in gmfx.__all__[1:]:\n"
        "    value = getattr(gmfx, name)\n"
        "    assert not inspect.ismodule(value), name\n"
        "assert callable(gmfx.run_preproc) and callable(gmfx.run_decode) and callable(gmfx.run_recon)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
