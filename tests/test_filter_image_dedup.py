from __future__ import annotations

import io
import pickle
import random
from collections.abc import Callable
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image as PILImage
from PIL import ImageDraw, ImageEnhance, ImageFont

from curate.errors import UserError
from curate.hashindex import HashIndex
from curate.images import HASHES
from curate.recipe import _validate
from curate.sample import Image, ImagePart, Message, Sample, TextPart
from curate.stage import StageContext, Verdict
from curate.filters.image_dedup import ImageDedup

# --- real images: charts, text, noise --------------------------------------------------------------


def chart(seed: int) -> PILImage.Image:
    rng = random.Random(seed)
    image = PILImage.new("RGB", (192, 144), "white")
    draw = ImageDraw.Draw(image)
    bars = rng.randrange(3, 8)
    for k in range(bars):
        height = rng.randrange(10, 120)
        x = 12 + k * (170 // bars)
        draw.rectangle([x, 130 - height, x + 150 // bars, 130], fill=tuple(rng.randrange(256) for _ in range(3)))
    draw.line([8, 130, 186, 130], fill="black", width=2)
    return image


def text_image(seed: int) -> PILImage.Image:
    """A receipt-like page: a coloured header band and lines of large text at varying places."""
    rng = random.Random(seed)
    image = PILImage.new("RGB", (192, 144), (250, 250, 240))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, 192, rng.randrange(10, 50)], fill=tuple(rng.randrange(256) for _ in range(3)))
    font = ImageFont.load_default(size=rng.randrange(16, 26))
    for _ in range(rng.randrange(2, 5)):
        word = rng.choice(["TOTAL 42", "TAX 7%", "12.50", "COFFEE", "SUM 99"])
        draw.text((rng.randrange(0, 90), rng.randrange(20, 120)), word, fill=(0, 0, 0), font=font)
    return image


def noise(seed: int) -> PILImage.Image:
    coarse = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    return PILImage.fromarray(coarse).resize((192, 144), PILImage.Resampling.NEAREST)


PICTURES: list[Callable[[int], PILImage.Image]] = [chart, text_image, noise]


def encode(image: PILImage.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def sample(sample_id: str, *images: bytes) -> Sample:
    return Sample(sample_id, "t", [Message("user", [ImagePart(i) for i in range(len(images))] + [TextPart("q")])],
                  [Image(data) for data in images])


def stage(tmp_path: Path, **options: object) -> ImageDedup:
    dedup = ImageDedup(ImageDedup.Options(**options))
    dedup.setup(StageContext(tmp_path / "cache.sqlite", tmp_path))
    return dedup


NEAR_COPIES: dict[str, Callable[[PILImage.Image], bytes]] = {
    "recompressed": lambda im: encode(im, "JPEG", quality=55),
    "resized": lambda im: encode(im.resize((150, 112))),
    "upscaled": lambda im: encode(im.resize((384, 288), PILImage.Resampling.BICUBIC)),
    "brightened": lambda im: encode(ImageEnhance.Brightness(im).enhance(1.05)),
}


# --- the stage -----------------------------------------------------------------------------------


@pytest.mark.parametrize("copy", NEAR_COPIES.values(), ids=NEAR_COPIES.keys())
@pytest.mark.parametrize("picture", PICTURES, ids=[p.__name__ for p in PICTURES])
def test_near_copy_of_an_earlier_image_is_rejected_naming_it(tmp_path: Path, picture, copy) -> None:
    dedup = stage(tmp_path)
    original = picture(1)
    assert dedup.process([sample("first", encode(picture(2)), encode(original))])[0].keep
    verdict = dedup.process([sample("other", encode(picture(3))), sample("later", encode(picture(4)), copy(original))])
    assert verdict[0].keep
    assert (verdict[1].keep, verdict[1].reason) == (False, "duplicate_image")
    # This sample's image 1 against image 1 of the earlier sample, with the distance.
    distance = int(verdict[1].detail.split(" is ")[1].split(" bits")[0])
    assert verdict[1].detail == f"image 1 is {distance} bits from image 1 of sample first" and distance <= 4


@pytest.mark.parametrize("hash_kind", ["phash", "dhash", "ahash", "whash"])
def test_every_hash_kind_is_wired_end_to_end(tmp_path: Path, hash_kind: str) -> None:
    dedup = stage(tmp_path, hash=hash_kind)
    originals = [sample(f"{p.__name__}{seed}", encode(p(seed))) for p in PICTURES for seed in range(4)]
    assert [v.detail for v in dedup.process(originals)] == [""] * len(originals)
    assert originals[0].meta["image_dedup"]["hashes"] == [str(HASHES[hash_kind](chart(0)))]
    # Same pixels in other containers: different bytes, distance 0.
    copies = [sample(f"copy{k}", encode(p(seed), "BMP" if k % 2 else "WEBP", lossless=True))
              for k, (p, seed) in enumerate((p, seed) for p in PICTURES for seed in range(4))]
    assert [v.detail.split(" from ")[0] for v in dedup.process(copies)] == ["image 0 is 0 bits"] * len(copies)


def test_first_occurrence_kept_later_ones_rejected_within_and_across_batches(tmp_path: Path) -> None:
    dedup = stage(tmp_path)
    image = chart(7)
    first = dedup.process([sample("a", encode(image)), sample("b", encode(image, "JPEG", quality=80)),
                           sample("c", encode(chart(8)))])
    second = dedup.process([sample("d", encode(image.resize((100, 75))))])
    assert [v.keep for v in first + second] == [True, False, True, False]
    assert all(v.detail.endswith("from image 0 of sample a") for v in (first[1], second[0]))


def test_hashes_recorded_and_images_of_one_sample_never_match_each_other(tmp_path: Path) -> None:
    image, other = encode(text_image(3)), encode(noise(5))
    s = sample("s", image, image, other)
    assert stage(tmp_path).process([s])[0].keep
    hashes = s.meta["image_dedup"]["hashes"]
    assert s.meta["image_dedup"]["hash"] == "phash-8" and "undecodable" not in s.meta["image_dedup"]
    # Each image's 64-bit perceptual hash in hex, as imagehash computes it.
    expected = [str(imagehash.phash(PILImage.open(io.BytesIO(data)), hash_size=8)) for data in (image, image, other)]
    assert hashes == expected
    assert len(hashes[0]) == 16 and hashes[0] != hashes[2]


def test_undecodable_images_are_skipped_noted_and_kept(tmp_path: Path) -> None:
    dedup = stage(tmp_path)
    broken = sample("broken", b"not an image", encode(chart(1))[:300])
    assert dedup.process([broken])[0].keep
    assert broken.meta["image_dedup"]["undecodable"] == [0, 1] and broken.meta["image_dedup"]["hashes"] == [None, None]
    assert len(dedup.index) == 0
    mixed = sample("mixed", b"", encode(chart(1)))
    assert dedup.process([mixed])[0].keep and mixed.meta["image_dedup"]["undecodable"] == [0]
    verdict = dedup.process([sample("again", encode(chart(1)))])[0]
    assert verdict.detail == "image 0 is 0 bits from image 1 of sample mixed"


def test_samples_without_images_are_kept(tmp_path: Path) -> None:
    dedup = stage(tmp_path)
    empty = [Sample(f"t{i}", "t", [Message("user", [TextPart("no image")])]) for i in range(3)]
    assert all(v.keep for v in dedup.process(empty))


def test_rejected_duplicates_do_not_enter_the_index(tmp_path: Path) -> None:
    dedup = stage(tmp_path)
    verdicts = dedup.process([sample("a", encode(noise(4))), sample("b", encode(noise(4), "JPEG"))])
    assert [v.keep for v in verdicts] == [True, False] and len(dedup.index) == 1


def test_prepared_hashes_give_the_same_verdicts(tmp_path: Path) -> None:
    stream = [sample(f"s{i}", encode(chart(i % 4), "JPEG", quality=60 + i)) for i in range(8)]
    direct = stage(tmp_path).process(stream)
    prepared_stream = [sample(s.id, *(im.data for im in s.images)) for s in stream]
    ImageDedup().prepare(prepared_stream)  # as in a worker: an instance that was never set up
    assert prepared_stream[0].meta["image_dedup"]["hashes"] == stream[0].meta["image_dedup"]["hashes"]
    assert stage(tmp_path).process(prepared_stream) == direct


def test_state_dict_round_trip_continues_the_stream(tmp_path: Path) -> None:
    stream = [sample(f"s{i}", encode(PICTURES[i % 3](i % 7), "JPEG", quality=70 + i % 20)) for i in range(42)]
    whole = stage(tmp_path)
    expected = [whole.process(stream[i : i + 5]) for i in range(0, len(stream), 5)]
    first = stage(tmp_path)
    split = [first.process(stream[i : i + 5]) for i in range(0, 20, 5)]
    state = pickle.loads(pickle.dumps(first.state_dict()))  # as the executor saves it
    assert isinstance(state["hashes"], np.ndarray) and state["hashes"].dtype == np.uint64
    second = stage(tmp_path)
    second.load_state_dict(state)
    split += [second.process(stream[i : i + 5]) for i in range(20, len(stream), 5)]
    assert split == expected
    flat: list[Verdict] = [v for batch in expected for v in batch]
    assert sum(v.keep for v in flat) == 21 and any("of sample s" in v.detail for v in flat[20:])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"hash_size": 16}, "less than or equal to 8"),
        ({"hash_size": 4, "max_distance": 16}, "must be below the hash's 16 bits"),
        ({"hash": "whash", "hash_size": 6}, "whash needs a power of two"),
        ({"hash": "md5"}, "'phash', 'dhash', 'ahash' or 'whash'"),
    ],
)
def test_bad_options_fail_when_the_recipe_loads(options: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        _validate(ImageDedup.Options, options, "recipe.yaml: stage 'image_dedup'")


def test_small_hashes_work_end_to_end(tmp_path: Path) -> None:
    dedup = stage(tmp_path, hash_size=4, max_distance=1)
    verdicts = dedup.process([sample("a", encode(chart(1))), sample("b", encode(chart(1), "JPEG", quality=90))])
    assert [v.keep for v in verdicts] == [True, False] and verdicts[1].detail.endswith("of sample a")
    assert len(verdicts[1].detail) and len(dedup.index) == 1


# --- HashIndex against brute force ---------------------------------------------------------------


def flipped(rng: random.Random, value: int, bits: int, count: int) -> int:
    for bit in rng.sample(range(bits), count):
        value ^= 1 << bit
    return value


def brute_force_nearest(stored: list[int], value: int, max_distance: int) -> tuple[str, int] | None:
    for position, other in enumerate(stored):
        if (other ^ value).bit_count() <= max_distance:
            return str(position), (other ^ value).bit_count()
    return None


@pytest.mark.parametrize(("max_distance", "bits"),
                         [(0, 64), (1, 64), (2, 64), (3, 64), (4, 64), (8, 64), (3, 16), (10, 36)])
def test_hash_index_lookup_equals_brute_force(max_distance: int, bits: int) -> None:
    rng = random.Random(max_distance * 100 + bits)
    index = HashIndex(max_distance, bits=bits)
    stored: list[int] = []
    for _ in range(5):
        batch = [rng.getrandbits(bits) for _ in range(120)]
        index.add_many(batch, [str(len(stored) + k) for k in range(len(batch))])
        stored.extend(batch)
    queries = [rng.getrandbits(bits) for _ in range(200)]
    for base in stored[:150]:  # planted at exactly d and d + 1 bits
        queries += [flipped(rng, base, bits, max_distance), flipped(rng, base, bits, max_distance + 1)]
    expected = [brute_force_nearest(stored, value, max_distance) for value in queries]
    assert [index.nearest(value) for value in queries] == expected
    assert sum(match is not None for match in expected) >= 150  # the planted ones at distance d at least


def sequential_dedup(groups: list[list[int]], max_distance: int) -> list[tuple[int, str, int] | None]:
    """The definition: walk the groups in order, each against every hash of the earlier kept groups."""
    kept: list[tuple[int, str]] = []
    results: list[tuple[int, str, int] | None] = []
    for g, group in enumerate(groups):
        match = None
        for member, value in enumerate(group):
            near = [(key, (other ^ value).bit_count()) for other, key in kept
                    if (other ^ value).bit_count() <= max_distance]
            if near:
                match = (member, *near[0])
                break
        if match is None:
            kept.extend((value, f"{g}.{m}") for m, value in enumerate(group))
        results.append(match)
    return results


def clustered_groups(seed: int, count: int, max_distance: int) -> list[list[int]]:
    """Groups of 0-3 hashes drawn around a few centres: many near pairs at distances up to 2d + 1, and
    crowded buckets, so the index's tables overflow and are rebuilt along the way."""
    rng = random.Random(seed)
    centres = [rng.getrandbits(64) for _ in range(40)]
    def near_a_centre() -> int:
        return flipped(rng, rng.choice(centres), 64, rng.randrange(0, 2 * max_distance + 2))
    return [[near_a_centre() for _ in range(rng.randrange(0, 4))] for _ in range(count)]


@pytest.mark.parametrize("max_distance", [0, 2, 4])
def test_dedup_batch_equals_sequential_brute_force(max_distance: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rebuilds = []
    original = HashIndex._rebuilt
    monkeypatch.setattr(HashIndex, "_rebuilt", lambda self: rebuilds.append(1) or original(self))
    groups = clustered_groups(max_distance, 1500, max_distance)
    expected = sequential_dedup(groups, max_distance)
    index = HashIndex(max_distance)
    got: list[tuple[int, str, int] | None] = []
    for start in range(0, len(groups), 97):
        chunk = groups[start : start + 97]
        keys = [[f"{start + g}.{m}" for m in range(len(group))] for g, group in enumerate(chunk)]
        got += index.dedup_batch(chunk, keys)
    assert got == expected
    assert sum(match is None for match in got) > 20 and sum(match is not None for match in got) > 200
    assert len(rebuilds) > 1  # the first build plus at least one overflow
    assert len(index) == sum(len(group) for group, match in zip(groups, got) if match is None)


def test_hash_index_state_round_trip_drops_the_dead_and_continues_identically() -> None:
    groups = clustered_groups(11, 600, 4)
    keys = [[f"{g}.{m}" for m in range(len(group))] for g, group in enumerate(groups)]
    whole = HashIndex(4)
    expected = whole.dedup_batch(groups[:300], keys[:300]) + whole.dedup_batch(groups[300:], keys[300:])
    first = HashIndex(4)
    got = first.dedup_batch(groups[:300], keys[:300])
    state = first.state_dict()
    restored = HashIndex.from_state_dict(pickle.loads(pickle.dumps(state)))
    assert len(restored) == len(first) < len(state["keys"])  # the rejected groups' hashes are not restored
    got += restored.dedup_batch(groups[300:], keys[300:])
    assert got == expected


def test_empty_batches_and_empty_groups() -> None:
    index = HashIndex(4)
    assert index.dedup_batch([], []) == []
    assert index.dedup_batch([[], [5], []], [[], ["a"], []]) == [None, None, None]
    assert index.dedup_batch([[4]], [["b"]]) == [(0, "a", 1)]
    assert index.nearest(6) == ("a", 2) and index.nearest(2**64 - 1) is None
