"""Sharded caches: every rank builds its shards (2 ranks write the 1-rank cache bit for bit), a killed extraction
resumes to the same cache encoding only what is missing, and caches are read memory-mapped."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("diffusers")
from scalegen.data import store  # noqa: E402
from scalegen.data.caches import LatentCache, cache_path, extract_latents  # noqa: E402
from scalegen.data.folder import ImageFolder  # noqa: E402
from scalegen.data.shards import TarShards, pack_folder  # noqa: E402
from scalegen.data.source import Subset  # noqa: E402
from scalegen.data.store import MANIFEST_FILE, CachedArrays, mapped_tensors, shard_name  # noqa: E402
from scalegen.errors import UserError  # noqa: E402
from scalegen.files import read_json  # noqa: E402
from scalegen.fingerprint import weights_fingerprint  # noqa: E402
from scalegen.tokenizers.sd_vae import load_sd_vae  # noqa: E402
from tests_support import TESTS, save_tiny_vae, torchrun, without_progress_bars, write_image_folder  # noqa: E402

SHARD_SIZE = 4  # 15 images: shards of 4, 4, 4 and 3
IMAGE_SIZE = 16


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return save_tiny_vae(root / "vae"), write_image_folder(root / "images")


def extract(sources, folder: Path) -> Path:
    vae, images = sources
    return extract_latents(load_sd_vae(vae), ImageFolder(images, IMAGE_SIZE), folder, batch_size=2,
                           shard_size=SHARD_SIZE)


def files_of(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


# The digests the loops gave before they were one (`fingerprint.state_digest`), for `digested_encoder()`: a cache's
# manifest recorded the first, so a cache made before must still be recognised as made by this encoder.
RECORDED_CACHE_DIGEST = "3881a32947dc54369276a786e40e3c9f85b74b053e60df9fa826b7257b90dcad"
RECORDED_FINGERPRINT = "7b12b8a741de6d63beb8c4b32a53ea8d58a841000c54176da49e0677d08db753"


def digested_encoder() -> torch.nn.Module:
    """A small encoder with exact weights (eighths), a float buffer and an integer one (BatchNorm's batch count)."""
    encoder = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    with torch.no_grad():
        for index, tensor in enumerate(encoder.state_dict().values()):
            tensor.copy_(torch.arange(tensor.numel()).reshape(tensor.shape) / 8 + index)
    return encoder


def test_the_weight_digests_are_the_ones_recorded_before_they_shared_a_loop():
    encoder = digested_encoder()
    assert store.weights_digest(encoder) == RECORDED_CACHE_DIGEST
    assert weights_fingerprint(encoder.state_dict()) == RECORDED_FINGERPRINT
    assert weights_fingerprint(encoder.half().state_dict()) == RECORDED_FINGERPRINT  # rounded to fp16 first


@pytest.mark.multiprocess
def test_two_ranks_write_the_one_rank_cache_bit_for_bit(sources, tmp_path):
    reference = extract(sources, tmp_path / "one")
    completed = torchrun(TESTS / "data" / "cache_worker.py", *map(str, sources), str(tmp_path / "two"), str(SHARD_SIZE),
                         str(tmp_path / "encoded"), timeout=300)
    assert completed.returncode == 0, without_progress_bars(completed.stderr)[-4000:]
    # Each rank encoded its own shards only (s ≡ rank mod 2), once.
    assert [read_json(tmp_path / "encoded" / f"rank-{rank}.json")["shards"] for rank in range(2)] == [
        [shard_name(0), shard_name(2)], [shard_name(1), shard_name(3)]]
    assert sorted(files_of(reference)) == [MANIFEST_FILE] + [shard_name(shard) for shard in range(4)]
    assert files_of(tmp_path / "two") == files_of(reference)
    cache = LatentCache(reference)
    assert len(cache) == 15 and read_json(reference / MANIFEST_FILE)["complete"]
    dataset = ImageFolder(sources[1], IMAGE_SIZE)
    for index in (0, 5, 14):  # items keep their data set's order and labels across the shards
        assert int(cache[(index, False)]["label"]) == int(dataset[(index, False)]["label"])


def test_a_killed_extraction_resumes_encoding_only_the_missing_shards(sources, tmp_path, monkeypatch):
    reference = extract(sources, tmp_path / "reference")
    encoded = []
    real_encode_shard = store.encode_shard

    def killed_after_two(dataset, encode, items, path, *args):
        if len(encoded) == 2:
            path.with_name(f".{path.name}.half-written").write_bytes(b"partial")  # what a kill mid-write leaves
            raise KeyboardInterrupt
        encoded.append(path.name)
        real_encode_shard(dataset, encode, items, path, *args)

    monkeypatch.setattr(store, "encode_shard", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        extract(sources, tmp_path / "cache")
    assert encoded == [shard_name(0), shard_name(1)] and not read_json(tmp_path / "cache" / MANIFEST_FILE)["complete"]
    with pytest.raises(UserError, match="not a complete scalegen cache"):
        CachedArrays(tmp_path / "cache")
    encoded.clear()
    monkeypatch.setattr(store, "encode_shard",
                        lambda *args: encoded.append(args[3].name) or real_encode_shard(*args))
    extract(sources, tmp_path / "cache")
    assert encoded == [shard_name(2), shard_name(3)]  # the finished shards were kept
    assert files_of(tmp_path / "cache") == files_of(reference)  # and the partial file is gone
    encoded.clear()
    extract(sources, tmp_path / "cache")
    assert encoded == []  # a complete cache is used as it is


def test_a_cache_is_extracted_from_tar_shards_as_from_the_folder(sources, tmp_path):
    vae, images = sources
    shards = TarShards(pack_folder(images, tmp_path / "shards" / "train", images_per_shard=4), IMAGE_SIZE)
    codec = load_sd_vae(vae)
    from_shards = LatentCache(extract_latents(codec, shards, tmp_path / "cache", batch_size=2, shard_size=SHARD_SIZE))
    from_folder = LatentCache(extract(sources, tmp_path / "reference"))
    assert len(from_shards) == len(shards) == 15
    folder = ImageFolder(images, IMAGE_SIZE)
    position = {folder[(index, False)]["image"].numpy().tobytes(): index for index in range(15)}
    matched = [position[shards[(index, False)]["image"].numpy().tobytes()] for index in range(15)]
    assert sorted(matched) == list(range(15))  # the same images, in the shards' (shuffled) order
    for index, source in enumerate(matched):  # with the same labels and latents (within batching's rounding)
        assert int(from_shards.arrays.row("labels", index)) == int(from_folder.arrays.row("labels", source))
        torch.testing.assert_close(from_shards.arrays.row("mean", index), from_folder.arrays.row("mean", source),
                                   atol=1e-3, rtol=1e-3)
    expected, _ = codec.encode_distribution(shards[(7, True)]["image"].unsqueeze(0))
    torch.testing.assert_close(from_shards.arrays.row("mean", 7, True).float(), expected[0], atol=2e-3, rtol=2e-3)


def test_a_cache_of_other_data_is_refused(sources, tmp_path):
    extract(sources, tmp_path / "cache")
    vae, images = sources
    with pytest.raises(UserError, match="move .* away to extract anew"):
        extract_latents(load_sd_vae(vae), Subset(ImageFolder(images, IMAGE_SIZE), 10),
                        tmp_path / "cache", batch_size=2, shard_size=SHARD_SIZE)


def test_unreadable_images_are_skipped_and_the_cache_keeps_each_item_s_index(sources, tmp_path):
    vae, images = sources
    (images / "class-1" / "2.png").write_bytes(b"not a png")
    try:
        with pytest.warns(UserWarning, match="skipping unreadable image"):
            folder = extract_latents(load_sd_vae(vae), ImageFolder(images, IMAGE_SIZE), tmp_path / "cache",
                                     batch_size=2, shard_size=SHARD_SIZE)
    finally:
        write_image_folder(images)  # the module's other tests share the folder
    arrays = CachedArrays(folder)
    assert len(arrays) == 14 and arrays.rows("indices", torch.arange(14)).tolist() == [*range(7), *range(8, 15)]


def resident_anonymous_megabytes() -> float:
    """This process's anonymous resident memory (its own, not the page cache's), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status here")


def test_caches_are_read_memory_mapped(tmp_path):
    items = 4096
    for shard in range(2):  # two shards of 64 MB
        save_file({"mean": torch.randn(items, 2, 4, 32, 32).half(), "std": torch.rand(items, 2, 4, 32, 32).half(),
                   "labels": torch.zeros(items, dtype=torch.long), "indices": torch.arange(items) + shard * items},
                  tmp_path / shard_name(shard))
    manifest = {"format": store.CACHE_FORMAT, "items": 2 * items, "shard_size": items, "description": "",
                "shards": [shard_name(0), shard_name(1)], "complete": True}
    store.write_json_atomic(tmp_path / MANIFEST_FILE, manifest)
    before = resident_anonymous_megabytes()
    cache = LatentCache(tmp_path)
    batch = [cache[(index, bool(index % 2))] for index in range(0, 2 * items, 97)]
    assert len(cache) == 2 * items and len(batch) == 85
    assert resident_anonymous_megabytes() - before < 16  # of 256 MB of cache
    on_device = LatentCache(tmp_path).to(torch.device("cpu"))  # --data-on-device: the cache in memory, one gather
    indices, flips = torch.tensor([1, 4097, 8191]), torch.tensor([True, False, True])
    torch.testing.assert_close(on_device.arrays.rows("mean", indices, flips), cache.arrays.rows("mean", indices, flips))


def test_the_mapped_reader_reads_what_safetensors_wrote(tmp_path):
    tensors = {"half": torch.randn(5, 2, 3).half(), "bf16": torch.randn(4).bfloat16(), "tokens": torch.arange(-6, 6,
               dtype=torch.int16).view(2, 2, 3), "labels": torch.arange(5), "flags": torch.tensor([True, False]),
               "bytes": torch.arange(7, dtype=torch.uint8), "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5)}
    save_file(tensors, tmp_path / "file.safetensors", metadata={"note": "kept aside"})
    mapped, loaded = mapped_tensors(tmp_path / "file.safetensors"), load_file(tmp_path / "file.safetensors")
    assert mapped.keys() == loaded.keys()
    for name, tensor in loaded.items():
        assert mapped[name].dtype == tensor.dtype and torch.equal(mapped[name], tensor), name
    (tmp_path / "broken.safetensors").write_bytes(b"\x05")
    with pytest.raises(UserError, match="cannot read the cache file"):
        mapped_tensors(tmp_path / "broken.safetensors")


def test_a_run_s_cache_of_the_earlier_one_file_format_is_read_as_it_is(tmp_path):
    earlier, folder = tmp_path / "latents.safetensors", tmp_path / "latents"
    assert cache_path(folder, earlier) == folder  # nothing yet: a sharded cache is made
    mean = torch.randn(6, 2, 4, 2, 2).half()
    save_file({"mean": mean, "std": torch.ones(6, 2, 4, 2, 2).half(), "labels": torch.arange(6) % 3}, earlier)
    assert cache_path(folder, earlier) == earlier
    cache = LatentCache(earlier)
    assert len(cache) == 6 and torch.equal(cache.arrays.row("mean", 4, True), mean[4, 1])
    assert torch.equal(cache.arrays.rows("indices", torch.arange(6)), torch.arange(6))  # its items, in order
