"""The Ray engine (``run.engine: ray``) on a real Ray cluster of three nodes on this machine
(``ray.cluster_utils.Cluster``, started by a process of its own: :mod:`tests.ray_cluster`): the
same rows as the local engine, one quota for every actor, the per-file deadline enforced by
killing the task, and no file lost or doubled when a worker node, an embed actor or the driver
dies mid-run."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import lancedb
import numpy as np
import polars as pl
import pytest

from pipeline.commands.sample_files import make_text_corpus
from pipeline.config import load_job
from pipeline.emulator.server import Emulator, EmulatorOptions
from pipeline.run import EXIT_OK, Run, run_job
from tests.conftest import REPO, CorpusFile, copy_corpus_files, write_job

ray = pytest.importorskip("ray", reason="the Ray engine's tests need the ray extra: "
                                        "pip install -e '.[dev,ray]'")
from pipeline.engine.ray import RayEngine  # noqa: E402
from tests.ray_cluster import ClusterProcess  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterProcess]:
    """A head node and two worker nodes, one CPU each, started by a process of their own;
    the tests' driver joins it."""
    c = ClusterProcess(REPO)
    try:
        ray.init(address=c.address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"worker_process_setup_hook": "tests.ray_hooks.setup",
                              "env_vars": {"PYTHONPATH": str(REPO)}})
        yield c
        ray.shutdown()
    finally:
        c.close()


def _job(tmp_path: Path, src: Path, emu: Emulator, engine: str, **run: object) -> Path:
    return write_job(tmp_path / engine, src, embed={
        "provider": "gemini", "api_key": "any-key", "base_url": emu.base_url,
        "model": "gemini-embedding-2", "output_dimensionality": 128, "mode": "interactive",
        "batch_size": 20, "concurrency": 4},
        extra={"run": {"engine": engine, "flush_rows": 200, **run}})


def _tables(job: Path) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    db = lancedb.connect(str(job.parent / "lance"))
    read = [pl.DataFrame(pl.from_arrow(db.open_table(t).to_arrow()))
            for t in ("vectors", "rejects", "files")]
    return read[0], read[1], read[2]


def _accounted(job: Path, files: int) -> pl.DataFrame:
    """Every listed file has its manifest row, with its rows or its rejects; no id twice."""
    vectors, rejects, manifest = _tables(job)
    assert vectors["id"].n_unique() == vectors.height, "duplicate ids"
    assert rejects["id"].n_unique() == rejects.height, "duplicate reject ids"
    assert manifest.height == files, f"{files - manifest.height} files lost"
    embedded = manifest.filter(pl.col("status") == "embedded")
    rows = vectors.group_by("uri").len()
    joined = embedded.join(rows, on="uri", how="left")
    assert joined.filter(pl.col("len").is_null() | (pl.col("len") != pl.col("parts"))).height == 0
    assert set(manifest.filter(pl.col("status") != "embedded")["uri"]) <= set(rejects["uri"])
    return manifest


@pytest.fixture()
def mixed(tmp_path: Path, corpus_dir: Path, corpus: list[CorpusFile]) -> Path:
    """Every file of the shared corpus (PDFs to split, media, the bad ones) and 300 texts."""
    src = tmp_path / "src"
    copy_corpus_files(corpus_dir, [f.path for f in corpus], src)
    make_text_corpus(src / "texts", 300)
    return src


def test_ray_and_local_engines_write_the_same_ids_and_vectors(cluster: ClusterProcess, tmp_path: Path,
                                                              mixed: Path):
    with Emulator(EmulatorOptions()) as emu:
        local = run_job(load_job(_job(tmp_path, mixed, emu, "local")))
        on_ray = run_job(load_job(_job(tmp_path, mixed, emu, "ray")))
    assert local.exit_code == on_ray.exit_code == EXIT_OK  # the corpus has bad files
    (lv, lr, _), (rv, rr, _) = (_tables(tmp_path / e / "job.yaml") for e in ("local", "ray"))
    assert lv.height > 300 and sorted(lv["id"]) == sorted(rv["id"])
    a, b = lv.sort("id"), rv.sort("id")
    same = (np.stack(a["vector"].to_numpy()) == np.stack(b["vector"].to_numpy())).all(axis=1)
    assert same.all(), f"other vectors for {sorted(set(a.filter(~pl.Series(same))['uri']))}"
    assert a.select("uri", "part", "page_start", "page_end").equals(
        b.select("uri", "part", "page_start", "page_end"))
    assert sorted(zip(lr["uri"], lr["reason"], strict=True)) == \
        sorted(zip(rr["uri"], rr["reason"], strict=True))
    # (how items are packed into calls depends on timing: the calls' count may differ)
    assert on_ray.stats.items_embedded == local.stats.items_embedded == lv.height


