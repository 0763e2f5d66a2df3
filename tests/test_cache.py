from __future__ import annotations

import multiprocessing
from pathlib import Path

from curate.cache import Cache, cache_key


def test_key_depends_on_every_part_and_not_on_dict_order() -> None:
    base = cache_key("vllm", "qwen", {"prompt": "hi", "images": ["ab"]}, {"n": 8, "temperature": 1.0})
    assert base == cache_key("vllm", "qwen", {"images": ["ab"], "prompt": "hi"}, {"temperature": 1.0, "n": 8})
    variants = [
        cache_key("openai", "qwen", {"prompt": "hi", "images": ["ab"]}, {"n": 8, "temperature": 1.0}),
        cache_key("vllm", "qwen2", {"prompt": "hi", "images": ["ab"]}, {"n": 8, "temperature": 1.0}),
        cache_key("vllm", "qwen", {"prompt": "hi!", "images": ["ab"]}, {"n": 8, "temperature": 1.0}),
        cache_key("vllm", "qwen", {"prompt": "hi", "images": ["ab"]}, {"n": 4, "temperature": 1.0}),
    ]
    assert len({base, *variants}) == 5


def test_a_put_is_counted_and_persists_for_another_run(tmp_path: Path) -> None:
    with Cache(tmp_path / "c.sqlite") as cache:
        assert cache.get("k") is None
        cache.put("k", {"answers": ["a", "b"]})
        assert cache.get("k") == {"answers": ["a", "b"]}
        assert (cache.hits, cache.misses) == (1, 1)
    with Cache(tmp_path / "c.sqlite") as reopened:  # another run, same file
        assert reopened.get("k") == {"answers": ["a", "b"]} and len(reopened) == 1


def _writer(path: str, worker: int) -> None:
    with Cache(Path(path)) as cache:
        for i in range(200):
            cache.put(f"{worker}-{i}", {"worker": worker, "i": i})


def test_concurrent_processes_share_one_file(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite"
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_writer, args=(str(path), w)) for w in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    with Cache(path) as cache:
        assert len(cache) == 800
        assert cache.get("3-199") == {"worker": 3, "i": 199}
