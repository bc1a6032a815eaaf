"""Benchmark: the at-scale data paths on this machine, extrapolated to ImageNet-1k on one 8-GPU node.

    python bench/scale.py [--images 512] [--image-size 128] [--cache-sizes 2000,8000,32000] [--steps 150] [--repeats 2]
                          [--gpu-tflops 100] [--skip PARTS] [--json bench/scale.json] [--work DIR]

1. Synthetic ImageNet-like data: a class folder of `--images` generated JPEGs (10 classes, sizes around
   `--image-size`, smooth colours and noise so they compress like photos), and the same packed as tar shards
   (`scalegen data pack`).
2. Extraction: a randomly initialised VAE of the SD-VAE architecture, built from a diffusers config (fewer channels, so
   it runs on the CPU), encodes every image and its mirror into a latent cache, with 1 rank (all threads; and one
   thread) and with 2 ranks of one thread each under torchrun, from the folder and from the shards: images/s.
3. Memory: latent caches of N images at 256 px (SD-VAE latents 4×32×32, mean and std in fp16, image and mirror:
   32 KB an image, as ImageNet's), N in `--cache-sizes`; a DiT trains `--steps` steps on each with 1 and with 2 ranks,
   each rank sampling its own resident memory: anonymous (its own) and file-backed (the cache's mapped pages, which
   the page cache holds once for all ranks of a machine). Beside it, the cache loaded into memory as the one-file
   LatentCache of earlier versions did (`load_file`).
4. Checkpoints: the training stall of a DiT-XL/2-sized checkpoint (model and EMA), sharded and written synchronously
   against asynchronously, and the one-file format (bench/checkpoint_stall.py).
5. The extrapolation to ImageNet-1k at 256 and 512 px on one 8-GPU node: memory per rank, disk, and the extraction's
   time from the SD-VAE encoder's FLOPs (counted here) at `--gpu-tflops` sustained per GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

BENCH = Path(__file__).parent
sys.path.insert(0, str(BENCH))

IMAGENET_TRAIN_IMAGES = 1_281_167
IMAGENET_CLASSES = 1000
GPUS_PER_NODE = 8
LATENT_CHANNELS, LATENT_DOWNSAMPLE = 4, 8
CACHE_BYTES_PER_VALUE = 2  # fp16
CACHE_COPIES = 2 * 2  # mean and std, image and mirror
CLASSES = 10
SAMPLE_SECONDS = 0.02  # how often a training rank samples its resident memory
SD_VAE_CONFIG = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)  # SD's VAE
SMALL_VAE_CONFIG = dict(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=16)  # CPU-sized
SHARD_IMAGES = 64  # images per tar shard of the synthetic data


def vae_config(sizes: dict) -> dict:
    """A diffusers AutoencoderKL config of the SD-VAE architecture (4 levels: 8× down, 4 latent channels)."""
    return dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=LATENT_CHANNELS, **sizes)


def make_vae(folder: Path) -> Path:
    """The CPU-sized random SD-VAE-architecture VAE, saved as a local `--vae` folder."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(**vae_config(SMALL_VAE_CONFIG)).save_pretrained(folder)
    return folder


