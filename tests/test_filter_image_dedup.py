from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
from PIL import Image as PILImage
from PIL import ImageDraw, ImageEnhance

from curate.hashindex import HashIndex
from curate.sample import Image, ImagePart, Message, Sample, TextPart
from curate.stage import StageContext
from filters.image_dedup import ImageDedup


def picture(seed: int) -> PILImage.Image:
    rng = random.Random(seed)
    image = PILImage.new("RGB", (128, 96), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.randrange(128), rng.randrange(96)
        draw.rectangle([x, y, x + rng.randrange(5, 40), y + rng.randrange(5, 40)], fill=tuple(rng.randrange(256) for _ in range(3)))
    return image


def encode(image: PILImage.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def sample(sample_id: str, *images: bytes) -> Sample:
    return Sample(sample_id, "t", [Message("user", [ImagePart(i) for i in range(len(images))] + [TextPart("q")])],
                  [Image(data) for data in images])


def stage(tmp_path: Path, **options) -> ImageDedup:
    dedup = ImageDedup(ImageDedup.Options(**options))
    dedup.setup(StageContext(tmp_path / "c.sqlite", tmp_path))
    return dedup


@pytest.mark.parametrize(
    "variant",
    [
        lambda im: encode(im, "JPEG", quality=60),
        lambda im: encode(im.resize((120, 90))),
        lambda im: encode(ImageEnhance.Brightness(im).enhance(1.08)),
    ],
    ids=["recompressed", "resized", "brightened"],
)
def test_near_copies_of_an_earlier_image_are_rejected_naming_it(tmp_path: Path, variant) -> None:
    dedup = stage(tmp_path)
    original = picture(1)
    assert dedup.process([sample("first", encode(picture(2)), encode(original))])[0].keep
    verdict = dedup.process([sample("later", variant(original))])[0]
    assert (verdict.keep, verdict.reason) == (False, "duplicate_image")
    assert "image 1 of first" in verdict.detail


def test_different_images_are_kept_and_hashes_annotated(tmp_path: Path) -> None:
    dedup = stage(tmp_path)
    samples = [sample(f"s{i}", encode(picture(100 + i))) for i in range(30)]
    assert all(dedup.process([s])[0].keep for s in samples)
    assert len(samples[0].meta["image_dedup"]["hashes"][0]) >= 15


def test_same_image_twice_in_one_sample_is_not_its_own_duplicate(tmp_path: Path) -> None:
    image = encode(picture(3))
    assert stage(tmp_path).process([sample("s", image, image)])[0].keep


def test_rejected_duplicates_do_not_enter_the_index_and_undecodable_images_are_skipped(tmp_path: Path) -> None:
    dedup = stage(tmp_path)
    assert dedup.process([sample("a", encode(picture(4)))])[0].keep
    assert not dedup.process([sample("b", encode(picture(4), "JPEG"))])[0].keep
    assert len(dedup.index) == 1
    assert dedup.process([sample("c", b"not an image")])[0].keep
    assert len(dedup.index) == 1


def test_state_dict_round_trip_continues_the_stream(tmp_path: Path) -> None:
    stream = [sample(f"s{i}", encode(picture(i % 7), "JPEG", quality=80 + i % 5)) for i in range(20)]
    whole = stage(tmp_path)
    expected = [whole.process([s])[0].keep for s in stream]
    first, second = stage(tmp_path), stage(tmp_path)
    split = [first.process([s])[0].keep for s in stream[:9]]
    second.load_state_dict(first.state_dict())
    split += [second.process([s])[0].keep for s in stream[9:]]
    assert split == expected and expected.count(True) == 7


def brute_force_nearest(hashes: list[int], value: int, max_distance: int) -> tuple[str, int] | None:
    for position, other in enumerate(hashes):
        if (other ^ value).bit_count() <= max_distance:
            return str(position), (other ^ value).bit_count()
    return None


@pytest.mark.parametrize("max_distance", [0, 3, 4, 8])
def test_hash_index_equals_brute_force(max_distance: int) -> None:
    rng = random.Random(max_distance)
    index = HashIndex(max_distance, merge_every=150)  # small, so both levels and merges are exercised
    stored: list[int] = []
    for _ in range(4):  # several merges into the sorted arrays
        batch = [rng.getrandbits(64) for _ in range(100)]
        index.add_many(batch, [str(len(stored) + k) for k in range(len(batch))])
        stored.extend(batch)
    queries = [rng.getrandbits(64) for _ in range(200)]
    for base in stored[:100]:  # planted at exactly d and d + 1 bits
        for flips in (max_distance, max_distance + 1):
            value = base
            for bit in rng.sample(range(64), flips):
                value ^= 1 << bit
            queries.append(value)
    for value in queries:
        assert index.nearest(value) == brute_force_nearest(stored, value, max_distance)


def test_dedup_batch_equals_one_at_a_time_brute_force() -> None:
    """Keep-first semantics across and within batches, groups of several hashes, against a plain loop."""
    rng = random.Random(7)
    pool = [rng.getrandbits(64) for _ in range(60)]
    groups = []
    for _ in range(300):
        group = []
        for _ in range(rng.randrange(0, 3)):
            value = rng.choice(pool)
            for bit in rng.sample(range(64), rng.randrange(0, 6)):
                value ^= 1 << bit
            group.append(value)
        groups.append(group)
    kept_hashes: list[tuple[int, str]] = []
    expected = []
    for g, group in enumerate(groups):
        match = None
        for member, value in enumerate(group):
            near = [(key, (other ^ value).bit_count()) for other, key in kept_hashes if (other ^ value).bit_count() <= 3]
            if near:
                match = (member, *near[0])
                break
        if match is None:
            kept_hashes.extend((value, f"{g}.{m}") for m, value in enumerate(group))
        expected.append(match)
    index = HashIndex(3, merge_every=50)
    got = []
    for start in range(0, len(groups), 32):
        chunk = groups[start : start + 32]
        got += index.dedup_batch(chunk, [[f"{start + g}.{m}" for m in range(len(group))] for g, group in enumerate(chunk)])
    assert got == expected
    assert sum(match is None for match in got) > 20 and sum(match is not None for match in got) > 20