def test_a_file_past_its_deadline_is_killed_on_the_cluster_and_rejected(cluster: ClusterProcess,
                                                                       tmp_path: Path):
    src = tmp_path / "src"
    make_text_corpus(src, 40)
    (src / "d0000" / "x-hang-forever.txt").write_text("never validated", encoding="utf-8")
    with Emulator(EmulatorOptions()) as emu:
        job = _job(tmp_path, src, emu, "ray")
        job.write_text(job.read_text() + "validate: {file_timeout_s: 1.0}\n")
        started = time.monotonic()
        result = run_job(load_job(job))
    assert time.monotonic() - started < 60
    assert result.exit_code == EXIT_OK
    manifest = _accounted(job, 41)
    _, rejects, _ = _tables(job)
    assert rejects.select("key", "reason").rows() == [("d0000/x-hang-forever.txt", "timeout")]
    assert manifest.filter(pl.col("status") == "embedded").height == 40


def test_every_actor_shares_one_quota(cluster: ClusterProcess):
    """The limiter actor grants at most ``concurrency`` slots and ``rpm`` permits in all."""
    from pipeline.engine.ray import Limiter

    limiter = ray.remote(num_cpus=0)(Limiter).options(max_concurrency=100).remote(5, None, None, 3)
    ray.get(limiter.granted.remote(), timeout=120)  # started: the waits below time only blocking
    slots = [limiter.take_slot.remote() for _ in range(5)]
    ready, waiting = ray.wait(slots, num_returns=5, timeout=2)
    assert (len(ready), len(waiting)) == (3, 2)  # a fourth call waits for a slot
    ray.get(limiter.give_slot.remote())
    ready, waiting = ray.wait(waiting, num_returns=2, timeout=2)
    assert (len(ready), len(waiting)) == (1, 1)
    permits = [limiter.permit.remote(1, 10) for _ in range(6)]
    ready, waiting = ray.wait(permits, num_returns=6, timeout=2)
    assert (len(ready), len(waiting)) == (5, 1)  # rpm 5: the sixth waits for the minute
    ray.kill(limiter)
    # An embed actor that died holding slots: its restart gives them back.
    limiter = ray.remote(num_cpus=0)(Limiter).options(max_concurrency=100).remote(
        None, None, None, 3)
    ray.get(limiter.granted.remote(), timeout=120)
    held = [limiter.take_slot.remote(7) for _ in range(3)]
    assert len(ray.wait(held, num_returns=3, timeout=2)[0]) == 3
    blocked = limiter.take_slot.remote(8)
    assert not ray.wait([blocked], timeout=0.5)[0]
    assert ray.get(limiter.restarted.remote(7)) == 3
    assert ray.wait([blocked], timeout=2)[0]
    ray.kill(limiter)


def test_a_run_with_a_quota_gets_no_429_from_several_actors(cluster: ClusterProcess, tmp_path: Path):
    src = tmp_path / "src"
    make_text_corpus(src, 400)
    # The server allows 300 items a (2 s) minute; the job knows the quota per real minute
    # scaled down, so with every actor under one limiter no call is refused.
    with Emulator(EmulatorOptions(rpm=300, window_s=2.0)) as emu:
        job = _job(tmp_path, src, emu, "ray")
        text = job.read_text().replace("mode: interactive", "mode: interactive\n  quota: {rpm: 9000}")
        job.write_text(text)
        result = run_job(load_job(job))
        served_429 = sum(emu.state.stats.quota_429.values())
    assert result.exit_code == EXIT_OK
    _accounted(job, 400)
    assert served_429 == result.stats.http_429


def _run_while(run: Run, emu: Emulator, after_items: int,
               action: Callable[[], None]) -> tuple[int, bool]:
    """Run ``run`` to its end; once the emulator has served ``after_items`` items, do
    ``action`` (in a thread). Returns the exit code and whether the action was done."""
    import anyio

    done = False

    async def main() -> int:
        async with anyio.create_task_group() as tg:
            async def meanwhile() -> None:
                nonlocal done
                while emu.state.stats.items < after_items:
                    await anyio.sleep(0.02)
                await anyio.to_thread.run_sync(action)
                done = True

            tg.start_soon(meanwhile)
            result = await run.execute()
            tg.cancel_scope.cancel()
            return result.exit_code

    return anyio.run(main), done


def test_an_embed_actor_killed_mid_call_loses_nothing(cluster: ClusterProcess, tmp_path: Path):
    src = tmp_path / "src"
    make_text_corpus(src, 2000)
    with Emulator(EmulatorOptions(latency_ms=100)) as emu:
        run = Run(load_job(_job(tmp_path, src, emu, "ray")))

        def kill_an_actor() -> None:
            assert isinstance(run.engine, RayEngine)
            ray.kill(run.engine.cluster.actors[0], no_restart=False)

        code, killed = _run_while(run, emu, 300, kill_an_actor)
        served = emu.state.stats.items
    assert killed and code == EXIT_OK
    _accounted(tmp_path / "ray" / "job.yaml", 2000)
    assert isinstance(run.engine, RayEngine) and run.engine.resent_batches >= 1
    assert served - 2000 <= run.engine.resent_batches * 20


