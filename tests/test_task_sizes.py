"""Tasks sized by work: a short recording is not split into more tasks than its work is worth."""

import numpy as np
from dask.callbacks import Callback
from distributed import get_task_stream

from gmfx.stages.preproc import chain, run_chain, vertex_block_size
from gmfx.storage import Location, open_dataset
from gmfx.testing._synthetic import synthetic_face, write_synthetic_recon


def _preproc_tasks(stream) -> list[str]:
    keys = [record["key"] if isinstance(record["key"], str) else record["key"][0] for record in stream.data]
    return [key for key in keys if key.startswith("preproc-")]


def test_the_example_sized_recording_makes_three_preproc_tasks(tmp_path, dask_client):
    """The bundled example's size (72 frames, MediaPipe's 478 vertices): one align/interpolate region, one
    filter block and the other variables' task; the previous sizing made 8 filter blocks of 0.05 MB."""
    out = Location(str(tmp_path / "out"))
    source = write_synthetic_recon(out.child("a_recon.zarr"), synthetic_face(72, n_vertices=478, seed=3), chunk=256)
    computations = []
    with get_task_stream(dask_client) as stream, Callback(start=computations.append):
        (target,) = run_chain([source], [out.child("a_preproc.zarr")], client=dask_client, progress=False,
                              filter={"highpass": 0.2, "lowpass": 5.0, "order": 3})  # fmt: skip
    tasks = _preproc_tasks(stream)
    assert sorted(key.split("-")[1] for key in tasks) == ["block", "region", "rest"], tasks
    # computations in this process (a round trip each when the client is the default scheduler): the
    # alignment's weights and reference, one per store template, the short-stretch check; 9 before the
    # templates' small variables were computed together
    assert len(computations) <= 5, len(computations)
    expected = chain(open_dataset(source, stage="recon"), filter={"highpass": 0.2, "lowpass": 5.0, "order": 3})
    np.testing.assert_allclose(open_dataset(target, stage="preproc").v.values, expected.v.values, atol=1e-6)


def test_vertex_blocks_grow_with_the_work_and_stay_bounded():
    # (frames, vertices) -> blocks: one for short recordings, 8 once each holds 8 MB, 48 MB at most each
    sizes = {(72, 478): 1, (1_800, 478): 1, (18_000, 478): 8, (1_800, 5_023): 8, (108_000, 5_023): 133}
    for (n_time, n_vertex), blocks in sizes.items():
        block = vertex_block_size(n_time, 1, n_vertex, 3)
        assert -(-n_vertex // block) == blocks, (n_time, n_vertex, block)
        assert 4 * n_time * 3 * block <= 48 * 2**20