def make_images(folder: Path, count: int, size: int) -> Path:
    """`count` synthetic JPEGs in 10 class folders: smooth colour fields with noise, of varied aspect ratios."""
    generator = np.random.default_rng(0)
    for index in range(count):
        label = index % CLASSES
        height, width = size + int(generator.integers(0, size // 2)), size + int(generator.integers(0, size // 2))
        rows, columns = np.mgrid[0:height, 0:width]
        base = np.stack([np.sin(rows / (7 + label) + channel) * np.cos(columns / (5 + channel + label))
                         for channel in range(3)], axis=-1)  # (H, W, 3)
        pixels = (base * 90 + 128 + generator.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
        (folder / f"class-{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"class-{label}" / f"{index:06d}.jpg", quality=90)
    return folder


def torchrun(ranks: int, arguments: list[str], threads: int) -> None:
    """Run this script's worker under torchrun with `ranks` processes of `threads` threads each."""
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               str(Path(__file__).resolve()), *arguments]
    completed = subprocess.run(command, env=environment, capture_output=True, text=True)
    if completed.returncode:
        raise SystemExit(f"worker failed: {' '.join(arguments)}\n{completed.stderr[-3000:]}")


def resident_memory() -> dict[str, int]:
    """This process's resident memory in bytes: anonymous (its own) and file-backed (mapped files)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


class PeakMemory:
    """Samples `resident_memory` in a thread and keeps each field's peak."""

    def __init__(self):
        self.peaks = resident_memory()
        self.running = True
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def watch(self) -> None:
        while self.running:
            for name, value in resident_memory().items():
                self.peaks[name] = max(self.peaks[name], value)
            time.sleep(SAMPLE_SECONDS)

    def stop(self) -> dict[str, int]:
        self.running = False
        self.thread.join()
        return self.peaks


# ----- workers (run under torchrun) -----

def extract_worker(data: str, vae: str, cache: str, image_size: int, result: str) -> None:
    """Every rank extracts its shards of the latent cache; rank 0 writes the images/s."""
    from scalegen.data.caches import extract_latents
    from scalegen.data.registry import open_source
    from scalegen.distributed import barrier, cleanup, setup_distributed
    from scalegen.tokenizers.sd_vae import load_sd_vae

    context = setup_distributed("cpu")
    dataset, codec = open_source(data, image_size), load_sd_vae(vae)
    barrier(context)
    started = time.perf_counter()
    extract_latents(codec, dataset, cache, batch_size=16, context=context, shard_size=SHARD_IMAGES)
    elapsed = time.perf_counter() - started
    if context.is_main:
        Path(result).write_text(json.dumps({"images": len(dataset), "seconds": elapsed,
                                            "images_per_second": len(dataset) / elapsed}))
    cleanup(context)


def train_worker(cache: str, vae: str, steps: int, in_memory: bool, result: str, run: str) -> None:
    """Train a small DiT on the cache for `steps` steps; every rank reports its peak resident memory."""
    import torch.distributed as dist

    from scalegen.data.caches import LatentCache
    from scalegen.distributed import setup_distributed
    from scalegen.models.dit import DiTConfig
    from scalegen.tokenizers.sd_vae import load_sd_vae
    from scalegen.train.dit_task import DiTTask
    from scalegen.train.trainer import TrainConfig, train

    watcher = PeakMemory()
    context = setup_distributed("cpu")
    dataset = LatentCache(cache)
    if in_memory:  # what the one-file LatentCache of earlier versions held: every tensor read into memory
        dataset.arrays.parts = [{name: tensor.clone() for name, tensor in part.items()}
                                for part in dataset.arrays.parts]
    size = len(dataset)
    model = DiTConfig(input_size=32, patch_size=4, in_channels=LATENT_CHANNELS, hidden_size=64, depth=2, num_heads=2,
                      num_classes=CLASSES)
    class WithoutGrid(DiTTask):
        def write_samples(self, model: torch.nn.Module, path: Path) -> None:
            """No sample grid: decoding one would dominate the peak this measures."""

    torch.manual_seed(0)
    task = WithoutGrid(model, load_sd_vae(vae), sample_steps=2)
    train(task, dataset, TrainConfig(out=run, steps=steps, batch_size=32 * context.world_size, log_every=50,
                                     checkpoint_every=10**9, device="cpu", precision="fp32", num_workers=0))
    peaks = watcher.stop()
    everyone = [None] * context.world_size
    if dist.is_initialized():
        dist.all_gather_object(everyone, peaks)
    else:
        everyone = [peaks]
    if context.rank == 0:
        Path(result).write_text(json.dumps({"items": size, "ranks": everyone}))


# ----- the benchmark -----

def write_cache(folder: Path, count: int) -> int:
    """A latent cache of `count` images at 256 px with random latents (what training reads does not depend on the
    encoder), written by `build_cache`; returns its size in bytes."""
    from scalegen.data.source import DataSource
    from scalegen.data.store import build_cache

    class Placeholders(DataSource):
        def __len__(self):
            return count

        def __getitem__(self, item):
            return {"image": torch.zeros(3, 1, 1), "label": torch.tensor(item[0] % CLASSES)}

    def random_latents(images: torch.Tensor) -> dict[str, torch.Tensor]:
        shape = (len(images), LATENT_CHANNELS, 32, 32)
        return {"mean": torch.randn(shape).half(), "std": torch.rand(shape).half()}

    torch.manual_seed(0)
    build_cache(Placeholders(), random_latents, folder, batch_size=512, device="cpu", description="cache",
                shard_size=2048)
    return sum(path.stat().st_size for path in folder.iterdir())


def disk_reads() -> int:
    """Bytes this process has read from storage (not from the page cache)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def evict(folder: Path) -> None:
    """Drop a folder's files from the page cache (their pages must not be mapped by anyone)."""
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def cold_reads(cache: Path, stride: int = 97) -> dict:
    """Storage bytes read for every `stride`-th item (image or mirror, mean and std) of a cache just evicted from the
    page cache: through safetensors' own memory map against the cache's reader (random access advised)."""
    import gc

    from safetensors import safe_open

    from scalegen.data.store import CachedArrays

    def safetensors_rows(cache: Path) -> CachedArrays:
        arrays = CachedArrays(cache)
        for number, name in enumerate(sorted(path.name for path in cache.glob("shard-*"))):
            with safe_open(cache / name, framework="pt") as handle:
                arrays.parts[number] = {key: handle.get_tensor(key) for key in handle.keys()}
        return arrays

    figures = {}
    for reader, arrays_of in (("safetensors", safetensors_rows), ("scalegen", CachedArrays)):
        gc.collect()
        evict(cache)
        arrays = arrays_of(cache)
        before = disk_reads()
        items = range(0, len(arrays), stride)
        for index in items:
            flip = index % 2 == 1
            arrays.row("mean", index, flip).float().sum() + arrays.row("std", index, flip).float().sum()
        figures[reader] = (disk_reads() - before) / len(items)
        del arrays
    item = 2 * 4 * 32 * 32 * CACHE_BYTES_PER_VALUE
    print(f"cold reads of {len(items)} random items ({item // 1024} KiB each: mean and std of an image or its mirror): "
          f"{figures['safetensors'] / 1024:.0f} KiB read from storage per item through safetensors' map, "
          f"{figures['scalegen'] / 1024:.0f} KiB through the cache's reader")
    return {"items": len(items), "item_bytes": item, "bytes_per_item": figures}


def sd_vae_gflops(image_size: int) -> float:
    """FLOPs (torch's counter: 2 per multiply-add) of the full SD-VAE encoder on one image, in GFLOPs."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    encoder = AutoencoderKL(**vae_config(SD_VAE_CONFIG)).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        encoder.encode(torch.zeros(1, 3, image_size, image_size))
    return counter.get_total_flops() / 1e9


def gib(count: float) -> str:
    return f"{count / 2**30:.2f} GiB"


def mib(count: float) -> str:
    return f"{count / 2**20:.0f} MiB"


def extraction(work: Path, images: int, image_size: int, repeats: int) -> list[dict]:
    """Images/s of latent extraction from the folder and the shards, with 1 and 2 ranks: the best of `repeats`
    interleaved rounds (the machine is shared; the best round is the least disturbed)."""
    from scalegen.data.shards import pack_folder

    folder = make_images(work / "images", images, image_size)
    shards = pack_folder(folder, work / "shards" / "train", images_per_shard=SHARD_IMAGES, seed=0)
    vae = make_vae(work / "vae")
    configurations = [(source, data, ranks, threads) for source, data in (("folder", folder), ("tar shards", shards))
                      for ranks, threads in ((1, os.cpu_count()), (1, 1), (2, 1))]
    rounds: dict[tuple, list[dict]] = {}
    for round_number in range(repeats):
        for source, data, ranks, threads in configurations:
            name = f"{source.replace(' ', '-')}-{ranks}x{threads}-{round_number}"
            result = work / f"{name}.json"
            torchrun(ranks, ["extract", str(data), str(vae), str(work / name), str(image_size), str(result)], threads)
            rounds.setdefault((source, ranks, threads), []).append(json.loads(result.read_text()))
    rows = []
    for (source, ranks, threads), figures in rounds.items():
        best = max(figures, key=lambda row: row["images_per_second"])
        rows.append({"source": source, "ranks": ranks, "threads": threads, **best,
                     "rounds": [row["images_per_second"] for row in figures]})
        measured = ", ".join(f"{row['images_per_second']:.1f}" for row in figures)
        print(f"extraction from {source}: {ranks} rank(s) × {threads} thread(s): {best['images_per_second']:.1f} "
              f"images/s, best of {measured} ({best['images']} images and their mirrors)")
    for source in ("folder", "tar shards"):
        speed = {(row["ranks"], row["threads"]): row["images_per_second"] for row in rows if row["source"] == source}
        cores = os.cpu_count()
        print(f"extraction from {source}: 2 ranks × 1 thread = {speed[2, 1] / speed[1, 1]:.2f}× one rank of one "
              f"thread, {speed[2, 1] / speed[1, cores]:.2f}× one rank of {cores} threads (goal ≥ 1.7×)")
    return rows


def memory(work: Path, sizes: list[int], steps: int) -> list[dict]:
    """Peak resident memory per training rank on caches of each size."""
    vae = work / "vae" if (work / "vae").exists() else make_vae(work / "vae")
    rows = []
    for count in sizes:
        cache = work / f"cache-{count}"
        cache_bytes = write_cache(cache, count)
        for ranks, in_memory in ((1, False), (2, False), (1, True)):
            name = f"train-{count}-{ranks}{'-in-memory' * in_memory}"
            result = work / f"{name}.json"
            torchrun(ranks, ["train", str(cache), str(vae), str(steps), str(int(in_memory)), str(result),
                             str(work / name)], threads=1)
            figures = json.loads(result.read_text())
            for rank, peaks in enumerate(figures["ranks"]):
                rows.append({"images": count, "cache_bytes": cache_bytes, "ranks": ranks, "rank": rank,
                             "in_memory": in_memory, "anonymous": peaks["RssAnon"], "mapped": peaks["RssFile"]})
                print(f"cache of {count:,} images ({mib(cache_bytes)}), {ranks} rank(s){', in memory' * in_memory}: "
                      f"rank {rank} peak {mib(peaks['RssAnon'])} anonymous + {mib(peaks['RssFile'])} mapped")
    return rows


def extrapolation(memory_rows: list[dict], extraction_rows: list[dict], gpu_tflops: float) -> list[dict]:
    """ImageNet-1k on one 8-GPU node, at 256 and 512 px: what the caches cost before and after."""
    sharded = [row for row in memory_rows if not row["in_memory"] and row["ranks"] == 1]
    smallest, largest = min(sharded, key=lambda row: row["images"]), max(sharded, key=lambda row: row["images"])
    growth = largest["anonymous"] - smallest["anonymous"]
    growth_per_image = max(0.0, growth / (largest["images"] - smallest["images"]))
    speedups = {row["source"]: row["images_per_second"] for row in extraction_rows if row["ranks"] == 2}
    baseline = {row["source"]: row["images_per_second"] for row in extraction_rows
                if row["ranks"] == 1 and row["threads"] == 1}
    scaling = min(speedups[source] / baseline[source] for source in speedups) / 2  # per-rank efficiency at 2 ranks
    rows = []
    for image_size in (256, 512):
        latent = image_size // LATENT_DOWNSAMPLE
        per_image = LATENT_CHANNELS * latent * latent * CACHE_BYTES_PER_VALUE * CACHE_COPIES
        cache = per_image * IMAGENET_TRAIN_IMAGES
        encoder_gflops = sd_vae_gflops(image_size)
        per_gpu_hour = 3600 * gpu_tflops * 1e12 / (encoder_gflops * 1e9) / 2  # images (each with its mirror)
        rows.append({
            "image_size": image_size, "cache_bytes_per_image": per_image, "cache_bytes": cache,
            "earlier_per_rank": cache, "earlier_per_node": cache * GPUS_PER_NODE, "earlier_rank0_writing": 2 * cache,
            "sharded_per_rank_own": smallest["anonymous"] + growth_per_image * IMAGENET_TRAIN_IMAGES,
            "sharded_page_cache_per_node": cache,
            "encoder_gflops": encoder_gflops, "images_per_gpu_hour": per_gpu_hour,
            "extraction_hours_one_gpu": IMAGENET_TRAIN_IMAGES / per_gpu_hour,
            "extraction_hours_node": IMAGENET_TRAIN_IMAGES / per_gpu_hour / (GPUS_PER_NODE * scaling),
            "rank_scaling": scaling,
        })
    return rows


def print_extrapolation(rows: list[dict], gpu_tflops: float) -> None:
    print(f"\nImageNet-1k ({IMAGENET_TRAIN_IMAGES:,} images) on one node of {GPUS_PER_NODE} GPUs, SD-VAE latents "
          f"(fp16 mean and std, image and mirror), encoder at {gpu_tflops:.0f} TFLOP/s sustained per GPU:")
    for row in rows:
        print(f"  {row['image_size']} px: cache {gib(row['cache_bytes'])} on disk "
              f"({row['cache_bytes_per_image'] / 1024:.0f} KiB an image). Earlier one-file cache: "
              f"{gib(row['earlier_per_rank'])} per rank, {gib(row['earlier_per_node'])} per node, "
              f"{gib(row['earlier_rank0_writing'])} in rank 0 while writing. Sharded and memory-mapped: "
              f"{gib(row['sharded_per_rank_own'])} of each rank's own memory, the cache's pages shared once per node "
              f"by the page cache (≤ {gib(row['sharded_page_cache_per_node'])}, evictable). Encoder "
              f"{row['encoder_gflops']:.0f} GFLOPs an image: {row['images_per_gpu_hour']:,.0f} images (with mirror) "
              f"per GPU-hour, so {row['extraction_hours_one_gpu']:.1f} h on rank 0 alone (earlier), "
              f"{row['extraction_hours_node'] * 60:.0f} min over {GPUS_PER_NODE} ranks "
              f"(at the measured 2-rank efficiency {row['rank_scaling']:.0%})")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "extract":
        return extract_worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6])
    if len(sys.argv) > 1 and sys.argv[1] == "train":
        return train_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), bool(int(sys.argv[5])), sys.argv[6],
                            sys.argv[7])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512, help="synthetic JPEGs for the extraction")
    parser.add_argument("--image-size", type=int, default=128, help="their size (the extraction's crop)")
    parser.add_argument("--cache-sizes", default="2000,8000,32000", help="images in each latent cache (256 px)")
    parser.add_argument("--steps", type=int, default=150, help="training steps on each cache")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds of the extraction (the best counts)")
    parser.add_argument("--gpu-tflops", type=float, default=100.0, help="sustained encoder TFLOP/s of one GPU")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: extraction,memory,checkpoint")
    parser.add_argument("--json", default=str(BENCH / "scale.json"), help="where to write the figures")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    with tempfile.TemporaryDirectory(prefix="scale-") as temporary:
        work = Path(args.work or temporary)
        work.mkdir(parents=True, exist_ok=True)
        print(f"machine: {os.cpu_count()} CPU(s), torch {torch.__version__}")
        figures: dict = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__}}
        figures["extraction"] = [] if "extraction" in skip else extraction(work, args.images, args.image_size,
                                                                            args.repeats)
        sizes = [int(size) for size in args.cache_sizes.split(",")]
        figures["memory"] = [] if "memory" in skip else memory(work, sizes, args.steps)
        if figures["memory"]:
            figures["cold_reads"] = cold_reads(work / f"cache-{max(sizes)}")
        if figures["memory"]:
            sharded = [row for row in figures["memory"] if not row["in_memory"]]
            for ranks in (1, 2):
                rows = [row for row in sharded if row["ranks"] == ranks]
                first, last = min(rows, key=lambda row: row["images"]), max(rows, key=lambda row: row["images"])
                growth = max(row["anonymous"] for row in rows if row["images"] == last["images"]) - \
                    max(row["anonymous"] for row in rows if row["images"] == first["images"])
                print(f"{ranks} rank(s): peak anonymous memory grows by {mib(growth)} from {first['images']:,} to "
                      f"{last['images']:,} images: {growth / last['cache_bytes']:.1%} of the cache's "
                      f"{mib(last['cache_bytes'])} (goal < 5 %)")
        if "checkpoint" not in skip:
            from checkpoint_stall import measure_checkpoint_stall, print_checkpoint_stall

            figures["checkpoint"] = measure_checkpoint_stall(work)
            print_checkpoint_stall(figures["checkpoint"])
        if figures["extraction"] and figures["memory"]:
            figures["extrapolation"] = extrapolation(figures["memory"], figures["extraction"], args.gpu_tflops)
            print_extrapolation(figures["extrapolation"], args.gpu_tflops)
        Path(args.json).write_text(json.dumps(figures, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