def test_a_worker_node_lost_mid_run_loses_no_file(cluster: ClusterProcess, tmp_path: Path,
                                                   corpus_dir: Path, corpus: list[CorpusFile]):
    src = tmp_path / "src"
    copy_corpus_files(corpus_dir, [f.path for f in corpus], src)
    make_text_corpus(src / "texts", 5000)
    with Emulator(EmulatorOptions(latency_ms=20)) as emu:
        run = Run(load_job(_job(tmp_path, src, emu, "ray")))
        code, removed = _run_while(run, emu, 1000, cluster.remove_worker)
    cluster.add_worker()  # for the tests after this one
    assert removed and code == EXIT_OK
    manifest = _accounted(tmp_path / "ray" / "job.yaml", len(corpus) + 5000)
    _, rejects, _ = _tables(tmp_path / "ray" / "job.yaml")
    assert not rejects.filter(pl.col("message").str.contains("workers died")).height
    by_key = dict(zip(rejects["key"], rejects["reason"], strict=True))
    for f in corpus:
        got = by_key.get(f.path)
        if got is not None:
            assert f.accepts(got), (f.path, got)
    assert manifest.filter(pl.col("status") == "embedded").height >= 5000


def test_a_source_gone_mid_run_on_the_cluster_fails_the_night_and_blames_no_file(
        cluster: ClusterProcess, tmp_path: Path):
    """A worker that finds the source folder gone (see tests.ray_hooks) stops the run: exit 3,
    no reject, nothing deleted; the next run, the folder back, does the rest."""
    from pipeline.run import EXIT_FAILED

    src = tmp_path / "src"
    notes = make_text_corpus(src, 60)
    with Emulator(EmulatorOptions()) as emu:
        job = _job(tmp_path, src, emu, "ray")
        assert run_job(load_job(job)).exit_code == EXIT_OK
        before = _tables(job)[0].select("uri", "version")
        (src / "a-unmount-the-source.txt").write_text("a share about to go", encoding="utf-8")
        for note in notes[:20]:  # listed after the file that moves the folder away
            note.write_text(note.read_text(encoding="utf-8") + "Revised.\n", encoding="utf-8")
        night = run_job(load_job(job))
        assert night.exit_code == EXIT_FAILED, night.problems
        failure = [p for p in night.problems if "the source failed" in p]
        assert len(failure) == 1 and "is gone" in failure[0]
        assert "\n" not in failure[0] and "\x1b" not in failure[0]  # one line, not Ray's traceback
        vectors, rejects, _ = _tables(job)
        assert rejects.height == 0
        assert set(before["uri"]) <= set(vectors["uri"])  # nothing deleted
        src.with_name("src.unmounted").rename(src)
        (src / "a-unmount-the-source.txt").rename(src / "a-note.txt")
        again = run_job(load_job(job))
    assert again.exit_code == EXIT_OK, again.problems
    manifest = _accounted(job, 61)
    assert manifest.filter(pl.col("status") == "embedded").height == 61
    vectors = _tables(job)[0]
    old = dict(before.iter_rows())
    assert sorted(u for u, v in vectors.select("uri", "version").iter_rows()
                  if old.get(u) != v) == sorted([n.as_uri() for n in notes[:20]] +
                                                [(src / "a-note.txt").as_uri()])


def test_the_driver_killed_then_run_again_leaves_one_row_per_item(cluster: ClusterProcess,
                                                                  tmp_path: Path):
    """The first run joins the cluster by ``engine: auto`` and RAY_ADDRESS, and is SIGKILLed
    mid-run; the second by ``--engine ray --address``."""
    import os

    src = tmp_path / "src"
    make_text_corpus(src, 3000)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with Emulator(EmulatorOptions(latency_ms=50)) as emu:
        job = _job(tmp_path, src, emu, "auto")
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "-q", str(job)],
                                env={**env, "RAY_ADDRESS": cluster.address},
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while emu.state.stats.items < 800:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        again = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "-q", "--engine",
                                "ray", "--address", cluster.address, "--report", "-", str(job)],
                               env=env, capture_output=True, text=True, timeout=300)
        served = emu.state.stats.items
    assert again.returncode == EXIT_OK, again.stderr[-2000:]
    import json

    report = json.loads(again.stdout)
    assert report["engine"] == "ray" and report["files_unchanged"] > 0  # the first run's files
    _accounted(job, 3000)
    # Paid again only for what was in flight at the kill: unflushed rows and calls under way.
    in_flight = 200 * 2 + 20 * (4 + 4)
    assert served <= 3000 + in_flight, served
